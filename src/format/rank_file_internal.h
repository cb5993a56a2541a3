#pragma once
// What the three parts of the rank-file code share: rank_file_json.cpp (the JSON encoders),
// rank_file_plan.cpp (planning and rendering a header) and rank_file_header.cpp (parsing one).
// Private to src/format.

#include <charconv>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "fastdcp/format/rank_file.h"

namespace fastdcp::rank_file_detail {

constexpr std::string_view kVersionKey = "fastdcp.version";
constexpr std::string_view kTreeKey = "fastdcp.tree";
constexpr std::string_view kStoragesKey = "fastdcp.storages";
constexpr std::string_view kChunkBytesKey = "fastdcp.chunk_bytes";
constexpr std::string_view kChecksumsKey = "fastdcp.crc32c";
constexpr std::string_view kRawPrefix = "__fastdcp__.storage.";
constexpr uint64_t kRawPadding = 64;

// The one message for a tree beyond the limit, on save and load alike (rank_file_json.cpp).
std::string too_deep();

// ---- small encoders (rank_file_json.cpp) ---------------------------------------------------

void append_base64(std::string& out, std::string_view in);
std::optional<std::string> decode_base64(std::string_view in);
bool valid_utf8(std::string_view s);
void append_json_string(std::string& out, std::string_view s);

template <class T>
void append_number(std::string& out, T v) {
  char buffer[32];
  const auto [end, ec] = std::to_chars(buffer, buffer + sizeof buffer, v);
  out.append(buffer, end);
}

void append_double(std::string& out, double v);
void append_dims(std::string& out, const Dims& dims);

}  // namespace fastdcp::rank_file_detail
