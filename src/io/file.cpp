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
#include "io/file_error.h"

namespace fastdcp {
[[noreturn]] void throw_file_error(const char* operation, const std::string& path, int error) {
  std::string what = std::string(operation) + " '" + path + "'";
  if (error == ENOSPC) what += " (the disk is full)";
  if (error == EFBIG) what += " (the file-size limit was reached)";
  if (error == ENOENT) throw Error(ErrorCode::kNotFound, what + ": no such file or directory");
  throw_system_error(what, error);
}

File File::open(const std::string& path, Mode mode, Options options) {
  int flags = O_CLOEXEC;
  switch (mode) {
    case Mode::kRead: flags |= O_RDONLY; break;
    case Mode::kCreate: flags |= O_WRONLY | O_CREAT | O_TRUNC; break;
    case Mode::kCreateNew: flags |= O_WRONLY | O_CREAT | O_EXCL; break;
  }
  if (options.direct_io) flags |= O_DIRECT;
  const int fd = ::open(path.c_str(), flags, 0644);
  if (fd < 0) throw_file_error(mode == Mode::kRead ? "cannot open" : "cannot create", path, errno);
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

namespace {

// Moves all of `iov` with preadv/pwritev, retrying short transfers and EINTR.
void transfer(int fd, const std::string& path, bool write, std::vector<iovec> iov, uint64_t offset) {
  const uint64_t start = offset;
  uint64_t wanted = 0;
  for (const iovec& v : iov) wanted += v.iov_len;
  size_t first = 0;
  while (first < iov.size()) {
    if (iov[first].iov_len == 0) {
      ++first;
      continue;
    }
    const int count = static_cast<int>(std::min(iov.size() - first, kMaxIovecs));
    const ssize_t n = write ? ::pwritev(fd, iov.data() + first, count, static_cast<off_t>(offset))
                            : ::preadv(fd, iov.data() + first, count, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_file_error(write ? "cannot write" : "cannot read", path, errno);
    }
    if (n == 0) {
      if (write) throw_file_error("cannot write", path, ENOSPC);
      throw Error(ErrorCode::kDataLoss, "'" + path + "' is truncated: it ends at byte " + std::to_string(offset) +
                                            ", and " + std::to_string(wanted) + " bytes were wanted from byte " +
                                            std::to_string(start));
    }
    offset += static_cast<uint64_t>(n);
    // Skip what moved: whole buffers, then part of the next.
    for (size_t done = static_cast<size_t>(n); done > 0;) {
      if (done >= iov[first].iov_len) {
        done -= iov[first].iov_len;
        ++first;
      } else {
        iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + done;
        iov[first].iov_len -= done;
        done = 0;
      }
    }
  }
}

}  // namespace

void File::read_at(void* data, size_t size, uint64_t offset) const {
  transfer(fd_, path_, false, {iovec{data, size}}, offset);
}

void File::write_at(const void* data, size_t size, uint64_t offset) const {
  transfer(fd_, path_, true, {iovec{const_cast<void*>(data), size}}, offset);
}

void File::read_vectored_at(std::vector<iovec> iov, uint64_t offset) const {
  transfer(fd_, path_, false, std::move(iov), offset);
}

void File::write_vectored_at(std::vector<iovec> iov, uint64_t offset) const {
  transfer(fd_, path_, true, std::move(iov), offset);
}

uint64_t File::size() const {
  struct stat st{};
  if (::fstat(fd_, &st) != 0) throw_file_error("cannot stat", path_, errno);
  return static_cast<uint64_t>(st.st_size);
}

void File::truncate(uint64_t size) const {
  if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) throw_file_error("cannot resize", path_, errno);
}

void File::reserve(uint64_t size) const {
  if (size == 0) return;
  if (::fallocate(fd_, 0, 0, static_cast<off_t>(size)) != 0 && errno != EOPNOTSUPP && errno != ENOSYS) {
    throw_file_error("cannot reserve space for", path_, errno);
  }
}

void File::sync() const {
  if (::fdatasync(fd_) != 0) throw_file_error("cannot sync", path_, errno);
}

void File::close() {
  if (fd_ < 0) return;
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0 && errno != EINTR) throw_file_error("cannot close", path_, errno);
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
  if (ec) throw Error(ErrorCode::kIoError, "cannot create directory '" + path + "': " + ec.message(), ec.value());
}

void sync_directory(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw_file_error("cannot open directory", path, errno);
  const int rc = ::fsync(fd);
  const int error = errno;
  ::close(fd);
  if (rc != 0) throw_file_error("cannot sync directory", path, error);
}

void rename_path(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) throw_file_error(("cannot rename to '" + to + "' from").c_str(), from, errno);
}

void remove_file(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) throw_file_error("cannot remove", path, errno);
}

std::vector<std::string> list_directory(const std::string& path) {
  std::unique_ptr<DIR, int (*)(DIR*)> dir(::opendir(path.c_str()), &::closedir);
  if (!dir) throw_file_error("cannot list directory", path, errno);
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
