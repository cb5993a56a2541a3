// The `mem` backend: named stores in this process's memory, for tests and for checkpoints that
// need not outlive the process.

#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string_view>
#include <vector>

#include "fastdcp/common/error.h"
#include "storage/backends.h"

namespace fastdcp::storage {
namespace {

// A committed blob's bytes never change: a commit swaps in a new Bytes, and readers and mappings
// keep the one they opened.
using Bytes = std::vector<std::byte>;

// The blobs of one named store, shared by every open of "mem://<name>".
struct Blobs {
  std::mutex mutex;
  std::map<std::string, std::shared_ptr<const Bytes>, std::less<>> by_name;
  std::set<std::string, std::less<>> locked;
};

class MemoryBlobWriter final : public BlobWriter {
 public:
  MemoryBlobWriter(std::shared_ptr<Blobs> blobs, const std::string& spec, const std::string& name, bool if_absent)
      : BlobWriter(spec, name), blobs_(std::move(blobs)), if_absent_(if_absent) {}
  ~MemoryBlobWriter() override { abort(); }

 private:
  void do_write_at(const void* data, size_t size, uint64_t offset) override {
    if (offset + size > bytes_.size()) bytes_.resize(offset + size);
    if (size > 0) std::memcpy(bytes_.data() + offset, data, size);
  }

  void do_commit(uint64_t) override {
    auto committed = std::make_shared<const Bytes>(std::move(bytes_));
    std::lock_guard lock(blobs_->mutex);
    auto [it, inserted] = blobs_->by_name.try_emplace(name(), committed);
    if (inserted) return;
    if (if_absent_) {
      throw_blob_exists(store(), name());
    }
    it->second = std::move(committed);
  }

  void do_abort() noexcept override { Bytes().swap(bytes_); }
  bool random_writes() const override { return true; }

  std::shared_ptr<Blobs> blobs_;
  bool if_absent_;
  Bytes bytes_;
};

struct MemoryMapping final : Mapping {
  std::shared_ptr<const Bytes> bytes;
};

class MemoryBlobReader final : public BlobReader {
 public:
  MemoryBlobReader(const std::string& spec, const std::string& name, std::shared_ptr<const Bytes> bytes)
      : BlobReader(spec, name, bytes->size()), bytes_(std::move(bytes)) {}

 private:
  void do_read_at(void* data, size_t size, uint64_t offset) const override {
    std::memcpy(data, bytes_->data() + offset, size);
  }
  std::shared_ptr<const Mapping> do_map() const override {
    auto mapping = std::make_shared<MemoryMapping>();
    mapping->bytes = bytes_;
    mapping->data = bytes_->data();
    mapping->size = bytes_->size();
    return mapping;
  }

  std::shared_ptr<const Bytes> bytes_;
};

// A claim of try_lock, released when destroyed.
struct NameLock {
  NameLock(std::shared_ptr<Blobs> b, std::string n) : blobs(std::move(b)), name(std::move(n)) {}
  NameLock(const NameLock&) = delete;
  NameLock& operator=(const NameLock&) = delete;
  ~NameLock() {
    std::lock_guard lock(blobs->mutex);
    blobs->locked.erase(name);
  }
  std::shared_ptr<Blobs> blobs;
  std::string name;
};

class MemoryStore final : public Store {
 public:
  MemoryStore(std::shared_ptr<Blobs> blobs, const std::string& spec) : Store(spec), blobs_(std::move(blobs)) {}

  Capabilities capabilities() const override {
    return Capabilities{.random_writes = true, .mmap = true, .direct_io = false, .shared_between_processes = false};
  }

  std::shared_ptr<void> try_lock(const std::string& name) override {
    std::lock_guard lock(blobs_->mutex);
    if (!blobs_->locked.insert(name).second) return nullptr;
    return std::make_shared<NameLock>(blobs_, name);
  }

 private:
  std::unique_ptr<BlobWriter> do_open_writer(const std::string& name, const WriteOptions& options) override {
    return std::make_unique<MemoryBlobWriter>(blobs_, spec(), name, options.if_absent);
  }

  std::unique_ptr<BlobReader> do_open_reader(const std::string& name) override {
    std::shared_ptr<const Bytes> bytes;
    {
      std::lock_guard lock(blobs_->mutex);
      const auto it = blobs_->by_name.find(name);
      if (it != blobs_->by_name.end()) bytes = it->second;
    }
    if (!bytes) throw_no_blob(spec(), name);
    return std::make_unique<MemoryBlobReader>(spec(), name, std::move(bytes));
  }

  std::vector<std::string> do_list() override {
    std::lock_guard lock(blobs_->mutex);
    std::vector<std::string> names;
    for (const auto& [name, bytes] : blobs_->by_name) names.push_back(name);
    return names;
  }

  void do_remove(const std::string& name) override {
    std::lock_guard lock(blobs_->mutex);
    blobs_->by_name.erase(name);
  }

  std::shared_ptr<Blobs> blobs_;
};

}  // namespace

std::shared_ptr<Store> open_memory_store(const std::string& name, const std::string& spec) {
  // Every named store lives as long as the process, so that what one open wrote the next finds.
  static std::mutex mutex;
  static std::map<std::string, std::shared_ptr<Blobs>> stores;
  std::lock_guard lock(mutex);
  std::shared_ptr<Blobs>& blobs = stores[name];
  if (!blobs) blobs = std::make_shared<Blobs>();
  return std::make_shared<MemoryStore>(blobs, spec);
}

}  // namespace fastdcp::storage
