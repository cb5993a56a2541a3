// The `file` backend: a directory of files, written with io/file.h's POSIX code and durability
// rules (Note [Durable commit], Note [Files the writer creates]).

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <filesystem>

#include "fastdcp/common/error.h"
#include "fastdcp/io/file.h"
#include "storage/backends.h"

namespace fastdcp::storage {
namespace {

// Note [File store temporaries]
// A blob is written under a temporary name only this writer uses (a leading '.', which no blob
// name has, the process id and a counter), then synced and given its name: renamed for a plain
// commit, which replaces a blob (or a link) of that name; hard-linked for an if-absent commit,
// which fails if anything has the name, so that of racing writers, in any process, exactly one
// wins. The temporary name is removed either way, and the directory synced. A crash leaves at
// most a '.' name, which listing never shows.
std::string temporary_name(const std::string& name) {
  static std::atomic<uint64_t> counter{0};
  return "." + name + "." + std::to_string(::getpid()) + "." + std::to_string(counter++) + ".tmp";
}

// A crashed writer's temporary: the blob it was for ('.' name '.' pid '.' counter ".tmp", or an
// older ".<name>.tmp"), or "" for a name that is none.
std::string blob_of_temporary(const std::string& entry) {
  if (entry.size() < 6 || !entry.starts_with(".") || !entry.ends_with(".tmp")) return "";
  std::string inner = entry.substr(1, entry.size() - 5);
  const auto numeric_suffix = [&] {
    const size_t dot = inner.rfind('.');
    if (dot == std::string::npos || dot + 1 == inner.size()) return false;
    if (inner.find_first_not_of("0123456789", dot + 1) != std::string::npos) return false;
    inner.resize(dot);
    return true;
  };
  const std::string whole = inner;
  if (!(numeric_suffix() && numeric_suffix())) inner = whole;
  return inner;
}

class FileBlobWriter final : public BlobWriter {
 public:
  FileBlobWriter(std::shared_ptr<const Directory> directory, const std::string& spec, const std::string& name,
                 const WriteOptions& options)
      : BlobWriter(spec, name),
        directory_(std::move(directory)),
        temporary_(temporary_name(name)),
        if_absent_(options.if_absent),
        file_(create(*directory_, temporary_, options)) {}
  ~FileBlobWriter() override { abort(); }

  const File* file() const override { return &file_; }

 private:
  // The temporary, created new; an O_DIRECT open that fails (tmpfs) may have created it first.
  static File create(const Directory& directory, const std::string& temporary, const WriteOptions& options) {
    try {
      return directory.create(temporary, File::Options{.direct_io = options.direct_io});
    } catch (const Error&) {
      if (options.direct_io) {
        try {
          directory.remove(temporary);
        } catch (const Error&) {
          // a '.' name, never listed
        }
      }
      throw;
    }
  }

  void do_write_at(const void* data, size_t size, uint64_t offset) override { file_.write_at(data, size, offset); }

  void do_commit(uint64_t) override {
    file_.sync();
    file_.close();
    if (if_absent_) {
      try {
        directory_->link_if_absent(temporary_, name());
      } catch (const Error& e) {
        if (e.code() != ErrorCode::kAlreadyExists) throw;
        throw_blob_exists(store(), name());
      }
      directory_->remove(temporary_);
    } else {
      directory_->rename(temporary_, name());
    }
    directory_->sync();
  }

  void do_abort() noexcept override {
    file_ = File();
    try {
      directory_->remove(temporary_);
    } catch (const Error&) {
      // a temporary left behind has a '.' name: never listed, and named for who left it
    }
  }

  bool random_writes() const override { return true; }

  std::shared_ptr<const Directory> directory_;
  std::string temporary_;
  bool if_absent_;
  File file_;
};

struct FileMapping final : Mapping {
  ~FileMapping() override {
    if (size > 0) ::munmap(const_cast<std::byte*>(data), size);
  }
};

class FileBlobReader final : public BlobReader {
 public:
  FileBlobReader(const std::string& spec, const std::string& name, File file)
      : BlobReader(spec, name, file.size()), file_(std::move(file)) {}

  const File* file() const override { return &file_; }

 private:
  void do_read_at(void* data, size_t size, uint64_t offset) const override { file_.read_at(data, size, offset); }

  std::shared_ptr<const Mapping> do_map() const override {
    auto mapping = std::make_shared<FileMapping>();
    if (size() == 0) return mapping;
    void* base = ::mmap(nullptr, size(), PROT_READ, MAP_SHARED, file_.fd(), 0);
    if (base == MAP_FAILED) throw_system_error("cannot map '" + file_.path() + "'", errno);
    mapping->data = static_cast<const std::byte*>(base);
    mapping->size = size();
    return mapping;
  }

  File file_;
};

class FileStore final : public Store {
 public:
  FileStore(const std::string& path, const std::string& spec, const OpenOptions& options)
      : Store(spec), directory_(std::make_shared<const Directory>(open_directory(path, spec, options))) {}

  Capabilities capabilities() const override {
    return Capabilities{.random_writes = true,
                        .mmap = true,
                        .direct_io = true,
                        .direct_io_alignment = direct_io_alignment(directory_->path()),
                        .preferred_part_size = 0};
  }

 private:
  static Directory open_directory(const std::string& path, const std::string& spec, const OpenOptions& options) {
    if (options.create) create_directories(path);
    try {
      return Directory::open(path);
    } catch (const Error& e) {
      if (e.code() != ErrorCode::kNotFound) throw;
      throw Error(ErrorCode::kNotFound, "store '" + spec + "': the directory '" + path +
                                            "' does not exist; create it first");
    }
  }

  std::unique_ptr<BlobWriter> do_open_writer(const std::string& name, const WriteOptions& options) override {
    return std::make_unique<FileBlobWriter>(directory_, spec(), name, options);
  }

  std::unique_ptr<BlobReader> do_open_reader(const std::string& name) override {
    try {
      return std::make_unique<FileBlobReader>(spec(), name, File::open(directory_->path_of(name), File::Mode::kRead));
    } catch (const Error& e) {
      if (e.code() != ErrorCode::kNotFound) throw;
      throw_no_blob(spec(), name);
    }
  }

  // Files and links to them; not directories (which no writer of this store makes).
  std::vector<std::string> do_list() override {
    std::vector<std::string> names = directory_->list();
    std::erase_if(names, [&](const std::string& name) {
      std::error_code ec;
      return std::filesystem::is_directory(std::filesystem::status(directory_->path_of(name), ec));
    });
    return names;
  }

  void do_remove(const std::string& name) override {
    if (directory_->remove(name)) directory_->sync();  // nothing removed: nothing to make durable
  }

 public:
  void remove_leftovers(const std::function<bool(const std::string&)>& owned) override {
    for (const std::string& entry : directory_->list()) {
      const std::string blob = blob_of_temporary(entry);
      if (!blob.empty() && owned(blob)) directory_->remove(entry);  // a link goes itself; a directory stays
    }
  }

  std::shared_ptr<void> try_lock(const std::string& name) override {
    std::optional<DirectoryLock> lock = directory_->try_lock(name);
    if (!lock) return nullptr;
    return std::make_shared<DirectoryLock>(std::move(*lock));
  }

 private:

  std::shared_ptr<const Directory> directory_;
};

}  // namespace

std::shared_ptr<Store> open_file_store(const std::string& path, const std::string& spec, const OpenOptions& options) {
  return std::make_shared<FileStore>(path, spec, options);
}

}  // namespace fastdcp::storage
