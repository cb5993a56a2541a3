#pragma once
// The manifest: the commit record of a checkpoint directory (docs/format.md), and the names of
// the files in such a directory.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fastdcp/tensor/dtype.h"
#include "fastdcp/tensor/sharded.h"

namespace fastdcp {

// Version 2 adds the global index of sharded tensors; a manifest without one stays version 1.
inline constexpr int kManifestFormatVersion = 2;
inline constexpr const char* kManifestName = "manifest.json";

// Note [Global index]
// A checkpoint of sharded tensors describes itself: its manifest lists, per key path (the
// append_key_path spelling), the global shape, the dtype and every saved box with the rank whose
// file holds it. Each rank's receipt carries its own boxes; rank 0 merges them at the commit and
// refuses to commit unless all ranks agree on dtype and global shape and the boxes tile the tensor
// exactly. A load plans from the index alone which files and bytes each of its boxes needs, at
// any world size.
struct IndexChunk {
  int rank = 0;  // whose file holds it
  Dims offset;
  Dims sizes;
  Box box() const { return Box{offset, sizes}; }
};
struct IndexEntry {
  std::string key;
  DType dtype = DType::kF32;
  Dims global_shape;
  std::vector<IndexChunk> chunks;
};

struct ManifestRank {
  int rank = 0;
  std::string file;  // relative to the checkpoint directory
  uint64_t size = 0;
  uint32_t header_crc32c = 0;  // of the file's first data_offset bytes (length prefix and header)
  // Receipts only: this rank's sharded leaves and the boxes its file holds (Note [Global index]).
  std::vector<IndexEntry> sharded;
};

struct Manifest {
  int version = 1;  // render_manifest writes 2 when `index` is not empty
  uint64_t generation = 0;
  int world_size = 0;
  std::vector<ManifestRank> ranks;  // ordered by rank, one per rank
  std::vector<IndexEntry> index;    // sharded keys, in the order of rank 0's tree
};

// Merges the ranks' receipts (manifest.ranks[r].sharded) into manifest.index and checks it:
// every rank agrees on each key's dtype and global shape, and the boxes tile each tensor exactly.
// Throws Error(kInvalidArgument) naming the key otherwise.
void build_index(Manifest& manifest);
// The same checks on a parsed index; `problem` names what is wrong, or "".
std::string index_problem(const IndexEntry& entry, int world_size);

std::string render_manifest(const Manifest& manifest);
// Throws Error(kDataLoss) naming `file_name` for anything malformed, Error(kFailedPrecondition)
// for a newer version.
Manifest parse_manifest(std::string_view text, const std::string& file_name);

// A rank's receipt: the same record, written by the rank once its file is durable.
std::string render_receipt(const ManifestRank& receipt, uint64_t generation);
ManifestRank parse_receipt(std::string_view text, uint64_t generation, const std::string& file_name);

// A rank's vote against committing: why its part failed (rank 0's also means "abandoned").
std::string render_failure(int rank, uint64_t generation, const std::string& error);
// The error a failure record carries (the file's text if it is not a failure record).
std::string parse_failure(std::string_view text);

std::string rank_file_name(int rank, uint64_t generation);     // checkpoint_<rank>.g<generation>.safetensors
std::string receipt_file_name(int rank, uint64_t generation);  // rank_<rank>.g<generation>.json
std::string failure_file_name(int rank, uint64_t generation);  // rank_<rank>.g<generation>.failed.json
// The generation in a rank file or receipt name, or 0 for another name.
uint64_t generation_of(std::string_view file_name);

}  // namespace fastdcp
