#include "fastdcp/storage/store.h"

#include <algorithm>
#include <map>
#include <mutex>

#include "fastdcp/common/error.h"
#include "storage/backends.h"

namespace fastdcp::storage {

void throw_blob_exists(const std::string& spec, const std::string& name) {
  throw Error(ErrorCode::kAlreadyExists, "blob '" + name + "' in store '" + spec +
                                             "' already exists (another writer committed it first); remove it "
                                             "or write under another name");
}

void throw_no_blob(const std::string& spec, const std::string& name) {
  throw Error(ErrorCode::kNotFound,
              "store '" + spec + "' has no blob '" + name + "': check the name (list() shows what is there)");
}

void BlobWriter::check_open(const char* operation) const {
  if (done_) {
    throw Error(ErrorCode::kFailedPrecondition, std::string("cannot ") + operation + " blob '" + name_ +
                                                    "' in store '" + store_ +
                                                    "': its writer was already committed, aborted or failed; open a new one");
  }
}

template <class Work>
void BlobWriter::spend_on_failure(Work work) {
  try {
    work();
  } catch (...) {
    abort();
    throw;
  }
}

void BlobWriter::append(const void* data, size_t size) {
  check_open("append to");
  spend_on_failure([&] { do_write_at(data, size, size_); });
  size_ += size;
}

void BlobWriter::write_at(const void* data, size_t size, uint64_t offset) {
  check_open("write to");
  if (offset != size_ && !random_writes()) {
    throw Error(ErrorCode::kFailedPrecondition, "store '" + store_ + "' writes blobs only in order: blob '" + name_ +
                                                    "' has " + std::to_string(size_) +
                                                    " bytes and a write at byte " + std::to_string(offset) +
                                                    " was asked for; append instead");
  }
  spend_on_failure([&] { do_write_at(data, size, offset); });
  size_ = std::max(size_, offset + size);
}

void BlobWriter::commit() {
  check_open("commit");
  spend_on_failure([&] { do_commit(size_); });
  done_ = true;
}

void BlobWriter::abort() noexcept {
  if (done_) return;
  done_ = true;
  do_abort();
}

void BlobReader::read_at(void* data, size_t size, uint64_t offset) const {
  if (offset > size_ || size > size_ - offset) {
    throw Error(ErrorCode::kDataLoss, "blob '" + name_ + "' in store '" + store_ + "' has " +
                                          std::to_string(size_) + " bytes, and bytes [" + std::to_string(offset) +
                                          ", " + std::to_string(offset + size) +
                                          ") were wanted: it is truncated, or the reader asked past its end");
  }
  if (size > 0) do_read_at(data, size, offset);
}

std::shared_ptr<const Mapping> BlobReader::map() const { return do_map(); }

std::shared_ptr<const Mapping> BlobReader::do_map() const {
  throw Error(ErrorCode::kUnavailable, "store '" + store_ + "' cannot map blob '" + name_ +
                                           "' (it has no mmap capability); read it with read_at");
}

namespace {

// `name` with control characters as \xNN, so that a message shows all of it (a NUL would end it).
std::string printable(const std::string& name) {
  std::string out;
  for (const char c : name) {
    if (static_cast<unsigned char>(c) >= 0x20) {
      out += c;
      continue;
    }
    const char* digits = "0123456789abcdef";
    out += std::string("\\x") + digits[(c >> 4) & 0xf] + digits[c & 0xf];
  }
  return out;
}

}  // namespace

void Store::check_name(const std::string& name) const {
  if (name.empty() || name.front() == '.' || name.find('/') != std::string::npos ||
      name.find('\0') != std::string::npos) {
    throw Error(ErrorCode::kInvalidArgument, "'" + printable(name) + "' is not a blob name in store '" + spec_ +
                                                 "': names are non-empty, without '/' or NUL, and do not "
                                                 "start with '.'");
  }
}

std::unique_ptr<BlobWriter> Store::open_writer(const std::string& name, const WriteOptions& options) {
  check_name(name);
  return do_open_writer(name, options);
}

std::unique_ptr<BlobReader> Store::open_reader(const std::string& name) {
  check_name(name);
  return do_open_reader(name);
}

void Store::put_if_absent(const std::string& name, const void* data, size_t size) {
  auto writer = open_writer(name, WriteOptions{.if_absent = true});
  writer->append(data, size);
  writer->commit();
}

std::vector<std::string> Store::list(const std::string& prefix) {
  std::vector<std::string> names = do_list();
  std::erase_if(names, [&](const std::string& n) { return n.empty() || n.front() == '.' || !n.starts_with(prefix); });
  std::sort(names.begin(), names.end());
  return names;
}

void Store::remove(const std::string& name) {
  check_name(name);
  do_remove(name);
}

namespace {

struct Registry {
  std::mutex mutex;
  std::map<std::string, StoreFactory> factories{
      {"file", [](const std::string& rest, const std::string& spec, const OpenOptions& options) {
         if (!rest.starts_with("/")) {
           throw Error(ErrorCode::kInvalidArgument, "store spec '" + spec +
                                                        "' names no absolute path: write file:///abs/dir, or a "
                                                        "plain path for a relative one");
         }
         return open_file_store(rest, spec, options);
       }},
      {"mem", [](const std::string& rest, const std::string& spec, const OpenOptions&) {
         if (rest.empty()) {
           throw Error(ErrorCode::kInvalidArgument,
                       "store spec '" + spec + "' names no in-memory store: write mem://name");
         }
         return open_memory_store(rest, spec);
       }},
      // Note [Shared memory stores]
      {"shm", [](const std::string& rest, const std::string& spec, const OpenOptions& options) {
         const bool climbs = rest == ".." || rest.starts_with("../") || rest.ends_with("/..") ||
                             rest.find("/../") != std::string::npos;
         if (rest.empty() || rest.starts_with("/") || climbs) {
           throw Error(ErrorCode::kInvalidArgument, "store spec '" + spec +
                                                        "' names no shared-memory store: write shm://name "
                                                        "(a relative name, without '..')");
         }
         return open_file_store("/dev/shm/fastdcp/" + rest, spec, options);
       }},
  };
};

Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace

void register_store_scheme(const std::string& scheme, StoreFactory factory) {
  Registry& r = registry();
  std::lock_guard lock(r.mutex);
  r.factories[scheme] = std::move(factory);
}

std::shared_ptr<Store> open_store(const std::string& spec, const OpenOptions& options) {
  if (spec.empty()) throw Error(ErrorCode::kInvalidArgument, "the store spec '' is empty: give a path or a URL");
  const size_t colon = spec.find("://");
  // A plain path, even one with "://" after a '/' in it.
  if (colon == std::string::npos || spec.find('/') < colon) return open_file_store(spec, spec, options);
  const std::string scheme = spec.substr(0, colon);
  StoreFactory factory;
  {
    Registry& r = registry();
    std::lock_guard lock(r.mutex);
    const auto it = r.factories.find(scheme);
    if (it == r.factories.end()) {
      std::string known;
      for (const auto& [name, f] : r.factories) known += (known.empty() ? "" : ", ") + name + "://";
      throw Error(ErrorCode::kInvalidArgument,
                  "store spec '" + spec + "' has the unknown scheme '" + scheme + "'; known: " + known);
    }
    factory = it->second;
  }
  return factory(spec.substr(colon + 3), spec, options);
}

void require_shared_between_processes(const std::string& spec, const std::string& who) {
  std::shared_ptr<Store> store;
  try {
    store = open_store(spec);
  } catch (const Error&) {
    return;  // the writer reports what keeps it from opening the store (e.g. a missing directory)
  }
  if (!store->capabilities().shared_between_processes) {
    throw Error(ErrorCode::kInvalidArgument, "store '" + spec + "' lives in this process's memory, where " + who +
                                                 " cannot reach it: save to shm://name (shared by the processes "
                                                 "of a node) or to a directory, or save without " + who);
  }
}

}  // namespace fastdcp::storage
