#include "fastdcp/format/manifest.h"

#include <charconv>
#include <nlohmann/json.hpp>

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

json parse_object(std::string_view text, const std::string& file) {
  json j = json::parse(text.begin(), text.end(), nullptr, false);
  if (!j.is_object()) corrupt(file, "it is not a JSON object");
  return j;
}

}  // namespace

std::string render_manifest(const Manifest& m) {
  json ranks = json::array();
  for (const auto& r : m.ranks) ranks.push_back(rank_record(r));
  return json{{"format", "fastdcp.manifest"}, {"version", m.version}, {"generation", m.generation},
              {"world_size", m.world_size}, {"ranks", std::move(ranks)}}
             .dump(1) + "\n";
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
  return m;
}

std::string render_receipt(const ManifestRank& receipt, uint64_t generation) {
  json j = rank_record(receipt);
  j["generation"] = generation;
  return j.dump() + "\n";
}

ManifestRank parse_receipt(std::string_view text, uint64_t generation, const std::string& file) {
  const json j = parse_object(text, file);
  if (field<uint64_t>(j, "generation", file) != generation) corrupt(file, "it is for another generation");
  return parse_rank(j, file);
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
