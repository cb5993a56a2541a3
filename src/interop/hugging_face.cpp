#include "fastdcp/interop/hugging_face.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <regex>
#include <unordered_map>
#include <unordered_set>

#include "fastdcp/checkpoint/device_targets.h"
#include "fastdcp/common/error.h"
#include "fastdcp/common/parallel.h"
#include "fastdcp/format/rank_file.h"
#include "fastdcp/io/file.h"

namespace fastdcp {

namespace hf {

namespace {

std::string lower(std::string_view text) {
  std::string out(text);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

}  // namespace

uint64_t parse_size(std::string_view text, std::string_view option) {
  const auto bad = [&] {
    return Error(ErrorCode::kInvalidArgument, std::string(option) + ": '" + std::string(text) +
                                                  "' is not a size; give bytes or a number with a unit: 5GB, 500MB, "
                                                  "2GiB (KB, MB, GB, TB are decimal; KiB, MiB, GiB, TiB binary)");
  };
  double number = 0;
  const char* end = text.data() + text.size();
  const auto [rest, ec] = std::from_chars(text.data(), end, number);
  if (ec != std::errc() || !(number > 0)) throw bad();
  const std::string unit = lower(std::string_view(rest, static_cast<size_t>(end - rest)));
  static const std::pair<const char*, double> units[] = {
      {"", 1},          {"b", 1},           {"kb", 1e3},           {"mb", 1e6},           {"gb", 1e9},
      {"tb", 1e12},     {"kib", 1024.0},    {"mib", 1048576.0},    {"gib", 1073741824.0}, {"tib", 1099511627776.0}};
  for (const auto& [name, scale] : units) {
    if (unit == name) {
      const double bytes = number * scale;
      if (bytes < 1 || bytes > 9e18) throw bad();
      return static_cast<uint64_t>(bytes);
    }
  }
  throw bad();
}

DType parse_float_dtype(std::string_view text, std::string_view option) {
  const std::string name = lower(text);
  if (name == "bf16" || name == "bfloat16") return DType::kBF16;
  if (name == "f16" || name == "fp16" || name == "float16" || name == "half") return DType::kF16;
  if (name == "f32" || name == "fp32" || name == "float32" || name == "float") return DType::kF32;
  if (name == "f64" || name == "fp64" || name == "float64" || name == "double") return DType::kF64;
  throw Error(ErrorCode::kInvalidArgument, std::string(option) + ": '" + std::string(text) +
                                               "' is not a floating dtype a cast goes to; use bf16, f16, f32 or f64");
}

bool is_castable_float(DType dtype) noexcept {
  return dtype == DType::kF16 || dtype == DType::kBF16 || dtype == DType::kF32 || dtype == DType::kF64;
}

namespace {

// Note [Casts as torch rounds]
// Every value widens exactly to float (double for F64), then narrows to the target; F64 to F16 or
// BF16 goes through F32, since torch's Half and BFloat16 are built from a float (so a double is
// rounded twice, as torch does). F32 to BF16 rounds to nearest, ties to even, and a NaN
// becomes 0x7FC0, as c10::BFloat16; F32 to F16 is IEEE's conversion (round to nearest, ties to
// even, a NaN stays a quiet NaN with its top payload bits), as torch's F16C path converts. F16 is
// done by hand: clang before 15 has no _Float16 on x86.
struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

float float_of_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Sources widen to float (double for F64): exact.
float load(float v) { return v; }
double load(double v) { return v; }
float load(F16 v) {
  const uint32_t sign = uint32_t{v.bits & 0x8000u} << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1Fu;
  const uint32_t mantissa = v.bits & 0x3FFu;
  if (exponent == 0) {  // zero or a subnormal: mantissa * 2^-24, exact in float
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return float_of_bits(sign | 0x7F800000u | (mantissa << 13));  // infinity, NaN
  return float_of_bits(sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13));
}
float load(BF16 v) { return float_of_bits(uint32_t{v.bits} << 16); }

void put(float v, float& d) { d = v; }
void put(float v, double& d) { d = v; }
void put(double v, double& d) { d = v; }
void put(float v, F16& d) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const auto sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) {  // NaN
    d.bits = static_cast<uint16_t>(sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu));
  } else if (magnitude >= 0x477FF000u) {  // 65520 and above round past 65504, the largest half
    d.bits = static_cast<uint16_t>(sign | 0x7C00u);
  } else if (magnitude < 0x38800000u) {  // below 2^-14: a subnormal half, its mantissa the value * 2^24
    d.bits = static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(float_of_bits(magnitude) * 16777216.0f)));
  } else {  // normal: rebias the exponent, round the mantissa's low 13 bits to nearest, ties to even
    uint32_t h = magnitude - ((127u - 15u) << 23);
    h += 0xFFFu + ((h >> 13) & 1u);
    d.bits = static_cast<uint16_t>(sign | (h >> 13));
  }
}
void put(float v, BF16& d) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7FFFFFFF) > 0x7F800000) {  // NaN
    d.bits = 0x7FC0;
    return;
  }
  bits += 0x7FFF + ((bits >> 16) & 1);
  d.bits = static_cast<uint16_t>(bits >> 16);
}
// A double to anything narrower than itself goes through float, as torch's conversions do.
template <class D>
void put(double v, D& d) {
  put(static_cast<float>(v), d);
}

template <class S, class D>
void convert(const void* src, void* dst, size_t n) {
  const S* s = static_cast<const S*>(src);
  D* d = static_cast<D*>(dst);
  for (size_t i = 0; i < n; ++i) put(load(s[i]), d[i]);
}

template <class S>
void convert_from(const void* src, void* dst, DType dst_dtype, size_t n) {
  switch (dst_dtype) {
    case DType::kF16: return convert<S, F16>(src, dst, n);
    case DType::kBF16: return convert<S, BF16>(src, dst, n);
    case DType::kF32: return convert<S, float>(src, dst, n);
    default: return convert<S, double>(src, dst, n);
  }
}

}  // namespace

void cast_elements(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t n) {
  if (!is_castable_float(src_dtype) || !is_castable_float(dst_dtype)) {
    throw Error(ErrorCode::kInvalidArgument, "cannot cast " + std::string(dtype_name(src_dtype)) + " to " +
                                                 std::string(dtype_name(dst_dtype)) +
                                                 ": casts go between F16, BF16, F32 and F64 only");
  }
  if (src_dtype == dst_dtype) {
    std::memcpy(dst, src, n * static_cast<size_t>(dtype_bits(src_dtype) / 8));
    return;
  }
  switch (src_dtype) {
    case DType::kF16: return convert_from<F16>(src, dst, dst_dtype, n);
    case DType::kBF16: return convert_from<BF16>(src, dst, dst_dtype, n);
    case DType::kF32: return convert_from<float>(src, dst, dst_dtype, n);
    default: return convert_from<double>(src, dst, dst_dtype, n);
  }
}

std::vector<size_t> plan_shards(const std::vector<uint64_t>& costs, uint64_t base, uint64_t max_cost) {
  std::vector<size_t> starts;
  uint64_t current = 0;
  for (size_t i = 0; i < costs.size(); ++i) {
    if (starts.empty() || current + costs[i] > max_cost) {
      starts.push_back(i);
      current = base;
    }
    current += costs[i];
  }
  return starts;
}

std::string shard_file_name(size_t index, size_t count) {
  char name[64];
  std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", index + 1, count);
  return name;
}

}  // namespace hf

namespace {

int io_threads(int requested) { return requested > 0 ? requested : std::max(4, resolve_thread_count(0)); }

// The dtypes safetensors names (docs/format.md); the others are fastdcp's own and stay inside
// fastdcp's tree.
bool safetensors_knows(DType dtype) {
  return dtype != DType::kC128 && dtype != DType::kF8_E8M0 && dtype != DType::kF4 && dtype != DType::kF6_E2M3 &&
         dtype != DType::kF6_E3M2;
}

nlohmann::ordered_json entry_json(DType dtype, const Dims& shape, uint64_t begin, uint64_t end) {
  nlohmann::ordered_json record;
  record["dtype"] = std::string(dtype_name(dtype));
  record["shape"] = shape;
  record["data_offsets"] = {begin, end};
  return record;
}

// ---- export --------------------------------------------------------------------------------

struct ExportItem {
  std::string name;
  std::string path;  // the key path in the checkpoint
  Tensor source;     // a sharded key's only while its file is written
  bool sharded = false;
  Dims shape;
  DType dtype;  // as written
  uint64_t nbytes = 0;
  uint64_t begin = 0;  // offset in its file's data
};

// The header of one safetensors file whose items are given, with their offsets assigned (largest
// elements first, so that each starts at a multiple of its element size); padded with spaces to a
// multiple of 8, after the 8-byte length.
std::string render_shard_header(std::vector<ExportItem*>& items) {
  std::stable_sort(items.begin(), items.end(),
                   [](const ExportItem* a, const ExportItem* b) { return dtype_bits(a->dtype) > dtype_bits(b->dtype); });
  nlohmann::ordered_json header;
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (ExportItem* item : items) {
    item->begin = offset;
    offset += item->nbytes;
    header[item->name] = entry_json(item->dtype, item->shape, item->begin, offset);
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const uint64_t length = json.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((length >> (8 * i)) & 0xFF);
  return out + json;
}

// An upper bound of what an item adds to its file's header.
uint64_t header_cost(const ExportItem& item) {
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  nlohmann::ordered_json one;
  one[item.name] = entry_json(item.dtype, item.shape, kMax, kMax);
  return one.dump().size();  // its braces stand for the comma that separates it
}

// Output pieces of about this size are cast and written by one thread at a time.
constexpr uint64_t kExportPieceBytes = uint64_t{8} << 20;

void write_shard(const File& file, const std::vector<ExportItem*>& items, uint64_t data_offset, int threads) {
  struct Piece {
    const ExportItem* item;
    uint64_t first, count;  // elements; count 0: the whole item
  };
  std::vector<Piece> pieces;
  for (const ExportItem* item : items) {
    const int bits = dtype_bits(item->dtype);
    const uint64_t numel = static_cast<uint64_t>(item->source.numel());
    if (bits % 8 != 0 || !item->source.is_contiguous() || numel == 0) {
      pieces.push_back({item, 0, 0});  // packed, strided (copied first) or empty: one piece
      continue;
    }
    const uint64_t per_piece = std::max<uint64_t>(1, kExportPieceBytes / static_cast<uint64_t>(bits / 8));
    for (uint64_t first = 0; first < numel; first += per_piece) {
      pieces.push_back({item, first, std::min(per_piece, numel - first)});
    }
  }
  parallel_for(pieces.size(), threads, [&](size_t p) {
    const Piece& piece = pieces[p];
    const ExportItem& item = *piece.item;
    if (item.nbytes == 0) return;
    Tensor source = item.source;
    if (!source.is_contiguous()) {
      Tensor copy = Tensor::empty_cpu(source.dtype(), source.shape());
      copy_tensor(copy, source);
      source = std::move(copy);
    }
    const uint64_t out_element = static_cast<uint64_t>(dtype_bits(item.dtype) / 8);
    const uint64_t out_offset = data_offset + item.begin + piece.first * out_element;
    const char* src = static_cast<const char*>(source.data_ptr()) +
                      piece.first * static_cast<uint64_t>(dtype_bits(source.dtype()) / 8);
    if (source.dtype() == item.dtype) {
      file.write_at(src, piece.count ? piece.count * out_element : item.nbytes, out_offset);
      return;
    }
    const uint64_t count = piece.count ? piece.count : static_cast<uint64_t>(source.numel());
    thread_local std::vector<char> buffer;
    buffer.resize(count * out_element);
    hf::cast_elements(src, source.dtype(), buffer.data(), item.dtype, count);
    file.write_at(buffer.data(), buffer.size(), out_offset);
  });
}

// Names an earlier export may have left: the single file, shards, the index.
bool is_export_name(const std::string& name) {
  static const std::regex shard(R"(model-[0-9]{5,}-of-[0-9]{5,}\.safetensors)");
  return name == kHfSingleFile || name == kHfIndexFile || std::regex_match(name, shard);
}

std::string temporary_name(const std::string& name) { return "." + name + ".tmp"; }

// Tied weights: tensors of a tree that are one view of the same memory (Note [Tied weights in an
// export]). Export and import both find them as they walk the tree.
class TiedViews {
 public:
  // The index given with an earlier tensor that is the same view as `t`, or nullopt; `t` is
  // remembered with `index` either way. Empty tensors tie to nothing.
  std::optional<size_t> tie(const Tensor& t, size_t index) {
    if (t.nbytes() == 0) return std::nullopt;
    std::vector<std::pair<Tensor, size_t>>& same_address = seen_[t.data_ptr()];
    std::optional<size_t> out;
    for (const auto& [earlier, i] : same_address) {
      if (same_view(earlier, t)) {
        out = i;
        break;
      }
    }
    same_address.emplace_back(t, index);
    return out;
  }

 private:
  static bool same_view(const Tensor& a, const Tensor& b) {
    return a.data_ptr() == b.data_ptr() && a.device() == b.device() && a.dtype() == b.dtype() &&
           a.shape() == b.shape() && a.strides() == b.strides();
  }
  std::unordered_map<const void*, std::vector<std::pair<Tensor, size_t>>> seen_;
};

}  // namespace

HfExportReport export_hugging_face(const std::string& checkpoint, const std::string& out,
                                   const HfExportOptions& options) {
  if (options.max_shard_bytes == 0) throw Error(ErrorCode::kInvalidArgument, "max_shard_bytes must be positive");
  if (options.dtype && !hf::is_castable_float(*options.dtype)) {
    throw Error(ErrorCode::kInvalidArgument, "dtype: exports cast to F16, BF16, F32 or F64, not " +
                                                 std::string(dtype_name(*options.dtype)));
  }
  const Manifest manifest = read_manifest(checkpoint);
  if (options.rank < 0 || options.rank >= manifest.world_size) {
    throw Error(ErrorCode::kInvalidArgument, "rank " + std::to_string(options.rank) + ": '" + checkpoint +
                                                 "' was written by " + std::to_string(manifest.world_size) +
                                                 " ranks (0 to " + std::to_string(manifest.world_size - 1) + ")");
  }
  // The output directory first, so that a refusal reads nothing.
  std::error_code error;
  if (std::filesystem::exists(out, error) && !std::filesystem::is_directory(out, error)) {
    throw Error(ErrorCode::kInvalidArgument, "'" + out + "' exists and is not a directory: export into a directory");
  }
  create_directories(out);
  const Directory dir = Directory::open(out);
  const std::vector<std::string> existing = dir.list();
  if (!existing.empty() && !options.overwrite) {
    throw Error(ErrorCode::kFailedPrecondition,
                "'" + out + "' is not empty (it holds '" + existing.front() + "'" +
                    (existing.size() > 1 ? " and " + std::to_string(existing.size() - 1) + " more" : std::string()) +
                    "): export into a new directory, or ask to overwrite (--overwrite; overwrite=True), which "
                    "replaces only model*.safetensors and their index");
  }

  // Mapped: each tensor's pages are read from the page cache as it is written; sharded keys are
  // assembled a file at a time (Note [Hugging Face model directories]).
  ReadOptions read_options;
  read_options.use_mmap = true;
  read_options.assemble_sharded = false;
  read_options.verify_checksums = options.verify_checksums;
  read_options.io_threads = options.io_threads;
  const CheckpointReader reader(RankInfo{options.rank, manifest.world_size}, read_options);
  Value state = reader.read(checkpoint);

  HfExportReport report;
  std::vector<ExportItem> items;
  std::unordered_map<std::string, std::string> path_of_name;
  TiedViews tied;  // items of plain tensors
  for_each_leaf(state, [&](const std::string& path, Value& v) {
    if (!path.starts_with(options.prefix)) return;
    const auto skip = [&](const std::string& why) { report.skipped.emplace_back(path, why); };
    if (!v.is_tensor() && !v.is_sharded()) {
      skip(std::string("not a tensor (") + Value::kind_name(v.kind()) + ")");
      return;
    }
    // A sharded key's traits are its chunks' (a rank that holds none has the defaults).
    const Tensor* t = v.is_tensor() ? &v.as_tensor()
                      : v.as_sharded().chunks.empty() ? nullptr
                                                      : &v.as_sharded().chunks.front().data;
    const DType dtype = v.is_tensor() ? t->dtype() : v.as_sharded().dtype;
    if (t && (t->traits().conj || t->traits().neg || !t->traits().framework_dtype.empty())) {
      skip("its bytes are not its values (a lazy conjugate or negative, or a framework dtype stored as another)");
      return;
    }
    if (!safetensors_knows(dtype)) {
      skip("safetensors has no dtype " + std::string(dtype_name(dtype)));
      return;
    }
    std::string name = options.strip_prefix ? path.substr(options.prefix.size()) : path;
    if (name.empty() || name == "__metadata__") {
      skip("its name would be '" + name + "', which safetensors cannot hold");
      return;
    }
    if (const auto i = v.is_tensor() ? tied.tie(*t, items.size()) : std::nullopt) {
      skip("the same tensor as '" + items[*i].path + "' (tied weights), exported once as '" + items[*i].name +
           "', as transformers' save_pretrained does");
      return;
    }
    const auto [it, fresh] = path_of_name.emplace(name, path);
    if (!fresh) {
      throw Error(ErrorCode::kInvalidArgument, "'" + path + "' and '" + it->second + "' would both be named '" + name +
                                                   "' in the export: rename one of them");
    }
    ExportItem item;
    item.name = std::move(name);
    item.path = path;
    item.sharded = v.is_sharded();
    if (v.is_tensor()) item.source = *t;
    item.shape = v.is_tensor() ? t->shape() : v.as_sharded().global_shape;
    item.dtype = options.dtype && hf::is_castable_float(dtype) ? *options.dtype : dtype;
    item.nbytes = *contiguous_nbytes(item.dtype, item.shape);  // the shape of a tensor or a checked index entry
    items.push_back(std::move(item));
  });
  if (items.empty()) {
    throw Error(ErrorCode::kInvalidArgument, "'" + checkpoint + "' has no tensor" +
                                                 (options.prefix.empty() ? "" : " under the prefix '" + options.prefix + "'") +
                                                 " to export");
  }

  // Shards: each file's header and data at most max_shard_bytes, unless one tensor is larger.
  std::vector<uint64_t> costs;
  for (const ExportItem& item : items) costs.push_back(item.nbytes + header_cost(item));
  const uint64_t base = 8 + nlohmann::ordered_json({{"__metadata__", {{"format", "pt"}}}}).dump().size() + 8;
  std::vector<size_t> starts = hf::plan_shards(costs, base, options.max_shard_bytes);
  starts.push_back(items.size());
  const size_t count = starts.size() - 1;

  std::vector<std::string> written;  // temporary names created, removed again on failure
  try {
    const int threads = io_threads(options.io_threads);
    nlohmann::json weight_map = nlohmann::json::object();
    for (size_t s = 0; s < count; ++s) {
      const std::string name = count == 1 ? std::string(kHfSingleFile) : hf::shard_file_name(s, count);
      std::vector<ExportItem*> shard;
      for (size_t i = starts[s]; i < starts[s + 1]; ++i) {
        shard.push_back(&items[i]);
        weight_map[items[i].name] = name;
        report.total_size += items[i].nbytes;
      }
      // This file's sharded keys, assembled now and released once it is written: the export holds
      // at most one file's worth of them.
      std::vector<std::string> sharded_keys;
      for (const ExportItem* item : shard) {
        if (item->sharded) sharded_keys.push_back(item->path);
      }
      std::vector<Tensor> assembled = reader.read_sharded(checkpoint, sharded_keys);
      uint64_t assembled_bytes = 0;
      for (size_t i = 0, k = 0; i < shard.size(); ++i) {
        if (!shard[i]->sharded) continue;
        assembled_bytes += assembled[k].nbytes();
        shard[i]->source = std::move(assembled[k++]);
      }
      report.peak_sharded_bytes = std::max(report.peak_sharded_bytes, assembled_bytes);
      const std::string header = render_shard_header(shard);
      uint64_t data_size = 0;
      for (const ExportItem* item : shard) data_size += item->nbytes;
      const std::string temporary = temporary_name(name);
      dir.remove(temporary);  // a crashed export's leftover: ours (a link goes, never its target)
      File file = dir.create(temporary);
      written.push_back(temporary);
      file.reserve(header.size() + data_size);
      file.write_at(header.data(), header.size(), 0);
      write_shard(file, shard, header.size(), threads);
      for (ExportItem* item : shard) {
        if (item->sharded) item->source = Tensor();
      }
      file.sync();
      file.close();
      report.files.push_back(name);
    }
    std::string index;
    if (count > 1) {
      const nlohmann::json json = {{"metadata", {{"total_size", report.total_size}}}, {"weight_map", weight_map}};
      index = json.dump(2) + "\n";
      const std::string temporary = temporary_name(std::string(kHfIndexFile));
      dir.remove(temporary);
      File file = dir.create(temporary);
      written.push_back(temporary);
      file.write_at(index.data(), index.size(), 0);
      file.sync();
      file.close();
    }
    // Every file is written: into place, the index last.
    for (const std::string& name : report.files) dir.rename(temporary_name(name), name);
    if (count > 1) {
      dir.rename(temporary_name(std::string(kHfIndexFile)), std::string(kHfIndexFile));
      report.index_file = kHfIndexFile;
    }
    written.clear();
    // An earlier export's files that this one does not replace would mislead a loader.
    const std::unordered_set<std::string> ours(report.files.begin(), report.files.end());
    for (const std::string& name : dir.list()) {
      if (is_export_name(name) && !ours.contains(name) && name != report.index_file) dir.remove(name);
    }
    dir.sync();
  } catch (...) {
    for (const std::string& name : written) {
      try {
        dir.remove(name);
      } catch (...) {  // the first error is the one to report
      }
    }
    throw;
  }
  report.tensors = items.size();
  return report;
}

// ---- import --------------------------------------------------------------------------------

namespace {

// The files of a model directory, their headers, and which file holds each tensor.
struct HfFiles {
  std::string described;  // how errors name the source: the index file or the safetensors file
  std::vector<File> files;
  std::vector<RankFileHeader> headers;
  struct Stored {
    std::string name;
    size_t file;
    size_t entry;
  };
  std::vector<Stored> tensors;  // in the index's (or the file's) order
};

RankFileHeader read_plain_header(const File& file) {
  RankFileHeader header = RankFileHeader::read(
      [&](void* dst, uint64_t offset, uint64_t n) { file.read_at(dst, n, offset); }, file.size(), file.path());
  if (header.has_checksums()) {
    throw Error(ErrorCode::kInvalidArgument, "'" + file.path() +
                                                 "' is a fastdcp rank file, not a Hugging Face weights file: load its "
                                                 "checkpoint directory with CheckpointReader");
  }
  return header;
}

HfFiles open_single(const std::string& path) {
  HfFiles out;
  out.described = path;
  out.files.push_back(File::open(path, File::Mode::kRead));
  out.headers.push_back(read_plain_header(out.files[0]));
  const auto& entries = out.headers[0].entries();
  for (size_t e = 0; e < entries.size(); ++e) out.tensors.push_back({entries[e].name, 0, e});
  return out;
}

HfFiles open_index(const std::string& index_path) {
  const std::filesystem::path dir = std::filesystem::path(index_path).parent_path();
  HfFiles out;
  out.described = index_path;
  const auto corrupt = [&](const std::string& what) {
    return Error(ErrorCode::kDataLoss, "'" + index_path + "' is not a Hugging Face index: " + what);
  };
  std::string text;
  {
    const File file = File::open(index_path, File::Mode::kRead);
    const uint64_t size = file.size();
    if (size > (uint64_t{1} << 30)) throw corrupt("it is larger than 1 GiB");
    text.resize(size);
    file.read_at(text.data(), size, 0);
  }
  nlohmann::ordered_json index;
  try {
    index = nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw corrupt(std::string("it is not JSON (") + e.what() + ")");
  }
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
    throw corrupt("it has no \"weight_map\" object");
  }
  std::unordered_map<std::string, size_t> file_of;
  std::vector<std::unordered_map<std::string_view, size_t>> entry_of;
  for (const auto& [name, value] : index["weight_map"].items()) {
    if (!value.is_string()) throw corrupt("the weight_map entry of '" + name + "' is not a file name");
    const std::string file_name = value.get<std::string>();
    if (file_name.empty() || file_name == "." || file_name == ".." || file_name.find('/') != std::string::npos ||
        file_name.find('\0') != std::string::npos) {
      throw corrupt("the weight_map maps '" + name + "' to '" + file_name +
                    "', which is not a file name in the model directory");
    }
    auto [it, fresh] = file_of.emplace(file_name, out.files.size());
    if (fresh) {
      const std::string file_path = (dir / file_name).string();
      if (!path_exists(file_path)) {
        throw Error(ErrorCode::kNotFound, "'" + index_path + "' maps '" + name + "' to '" + file_name +
                                              "', which does not exist in '" + dir.string() + "'");
      }
      out.files.push_back(File::open(file_path, File::Mode::kRead));
      out.headers.push_back(read_plain_header(out.files.back()));
      auto& entries = entry_of.emplace_back();
      for (size_t e = 0; e < out.headers.back().entries().size(); ++e) {
        entries.emplace(out.headers.back().entries()[e].name, e);
      }
    }
    const auto entry = entry_of[it->second].find(name);
    if (entry == entry_of[it->second].end()) {
      throw Error(ErrorCode::kDataLoss, "'" + index_path + "' maps '" + name + "' to '" + file_name +
                                            "', which holds no tensor of that name");
    }
    out.tensors.push_back({name, it->second, entry->second});
  }
  return out;
}

// A model directory (model.safetensors first, as transformers), its index file, or one
// safetensors file.
HfFiles open_hugging_face(const std::string& path) {
  std::error_code error;
  const std::filesystem::file_status status = std::filesystem::status(path, error);
  if (!std::filesystem::exists(status)) throw Error(ErrorCode::kNotFound, "'" + path + "' does not exist");
  if (std::filesystem::is_directory(status)) {
    const std::string single = join_path(path, std::string(kHfSingleFile));
    if (path_exists(single)) return open_single(single);
    const std::string index = join_path(path, std::string(kHfIndexFile));
    if (path_exists(index)) return open_index(index);
    throw Error(ErrorCode::kNotFound, "'" + path + "' holds neither " + std::string(kHfSingleFile) + " nor " +
                                          std::string(kHfIndexFile) +
                                          " (pytorch_model.bin is a pickle, which fastdcp does not read)");
  }
  if (path.ends_with(".json")) return open_index(path);
  return open_single(path);
}

// One box of a stored tensor, bound for `dst` (whose shape is the box's sizes).
struct Target {
  std::string key;
  Tensor dst;
  Dims offset;        // of the box in the stored tensor
  Dims global_shape;  // what the stored tensor's shape must be
};

std::string box_text(const Dims& offset, const Dims& sizes) {
  std::string out = "[";
  for (size_t d = 0; d < sizes.size(); ++d) {
    out += (d ? ", " : "") + std::to_string(offset[d]) + ":" + std::to_string(offset[d] + sizes[d]);
  }
  return out + "]";
}

std::string shape_text(const Dims& shape) {
  std::string out = "[";
  for (size_t d = 0; d < shape.size(); ++d) out += (d ? ", " : "") + std::to_string(shape[d]);
  return out + "]";
}

std::string list_keys(const std::vector<std::string>& keys) {
  std::string out;
  for (size_t i = 0; i < keys.size() && i < 10; ++i) out += (i ? ", " : "") + keys[i];
  if (keys.size() > 10) out += " (and " + std::to_string(keys.size() - 10) + " more)";
  return out;
}

std::string map_name(const std::string& name, const HfImportOptions& options) {
  std::string_view rest = name;
  if (!options.strip_prefix.empty() && rest.starts_with(options.strip_prefix)) rest.remove_prefix(options.strip_prefix.size());
  return options.add_prefix + std::string(rest);
}

// A box read from the file: contiguous byte runs, in the box's row-major order.
struct Run {
  uint64_t offset;  // in the file
  uint64_t size;
};

std::vector<Run> box_runs(const StoredEntry& entry, uint64_t data_offset, const Dims& offset, const Dims& sizes) {
  const Dims& shape = entry.shape;
  const size_t n = shape.size();
  const uint64_t base = data_offset + entry.begin;
  // The innermost dim the box does not cover whole: everything inside it is one run.
  size_t j = n;
  while (j > 0 && offset[j - 1] == 0 && sizes[j - 1] == shape[j - 1]) --j;
  if (j == 0) return {{base, entry.nbytes}};
  const uint64_t element = static_cast<uint64_t>(dtype_bits(entry.dtype) / 8);
  std::vector<uint64_t> stride(n, element);  // bytes
  for (size_t d = n - 1; d-- > 0;) stride[d] = stride[d + 1] * static_cast<uint64_t>(shape[d + 1]);
  const size_t cut = j - 1;  // runs span sizes[cut] rows of the dims after it
  const uint64_t run_bytes = static_cast<uint64_t>(sizes[cut]) * stride[cut];
  std::vector<int64_t> index(cut, 0);
  std::vector<Run> runs;
  while (true) {
    uint64_t at = base + static_cast<uint64_t>(offset[cut]) * stride[cut];
    for (size_t d = 0; d < cut; ++d) at += static_cast<uint64_t>(offset[d] + index[d]) * stride[d];
    runs.push_back({at, run_bytes});
    size_t d = cut;
    while (d > 0 && ++index[d - 1] == sizes[d - 1]) index[--d] = 0;
    if (d == 0) break;
  }
  return runs;
}

// Targets whose bytes go through a temporary (another dtype, a strided target) are read in waves
// of at most this many temporary bytes, so that memory stays bounded for any model size.
constexpr uint64_t kWaveBytes = uint64_t{1} << 30;
constexpr uint64_t kReadPieceBytes = uint64_t{16} << 20;

void read_targets(const HfFiles& source, const std::vector<std::pair<size_t, const HfFiles::Stored*>>& plan,
                  const std::vector<Target>& targets, int threads) {
  struct Job {
    const Target* target;
    const HfFiles::Stored* stored;
    Tensor landing;  // the target itself, or a contiguous temporary of the stored dtype
  };
  struct Read {
    size_t file;
    uint64_t offset;
    char* dst;
    uint64_t size;
  };
  size_t next = 0;
  while (next < plan.size()) {
    std::vector<Job> jobs;
    uint64_t temporary_bytes = 0;
    while (next < plan.size() && (jobs.empty() || temporary_bytes < kWaveBytes)) {
      const auto& [t, stored] = plan[next++];
      const Target& target = targets[t];
      const StoredEntry& entry = source.headers[stored->file].entries()[stored->entry];
      if (target.dst.numel() == 0) continue;
      Job job{&target, stored, target.dst};
      if (target.dst.dtype() != entry.dtype || !target.dst.is_contiguous()) {
        job.landing = Tensor::empty_cpu(entry.dtype, target.dst.shape());
        temporary_bytes += job.landing.nbytes();
      }
      jobs.push_back(std::move(job));
    }
    std::vector<Read> reads;
    for (const Job& job : jobs) {
      const StoredEntry& entry = source.headers[job.stored->file].entries()[job.stored->entry];
      char* dst = static_cast<char*>(job.landing.data_ptr());
      for (const Run& run : box_runs(entry, source.headers[job.stored->file].data_offset(), job.target->offset,
                                     job.target->dst.shape())) {
        for (uint64_t done = 0; done < run.size; done += kReadPieceBytes) {
          const uint64_t size = std::min(kReadPieceBytes, run.size - done);
          reads.push_back({job.stored->file, run.offset + done, dst, size});
          dst += size;
        }
      }
    }
    parallel_for(reads.size(), threads, [&](size_t r) {
      source.files[reads[r].file].read_at(reads[r].dst, reads[r].size, reads[r].offset);
    });
    parallel_for(jobs.size(), threads, [&](size_t j) {
      const Job& job = jobs[j];
      const Tensor& dst = job.target->dst;
      if (job.landing.data_ptr() == dst.data_ptr() && job.landing.dtype() == dst.dtype()) return;  // read in place
      if (job.landing.dtype() == dst.dtype()) {
        copy_tensor(dst, job.landing);
        return;
      }
      const size_t n = static_cast<size_t>(dst.numel());
      if (dst.is_contiguous()) {
        hf::cast_elements(job.landing.data_ptr(), job.landing.dtype(), dst.data_ptr(), dst.dtype(), n);
        return;
      }
      const Tensor cast = Tensor::empty_cpu(dst.dtype(), dst.shape());
      hf::cast_elements(job.landing.data_ptr(), job.landing.dtype(), cast.data_ptr(), cast.dtype(), n);
      copy_tensor(dst, cast);
    });
  }
}

// Matches the targets against the stored tensors, checks everything, then reads.
// `tied_to`: a target key that is the same tensor as an earlier one (Note [Tied weights in an
// export]), mapped to that key; either name in the files fills both.
LoadResult load_targets(const HfFiles& source, const std::vector<Target>& targets,
                        const std::vector<std::string>& target_keys, const HfImportOptions& options,
                        const std::unordered_map<std::string, std::string>& tied_to = {}) {
  std::unordered_map<std::string, const HfFiles::Stored*> stored_of;
  std::unordered_map<std::string, std::string> original_of;
  LoadResult result;
  std::unordered_set<std::string> keys(target_keys.begin(), target_keys.end());
  for (const HfFiles::Stored& stored : source.tensors) {
    std::string key = map_name(stored.name, options);
    const auto [it, fresh] = original_of.emplace(key, stored.name);
    if (!fresh) {
      throw Error(ErrorCode::kInvalidArgument, "'" + stored.name + "' and '" + it->second + "' of '" + source.described +
                                                   "' both become '" + key + "' with these prefix options");
    }
    if (!keys.contains(key)) result.unexpected_keys.push_back(key);
    stored_of.emplace(std::move(key), &stored);
  }
  // Tied keys: one of them stored fills them all.
  std::unordered_set<std::string> stored_groups;
  for (const std::string& key : target_keys) {
    const auto tied = tied_to.find(key);
    const std::string& group = tied == tied_to.end() ? key : tied->second;
    if (stored_of.contains(key)) stored_groups.insert(group);
  }
  for (const std::string& key : target_keys) {
    const auto tied = tied_to.find(key);
    if (!stored_of.contains(key) && !stored_groups.contains(tied == tied_to.end() ? key : tied->second)) {
      result.missing_keys.push_back(key);
    }
  }
  if (options.strict && (!result.missing_keys.empty() || !result.unexpected_keys.empty())) {
    std::string message = "strict load of '" + source.described + "' refused; nothing was changed.";
    if (!result.missing_keys.empty()) message += " Missing from the files: " + list_keys(result.missing_keys) + ".";
    if (!result.unexpected_keys.empty()) message += " Not in the target: " + list_keys(result.unexpected_keys) + ".";
    if (options.strip_prefix.empty() && options.add_prefix.empty()) {
      message += " If the names differ by a prefix, strip or add it.";
    }
    throw Error(ErrorCode::kFailedPrecondition, message);
  }
  std::vector<std::pair<size_t, const HfFiles::Stored*>> plan;
  for (size_t t = 0; t < targets.size(); ++t) {
    const Target& target = targets[t];
    const auto it = stored_of.find(target.key);
    if (it == stored_of.end()) continue;  // missing, or filled through its tie
    const HfFiles::Stored& stored = *it->second;
    const StoredEntry& entry = source.headers[stored.file].entries()[stored.entry];
    const std::string where = "cannot load '" + target.key + "' from '" + stored.name + "' in '" +
                              source.files[stored.file].path() + "': ";
    const DType dtype = target.dst.dtype();
    if (entry.shape != target.global_shape) {
      throw Error(ErrorCode::kInvalidArgument, where + "the target's shape is " + shape_text(target.global_shape) +
                                                   ", the file's " + shape_text(entry.shape));
    }
    if (dtype != entry.dtype && !(options.cast && hf::is_castable_float(dtype) && hf::is_castable_float(entry.dtype))) {
      throw Error(ErrorCode::kInvalidArgument,
                  where + "the target is " + std::string(dtype_name(dtype)) + ", the file holds " +
                      std::string(dtype_name(entry.dtype)) +
                      (hf::is_castable_float(dtype) && hf::is_castable_float(entry.dtype)
                           ? "; ask for a cast (cast=True) to convert it"
                           : "; only floating tensors (F16, BF16, F32, F64) are cast"));
    }
    if (!target.dst.device().is_cpu()) {
      throw Error(ErrorCode::kInvalidArgument, where + "the target is on " + target.dst.device().str() +
                                                   "; load into CPU tensors");
    }
    const Dims& sizes = target.dst.shape();
    bool whole = true;
    for (size_t d = 0; d < sizes.size(); ++d) {
      if (target.offset[d] < 0 || target.offset[d] + sizes[d] > entry.shape[d]) {
        throw Error(ErrorCode::kInvalidArgument, where + "the box " + box_text(target.offset, sizes) +
                                                     " lies outside the tensor");
      }
      whole = whole && target.offset[d] == 0 && sizes[d] == entry.shape[d];
    }
    if (!whole && dtype_is_sub_byte(entry.dtype)) {
      throw Error(ErrorCode::kInvalidArgument, where + "a packed " + std::string(dtype_name(entry.dtype)) +
                                                   " tensor loads only whole");
    }
    plan.emplace_back(t, &stored);
  }
  read_targets(source, plan, targets, io_threads(options.io_threads));
  return result;
}

}  // namespace

LoadResult load_hugging_face(const std::string& path, Value& target, const HfImportOptions& options) {
  DeviceTargets device_targets(target, nullptr);  // Note [Loading into device tensors]
  const HfFiles source = open_hugging_face(path);
  std::vector<Target> targets;
  std::vector<std::string> keys;
  std::unordered_map<std::string, std::string> tied_to;
  TiedViews tied;  // plain targets
  for_each_leaf(target, [&](const std::string& key, Value& v) {
    if (v.is_tensor()) {
      const Tensor& t = v.as_tensor();
      if (const auto i = tied.tie(t, targets.size())) tied_to.emplace(key, targets[*i].key);
      targets.push_back({key, t, Dims::zeros(t.dim()), t.shape()});
      keys.push_back(key);
    } else if (v.is_sharded()) {
      const ShardedTensor& s = v.as_sharded();
      s.validate(key);
      for (const ShardChunk& chunk : s.chunks) targets.push_back({key, chunk.data, chunk.offset, s.global_shape});
      keys.push_back(key);
    }
  });
  LoadResult result = load_targets(source, targets, keys, options, tied_to);
  device_targets.copy_back();
  return result;
}

Value read_hugging_face(const std::string& path, const HfImportOptions& options) {
  if (options.dtype && !hf::is_castable_float(*options.dtype)) {
    throw Error(ErrorCode::kInvalidArgument, "dtype: loads cast to F16, BF16, F32 or F64, not " +
                                                 std::string(dtype_name(*options.dtype)));
  }
  const HfFiles source = open_hugging_face(path);
  std::vector<Target> targets;
  std::vector<std::string> keys;
  Value out = Value::dict();
  for (const HfFiles::Stored& stored : source.tensors) {
    const StoredEntry& entry = source.headers[stored.file].entries()[stored.entry];
    const DType dtype = options.dtype && hf::is_castable_float(entry.dtype) ? *options.dtype : entry.dtype;
    const Tensor tensor = Tensor::empty_cpu(dtype, entry.shape);
    std::string key = map_name(stored.name, options);
    out.insert(key, tensor);  // a repeated name is an error naming it
    targets.push_back({key, tensor, Dims::zeros(entry.shape.size()), entry.shape});
    keys.push_back(std::move(key));
  }
  HfImportOptions all = options;
  all.cast = true;
  load_targets(source, targets, keys, all);
  return out;
}

}  // namespace fastdcp
