#include "fastdcp/checkpoint/shared_state_dict.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <unordered_map>

#include "fastdcp/common/error.h"
#include "fastdcp/format/rank_file.h"

namespace fastdcp {
namespace {

// The message: magic, then one section for the rank file (the plan this rank's file holds), and a
// second one for the whole tree when the file leaves other replicas' chunks out (Note [Shared state
// dicts]). A section: data size, checksum table offset, entry count, one EntryRecord per entry,
// the extras (the entries' names and shapes, then the sharded index) with their size, then the
// plan's header with its 8-byte length prefix. Both ends are one machine, so integers are native.
// The writer takes the file's plan from the records, not from its header (Note [Trusting the plan]).
constexpr char kMagic[8] = {'F', 'D', 'C', 'P', 'S', 'H', 'M', '3'};
constexpr char kName[] = "shared state dict";
constexpr uint64_t kMaxRank = 64;  // far beyond any tensor's; bounds a record's shape
struct EntryPlace {
  uint32_t fd_index;
  uint64_t offset;
};
struct EntryRecord {
  uint32_t fd_index;
  uint32_t name_size;  // the name opens the entry's extras
  uint64_t offset;     // in the memfd
  uint64_t begin, end, nbytes;
  uint8_t dtype;
  uint8_t rank;  // its shape's rank int64s follow the name
  uint8_t reserved[6];
};

[[noreturn]] void malformed(const std::string& what) {
  throw Error(ErrorCode::kInvalidArgument, "malformed shared state dict message: " + what);
}

template <class T>
void append(std::string& out, const T& value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof value);
}

template <class T>
T load(std::string_view bytes, size_t at) {
  T value;
  std::memcpy(&value, bytes.data() + at, sizeof value);
  return value;
}

void append_dims(std::string& out, const Dims& dims) {
  append(out, static_cast<uint64_t>(dims.size()));
  out.append(reinterpret_cast<const char*>(dims.data()), dims.size() * sizeof(int64_t));
}

void append_section(std::string& out, const RankFilePlan& plan, const std::vector<EntryPlace>& places) {
  const auto& entries = plan.entries();
  append(out, plan.file_size() - plan.data_offset());
  append(out, plan.checksums_offset());
  append(out, static_cast<uint64_t>(entries.size()));
  std::string extras;
  for (size_t i = 0; i < entries.size(); ++i) {
    const StoredEntry& e = entries[i];
    EntryRecord record{places[i].fd_index, static_cast<uint32_t>(e.name.size()), places[i].offset, e.begin, e.end,
                       e.nbytes, static_cast<uint8_t>(e.dtype), static_cast<uint8_t>(e.shape.size()), {}};
    append(out, record);
    extras += e.name;
    extras.append(reinterpret_cast<const char*>(e.shape.data()), e.shape.size() * sizeof(int64_t));
  }
  append(extras, static_cast<uint64_t>(plan.sharded().size()));
  for (const IndexEntry& s : plan.sharded()) {
    append(extras, static_cast<uint64_t>(s.key.size()));
    extras += s.key;
    append(extras, static_cast<uint8_t>(s.dtype));
    append_dims(extras, s.global_shape);
    append(extras, static_cast<uint64_t>(s.chunks.size()));
    for (const IndexChunk& c : s.chunks) {
      append_dims(extras, c.offset);
      append_dims(extras, c.sizes);
    }
  }
  append(out, static_cast<uint64_t>(extras.size()));
  out += extras;
  out += plan.header();
}

DType to_dtype(uint8_t d) {
  if (d >= kNumDTypes) malformed("it names dtype " + std::to_string(d));
  return static_cast<DType>(d);
}

// Reads a section's extras front to back, refusing to read past their end.
class ExtrasReader {
 public:
  explicit ExtrasReader(std::string_view bytes) : bytes_(bytes) {}
  std::string_view take(uint64_t n) {
    if (n > bytes_.size() - at_) malformed("its extras are truncated");
    const std::string_view out = bytes_.substr(at_, n);
    at_ += n;
    return out;
  }
  template <class T>
  T get() {
    return load<T>(take(sizeof(T)), 0);
  }
  DType dtype() { return to_dtype(get<uint8_t>()); }
  Dims dims(uint64_t rank) {
    if (rank > kMaxRank) malformed("a shape has " + std::to_string(rank) + " dimensions");
    const std::string_view bytes = take(rank * sizeof(int64_t));
    int64_t values[kMaxRank];
    std::memcpy(values, bytes.data(), bytes.size());
    return Dims(std::span<const int64_t>(values, rank));
  }
  Dims dims() { return dims(get<uint64_t>()); }
  bool done() const { return at_ == bytes_.size(); }

 private:
  std::string_view bytes_;
  size_t at_ = 0;
};

struct Section {
  uint64_t data_size = 0;
  uint64_t checksums_offset = 0;
  std::string_view records;  // count() EntryRecords
  std::string_view extras;
  std::string_view header;  // its length prefix included
  size_t count() const { return records.size() / sizeof(EntryRecord); }
  EntryRecord record(size_t i) const { return load<EntryRecord>(records, i * sizeof(EntryRecord)); }
};

// The section at message[at...]; moves `at` past it.
Section read_section(std::string_view message, size_t& at) {
  Section s;
  if (message.size() - at < 3 * sizeof(uint64_t)) malformed("a section is truncated");
  s.data_size = load<uint64_t>(message, at);
  if (s.data_size > std::numeric_limits<uint64_t>::max() - message.size()) malformed("its data size is out of range");
  s.checksums_offset = load<uint64_t>(message, at + sizeof(uint64_t));
  const auto count = load<uint64_t>(message, at + 2 * sizeof(uint64_t));
  at += 3 * sizeof(uint64_t);
  if (count > (message.size() - at) / sizeof(EntryRecord)) malformed("its entry table is truncated");
  s.records = message.substr(at, count * sizeof(EntryRecord));
  at += s.records.size();
  if (message.size() - at < sizeof(uint64_t)) malformed("its extras are missing");
  const auto extras = load<uint64_t>(message, at);
  at += sizeof(uint64_t);
  if (extras > message.size() - at) malformed("its extras are truncated");
  s.extras = message.substr(at, extras);
  at += extras;
  if (message.size() - at < sizeof(uint64_t)) malformed("the header is missing");
  const auto length = load<uint64_t>(message, at);  // little-endian, as the file has it
  if (length > message.size() - at - sizeof(uint64_t)) malformed("the header is truncated");
  s.header = message.substr(at, sizeof(uint64_t) + length);
  at += s.header.size();
  return s;
}

struct Message {
  Section file;                  // what the rank file holds
  std::optional<Section> whole;  // every replica's chunks, when `file` leaves some out
  const Section& tree() const { return whole ? *whole : file; }
};

Message read_message(std::string_view message) {
  if (message.size() < sizeof kMagic || std::memcmp(message.data(), kMagic, sizeof kMagic) != 0) {
    malformed("it does not start with the magic bytes");
  }
  size_t at = sizeof kMagic;
  Message m{read_section(message, at), std::nullopt};
  if (at < message.size()) m.whole = read_section(message, at);
  if (at != message.size()) malformed("it has trailing bytes");
  return m;
}

// One private mapping of a received memfd; unmapped with the last storage that views it.
struct Mapping {
  void* data = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (data) munmap(data, size);
  }
};

// The received memfds: each is mapped on first use, and closed with this (also on error).
class ReceivedFds {
 public:
  explicit ReceivedFds(const std::vector<int>& fds) : fds_(fds), mappings_(fds.size()) {}
  ReceivedFds(const ReceivedFds&) = delete;
  ReceivedFds& operator=(const ReceivedFds&) = delete;
  ~ReceivedFds() {
    for (int fd : fds_) close(fd);
  }

  // The bytes of entry i of `section`, checked to lie inside their memfd.
  Storage storage(const Section& section, size_t i, const StoredEntry& entry) {
    if (i >= section.count()) {
      malformed("the header has more entries than the table's " + std::to_string(section.count()));
    }
    const EntryRecord place = section.record(i);
    if (place.fd_index >= fds_.size()) {
      malformed("entry '" + entry.name + "' names file descriptor " + std::to_string(place.fd_index) + " of " +
                std::to_string(fds_.size()));
    }
    auto& mapping = mappings_[place.fd_index];
    if (!mapping) {
      const int fd = fds_[place.fd_index];
      struct stat st {};
      if (fstat(fd, &st) != 0) throw_system_error("fstat of a shared state dict's memfd", errno);
      auto map = std::make_shared<Mapping>();
      map->size = static_cast<size_t>(st.st_size);
      if (map->size) {
        void* data = mmap(nullptr, map->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
        if (data == MAP_FAILED) throw_system_error("mapping a shared state dict's memfd", errno);
        map->data = data;
      }
      mapping = std::move(map);
    }
    if (place.offset > mapping->size || entry.nbytes > mapping->size - place.offset) {
      malformed("entry '" + entry.name + "' lies outside its memfd");
    }
    return Storage::wrap(static_cast<char*>(mapping->data) + place.offset, entry.nbytes, Device::cpu(), mapping);
  }

 private:
  const std::vector<int>& fds_;
  std::vector<std::shared_ptr<const Mapping>> mappings_;
};

void check_count(const Section& section, size_t entries) {
  if (entries != section.count()) {
    malformed("the header has " + std::to_string(entries) + " entries, the table " + std::to_string(section.count()));
  }
}

}  // namespace

SharedStateDict share_state_dict(const Value& staged) {
  // The rank file's plan, rendered here once: the writer writes this header as it is. A file
  // leaves replicated chunks to the replica that writes them (Note [Writing replicas]), but a
  // writer of another kind gets the whole tree: only then is it planned a second time.
  const RankFilePlan plan = RankFilePlan::make(staged);
  std::optional<RankFilePlan> whole;
  if (plan.omits_replicas()) whole = RankFilePlan::make(staged, RankFilePlan::Replicas::kAll);
  const RankFilePlan& all = whole ? *whole : plan;  // every storage
  const auto& entries = all.entries();
  const auto& storages = all.storages();
  SharedStateDict out;
  std::vector<std::optional<SharedMemoryRange>> ranges(entries.size());  // none yet for empty storages
  uint64_t copy_bytes = 0;
  bool any_shared = false;
  for (size_t i = 0; i < entries.size(); ++i) {
    const Storage& storage = storages[i];
    if (!storage.device().is_cpu()) {
      throw Error(ErrorCode::kInvalidArgument, "cannot share '" + entries[i].name + "': it is on " +
                                                   storage.device().str() + "; stage the state dict to host memory first");
    }
    if (storage.nbytes() == 0) continue;
    ranges[i] = find_shared_memory(storage.data(), storage.nbytes());
    if (ranges[i]) {
      any_shared = true;
    } else {
      copy_bytes += (storage.nbytes() + 63) / 64 * 64;
    }
  }
  // Storages outside shared memory are copied into one memfd; empty storages point at offset 0 of
  // any memfd of the message, which is that one too when nothing else is shared.
  if (copy_bytes || (!any_shared && !entries.empty())) {
    const HostBuffer& copy =
        out.copies.emplace_back(HostBuffer::allocate(std::max<uint64_t>(copy_bytes, 1), HostMemoryTraits{false, true}));
    uint64_t copy_at = 0;
    for (size_t i = 0; i < entries.size(); ++i) {
      const Storage& storage = storages[i];
      if (storage.nbytes() == 0 || ranges[i]) continue;
      std::memcpy(static_cast<char*>(copy.data()) + copy_at, storage.data(), storage.nbytes());
      ranges[i] = SharedMemoryRange{copy.fd(), copy_at};
      copy_at += (storage.nbytes() + 63) / 64 * 64;
      out.bytes_copied += storage.nbytes();
    }
  }

  std::unordered_map<int, uint32_t> fd_index;  // memfd -> its index in out.fds
  auto index_of = [&](int fd) {
    const auto [it, added] = fd_index.try_emplace(fd, static_cast<uint32_t>(out.fds.size()));
    if (added) out.fds.push_back(fd);
    return it->second;
  };
  std::optional<int> empty_fd;
  if (!out.copies.empty()) {
    empty_fd = out.copies.front().fd();
  } else if (const auto first = std::find_if(ranges.begin(), ranges.end(), [](const auto& r) { return r.has_value(); });
             first != ranges.end()) {
    empty_fd = (*first)->fd;
  }
  std::vector<EntryPlace> places(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    places[i] = ranges[i] ? EntryPlace{index_of(ranges[i]->fd), ranges[i]->offset} : EntryPlace{index_of(*empty_fd), 0};
  }
  out.message.append(kMagic, sizeof kMagic);
  if (!whole) {
    append_section(out.message, plan, places);
    return out;
  }
  // The file's storages are some of the whole tree's.
  std::unordered_map<const StorageImpl*, size_t> whole_index;
  for (size_t i = 0; i < storages.size(); ++i) whole_index.emplace(storages[i].identity(), i);
  std::vector<EntryPlace> file_places;
  file_places.reserve(plan.storages().size());
  for (const Storage& storage : plan.storages()) file_places.push_back(places[whole_index.at(storage.identity())]);
  append_section(out.message, plan, file_places);
  append_section(out.message, *whole, places);
  return out;
}

Value attach_state_dict(std::string_view message, const std::vector<int>& fds) {
  ReceivedFds received(fds);
  const Message m = read_message(message);
  const Section& section = m.tree();
  const RankFileHeader header = RankFileHeader::parse(section.header.substr(sizeof(uint64_t)),
                                                      section.header.size() + section.data_size, kName);
  const auto& entries = header.entries();
  check_count(section, entries.size());
  std::vector<Storage> storages;
  storages.reserve(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) storages.push_back(received.storage(section, i, entries[i]));
  return header.build_tree(storages);
}

RankFilePlan attach_plan(std::string_view message, const std::vector<int>& fds) {
  ReceivedFds received(fds);
  const Message m = read_message(message);
  const Section& section = m.file;
  RankFilePlan::Parts parts{std::string(section.header), section.data_size, section.checksums_offset, {}, {}, {}};
  parts.entries.resize(section.count());
  parts.storages.reserve(section.count());
  ExtrasReader extras(section.extras);
  for (size_t i = 0; i < section.count(); ++i) {
    const EntryRecord r = section.record(i);
    StoredEntry& e = parts.entries[i];
    e.name = extras.take(r.name_size);
    e.dtype = to_dtype(r.dtype);
    e.shape = extras.dims(r.rank);
    e.begin = r.begin;
    e.end = r.end;
    e.nbytes = r.nbytes;
    e.chunk_crc32c.assign(e.num_chunks(), 0);
    parts.storages.push_back(received.storage(section, i, e));
  }
  const auto sharded = extras.get<uint64_t>();
  if (sharded > section.extras.size()) malformed("its sharded index is truncated");
  parts.sharded.resize(sharded);
  for (IndexEntry& s : parts.sharded) {
    s.key = extras.take(extras.get<uint64_t>());
    s.dtype = extras.dtype();
    s.global_shape = extras.dims();
    const auto chunks = extras.get<uint64_t>();
    if (chunks > section.extras.size()) malformed("its sharded index is truncated");
    s.chunks.resize(chunks);
    for (IndexChunk& c : s.chunks) {
      c.offset = extras.dims();
      c.sizes = extras.dims();
    }
  }
  if (!extras.done()) malformed("its extras have trailing bytes");
  return RankFilePlan::adopt(std::move(parts), kName);
}

}  // namespace fastdcp
