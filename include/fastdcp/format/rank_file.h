#pragma once
// One rank's data file: a safetensors file whose __metadata__ also carries what safetensors
// cannot say (the state-dict tree, views and aliasing, chunk checksums). Specified in
// docs/format.md.
//
// Note [Rank file layout]
// Every storage of the staged state dict becomes one safetensors entry. A storage seen through
// exactly one tensor that covers it whole and contiguously, with a dtype safetensors knows, is a
// "plain" entry named by the tensor's flattened key path, with its real dtype and shape: other
// tools read it as they would any safetensors file. Every other storage (views, aliasing,
// non-contiguous tensors, dtypes safetensors lacks) is a raw U8 entry named
// "__fastdcp__.storage.<id>", and the tree says which views it holds. Tensor data starts at a
// 4096-byte aligned file offset (the header is padded with spaces, which JSON allows); raw entries
// come first, each padded to 64 bytes, then plain entries by element size, largest first, so that
// every entry is aligned to its element size and safetensors' rule that entries tile the data
// without gaps holds. Checksums are CRC32C per 4 MiB chunk of each entry, stored as fixed-width hex
// so that the header can be rendered before the data is written and patched after.

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "fastdcp/format/manifest.h"
#include "fastdcp/tensor/value.h"

namespace fastdcp {

// The newest format this build reads. It writes version 3 only into files that hold a sharded
// tensor record, version 2 only into files that need it (a tensor with non-default traits, Note
// [Tensor traits]); every other file stays version 1.
inline constexpr int kRankFileFormatVersion = 3;
inline constexpr uint64_t kChecksumChunkBytes = uint64_t{4} << 20;
inline constexpr uint64_t kDataAlignment = 4096;
// A header longer than this is refused before it is read (safetensors' own limit is 100 MB).
inline constexpr uint64_t kMaxHeaderBytes = uint64_t{1} << 30;

// Note [Tree depth limit]
// How deep containers may nest in a state dict: saves refuse deeper trees, and loads and verify
// refuse files that hold them, with one message naming the limit. State dicts nest a handful of
// levels; the limit keeps every conversion of a loaded tree safe, recursive ones included (a few
// hundred bytes of stack per level, well inside a thread's 8 MiB even under sanitizers), and
// Python's own tools (copy.deepcopy, pickle, ==) refuse trees deeper than its recursion limit.
inline constexpr size_t kMaxTreeDepth = 10000;

// One stored byte range: a storage of the state dict.
struct StoredEntry {
  std::string name;  // the safetensors key
  DType dtype;       // as stored: the tensor's dtype for plain entries, U8 for raw ones
  Dims shape;
  uint64_t begin = 0;   // [begin, end): offsets from the start of the data, as safetensors' data_offsets
  uint64_t end = 0;
  uint64_t nbytes = 0;  // the storage's own size (raw entries are padded beyond it)
  std::vector<uint32_t> chunk_crc32c;  // one per kChecksumChunkBytes of [begin, begin + nbytes)

  size_t num_chunks() const { return static_cast<size_t>((nbytes + kChecksumChunkBytes - 1) / kChecksumChunkBytes); }
};

// The plan for writing one rank file: the header (rendered with zero checksums until
// set_checksums) and, per entry, the storage whose bytes go there.
class RankFilePlan {
 public:
  // Which chunks of replicated sharded leaves a plan holds: a rank file holds the ones this rank
  // writes (Note [Writing replicas]); a message to the writer process holds them all.
  enum class Replicas { kOwnShare, kAll };
  // Throws Error(kInvalidArgument) naming the key path of a value the format cannot hold (a
  // non-finite number is fine; a string that is not UTF-8 is not; two sharded leaves with one key
  // path are not; nor is a sharded leaf that ShardedTensor::validate refuses or of a sub-byte dtype).
  static RankFilePlan make(const Value& state_dict, Replicas replicas = Replicas::kOwnShare);
  // The parts of a plan that make() rendered in another process (Note [Shared state dicts]), as
  // that plan gave them: header() with zero checksums, file_size() - data_offset(),
  // checksums_offset(), entries(), sharded(), and per entry the bytes to write (at least its nbytes).
  struct Parts {
    std::string header;
    uint64_t data_size = 0;
    uint64_t checksums_offset = 0;
    std::vector<StoredEntry> entries;
    std::vector<Storage> storages;
    std::vector<IndexEntry> sharded;
  };
  // Takes those parts as they are: nothing is parsed or rendered again. It checks what keeps the
  // write itself inside its bounds (Note [Trusting the plan]): the length prefix, entries tiling
  // the data in order, each storage holding its entry, the checksum table inside the header; and
  // throws Error(kDataLoss) naming `name` and what is wrong.
  static RankFilePlan adopt(Parts parts, const std::string& name);
  // Whether make() left the chunks of some replicated sharded leaf to another replica (kOwnShare).
  bool omits_replicas() const { return omits_replicas_; }

  const std::vector<StoredEntry>& entries() const { return entries_; }
  const std::vector<Storage>& storages() const { return storages_; }  // parallel to entries()
  uint64_t data_offset() const { return header_.size(); }  // the 8-byte length prefix included
  uint64_t file_size() const { return data_offset() + data_size_; }
  // The file's first data_offset() bytes.
  const std::string& header() const { return header_; }
  // The offset in header() of the first checksum's hex digits (set_checksums writes there).
  uint64_t checksums_offset() const { return checksums_at_; }
  // Patches the checksums of `entry` into the header (crcs.size() == entries()[entry].num_chunks()).
  void set_checksums(size_t entry, const std::vector<uint32_t>& crcs);
  // The sharded leaves, in tree order, with the boxes this plan holds (rank 0 in every chunk: the
  // writer sets its own): what the rank's receipt reports (Note [Global index]).
  const std::vector<IndexEntry>& sharded() const { return sharded_; }

 private:
  std::vector<IndexEntry> sharded_;
  std::vector<StoredEntry> entries_;
  std::vector<Storage> storages_;
  std::string header_;
  uint64_t data_size_ = 0;
  uint64_t checksums_at_ = 0;       // offset in header_ of the first hex digit of the checksums
  std::vector<size_t> first_chunk_;  // per entry, the index of its first checksum
  bool omits_replicas_ = false;
};

// A parsed rank file header. Parsing checks everything the format promises (types, offsets inside
// the file, entries tiling the data, views inside their storages) and throws Error(kDataLoss)
// naming the file and what is wrong, or Error(kFailedPrecondition) for a newer format version.
class RankFileHeader {
 public:
  // Reads the 8-byte length, then the header: `read(offset, size)` returns file bytes.
  template <class ReadFn>
  static RankFileHeader read(ReadFn&& read, uint64_t file_size, const std::string& file_name);
  // Parses the JSON that follows the 8-byte length prefix.
  static RankFileHeader parse(std::string_view json, uint64_t file_size, const std::string& file_name);

  RankFileHeader(RankFileHeader&&) noexcept;
  RankFileHeader& operator=(RankFileHeader&&) noexcept;
  ~RankFileHeader();

  int format_version() const;
  // false for a plain safetensors file (no fastdcp metadata): its entries have no chunk checksums.
  bool has_checksums() const;
  const std::vector<StoredEntry>& entries() const;
  uint64_t data_offset() const;
  // The state dict, with tensors viewing storages[i] for entry i (each at least entries()[i].nbytes).
  Value build_tree(const std::vector<Storage>& storages) const;
  // Every tensor of the tree, described but not loaded, with its key path, in tree order: for
  // inspection and for naming the tensors in error messages. It checks the tree as build_tree does
  // (nesting, duplicate keys, every view inside its storage), so it also validates a file.
  struct TensorRecord {
    std::string path;
    size_t entry;  // index into entries()
    DType dtype;
    Dims shape, strides;
    int64_t offset;
    TensorTraits traits;
  };
  // (The chunks of sharded tensors are listed too, under their leaf's key path.)
  std::vector<TensorRecord> tensors() const;
  // Every sharded tensor record (version 3), in tree order, checked as build_tree checks it: chunks
  // inside the global shape, of its dtype, not overlapping.
  struct ShardedRecord {
    std::string path;
    DType dtype;
    Dims global_shape;
    int replica_index = 0;
    int replica_count = 1;
    std::vector<std::pair<Dims, TensorRecord>> chunks;  // global offset, view
  };
  std::vector<ShardedRecord> sharded() const;

  struct Impl;  // defined in rank_file_header.cpp

 private:
  explicit RankFileHeader(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Reads the 8-byte little-endian header length and checks it against the file size.
uint64_t parse_header_length(const unsigned char (&prefix)[8], uint64_t file_size, const std::string& file_name);

// The header's bytes, its 8-byte length prefix included (what a manifest checksums), through
// read(dst, offset, n).
template <class ReadFn>
std::string read_header_bytes(ReadFn&& read, uint64_t file_size, const std::string& file_name) {
  unsigned char prefix[8];
  read(prefix, 0, sizeof prefix);
  const uint64_t length = parse_header_length(prefix, file_size, file_name);
  std::string bytes(sizeof prefix + length, '\0');
  std::memcpy(bytes.data(), prefix, sizeof prefix);
  read(bytes.data() + sizeof prefix, sizeof prefix, length);
  return bytes;
}

template <class ReadFn>
RankFileHeader RankFileHeader::read(ReadFn&& read, uint64_t file_size, const std::string& file_name) {
  const std::string bytes = read_header_bytes(read, file_size, file_name);
  return parse(std::string_view(bytes).substr(8), file_size, file_name);
}

}  // namespace fastdcp
