#include "fastdcp/format/manifest.h"

#include <charconv>
#include <nlohmann/json.hpp>
#include <unordered_map>
#include <unordered_set>

#include "fastdcp/common/error.h"

namespace fastdcp {
namespace {

using json = nlohmann::json;

[[noreturn]] void corrupt(const std::string& file, const std::string& what) {
  throw Error(ErrorCode::kDataLoss, "corrupt checkpoint manifest '" + file + "': " + what);
}

json rank_record(const ManifestRank& r) {
  return {{"rank", r.rank}, {"file", r.file}, {"size", r.size}, {"header_crc32c", r.header_crc32c}};
}

json dims_json(const Dims& dims) {
  json out = json::array();
  for (int64_t d : dims) out.push_back(d);
  return out;
}

// {"key": ..., "dtype": ..., "shape": [...], "chunks": [[rank, offset, sizes], ...]}
json index_record(const IndexEntry& e) {
  json chunks = json::array();
  for (const IndexChunk& c : e.chunks) chunks.push_back(json::array({c.rank, dims_json(c.offset), dims_json(c.sizes)}));
  return {{"key", e.key}, {"dtype", std::string(dtype_name(e.dtype))}, {"shape", dims_json(e.global_shape)}, {"chunks", std::move(chunks)}};
}

json index_records(const std::vector<IndexEntry>& entries) {
  json out = json::array();
  for (const IndexEntry& e : entries) out.push_back(index_record(e));
  return out;
}

template <class T>
T field(const json& object, const char* key, const std::string& file) {
  const auto it = object.find(key);
  if (it == object.end()) corrupt(file, std::string("missing '") + key + "'");
  if constexpr (std::is_same_v<T, std::string>) {
    if (!it->is_string()) corrupt(file, std::string("'") + key + "' is not a string");
    return it->template get<std::string>();
  } else {
    if (!it->is_number_integer()) corrupt(file, std::string("'") + key + "' is not an integer");
    const auto wide = it->template get<int64_t>();
    if (it->is_number_unsigned() ? it->template get<uint64_t>() > std::numeric_limits<T>::max()
                                 : (wide < 0 || static_cast<uint64_t>(wide) > std::numeric_limits<T>::max())) {
      corrupt(file, std::string("'") + key + "' is out of range");
    }
    return it->is_number_unsigned() ? static_cast<T>(it->template get<uint64_t>()) : static_cast<T>(wide);
  }
}

ManifestRank parse_rank(const json& r, const std::string& file) {
  if (!r.is_object()) corrupt(file, "a rank record is not an object");
  ManifestRank out;
  out.rank = field<int>(r, "rank", file);
  out.file = field<std::string>(r, "file", file);
  out.size = field<uint64_t>(r, "size", file);
  out.header_crc32c = field<uint32_t>(r, "header_crc32c", file);
  if (out.file.empty() || out.file.find('/') != std::string::npos || out.file.starts_with(".")) {
    corrupt(file, "a rank file name '" + out.file + "' is not a plain file name");
  }
  return out;
}

Dims parse_dims(const json& j, const std::string& file, const std::string& key) {
  if (!j.is_array() || j.size() > 64) corrupt(file, "the index of '" + key + "' has a malformed shape or offset");
  Dims out;
  out.resize(j.size());
  for (size_t d = 0; d < j.size(); ++d) {
    if (!j[d].is_number_integer() || j[d].get<int64_t>() < 0 || (j[d].is_number_unsigned() && j[d].get<uint64_t>() > INT64_MAX)) {
      corrupt(file, "the index of '" + key + "' has a size or offset that is not a non-negative integer");
    }
    out[d] = j[d].get<int64_t>();
  }
  return out;
}

std::vector<IndexEntry> parse_index(const json& j, const std::string& file) {
  if (!j.is_array()) corrupt(file, "the index is not a list");
  std::vector<IndexEntry> out;
  for (const json& r : j) {
    if (!r.is_object()) corrupt(file, "an index record is not an object");
    IndexEntry e;
    e.key = field<std::string>(r, "key", file);
    const auto dtype = dtype_from_name(field<std::string>(r, "dtype", file));
    if (!dtype) corrupt(file, "the index of '" + e.key + "' has an unknown dtype");
    e.dtype = *dtype;
    const auto shape = r.find("shape");
    if (shape == r.end()) corrupt(file, "the index of '" + e.key + "' has no shape");
    e.global_shape = parse_dims(*shape, file, e.key);
    const auto chunks = r.find("chunks");
    if (chunks == r.end() || !chunks->is_array()) corrupt(file, "the index of '" + e.key + "' has no chunk list");
    for (const json& c : *chunks) {
      if (!c.is_array() || c.size() != 3 || !c[0].is_number_integer() || c[0].get<int64_t>() < 0 ||
          c[0].get<int64_t>() > INT32_MAX) {
        corrupt(file, "the index of '" + e.key + "' has a malformed chunk");
      }
      e.chunks.push_back({c[0].get<int>(), parse_dims(c[1], file, e.key), parse_dims(c[2], file, e.key)});
    }
    out.push_back(std::move(e));
  }
  return out;
}

json parse_object(std::string_view text, const std::string& file) {
  json j = json::parse(text.begin(), text.end(), nullptr, false);
  if (!j.is_object()) corrupt(file, "it is not a JSON object");
  return j;
}

}  // namespace

std::string render_manifest(const Manifest& m) {
  json ranks = json::array();
  for (const auto& r : m.ranks) ranks.push_back(rank_record(r));
  json out{{"format", "fastdcp.manifest"}, {"version", m.index.empty() ? 1 : 2}, {"generation", m.generation},
           {"world_size", m.world_size}, {"ranks", std::move(ranks)}};
  if (!m.index.empty()) out["index"] = index_records(m.index);
  return out.dump(1) + "\n";
}

Manifest parse_manifest(std::string_view text, const std::string& file) {
  const json j = parse_object(text, file);
  if (field<std::string>(j, "format", file) != "fastdcp.manifest") corrupt(file, "it is not a fastdcp manifest");
  Manifest m;
  m.version = field<int>(j, "version", file);
  if (m.version > kManifestFormatVersion) {
    throw Error(ErrorCode::kFailedPrecondition, "'" + file + "' was written in manifest version " +
                                                    std::to_string(m.version) + "; this fastdcp reads up to version " +
                                                    std::to_string(kManifestFormatVersion) + ": upgrade fastdcp");
  }
  if (m.version < 1) corrupt(file, "the version is not positive");
  m.generation = field<uint64_t>(j, "generation", file);
  m.world_size = field<int>(j, "world_size", file);
  const auto it = j.find("ranks");
  if (it == j.end() || !it->is_array()) corrupt(file, "missing 'ranks'");
  for (const json& r : *it) m.ranks.push_back(parse_rank(r, file));
  if (m.world_size < 1 || m.ranks.size() != static_cast<size_t>(m.world_size)) {
    corrupt(file, "it lists " + std::to_string(m.ranks.size()) + " ranks for world size " + std::to_string(m.world_size));
  }
  for (size_t i = 0; i < m.ranks.size(); ++i) {
    if (m.ranks[i].rank != static_cast<int>(i)) corrupt(file, "rank records are not 0..world_size-1 in order");
  }
  if (const auto index = j.find("index"); index != j.end()) {
    if (m.version < 2) corrupt(file, "a version-1 manifest has an index");
    m.index = parse_index(*index, file);
    std::unordered_set<std::string> keys;
    for (const IndexEntry& e : m.index) {
      if (!keys.insert(e.key).second) corrupt(file, "the index lists '" + e.key + "' twice");
      if (const std::string why = index_problem(e, m.world_size); !why.empty()) {
        corrupt(file, "the index of '" + e.key + "': " + why);
      }
    }
  }
  return m;
}

std::string render_receipt(const ManifestRank& receipt, uint64_t generation) {
  json j = rank_record(receipt);
  j["generation"] = generation;
  if (!receipt.sharded.empty()) j["sharded"] = index_records(receipt.sharded);
  return j.dump() + "\n";
}

ManifestRank parse_receipt(std::string_view text, uint64_t generation, const std::string& file) {
  const json j = parse_object(text, file);
  if (field<uint64_t>(j, "generation", file) != generation) corrupt(file, "it is for another generation");
  ManifestRank out = parse_rank(j, file);
  if (const auto sharded = j.find("sharded"); sharded != j.end()) out.sharded = parse_index(*sharded, file);
  for (const IndexEntry& e : out.sharded) {
    for (const IndexChunk& c : e.chunks) {
      if (c.rank != out.rank) corrupt(file, "rank " + std::to_string(out.rank) + "'s receipt lists a chunk of another rank");
    }
  }
  return out;
}

std::string index_problem(const IndexEntry& e, int world_size) {
  if (dtype_is_sub_byte(e.dtype)) return "its dtype " + std::string(dtype_name(e.dtype)) + " is narrower than a byte";
  if (!contiguous_nbytes(e.dtype, e.global_shape)) return "its global shape " + dims_text(e.global_shape) + " is too large";
  std::vector<Box> boxes;
  boxes.reserve(e.chunks.size());
  for (const IndexChunk& c : e.chunks) {
    if (c.rank < 0 || c.rank >= world_size) return "a chunk names rank " + std::to_string(c.rank) + " of " + std::to_string(world_size);
    if (c.offset.size() != e.global_shape.size() || c.sizes.size() != e.global_shape.size()) {
      return "a chunk has " + std::to_string(c.offset.size()) + " dims in a tensor of " + std::to_string(e.global_shape.size());
    }
    boxes.push_back(c.box());
  }
  return tiling_problem(e.global_shape, boxes);
}

void build_index(Manifest& m) {
  std::unordered_map<std::string, size_t> at;
  m.index.clear();
  for (const ManifestRank& r : m.ranks) {
    for (const IndexEntry& e : r.sharded) {
      const auto [it, added] = at.try_emplace(e.key, m.index.size());
      if (added) {
        m.index.push_back({e.key, e.dtype, e.global_shape, {}});
      } else if (const IndexEntry& first = m.index[it->second]; first.dtype != e.dtype || first.global_shape != e.global_shape) {
        throw Error(ErrorCode::kInvalidArgument,
                    "the ranks disagree on the sharded tensor at '" + e.key + "': one holds " + std::string(dtype_name(first.dtype)) +
                        dims_text(first.global_shape) + ", rank " + std::to_string(r.rank) + " holds " +
                        std::string(dtype_name(e.dtype)) + dims_text(e.global_shape) +
                        "; every rank must describe the same global tensor");
      }
      auto& chunks = m.index[it->second].chunks;
      chunks.insert(chunks.end(), e.chunks.begin(), e.chunks.end());
    }
  }
  for (const IndexEntry& e : m.index) {
    if (const std::string why = index_problem(e, m.world_size); !why.empty()) {
      throw Error(ErrorCode::kInvalidArgument, "the saved chunks of the sharded tensor at '" + e.key +
                                                   "' do not tile it: " + why +
                                                   "; each element must be held by exactly one box across the ranks "
                                                   "(replicas marked by replica_index/replica_count)");
    }
  }
}

std::string render_failure(int rank, uint64_t generation, const std::string& error) {
  // error_handler_t::replace: an error message is not always valid UTF-8.
  return json{{"rank", rank}, {"generation", generation}, {"error", error}}.dump(-1, ' ', false,
                                                                                  json::error_handler_t::replace) +
         "\n";
}

std::string parse_failure(std::string_view text) {
  const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_object()) {
    const auto it = j.find("error");
    if (it != j.end() && it->is_string()) return it->get<std::string>();
  }
  return std::string(text);
}

std::string failure_file_name(int rank, uint64_t generation) {
  return "rank_" + std::to_string(rank) + ".g" + std::to_string(generation) + ".failed.json";
}

std::string rank_file_name(int rank, uint64_t generation) {
  return "checkpoint_" + std::to_string(rank) + ".g" + std::to_string(generation) + ".safetensors";
}

std::string receipt_file_name(int rank, uint64_t generation) {
  return "rank_" + std::to_string(rank) + ".g" + std::to_string(generation) + ".json";
}

uint64_t generation_of(std::string_view name) {
  const bool data = name.starts_with("checkpoint_") && name.ends_with(".safetensors");
  const bool receipt = name.starts_with("rank_") && name.ends_with(".json");
  if (!data && !receipt) return 0;
  const size_t g = name.find(".g");
  if (g == std::string_view::npos) return 0;
  uint64_t generation = 0;
  const char* begin = name.data() + g + 2;
  const auto [end, ec] = std::from_chars(begin, name.data() + name.size(), generation);
  if (ec != std::errc() || end == name.data() + name.size() || *end != '.') return 0;
  return generation;
}

}  // namespace fastdcp
