#include "fastdcp/io/file.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <memory>

#include "fastdcp/common/error.h"
#include "fastdcp/common/fault.h"
#include "io/file_error.h"

namespace fastdcp {
[[noreturn]] void throw_file_error(const char* operation, const std::string& path, int error) {
  throw_file_error(operation, path, nullptr, error);
}

[[noreturn]] void throw_file_error(const char* operation, const std::string& path, const char* call, int error) {
  std::string what = std::string(operation) + " '" + path + "'";
  if (error == ENOSPC) what += " (the disk is full)";
  if (error == EFBIG) what += " (the file-size limit was reached)";
  if (error == ELOOP) what += " (it is a symbolic link, which fastdcp does not write through)";
  if (call) what += std::string(": ") + call;
  if (error == ENOENT) throw Error(ErrorCode::kNotFound, what + ": no such file or directory");
  throw_system_error(what, error);
}

namespace {

// Makes a system call unless a test injected its failure (Note [Fault injection]): then returns
// -1 with errno set, as the call would.
template <class Call>
auto guarded(const char* name, Call call) -> decltype(call()) {
  if (const int error = fault::injected(name)) {
    errno = error;
    return -1;
  }
  return call();
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
  const int fd = guarded("open", [&] { return ::open(path.c_str(), flags, 0644); });
  if (fd < 0) throw_file_error(mode == Mode::kRead ? "cannot open" : "cannot create", path, "open", errno);
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
    const char* call = write ? "pwritev" : "preadv";
    const ssize_t n = guarded(call, [&] {
      return write ? ::pwritev(fd, iov.data() + first, count, static_cast<off_t>(offset))
                   : ::preadv(fd, iov.data() + first, count, static_cast<off_t>(offset));
    });
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_file_error(write ? "cannot write" : "cannot read", path, call, errno);
    }
    if (n == 0) {
      if (write) throw_file_error("cannot write", path, call, ENOSPC);
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
  if (guarded("fstat", [&] { return ::fstat(fd_, &st); }) != 0) throw_file_error("cannot stat", path_, "fstat", errno);
  return static_cast<uint64_t>(st.st_size);
}

void File::truncate(uint64_t size) const {
  if (guarded("ftruncate", [&] { return ::ftruncate(fd_, static_cast<off_t>(size)); }) != 0) {
    throw_file_error("cannot resize", path_, "ftruncate", errno);
  }
}

void File::reserve(uint64_t size) const {
  if (size == 0) return;
  if (guarded("fallocate", [&] { return ::fallocate(fd_, 0, 0, static_cast<off_t>(size)); }) != 0 &&
      errno != EOPNOTSUPP && errno != ENOSYS) {
    throw_file_error("cannot reserve space for", path_, "fallocate", errno);
  }
}

void File::sync() const {
  if (guarded("fdatasync", [&] { return ::fdatasync(fd_); }) != 0) {
    throw_file_error("cannot sync", path_, "fdatasync", errno);
  }
}

void File::close() {
  if (fd_ < 0) return;
  const int fd = fd_;
  fd_ = -1;
  if (const int error = fault::injected("close")) {
    ::close(fd);  // released all the same, as a failing close does
    throw_file_error("cannot close", path_, "close", error);
  }
  if (::close(fd) != 0 && errno != EINTR) throw_file_error("cannot close", path_, "close", errno);
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
  Directory::open(path).sync();
}

void rename_path(const std::string& from, const std::string& to) {
  if (guarded("rename", [&] { return ::rename(from.c_str(), to.c_str()); }) != 0) {
    throw_file_error(("cannot rename to '" + to + "' from").c_str(), from, "rename", errno);
  }
}

void remove_file(const std::string& path) {
  if (guarded("unlink", [&] { return ::unlink(path.c_str()); }) != 0 && errno != ENOENT) {
    throw_file_error("cannot remove", path, "unlink", errno);
  }
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

Directory Directory::open(const std::string& path) {
  const int fd = guarded("open", [&] { return ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); });
  if (fd < 0) throw_file_error("cannot open directory", path, "open", errno);
  return Directory(File(fd, path));
}

File Directory::create(const std::string& name, File::Options options) const {
  int flags = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC;
  if (options.direct_io) flags |= O_DIRECT;
  const int fd = guarded("openat", [&] { return ::openat(handle_.fd(), name.c_str(), flags, 0644); });
  if (fd < 0) throw_file_error("cannot create", path_of(name), "openat", errno);
  return File(fd, path_of(name));
}

void Directory::rename(const std::string& from, const std::string& to) const {
  if (guarded("renameat", [&] { return ::renameat(handle_.fd(), from.c_str(), handle_.fd(), to.c_str()); }) != 0) {
    throw_file_error(("cannot rename to '" + path_of(to) + "' from").c_str(), path_of(from), "renameat", errno);
  }
}

void Directory::link_if_absent(const std::string& from, const std::string& to) const {
  if (guarded("linkat", [&] { return ::linkat(handle_.fd(), from.c_str(), handle_.fd(), to.c_str(), 0); }) != 0) {
    if (errno == EEXIST) throw Error(ErrorCode::kAlreadyExists, "'" + path_of(to) + "' already exists", EEXIST);
    throw_file_error(("cannot link '" + path_of(to) + "' to").c_str(), path_of(from), "linkat", errno);
  }
}

bool Directory::remove(const std::string& name) const {
  if (guarded("unlinkat", [&] { return ::unlinkat(handle_.fd(), name.c_str(), 0); }) == 0) return true;
  if (errno != ENOENT && errno != EISDIR) throw_file_error("cannot remove", path_of(name), "unlinkat", errno);
  return false;
}

bool Directory::contains(const std::string& name) const {
  struct stat st{};
  return ::fstatat(handle_.fd(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0;
}

std::vector<std::string> Directory::list() const {
  // fdopendir takes the descriptor it is given: a duplicate, opened at the start.
  const int fd = guarded("openat", [&] { return ::openat(handle_.fd(), ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC); });
  if (fd < 0) throw_file_error("cannot list directory", path(), "openat", errno);
  std::unique_ptr<DIR, int (*)(DIR*)> dir(::fdopendir(fd), &::closedir);
  if (!dir) {
    const int error = errno;
    ::close(fd);
    throw_file_error("cannot list directory", path(), "fdopendir", error);
  }
  std::vector<std::string> names;
  while (const dirent* entry = ::readdir(dir.get())) {
    const std::string name = entry->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  return names;
}

void Directory::sync() const {
  if (guarded("fsync", [&] { return ::fsync(handle_.fd()); }) != 0) {
    throw_file_error("cannot sync directory", path(), "fsync", errno);
  }
}

std::optional<DirectoryLock> Directory::try_lock(const std::string& name) const {
  for (;;) {
    const int fd = guarded("openat", [&] {
      return ::openat(handle_.fd(), name.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
    });
    if (fd < 0) throw_file_error("cannot create the lock file", path_of(name), "openat", errno);
    File file(fd, path_of(name));
    if (guarded("flock", [&] { return ::flock(fd, LOCK_EX | LOCK_NB); }) != 0) {
      const int error = errno;
      if (error == EWOULDBLOCK) return std::nullopt;
      if (error == ENOLCK || error == EOPNOTSUPP || error == ENOSYS) {
        throw Error(ErrorCode::kUnavailable, "the file system of '" + path() + "' has no flock (" +
                                                 std::strerror(error) + ")");
      }
      throw_file_error("cannot lock", path_of(name), "flock", error);
    }
    // The holder before us may have removed the name before releasing the file we locked: then
    // ours is not the lock, the file now under that name (or none) is.
    struct stat locked{};
    struct stat named{};
    if (::fstat(fd, &locked) != 0) throw_file_error("cannot stat", path_of(name), "fstat", errno);
    if (::fstatat(handle_.fd(), name.c_str(), &named, AT_SYMLINK_NOFOLLOW) == 0 && named.st_ino == locked.st_ino &&
        named.st_dev == locked.st_dev) {
      const int copy = ::fcntl(handle_.fd(), F_DUPFD_CLOEXEC, 0);
      if (copy < 0) throw_file_error("cannot duplicate the descriptor of", path(), "fcntl", errno);
      return DirectoryLock(Directory(File(copy, path())), std::move(file), name);
    }
  }
}

DirectoryLock& DirectoryLock::operator=(DirectoryLock&& other) noexcept {
  if (this != &other) {
    release();
    directory_ = std::move(other.directory_);
    file_ = std::move(other.file_);
    name_ = std::move(other.name_);
  }
  return *this;
}

void DirectoryLock::release() noexcept {
  if (!file_.is_open()) return;  // moved from
  try {
    directory_.remove(name_);  // while still held: see Directory::try_lock
  } catch (const Error&) {
    // a lock file left behind is locked and reused by the next holder
  }
  file_ = File();  // closing it releases the lock
}

std::string join_path(const std::string& directory, const std::string& name) {
  if (directory.empty() || directory.back() == '/') return directory + name;
  return directory + "/" + name;
}

}  // namespace fastdcp
