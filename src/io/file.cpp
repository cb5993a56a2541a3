#include "fastdcp/io/file.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <memory>

#include "fastdcp/common/error.h"

namespace fastdcp {
namespace {

[[noreturn]] void fail(const char* operation, const std::string& path, int error) {
  std::string what = std::string(operation) + " '" + path + "'";
  if (error == ENOSPC) what += " (the disk is full)";
  if (error == EFBIG) what += " (the file-size limit was reached)";
  if (error == ENOENT) throw Error(ErrorCode::kNotFound, what + ": no such file or directory");
  throw_system_error(what, error);
}

}  // namespace

File File::open(const std::string& path, Mode mode, Options options) {
  int flags = O_CLOEXEC;
  switch (mode) {
    case Mode::kRead: flags |= O_RDONLY; break;
    case Mode::kCreate: flags |= O_WRONLY | O_CREAT | O_TRUNC; break;
    case Mode::kCreateNew: flags |= O_WRONLY | O_CREAT | O_EXCL; break;
  }
  if (options.direct_io) flags |= O_DIRECT;
  const int fd = ::open(path.c_str(), flags, 0644);
  if (fd < 0) fail(mode == Mode::kRead ? "cannot open" : "cannot create", path, errno);
  return File(fd, path);
}

File::File(File&& other) noexcept : fd_(other.fd_), path_(std::move(other.path_)) { other.fd_ = -1; }

File& File::operator=(File&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = other.fd_;
    path_ = std::move(other.path_);
    other.fd_ = -1;
  }
  return *this;
}

File::~File() {
  if (fd_ >= 0) ::close(fd_);
}

void File::read_at(void* data, size_t size, uint64_t offset) const {
  auto* p = static_cast<char*>(data);
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::pread(fd_, p + done, size - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("cannot read", path_, errno);
    }
    if (n == 0) {
      throw Error(ErrorCode::kDataLoss, "'" + path_ + "' is truncated: wanted " + std::to_string(size) +
                                            " bytes at offset " + std::to_string(offset) + ", the file ends after " +
                                            std::to_string(done));
    }
    done += static_cast<size_t>(n);
  }
}

void File::write_at(const void* data, size_t size, uint64_t offset) const {
  const auto* p = static_cast<const char*>(data);
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::pwrite(fd_, p + done, size - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("cannot write", path_, errno);
    }
    if (n == 0) fail("cannot write", path_, ENOSPC);
    done += static_cast<size_t>(n);
  }
}

uint64_t File::size() const {
  struct stat st{};
  if (::fstat(fd_, &st) != 0) fail("cannot stat", path_, errno);
  return static_cast<uint64_t>(st.st_size);
}

void File::truncate(uint64_t size) const {
  if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) fail("cannot resize", path_, errno);
}

void File::sync() const {
  if (::fdatasync(fd_) != 0) fail("cannot sync", path_, errno);
}

void File::close() {
  if (fd_ < 0) return;
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0 && errno != EINTR) fail("cannot close", path_, errno);
}

size_t direct_io_alignment(const std::string& directory) {
#if defined(STATX_DIOALIGN)
  struct statx stx{};
  if (::statx(AT_FDCWD, directory.c_str(), 0, STATX_DIOALIGN, &stx) == 0 && (stx.stx_mask & STATX_DIOALIGN) &&
      stx.stx_dio_offset_align > 0) {
    return std::max<size_t>({size_t{stx.stx_dio_offset_align}, size_t{stx.stx_dio_mem_align}, size_t{512}});
  }
#else
  (void)directory;
#endif
  return 4096;
}

bool path_exists(const std::string& path) {
  struct stat st{};
  return ::stat(path.c_str(), &st) == 0;
}

void create_directories(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (ec) throw Error(ErrorCode::kIoError, "cannot create directory '" + path + "': " + ec.message());
}

void sync_directory(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail("cannot open directory", path, errno);
  const int rc = ::fsync(fd);
  const int error = errno;
  ::close(fd);
  if (rc != 0) fail("cannot sync directory", path, error);
}

void rename_path(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) fail(("cannot rename to '" + to + "' from").c_str(), from, errno);
}

void remove_file(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) fail("cannot remove", path, errno);
}

std::vector<std::string> list_directory(const std::string& path) {
  std::unique_ptr<DIR, int (*)(DIR*)> dir(::opendir(path.c_str()), &::closedir);
  if (!dir) fail("cannot list directory", path, errno);
  std::vector<std::string> names;
  while (const dirent* entry = ::readdir(dir.get())) {
    const std::string name = entry->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  return names;
}

std::string join_path(const std::string& directory, const std::string& name) {
  if (directory.empty() || directory.back() == '/') return directory + name;
  return directory + "/" + name;
}

}  // namespace fastdcp
