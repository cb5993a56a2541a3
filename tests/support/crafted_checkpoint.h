#pragma once
// Checkpoints crafted byte by byte, for the tests and the fuzz targets that attack the reader: a
// rank file from a header and data, committed with a manifest that records its true size and
// header checksum, as a save would, so that every check after the manifest's is reached.

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

#include "fastdcp/format/checksum.h"
#include "fastdcp/format/manifest.h"
#include "fastdcp/io/file.h"

namespace fastdcp::testing {

// [8-byte little-endian length][header][data]: a safetensors file's layout.
inline std::string rank_file_bytes(std::string_view header, std::string_view data) {
  std::string out(8, '\0');
  for (int k = 0; k < 8; ++k) out[k] = static_cast<char>((uint64_t{header.size()} >> (8 * k)) & 0xFF);
  out += header;
  out += data;
  return out;
}

// Makes `dir` (which must exist) a committed one-rank checkpoint whose data file holds `bytes`.
// The header checksum covers the length prefix and as much of the header as the file holds.
inline void commit_rank_file(const std::string& dir, std::string_view bytes) {
  uint64_t length = 0;
  for (int k = 7; k >= 0 && bytes.size() >= 8; --k) length = (length << 8) | static_cast<unsigned char>(bytes[k]);
  const uint64_t covered = bytes.size() < 8 || length > bytes.size() - 8 ? bytes.size() : 8 + length;
  Manifest manifest;
  manifest.generation = 1;
  manifest.world_size = 1;
  manifest.ranks.push_back({0, rank_file_name(0, 1), bytes.size(), crc32c(bytes.data(), covered)});
  const auto write = [&](const std::string& name, std::string_view text) {
    File file = File::open(join_path(dir, name), File::Mode::kCreate);
    file.write_at(text.data(), text.size(), 0);
    file.close();
  };
  write(rank_file_name(0, 1), bytes);
  write(kManifestName, render_manifest(manifest));
}

// A fastdcp (version 1) header holding `tree` over the given raw entries, described by hand:
// `entries` is the JSON of the entry records after __metadata__ (",name:{...}..."), `storages`
// the storage list and `crcs` the checksum digits.
inline std::string fastdcp_header(std::string_view tree, std::string_view entries, std::string_view storages,
                                  std::string_view crcs) {
  const auto quoted = [](std::string_view s) {
    std::string out = "\"";
    for (const char c : s) {
      if (c == '"' || c == '\\') out += '\\';
      out += c;
    }
    return out + "\"";
  };
  return std::string(R"({"__metadata__":{"fastdcp.version":"1","fastdcp.chunk_bytes":"4194304","fastdcp.storages":)") +
         quoted(storages) + R"(,"fastdcp.tree":)" + quoted(tree) + R"(,"fastdcp.crc32c":)" + quoted(crcs) + "}" +
         std::string(entries) + "}";
}

// The entry record and storage list of one raw 64-byte storage, for fastdcp_header.
inline constexpr std::string_view kOneStorageEntry =
    R"(,"__fastdcp__.storage.0":{"dtype":"U8","shape":[64],"data_offsets":[0,64]})";
inline constexpr std::string_view kOneStorageList = R"([["__fastdcp__.storage.0",64]])";

// The header of a fastdcp rank file whose data is one raw storage of 64 zero bytes, with its true
// checksum, and `tree`; one_storage_file is the whole file.
inline std::string one_storage_header(std::string_view tree) {
  const std::string zeros(64, '\0');
  char crc[9];
  std::snprintf(crc, sizeof crc, "%08x", crc32c(zeros.data(), zeros.size()));
  return fastdcp_header(tree, kOneStorageEntry, kOneStorageList, crc);
}
inline std::string one_storage_file(std::string_view tree) {
  return rank_file_bytes(one_storage_header(tree), std::string(64, '\0'));
}

}  // namespace fastdcp::testing
