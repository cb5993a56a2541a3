#pragma once
// The manifest: the commit record of a checkpoint directory (docs/format.md), and the names of
// the files in such a directory.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace fastdcp {

inline constexpr int kManifestFormatVersion = 1;
inline constexpr const char* kManifestName = "manifest.json";

struct ManifestRank {
  int rank = 0;
  std::string file;  // relative to the checkpoint directory
  uint64_t size = 0;
  uint32_t header_crc32c = 0;  // of the file's first data_offset bytes (length prefix and header)
};

struct Manifest {
  int version = kManifestFormatVersion;
  uint64_t generation = 0;
  int world_size = 0;
  std::vector<ManifestRank> ranks;  // ordered by rank, one per rank
};

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
