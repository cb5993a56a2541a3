#pragma once
// Files and directories for checkpoints: an RAII file handle whose every operation either
// completes fully or throws Error(kIoError) naming the path, the operation and the OS error, and
// the few directory operations an atomic commit needs.
//
// Note [Durable commit]
// A file is durable once its data was written, fsync'd, renamed into place and its directory
// fsync'd: a crash before the rename leaves only a temporary name, after it the whole file.
// fastdcp commits a checkpoint by renaming its manifest into place this way, after every data
// file it names is durable (docs/format.md).

#include <limits.h>
#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace fastdcp {

// The most buffers one vectored system call takes here (IOV_MAX, capped).
inline constexpr size_t kMaxIovecs = IOV_MAX > 1024 ? 1024 : IOV_MAX;

class File {
 public:
  enum class Mode {
    kRead,
    kCreate,     // write-only; creates or truncates
    kCreateNew,  // write-only; fails if the file exists
  };
  struct Options {
    bool direct_io = false;  // O_DIRECT: offsets, sizes and buffers aligned to direct_io_alignment()
  };

  static File open(const std::string& path, Mode mode, Options options);
  static File open(const std::string& path, Mode mode) { return open(path, mode, Options{}); }

  File() = default;
  File(File&& other) noexcept;
  File& operator=(File&& other) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File();

  // Reads exactly `size` bytes at `offset`; a short file is an error naming how much was there.
  void read_at(void* data, size_t size, uint64_t offset) const;
  // Writes exactly `size` bytes at `offset` (retrying short writes; ENOSPC and EFBIG are errors
  // that say the disk or the file-size limit is full).
  void write_at(const void* data, size_t size, uint64_t offset) const;
  // The vectored forms: the buffers of `iov`, in order, from or to consecutive bytes at `offset`,
  // with the same guarantees and errors (up to kMaxIovecs buffers per system call).
  void read_vectored_at(std::vector<iovec> iov, uint64_t offset) const;
  void write_vectored_at(std::vector<iovec> iov, uint64_t offset) const;
  uint64_t size() const;
  void truncate(uint64_t size) const;
  // Reserves disk blocks for [0, size) (fallocate), so that later writes neither extend the file
  // nor run out of space halfway; a file system without fallocate is left as it is.
  void reserve(uint64_t size) const;
  void sync() const;  // fdatasync
  void close();       // reports a failing close; the destructor closes silently

  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  bool is_open() const { return fd_ >= 0; }

 private:
  friend class Directory;
  File(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  int fd_ = -1;
  std::string path_;
};

// The alignment O_DIRECT needs for files under `directory` (statx STATX_DIOALIGN where the kernel
// reports it, else 4096).
size_t direct_io_alignment(const std::string& directory);

bool path_exists(const std::string& path);
void create_directories(const std::string& path);
// fsyncs a directory, making renames and creations in it durable.
void sync_directory(const std::string& path);
// rename(2): atomic replacement of `to` on one file system.
void rename_path(const std::string& from, const std::string& to);
void remove_file(const std::string& path);  // a missing file is not an error
// Names of the entries of a directory (not . and ..).
std::vector<std::string> list_directory(const std::string& path);
std::string join_path(const std::string& directory, const std::string& name);

// Note [Files the writer creates]
// A checkpoint directory may be shared, and anyone may have put a file or a symbolic link in it
// under one of the names fastdcp writes. So a writer opens the directory once (following a link
// there: a directory the user linked is theirs to save into) and does everything relative to that
// descriptor: it creates each file new (O_CREAT|O_EXCL|O_NOFOLLOW), so that it never writes
// through a link or into a file someone else holds open; it commits by renaming a file it
// created; and it removes names with unlinkat, which removes a link itself, never its target,
// and leaves a directory of that name alone.
class DirectoryLock;

class Directory {
 public:
  // Opens `path`, a directory (a link to one is followed).
  static Directory open(const std::string& path);


  // A new file `name`, write-only: Error(kIoError) if anything (a link included) has that name.
  File create(const std::string& name, File::Options options = {}) const;
  // renameat(2) within this directory: atomically replaces `to` (a link named `to` is replaced,
  // not followed).
  void rename(const std::string& from, const std::string& to) const;
  // linkat(2) within this directory: gives the file `from` the name `to` too, atomically and only
  // if nothing has that name; Error(kAlreadyExists) if something (a link included) has it.
  void link_if_absent(const std::string& from, const std::string& to) const;
  // unlinkat(2): a link goes itself; a missing name, or a directory, is left as it is (false).
  bool remove(const std::string& name) const;
  // Whether something (a link included) has this name.
  bool contains(const std::string& name) const;
  std::vector<std::string> list() const;
  void sync() const;  // fsync: creations, renames and removals in it are durable
  // An exclusive claim (flock) on the file `name`, created if missing (never through a link), or
  // nothing if another open file description holds it; Error(kUnavailable) where the file system
  // has no flock (some network file systems). See DirectoryLock.
  std::optional<DirectoryLock> try_lock(const std::string& name) const;

  const std::string& path() const { return handle_.path(); }
  std::string path_of(const std::string& name) const { return join_path(path(), name); }

 private:
  explicit Directory(File handle) : handle_(std::move(handle)) {}
  File handle_;  // O_DIRECTORY, read-only
};

// Held from Directory::try_lock until destroyed, or until the process dies (the kernel releases a
// flock then, so a crashed holder never blocks the next one). Destruction removes the lock file
// before releasing it; a locker checks after its flock that the name still is the file it locked.
class DirectoryLock {
 public:
  DirectoryLock(DirectoryLock&&) noexcept = default;
  DirectoryLock& operator=(DirectoryLock&& other) noexcept;
  ~DirectoryLock() { release(); }

 private:
  void release() noexcept;
  friend class Directory;
  DirectoryLock(Directory directory, File file, std::string name)
      : directory_(std::move(directory)), file_(std::move(file)), name_(std::move(name)) {}
  Directory directory_;
  File file_;
  std::string name_;
};

}  // namespace fastdcp
