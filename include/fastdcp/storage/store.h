#pragma once
// Stores: where checkpoints live, behind one interface. A Store is opened from a URL-like spec
// through a registry of schemes and holds named blobs, written whole by a BlobWriter and read by
// a BlobReader.
//
// Note [Stores]
// A blob becomes visible only when its writer commits, and then whole: a writer that is
// destroyed or aborted before committing leaves nothing under its name, and a reader sees the
// bytes of one commit (a blob committed again replaces it for later readers, not for readers
// already open). A writer created with `if_absent` commits only if no blob has its name: of any
// number of racing commits (threads or processes) exactly one wins, and the others fail with
// Error(kAlreadyExists). That is the checkpoint commit: the manifest is put if absent after the
// files it names are committed. A commit is durable when it returns (the `file` backend syncs the
// file and its directory: Note [Durable commit]).
//
// Blob names are flat: non-empty, without '/' or NUL, and not starting with '.', which the
// backends keep for their own temporary names, which listing never shows (nor, for `file`,
// directories).
//
// Specs: "file:///abs/dir" or a plain path (relative to the working directory) is the `file`
// backend over a directory; "mem://name" is the in-process store `name`, shared by every open of
// that spec in the process; "shm://name" is a store shared by the processes of a node (Note [Shared
// memory stores]). Names may contain '/' ("mem://job/step10"). register_store_scheme adds others.
//
// Note [Shared memory stores]
// shm://name is the `file` backend over the tmpfs directory /dev/shm/fastdcp/name (created on
// open for writing), not a new format over shm_open segments: tmpfs is the memory POSIX shared
// memory lives in anyway, and a directory of it gets, from the code that serves disks, atomic
// renames and links for the commit between processes, flock for the one-writer lock, mmap, and
// leftovers that a crash leaves under '.' names only; its blobs go when removed (or at reboot).

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace fastdcp {
class File;
}

namespace fastdcp::storage {

struct Capabilities {
  bool random_writes = false;        // BlobWriter::write_at at any offset, not only appends
  bool mmap = false;                 // BlobReader::map maps the blob without copying it
  bool direct_io = false;            // WriteOptions::direct_io is honoured
  size_t direct_io_alignment = 0;    // offsets, sizes and buffers of direct I/O align to this
  uint64_t preferred_part_size = 0;  // the write size the backend prefers; 0: any
  bool shared_between_processes = true;  // another process opening the spec sees the same blobs
};

struct OpenOptions {
  bool create = false;  // create what the store needs to exist (the `file` directory and its parents)
};

struct WriteOptions {
  bool if_absent = false;  // commit fails with kAlreadyExists if the name is taken
  bool direct_io = false;  // see Capabilities::direct_io (ignored where the backend has none)
};

// Writes one blob; see Note [Stores]. Not thread-safe: one thread writes a blob at a time.
class BlobWriter {
 public:
  virtual ~BlobWriter() = default;  // a writer not committed aborts (and reports nothing)
  BlobWriter(const BlobWriter&) = delete;
  BlobWriter& operator=(const BlobWriter&) = delete;

  // Appends `size` bytes after the furthest byte written so far.
  void append(const void* data, size_t size);
  // Writes `size` bytes at `offset` (a gap reads as zeros); Error(kFailedPrecondition) where the
  // backend has no random writes.
  void write_at(const void* data, size_t size, uint64_t offset);
  uint64_t size() const { return size_; }
  // Makes the blob durable and visible under its name (see WriteOptions::if_absent). After a
  // failed write or commit nothing is visible and the writer is spent (kFailedPrecondition).
  void commit();
  // Drops what was written; nothing becomes visible.
  void abort() noexcept;

  const std::string& name() const { return name_; }
  // The POSIX file being written, for the file backend's own I/O engines (O_DIRECT windows,
  // io_uring, writeback and page-cache advice: rank_file_io.h); nullptr for other backends. Its
  // bytes count for commit like those written here; size() does not see them.
  virtual const File* file() const { return nullptr; }

 protected:
  BlobWriter(std::string store, std::string name) : store_(std::move(store)), name_(std::move(name)) {}
  virtual void do_write_at(const void* data, size_t size, uint64_t offset) = 0;
  virtual void do_commit(uint64_t size) = 0;
  virtual void do_abort() noexcept = 0;
  virtual bool random_writes() const = 0;
  const std::string& store() const { return store_; }

 private:
  void check_open(const char* operation) const;
  // Runs `work`; if it throws, aborts (a blob with a failed write is never committed) and rethrows.
  template <class Work>
  void spend_on_failure(Work work);
  std::string store_;
  std::string name_;
  uint64_t size_ = 0;
  bool done_ = false;
};

// A blob's bytes, mapped or held in memory; they stay valid while the Mapping lives.
struct Mapping {
  virtual ~Mapping() = default;
  const std::byte* data = nullptr;
  size_t size = 0;
};

// Reads one committed blob. Thread-safe: reads at different offsets may run concurrently.
class BlobReader {
 public:
  virtual ~BlobReader() = default;
  BlobReader(const BlobReader&) = delete;
  BlobReader& operator=(const BlobReader&) = delete;

  uint64_t size() const { return size_; }
  // Reads exactly `size` bytes at `offset`; bytes past the end are Error(kDataLoss) naming the
  // store, the blob, its size and the range wanted.
  void read_at(void* data, size_t size, uint64_t offset) const;
  // The whole blob without a copy; Error(kUnavailable) where Capabilities::mmap is false.
  std::shared_ptr<const Mapping> map() const;

  const std::string& name() const { return name_; }
  // The POSIX file read, for the file backend's engines (O_DIRECT, io_uring, copy-on-write
  // mappings); nullptr for other backends.
  virtual const File* file() const { return nullptr; }

 protected:
  BlobReader(std::string store, std::string name, uint64_t size)
      : store_(std::move(store)), name_(std::move(name)), size_(size) {}
  virtual void do_read_at(void* data, size_t size, uint64_t offset) const = 0;
  virtual std::shared_ptr<const Mapping> do_map() const;

 private:
  std::string store_;
  std::string name_;
  uint64_t size_;
};

class Store {
 public:
  virtual ~Store() = default;
  // The spec it was opened from, as errors name it ("file:///ckpt/step_10", "mem://a").
  const std::string& spec() const { return spec_; }
  virtual Capabilities capabilities() const = 0;

  std::unique_ptr<BlobWriter> open_writer(const std::string& name, const WriteOptions& options = {});
  // Error(kNotFound) naming the store and the blob if none is committed under `name`.
  std::unique_ptr<BlobReader> open_reader(const std::string& name);
  // Writes and commits `size` bytes under `name` if no blob has it (else Error(kAlreadyExists)).
  void put_if_absent(const std::string& name, const void* data, size_t size);
  // The names of committed blobs that start with `prefix`, sorted.
  std::vector<std::string> list(const std::string& prefix = "");
  // Removes the blob `name` durably; a missing one is not an error.
  void remove(const std::string& name);
  // Removes what crashed writers left of the blobs for which `owned(blob name)` holds (the file
  // backend's '.' temporaries; nothing elsewhere). Never follows a link.
  virtual void remove_leftovers(const std::function<bool(const std::string&)>& owned) { (void)owned; }
  // An exclusive claim on `name` among everyone who opens this store (threads and, where the store
  // is shared, processes), held until the returned token is destroyed or its process dies; nullptr
  // if someone holds it. Error(kUnavailable) where the backend cannot lock (a file system without
  // flock). `name` may be a blob name the store shows in listings (the file backend's lock file).
  virtual std::shared_ptr<void> try_lock(const std::string& name) = 0;

 protected:
  explicit Store(std::string spec) : spec_(std::move(spec)) {}
  virtual std::unique_ptr<BlobWriter> do_open_writer(const std::string& name, const WriteOptions& options) = 0;
  virtual std::unique_ptr<BlobReader> do_open_reader(const std::string& name) = 0;
  virtual std::vector<std::string> do_list() = 0;  // every name, unsorted; '.' names are dropped
  virtual void do_remove(const std::string& name) = 0;

 private:
  void check_name(const std::string& name) const;
  std::string spec_;
};

// Opens the store a spec names (see Note [Stores]); Error(kInvalidArgument) for a malformed spec
// or an unknown scheme (naming the known ones), the backend's errors for a store it cannot open.
std::shared_ptr<Store> open_store(const std::string& spec, const OpenOptions& options = {});

// Error(kInvalidArgument) naming the spec and the fix unless another process of this node opening
// `spec` sees the same blobs (Capabilities::shared_between_processes); `who` names that process
// ("the writer process"). A spec whose store does not open passes (a directory to be created):
// the writer reports what keeps it from opening the store.
void require_shared_between_processes(const std::string& spec, const std::string& who);

// Makes open_store hand "<scheme>://<rest>" to `factory(rest, spec, options)`; replaces an earlier
// registration of the scheme.
using StoreFactory =
    std::function<std::shared_ptr<Store>(const std::string& rest, const std::string& spec, const OpenOptions& options)>;
void register_store_scheme(const std::string& scheme, StoreFactory factory);

}  // namespace fastdcp::storage
