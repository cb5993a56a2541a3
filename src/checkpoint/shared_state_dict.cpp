#include "fastdcp/checkpoint/shared_state_dict.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <unordered_map>

#include "fastdcp/common/error.h"
#include "fastdcp/format/rank_file.h"

namespace fastdcp {
namespace {

// The message: magic, data size, entry count, one EntryPlace per entry, then the rank-file
// header with its 8-byte length prefix. Both ends are one machine, so integers are native.
constexpr char kMagic[8] = {'F', 'D', 'C', 'P', 'S', 'H', 'M', '1'};
struct EntryPlace {
  uint32_t fd_index;
  uint32_t reserved;
  uint64_t offset;
};
constexpr size_t kFixedBytes = sizeof kMagic + 2 * sizeof(uint64_t);

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

// One private mapping of a received memfd; unmapped with the last storage that views it.
struct Mapping {
  void* data = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (data) munmap(data, size);
  }
};

struct FdCloser {
  const std::vector<int>& fds;
  ~FdCloser() {
    for (int fd : fds) close(fd);
  }
};

}  // namespace

SharedStateDict share_state_dict(const Value& staged) {
  // Every chunk of every replica: the writer process assigns the writing (Note [Writing replicas]).
  const RankFilePlan plan = RankFilePlan::make(staged, RankFilePlan::Replicas::kAll);
  const auto& entries = plan.entries();
  const auto& storages = plan.storages();
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
    places[i] = ranges[i] ? EntryPlace{index_of(ranges[i]->fd), 0, ranges[i]->offset} : EntryPlace{index_of(*empty_fd), 0, 0};
  }
  out.message.reserve(kFixedBytes + places.size() * sizeof(EntryPlace) + plan.header().size());
  out.message.append(kMagic, sizeof kMagic);
  append(out.message, plan.file_size() - plan.data_offset());
  append(out.message, static_cast<uint64_t>(places.size()));
  for (const EntryPlace& place : places) append(out.message, place);
  out.message += plan.header();
  return out;
}

Value attach_state_dict(std::string_view message, const std::vector<int>& fds) {
  FdCloser closer{fds};
  if (message.size() < kFixedBytes || std::memcmp(message.data(), kMagic, sizeof kMagic) != 0) {
    malformed("it does not start with the magic bytes");
  }
  const auto data_size = load<uint64_t>(message, sizeof kMagic);
  const auto count = load<uint64_t>(message, sizeof kMagic + sizeof(uint64_t));
  if (count > (message.size() - kFixedBytes) / sizeof(EntryPlace)) malformed("its entry table is truncated");
  const size_t header_at = kFixedBytes + count * sizeof(EntryPlace);
  const std::string_view header_bytes = message.substr(header_at);
  if (header_bytes.size() < 8) malformed("the header is missing");
  const uint64_t file_size = header_bytes.size() + data_size;
  const RankFileHeader header = RankFileHeader::parse(header_bytes.substr(8), file_size, "shared state dict");
  const auto& entries = header.entries();
  if (entries.size() != count) {
    malformed("the header has " + std::to_string(entries.size()) + " entries, the table " + std::to_string(count));
  }

  std::vector<std::shared_ptr<const Mapping>> mappings(fds.size());
  std::vector<Storage> storages;
  storages.reserve(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto place = load<EntryPlace>(message, kFixedBytes + i * sizeof(EntryPlace));
    if (place.fd_index >= fds.size()) {
      malformed("entry '" + entries[i].name + "' names file descriptor " + std::to_string(place.fd_index) + " of " +
                std::to_string(fds.size()));
    }
    auto& mapping = mappings[place.fd_index];
    if (!mapping) {
      const int fd = fds[place.fd_index];
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
    const uint64_t nbytes = entries[i].nbytes;
    if (place.offset > mapping->size || nbytes > mapping->size - place.offset) {
      malformed("entry '" + entries[i].name + "' lies outside its memfd");
    }
    storages.push_back(Storage::wrap(static_cast<char*>(mapping->data) + place.offset, nbytes, Device::cpu(), mapping));
  }
  return header.build_tree(storages);
}

}  // namespace fastdcp
