// The rank file header: planning the layout, rendering the JSON (by hand) and parsing it
// (simdjson, used only in this file). See Note [Rank file layout].

#include "fastdcp/format/rank_file.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstring>
#include <optional>
#include <simdjson.h>
#include <unordered_map>
#include <unordered_set>

#include "fastdcp/common/error.h"

namespace fastdcp {
namespace {

constexpr std::string_view kVersionKey = "fastdcp.version";
constexpr std::string_view kTreeKey = "fastdcp.tree";
constexpr std::string_view kStoragesKey = "fastdcp.storages";
constexpr std::string_view kChunkBytesKey = "fastdcp.chunk_bytes";
constexpr std::string_view kChecksumsKey = "fastdcp.crc32c";
constexpr std::string_view kRawPrefix = "__fastdcp__.storage.";
constexpr uint64_t kRawPadding = 64;
// The deepest JSON the parser takes: a tree level costs up to three JSON levels (a dict's {"d":[
// and the [key, value] pair), so any tree within kMaxTreeDepth parses, and deeper JSON is a tree
// beyond it (Note [Tree depth limit]). The parser's depth bookkeeping costs 9 bytes a level, so it
// is sized to what a document of its length can nest.
constexpr size_t kMaxJsonDepth = 3 * kMaxTreeDepth + 8;

// The one message for a tree beyond the limit, on save and load alike.
std::string too_deep() {
  return "containers nest more than " + std::to_string(kMaxTreeDepth) + " levels deep, the format's limit";
}

// dtypes that safetensors' readers (Python, torch) understand; others are stored raw.
bool safetensors_knows(DType dtype) {
  switch (dtype) {
    case DType::kBool: case DType::kU8: case DType::kI8: case DType::kI16: case DType::kU16: case DType::kI32:
    case DType::kU32: case DType::kI64: case DType::kU64: case DType::kF16: case DType::kBF16: case DType::kF32:
    case DType::kF64: case DType::kC64: case DType::kF8_E4M3: case DType::kF8_E5M2: case DType::kF8_E4M3FNUZ:
    case DType::kF8_E5M2FNUZ:
      return true;
    default:
      return false;
  }
}

uint64_t round_up(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }

// ---- small encoders ------------------------------------------------------------------------

constexpr char kBase64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

void append_base64(std::string& out, std::string_view in) {
  size_t i = 0;
  for (; i + 3 <= in.size(); i += 3) {
    const uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8) | uint8_t(in[i + 2]);
    out += kBase64[v >> 18];
    out += kBase64[(v >> 12) & 63];
    out += kBase64[(v >> 6) & 63];
    out += kBase64[v & 63];
  }
  if (const size_t rest = in.size() - i; rest > 0) {
    const uint32_t v = (uint8_t(in[i]) << 16) | (rest == 2 ? uint8_t(in[i + 1]) << 8 : 0);
    out += kBase64[v >> 18];
    out += kBase64[(v >> 12) & 63];
    out += rest == 2 ? kBase64[(v >> 6) & 63] : '=';
    out += '=';
  }
}

std::optional<std::string> decode_base64(std::string_view in) {
  if (in.size() % 4 != 0) return std::nullopt;
  std::string out;
  out.reserve(in.size() / 4 * 3);
  auto digit = [](char c) -> int {
    const char* p = std::strchr(kBase64, c);
    return c != '\0' && p ? static_cast<int>(p - kBase64) : -1;
  };
  for (size_t i = 0; i < in.size(); i += 4) {
    int d[4];
    int pad = 0;
    for (int k = 0; k < 4; ++k) {
      if (in[i + k] == '=' && i + 4 == in.size() && k >= 2) {
        d[k] = 0;
        ++pad;
      } else if (pad > 0 || (d[k] = digit(in[i + k])) < 0) {
        return std::nullopt;
      }
    }
    const uint32_t v = (d[0] << 18) | (d[1] << 12) | (d[2] << 6) | d[3];
    out += static_cast<char>(v >> 16);
    if (pad < 2) out += static_cast<char>((v >> 8) & 0xFF);
    if (pad < 1) out += static_cast<char>(v & 0xFF);
  }
  return out;
}

bool valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n;
    uint32_t cp;
    if (c < 0x80) { ++i; continue; }
    if ((c & 0xE0) == 0xC0) { n = 1; cp = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { n = 2; cp = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { n = 3; cp = c & 0x07; }
    else return false;
    if (i + n >= s.size()) return false;
    for (size_t k = 1; k <= n; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10FFFF ||
        (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += n + 1;
  }
  return true;
}

void append_json_string(std::string& out, std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  out += '"';
  size_t run = 0;  // start of the characters not yet appended, which need no escape
  for (size_t i = 0; i < s.size(); ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c != '"' && c != '\\') continue;
    out.append(s.data() + run, i - run);
    run = i + 1;
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        out += "\\u00";
        out += kHex[c >> 4];
        out += kHex[c & 15];
    }
  }
  out.append(s.data() + run, s.size() - run);
  out += '"';
}

template <class T>
void append_number(std::string& out, T v) {
  char buffer[32];
  const auto [end, ec] = std::to_chars(buffer, buffer + sizeof buffer, v);
  out.append(buffer, end);
}

void append_double(std::string& out, double v) {
  if (std::isnan(v)) {
    out += R"({"f":"nan"})";
  } else if (std::isinf(v)) {
    out += v > 0 ? R"({"f":"inf"})" : R"({"f":"-inf"})";
  } else {
    const size_t start = out.size();
    append_number(out, v);  // shortest text that reads back to the same double
    if (out.find_first_of(".eE", start) == std::string::npos) out += ".0";  // stays a float
  }
}

void append_dims(std::string& out, const Dims& dims) {
  out += '[';
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) out += ',';
    append_number(out, dims[i]);
  }
  out += ']';
}

// ---- planning ------------------------------------------------------------------------------

struct StorageUse {
  Storage storage;
  size_t uses = 0;
  const Tensor* first = nullptr;
  std::string first_path;
};

// Calls visit(value, key_path) on every tensor and visit_sharded(value, key_path) on every sharded
// leaf, in tree order, without recursion.
template <class Visit, class VisitSharded>
void for_each_tensor(const Value& root, Visit&& visit, VisitSharded&& visit_sharded) {
  for_each_leaf(root, [&](const std::string& path, const Value& v) {
    if (v.is_tensor()) {
      visit(v.as_tensor(), path);
    } else if (v.is_sharded()) {
      visit_sharded(v.as_sharded(), path);
    }
  });
}

// A tensor record's 6th element: the non-default traits (docs/format.md).
void append_traits(std::string& out, const TensorTraits& traits, const std::string& path) {
  if (traits.quantized) {
    // Scale and zero point (per tensor or per channel) are not captured: the bytes alone would
    // load as different values.
    throw Error(ErrorCode::kInvalidArgument, "cannot save the tensor at '" + path +
                                                 "': it is quantized, and fastdcp does not store scales and zero "
                                                 "points; save its dequantize() or int_repr() with its q_scale()");
  }
  out += ",{";
  const size_t start = out.size();
  auto flag = [&](bool on, std::string_view key) {
    if (!on) return;
    if (out.size() > start) out += ',';
    append_json_string(out, key);
    out += ":true";
  };
  flag(traits.conj, "conj");
  flag(traits.neg, "neg");
  flag(traits.parameter, "param");
  flag(traits.requires_grad, "grad");
  if (!traits.framework_dtype.empty()) {
    if (out.size() > start) out += ',';
    out += "\"dtype\":";
    if (!valid_utf8(traits.framework_dtype)) {
      throw Error(ErrorCode::kInvalidArgument, "cannot save the tensor at '" + path + "': its dtype name is not UTF-8");
    }
    append_json_string(out, traits.framework_dtype);
  }
  out += '}';
}

// A tensor record's element list: [storage id, dtype, shape, strides, offset(, traits)].
// uses_traits: set when it has traits, which needs format version 2.
void append_tensor_fields(std::string& out, const Tensor& t, const std::unordered_map<const StorageImpl*, size_t>& entry_of,
                          const std::string& path, bool& uses_traits) {
  out += '[';
  append_number(out, entry_of.at(t.storage().identity()));
  out += ",\"";
  out += dtype_name(t.dtype());
  out += "\",";
  append_dims(out, t.shape());
  out += ',';
  append_dims(out, t.strides());
  out += ',';
  append_number(out, t.storage_offset());
  if (!t.traits().is_default()) {
    append_traits(out, t.traits(), path);
    uses_traits = true;
  }
  out += ']';
}

// Renders the tree (see docs/format.md) without recursion; tensors name their storage's entry.
// version: raised to what the records need (2: traits, 3: a sharded tensor). `unwritten`: the
// sharded leaves whose chunks this file leaves to another replica (Note [Writing replicas]).
std::string render_tree(const Value& root, const std::unordered_map<const StorageImpl*, size_t>& entry_of,
                        const std::unordered_set<const ShardedTensor*>& unwritten, int& version) {
  bool uses_traits = false;
  std::string out;
  struct Frame {
    const Value* v;
    size_t next = 0;
    std::string path;
  };
  std::vector<Frame> stack;
  size_t containers = 0;  // open on the stack
  // A path kMaxTreeDepth steps long would swamp the message: its start names the value well enough.
  auto shortened_path = [](const std::string& path) {
    constexpr size_t kShown = 80;
    if (path.size() <= kShown) return path;
    size_t end = kShown;
    while (end > 0 && (static_cast<unsigned char>(path[end]) & 0xC0) == 0x80) --end;  // whole UTF-8 characters
    return path.substr(0, end) + "...";
  };
  auto fail = [](const std::string& path, const std::string& what) {
    throw Error(ErrorCode::kInvalidArgument,
                "cannot save the value at '" + path + "': " + what);
  };
  // Emits a leaf or opens a container (pushing it).
  auto emit = [&](const Value& v, std::string path) {
    switch (v.kind()) {
      case Value::Kind::kNone: out += "null"; break;
      case Value::Kind::kBool: out += v.as_bool() ? "true" : "false"; break;
      case Value::Kind::kInt: append_number(out, v.as_int()); break;
      case Value::Kind::kDouble: append_double(out, v.as_double()); break;
      case Value::Kind::kString:
        if (!valid_utf8(v.as_string())) fail(path, "the string is not valid UTF-8 (store it as bytes)");
        append_json_string(out, v.as_string());
        break;
      case Value::Kind::kBytes:
        out += R"({"b":")";
        append_base64(out, v.as_bytes().data);
        out += "\"}";
        break;
      case Value::Kind::kTensor:
        out += R"({"T":)";
        append_tensor_fields(out, v.as_tensor(), entry_of, path, uses_traits);
        out += '}';
        break;
      case Value::Kind::kSharded: {
        // {"S": [global shape, dtype, [[global offset, tensor fields], ...](, [replica, replicas])]}
        const ShardedTensor& s = v.as_sharded();
        out += R"({"S":[)";
        append_dims(out, s.global_shape);
        out += ",\"";
        out += dtype_name(s.dtype);
        out += "\",[";
        if (!unwritten.contains(&s)) {
          for (size_t k = 0; k < s.chunks.size(); ++k) {
            out += k ? ",[" : "[";
            append_dims(out, s.chunks[k].offset);
            out += ',';
            append_tensor_fields(out, s.chunks[k].data, entry_of, path, uses_traits);
            out += ']';
          }
        }
        out += ']';
        if (s.replica_count > 1) {
          out += ",[";
          append_number(out, s.replica_index);
          out += ',';
          append_number(out, s.replica_count);
          out += ']';
        }
        out += "]}";
        version = 3;
        break;
      }
      case Value::Kind::kList:
      case Value::Kind::kTuple:
      case Value::Kind::kDict:
        if (++containers > kMaxTreeDepth) fail(shortened_path(path), too_deep());
        out += v.kind() == Value::Kind::kList ? R"({"l":[)" : v.kind() == Value::Kind::kTuple ? R"({"t":[)" : R"({"d":[)";
        stack.push_back({&v, 0, std::move(path)});
        break;
    }
  };
  // A dict entry is written as [key, value]; a marker frame (v == nullptr) below the value closes
  // the pair once the value is complete: at once for a leaf, when it closes for a container.
  auto close_pairs = [&] {
    while (!stack.empty() && stack.back().v == nullptr) {
      out += ']';
      stack.pop_back();
    }
  };
  emit(root, "");
  while (!stack.empty()) {
    Frame& f = stack.back();
    if (f.next == f.v->size()) {
      out += "]}";
      stack.pop_back();
      --containers;
      close_pairs();
      continue;
    }
    const size_t i = f.next++;
    if (i) out += ',';
    std::string path = f.path;
    if (f.v->kind() == Value::Kind::kDict) {
      const auto& [key, value] = f.v->entries()[i];
      out += '[';
      if (key.is_int()) {
        append_number(out, key.as_int());
      } else {
        if (!valid_utf8(key.as_string())) fail(path, "a dict key is not valid UTF-8");
        append_json_string(out, key.as_string());
      }
      out += ',';
      append_key_path(path, key);
      stack.push_back({nullptr, 0, {}});
      emit(value, std::move(path));
    } else {
      append_index_path(path, i);
      emit(f.v->items()[i], std::move(path));
    }
    close_pairs();
  }
  if (uses_traits) version = std::max(version, 2);
  return out;
}

}  // namespace

RankFilePlan RankFilePlan::make(const Value& state_dict, Replicas replicas) {
  // Storages in first-seen order, with how often and where they are used.
  std::vector<StorageUse> uses;
  std::unordered_map<const StorageImpl*, size_t> index_of;
  RankFilePlan plan;
  std::unordered_set<std::string> sharded_paths;
  std::unordered_set<const ShardedTensor*> unwritten;
  ReplicaWriters writers;
  auto visit = [&](const Tensor& t, const std::string& path) {
    if (!t.device().is_cpu()) {
      throw Error(ErrorCode::kInvalidArgument,
                  "cannot save the tensor at '" + path + "': it is on " + t.device().str() + "; stage it first");
    }
    auto [it, inserted] = index_of.try_emplace(t.storage().identity(), uses.size());
    if (inserted) uses.push_back({t.storage(), 0, &t, path});
    ++uses[it->second].uses;
  };
  for_each_tensor(state_dict, visit, [&](const ShardedTensor& s, const std::string& path) {
    s.validate(path);
    if (dtype_is_sub_byte(s.dtype)) {
      throw Error(ErrorCode::kInvalidArgument, "cannot save the sharded tensor at '" + path + "': its dtype " +
                                                   std::string(dtype_name(s.dtype)) +
                                                   " is narrower than a byte, which boxes cannot cut; gather it first");
    }
    // The key path is the index's identity (Note [Global index]).
    if (!sharded_paths.insert(path).second) {
      throw Error(ErrorCode::kInvalidArgument, "cannot save two sharded tensors at the key path '" + path +
                                                   "' (keys that spell the same path): rename one");
    }
    IndexEntry& entry = plan.sharded_.emplace_back(IndexEntry{path, s.dtype, s.global_shape, {}});
    // Every replica takes its turn in the assignment, written or not (Note [Writing replicas]).
    if (!writers.writes(s) && replicas == Replicas::kOwnShare) {
      unwritten.insert(&s);
      return;
    }
    for (const ShardChunk& c : s.chunks) {
      visit(c.data, path);
      entry.chunks.push_back({0, c.offset, c.data.shape()});
    }
  });

  std::unordered_set<std::string> names;
  std::vector<bool> plain(uses.size());
  for (size_t i = 0; i < uses.size(); ++i) {
    const StorageUse& u = uses[i];
    const Tensor& t = *u.first;
    // A safetensors reader sees only dtype and bytes: a lazily conjugated or negated tensor, or one
    // of a framework dtype stored under another, would read as other values there.
    const TensorTraits& traits = t.traits();
    const bool bytes_are_values = !traits.conj && !traits.neg && traits.framework_dtype.empty();
    plain[i] = u.uses == 1 && t.is_contiguous() && t.storage_offset() == 0 && t.nbytes() == u.storage.nbytes() &&
               safetensors_knows(t.dtype()) && bytes_are_values && !u.first_path.empty() &&
               !u.first_path.starts_with("__") && names.insert(u.first_path).second;
  }
  // Entry i is storage i; its place in the file follows Note [Rank file layout].
  plan.entries_.resize(uses.size());
  plan.storages_.resize(uses.size());
  for (size_t i = 0; i < uses.size(); ++i) {
    StoredEntry& e = plan.entries_[i];
    const StorageUse& u = uses[i];
    e.nbytes = u.storage.nbytes();
    if (plain[i]) {
      e.name = u.first_path;
      e.dtype = u.first->dtype();
      e.shape = u.first->shape();
    } else {
      e.name = std::string(kRawPrefix) + std::to_string(i);
      e.dtype = DType::kU8;
      e.shape = Dims{static_cast<int64_t>(round_up(e.nbytes, kRawPadding))};
    }
    e.chunk_crc32c.assign(e.num_chunks(), 0);
    plan.storages_[i] = u.storage;
  }
  std::vector<size_t> order(uses.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  auto alignment = [&](size_t i) { return plain[i] ? std::max(1, dtype_bits(plan.entries_[i].dtype) / 8) : 1024; };
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return alignment(a) > alignment(b); });
  uint64_t offset = 0;
  for (const size_t i : order) {
    StoredEntry& e = plan.entries_[i];
    e.begin = offset;
    e.end = offset + (plain[i] ? e.nbytes : round_up(e.nbytes, kRawPadding));
    offset = e.end;
  }
  plan.data_size_ = offset;

  // The header. Checksums are one fixed-width hex string, patched by set_checksums.
  std::string storages = "[";
  size_t total_chunks = 0;
  plan.first_chunk_.resize(uses.size());
  for (size_t i = 0; i < uses.size(); ++i) {
    plan.first_chunk_[i] = total_chunks;
    if (i) storages += ',';
    storages += '[';
    append_json_string(storages, plan.entries_[i].name);
    storages += ',';
    append_number(storages, plan.entries_[i].nbytes);
    storages += ']';
    total_chunks += plan.entries_[i].num_chunks();
  }
  storages += ']';
  // Rendered by hand, like the tree: a JSON library's DOM costs more than the rest of the plan
  // for tens of thousands of tensors. Every string in it is valid UTF-8 (render_tree checked).
  std::string text = "{\"__metadata__\":{";
  const auto field = [&](std::string_view key, std::string_view value) {
    append_json_string(text, key);
    text += ':';
    append_json_string(text, value);
    text += ',';
  };
  int version = 1;
  std::string tree = render_tree(state_dict, index_of, unwritten, version);
  field(kVersionKey, std::to_string(version));
  field(kChunkBytesKey, std::to_string(kChecksumChunkBytes));
  field(kStoragesKey, storages);
  field(kTreeKey, tree);
  append_json_string(text, kChecksumsKey);
  text += ":\"";
  const size_t checksums_at = text.size();
  text.append(total_chunks * 8, '0');
  text += "\"}";
  for (const StoredEntry& e : plan.entries_) {
    text += ',';
    append_json_string(text, e.name);
    text += ":{\"dtype\":\"";
    text += dtype_name(e.dtype);
    text += "\",\"shape\":";
    append_dims(text, e.shape);
    text += ",\"data_offsets\":[";
    append_number(text, e.begin);
    text += ',';
    append_number(text, e.end);
    text += "]}";
  }
  text += '}';
  const uint64_t padded = round_up(8 + text.size(), kDataAlignment) - 8;
  text.resize(padded, ' ');
  plan.header_.resize(8);
  for (int k = 0; k < 8; ++k) plan.header_[k] = static_cast<char>((padded >> (8 * k)) & 0xFF);
  plan.header_ += text;
  plan.checksums_at_ = 8 + checksums_at;
  return plan;
}

void RankFilePlan::set_checksums(size_t entry, const std::vector<uint32_t>& crcs) {
  static constexpr char kHex[] = "0123456789abcdef";
  if (entry >= entries_.size() || crcs.size() != entries_[entry].num_chunks()) {
    throw Error(ErrorCode::kInternal, "set_checksums: wrong entry or chunk count");
  }
  const size_t chunk = first_chunk_[entry];
  for (size_t k = 0; k < crcs.size(); ++k) {
    char* digits = header_.data() + checksums_at_ + (chunk + k) * 8;
    for (int d = 0; d < 8; ++d) digits[d] = kHex[(crcs[k] >> (28 - 4 * d)) & 15];
  }
  entries_[entry].chunk_crc32c = crcs;
}

// ---- parsing -------------------------------------------------------------------------------

struct RankFileHeader::Impl {
  std::string file;
  int version = 0;
  uint64_t data_offset = 0;
  std::vector<StoredEntry> entries;
  // The tree (fastdcp files only): a document owned by its parser, at a stable address because
  // elements point into it.
  std::unique_ptr<simdjson::dom::parser> tree_parser;
  simdjson::dom::element tree;

  [[noreturn]] void corrupt(const std::string& what) const {
    throw Error(ErrorCode::kDataLoss, "corrupt checkpoint header in '" + file + "': " + what);
  }
};

namespace {

using simdjson::dom::element;
using simdjson::dom::element_type;

// A parser for a document of `size` bytes.
std::unique_ptr<simdjson::dom::parser> make_parser(size_t size, const RankFileHeader::Impl& impl) {
  auto parser = std::make_unique<simdjson::dom::parser>();
  const size_t depth = std::clamp<size_t>(size / 2 + 2, 64, kMaxJsonDepth);  // "[[[...]]]": two bytes a level
  if (parser->allocate(std::max<size_t>(size, 64), depth) != simdjson::SUCCESS) {
    throw Error(ErrorCode::kResourceExhausted, "cannot allocate a parser for the " + std::to_string(size) +
                                                   "-byte header of '" + impl.file + "'");
  }
  return parser;
}

element parse_json(simdjson::dom::parser& parser, std::string_view text, const char* what,
                   const RankFileHeader::Impl& impl) {
  element root;
  if (const auto error = parser.parse(text.data(), text.size(), /*realloc_if_needed=*/true).get(root); error) {
    if (error == simdjson::DEPTH_ERROR) impl.corrupt(std::string(what) + ": " + too_deep());
    impl.corrupt(std::string(what) + " is not valid JSON (" + simdjson::error_message(error) + ")");
  }
  return root;
}

uint64_t to_u64(element j, const char* what, const RankFileHeader::Impl& impl) {
  uint64_t v = 0;
  if (j.get_uint64().get(v) != simdjson::SUCCESS) impl.corrupt(std::string(what) + " is not a non-negative integer");
  return v;
}

int64_t to_i64(element j, const char* what, const RankFileHeader::Impl& impl) {
  int64_t v = 0;
  if (j.get_int64().get(v) != simdjson::SUCCESS) impl.corrupt(std::string(what) + " is not a 64-bit integer");
  return v;
}

Dims to_dims(element j, const char* what, const RankFileHeader::Impl& impl) {
  simdjson::dom::array list;
  if (j.get_array().get(list) != simdjson::SUCCESS || list.size() > 64) {
    impl.corrupt(std::string(what) + " is not a list of at most 64 integers");
  }
  Dims dims;
  dims.resize(list.size());
  size_t i = 0;
  for (const element d : list) dims[i++] = to_i64(d, what, impl);
  return dims;
}

// The items of a JSON array (none if it is not one), for indexing: DOM arrays are walked.
std::vector<element> items_of(simdjson::dom::array list) {
  std::vector<element> out;
  out.reserve(list.size());
  for (const element item : list) out.push_back(item);
  return out;
}
std::vector<element> items_of(element j) {
  simdjson::dom::array list;
  return j.get_array().get(list) == simdjson::SUCCESS ? items_of(list) : std::vector<element>{};
}

// The items of a JSON array of exactly N items, or nullopt: the records of one tensor, entry or
// dict pair, taken without allocating.
template <size_t N>
std::optional<std::array<element, N>> fixed_items(element j) {
  simdjson::dom::array list;
  if (j.get_array().get(list) != simdjson::SUCCESS || list.size() != N) return std::nullopt;
  std::array<element, N> out;
  size_t i = 0;
  for (const element item : list) out[i++] = item;
  return out;
}

// Whether no key of a JSON object repeats: a reader taking the first and one taking the last must
// not see different files.
bool unique_keys(simdjson::dom::object object) {
  std::vector<std::string_view> keys;
  keys.reserve(object.size());
  for (const simdjson::dom::key_value_pair field : object) keys.push_back(field.key);
  std::sort(keys.begin(), keys.end());  // an entry's record has three keys: no hashing
  return std::adjacent_find(keys.begin(), keys.end()) == keys.end();
}

std::string_view metadata_string(simdjson::dom::object metadata, std::string_view key,
                                 const RankFileHeader::Impl& impl) {
  std::string_view value;
  if (metadata.at_key(key).get_string().get(value) != simdjson::SUCCESS) {
    impl.corrupt("__metadata__ lacks the string '" + std::string(key) + "'");
  }
  return value;
}

}  // namespace

uint64_t parse_header_length(const unsigned char (&prefix)[8], uint64_t file_size, const std::string& file_name) {
  uint64_t length = 0;
  for (int k = 7; k >= 0; --k) length = (length << 8) | prefix[k];
  // The message echoes nothing of the file: it may be any file, a secret one included.
  if (length > kMaxHeaderBytes || 8 + length > file_size) {
    throw Error(ErrorCode::kDataLoss, "'" + file_name + "' is not a fastdcp or safetensors rank file, or it is damaged: " +
                                          "its header length is out of range for its " + std::to_string(file_size) +
                                          " bytes");
  }
  return length;
}

RankFileHeader::RankFileHeader(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RankFileHeader::RankFileHeader(RankFileHeader&&) noexcept = default;
RankFileHeader& RankFileHeader::operator=(RankFileHeader&&) noexcept = default;
RankFileHeader::~RankFileHeader() = default;

int RankFileHeader::format_version() const { return impl_->version; }
bool RankFileHeader::has_checksums() const { return impl_->version > 0; }
const std::vector<StoredEntry>& RankFileHeader::entries() const { return impl_->entries; }
uint64_t RankFileHeader::data_offset() const { return impl_->data_offset; }

RankFileHeader RankFileHeader::parse(std::string_view text, uint64_t file_size, const std::string& file_name) {
  auto impl = std::make_unique<Impl>();
  impl->file = file_name;
  impl->data_offset = 8 + text.size();
  const auto parser = make_parser(text.size(), *impl);
  simdjson::dom::object header;
  if (parse_json(*parser, text, "it", *impl).get_object().get(header) != simdjson::SUCCESS) {
    impl->corrupt("it is not a JSON object");
  }

  // Entries: every key but __metadata__.
  std::unordered_map<std::string_view, size_t> by_name;
  std::vector<StoredEntry> entries;
  std::optional<simdjson::dom::object> metadata;
  for (const simdjson::dom::key_value_pair field : header) {
    const std::string_view name = field.key;
    if (name == "__metadata__") {
      simdjson::dom::object m;
      if (metadata || field.value.get_object().get(m) != simdjson::SUCCESS || !unique_keys(m)) {
        impl->corrupt("__metadata__ is not one object of distinct keys");
      }
      metadata = m;
      continue;
    }
    simdjson::dom::object record;
    if (field.value.get_object().get(record) != simdjson::SUCCESS || !unique_keys(record)) {
      impl->corrupt("entry '" + std::string(name) + "' is not an object of distinct keys");
    }
    StoredEntry e;
    e.name = std::string(name);
    std::string_view dtype_text;
    std::optional<DType> dtype;
    if (record.at_key("dtype").get_string().get(dtype_text) == simdjson::SUCCESS) dtype = dtype_from_name(dtype_text);
    if (!dtype) impl->corrupt("entry '" + e.name + "' has no known dtype");
    e.dtype = *dtype;
    element shape, offsets;
    std::optional<std::array<element, 2>> bounds;
    if (record.at_key("shape").get(shape) != simdjson::SUCCESS ||
        record.at_key("data_offsets").get(offsets) != simdjson::SUCCESS || !(bounds = fixed_items<2>(offsets))) {
      impl->corrupt("entry '" + e.name + "' lacks shape or data_offsets");
    }
    e.shape = to_dims(shape, "a shape", *impl);
    e.begin = to_u64((*bounds)[0], "a data offset", *impl);
    e.end = to_u64((*bounds)[1], "a data offset", *impl);
    if (e.begin > e.end) impl->corrupt("entry '" + e.name + "' ends before it begins");
    const std::optional<uint64_t> shape_bytes = contiguous_nbytes(e.dtype, e.shape);
    if (!shape_bytes) impl->corrupt("entry '" + e.name + "' has an invalid shape");
    if (*shape_bytes != e.end - e.begin) {
      impl->corrupt("entry '" + e.name + "' has " + std::to_string(e.end - e.begin) + " bytes for its shape and dtype");
    }
    e.nbytes = e.end - e.begin;
    if (!by_name.emplace(name, entries.size()).second) impl->corrupt("entry '" + e.name + "' appears twice");
    entries.push_back(std::move(e));
  }
  // Entries tile the data region, which ends where the file ends.
  std::vector<const StoredEntry*> sorted;
  for (const auto& e : entries) sorted.push_back(&e);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;  // empty entries first
  });
  uint64_t offset = 0;
  for (const StoredEntry* e : sorted) {
    if (e->begin != offset) impl->corrupt("entry '" + e->name + "' does not start where the previous one ends");
    offset = e->end;
  }
  if (impl->data_offset + offset != file_size) {
    throw Error(ErrorCode::kDataLoss, "'" + file_name + "' is truncated or has trailing bytes: its header describes " +
                                          std::to_string(impl->data_offset + offset) + " bytes, the file has " +
                                          std::to_string(file_size));
  }

  if (!metadata || metadata->at_key(kVersionKey).error() != simdjson::SUCCESS) {
    // A plain safetensors file: its entries, in file order, as a flat dict.
    impl->version = 0;
    impl->entries.reserve(sorted.size());
    for (const StoredEntry* e : sorted) impl->entries.push_back(*e);
    return RankFileHeader(std::move(impl));
  }
  const std::string_view version_text = metadata_string(*metadata, kVersionKey, *impl);
  int version = 0;
  const auto [vend, vec] = std::from_chars(version_text.data(), version_text.data() + version_text.size(), version);
  if (vec != std::errc() || vend != version_text.data() + version_text.size() || version < 1) {
    impl->corrupt("the format version '" + std::string(version_text) + "' is not a positive integer");
  }
  if (version > kRankFileFormatVersion) {
    throw Error(ErrorCode::kFailedPrecondition, "'" + file_name + "' was written in format version " +
                                                    std::string(version_text) + "; this fastdcp reads up to version " +
                                                    std::to_string(kRankFileFormatVersion) + ": upgrade fastdcp");
  }
  impl->version = version;
  if (metadata_string(*metadata, kChunkBytesKey, *impl) != std::to_string(kChecksumChunkBytes)) {
    impl->corrupt("unsupported checksum chunk size");
  }
  // Storages, in id order, name their entries.
  const std::string_view storages_text = metadata_string(*metadata, kStoragesKey, *impl);
  const auto storages_parser = make_parser(storages_text.size(), *impl);
  const std::vector<element> storages = items_of(parse_json(*storages_parser, storages_text, "the storage list", *impl));
  if (storages.size() != entries.size()) impl->corrupt("the storage list does not match the entries");
  std::vector<bool> named(entries.size(), false);
  for (const element& s : storages) {
    const auto record = fixed_items<2>(s);
    std::string_view name;
    if (!record || (*record)[0].get_string().get(name) != simdjson::SUCCESS) impl->corrupt("a storage record is malformed");
    const auto it = by_name.find(name);
    if (it == by_name.end()) impl->corrupt("a storage names a missing entry '" + std::string(name) + "'");
    if (named[it->second]) impl->corrupt("two storages name the entry '" + std::string(name) + "'");
    named[it->second] = true;
    StoredEntry e = entries[it->second];
    const uint64_t nbytes = to_u64((*record)[1], "a storage size", *impl);
    if (nbytes > e.end - e.begin) impl->corrupt("storage '" + e.name + "' is larger than its entry");
    e.nbytes = nbytes;
    impl->entries.push_back(std::move(e));
  }
  // Checksums: 8 hex digits per chunk, entries in storage order.
  const std::string_view crcs = metadata_string(*metadata, kChecksumsKey, *impl);
  size_t chunk = 0;
  for (StoredEntry& e : impl->entries) {
    const size_t n = e.num_chunks();
    if (crcs.size() < (chunk + n) * 8) impl->corrupt("too few checksums");
    e.chunk_crc32c.resize(n);
    for (size_t k = 0; k < n; ++k, ++chunk) {
      uint32_t v = 0;
      const char* digits = crcs.data() + chunk * 8;
      const auto [end, ec] = std::from_chars(digits, digits + 8, v, 16);
      if (ec != std::errc() || end != digits + 8) impl->corrupt("a checksum is not 8 hex digits");
      e.chunk_crc32c[k] = v;
    }
  }
  if (crcs.size() != chunk * 8) impl->corrupt("too many checksums");
  const std::string_view tree_text = metadata_string(*metadata, kTreeKey, *impl);
  impl->tree_parser = make_parser(tree_text.size(), *impl);
  impl->tree = parse_json(*impl->tree_parser, tree_text, "the tree", *impl);
  return RankFileHeader(std::move(impl));
}

namespace {

// Builds the Value of a tree node without recursion; make_tensor(body, path) makes a tensor leaf,
// make_sharded(body, path) a sharded one.
template <class MakeTensor, class MakeSharded>
Value build_value(element root, const RankFileHeader::Impl& impl, MakeTensor&& make_tensor, MakeSharded&& make_sharded) {
  Value out;
  struct Frame {
    element node;
    Value* dst;
    std::string path;
    size_t depth;  // containers around the node
  };
  std::vector<Frame> stack;
  stack.push_back({root, &out, "", 0});
  while (!stack.empty()) {
    Frame f = std::move(stack.back());
    stack.pop_back();
    const element n = f.node;
    auto bad = [&](const std::string& what) { impl.corrupt("the value at '" + f.path + "' " + what); };
    auto open_container = [&] {  // the path, kMaxTreeDepth steps long, would swamp the message
      if (f.depth + 1 > kMaxTreeDepth) impl.corrupt("the tree: " + too_deep());
    };
    switch (n.type()) {
      case element_type::NULL_VALUE: *f.dst = Value(); break;
      case element_type::BOOL: *f.dst = Value(bool(n.get_bool())); break;
      case element_type::INT64: *f.dst = Value(int64_t(n.get_int64())); break;
      case element_type::UINT64: bad("is an integer out of range"); break;  // above INT64_MAX
      case element_type::DOUBLE: *f.dst = Value(double(n.get_double())); break;
      case element_type::STRING: *f.dst = Value(std::string(std::string_view(n.get_string()))); break;
      case element_type::OBJECT: {
        const simdjson::dom::object tagged = n.get_object();
        if (tagged.size() != 1) bad("is an object with other than one tag");
        const simdjson::dom::key_value_pair field = *tagged.begin();
        const std::string_view tag = field.key;
        const element body = field.value;
        if (tag == "f") {
          std::string_view s;
          if (body.get_string().get(s) != simdjson::SUCCESS) s = {};
          if (s == "nan") *f.dst = Value(std::nan(""));
          else if (s == "inf") *f.dst = Value(HUGE_VAL);
          else if (s == "-inf") *f.dst = Value(-HUGE_VAL);
          else bad("is a malformed float");
        } else if (tag == "b") {
          std::string_view text;
          std::optional<std::string> bytes;
          if (body.get_string().get(text) == simdjson::SUCCESS) bytes = decode_base64(text);
          if (!bytes) bad("is malformed base64");
          *f.dst = Value(Bytes{std::move(*bytes)});
        } else if (tag == "T") {
          *f.dst = make_tensor(body, f.path);
        } else if (tag == "S") {
          *f.dst = make_sharded(body, f.path);
        } else if (tag == "l" || tag == "t") {
          if (!body.is_array()) bad("is a sequence without items");
          open_container();
          const std::vector<element> children = items_of(body);
          *f.dst = tag == "l" ? Value::list() : Value::tuple();
          auto& items = f.dst->items();
          items.resize(children.size());
          for (size_t i = children.size(); i-- > 0;) {
            std::string p = f.path;
            append_index_path(p, i);
            stack.push_back({children[i], &items[i], std::move(p), f.depth + 1});
          }
        } else if (tag == "d") {
          if (!body.is_array()) bad("is a dict without entries");
          open_container();
          const std::vector<element> pairs = items_of(body);
          *f.dst = Value::dict();
          f.dst->entries().reserve(pairs.size());  // the children's addresses stay put
          std::vector<element> values;
          values.reserve(pairs.size());
          for (const element pair : pairs) {
            const auto kv = fixed_items<2>(pair);
            if (!kv) bad("has a malformed dict entry");
            const auto& [key_json, value] = *kv;
            std::string_view text;
            std::optional<DictKey> key;
            if (key_json.get_string().get(text) == simdjson::SUCCESS) {
              key.emplace(text);
            } else if (key_json.is_int64()) {
              key.emplace(int64_t(key_json.get_int64()));
            } else {
              bad("has a dict key that is neither a string nor a 64-bit integer");
            }
            // A repeated key would make loads differ: the last wins in a dict, the first in a lookup.
            if (f.dst->find(*key)) bad("has the key '" + key->str() + "' twice");
            f.dst->insert(std::move(*key), Value());
            values.push_back(value);
          }
          auto& entries = f.dst->entries();
          for (size_t i = entries.size(); i-- > 0;) {
            std::string p = f.path;
            append_key_path(p, entries[i].first);
            stack.push_back({values[i], &entries[i].second, std::move(p), f.depth + 1});
          }
        } else {
          bad("has an unknown tag");
        }
        break;
      }
      default: bad("has an unexpected JSON type");
    }
  }
  return out;
}

using TensorRecord = RankFileHeader::TensorRecord;

// A tensor record's optional 6th element (version 2): an object of the non-default traits.
TensorTraits parse_traits(element j, const std::string& path, const RankFileHeader::Impl& impl) {
  simdjson::dom::object object;
  if (impl.version < 2 || j.get_object().get(object) != simdjson::SUCCESS) {
    impl.corrupt("the tensor at '" + path + "' has a malformed traits record");
  }
  TensorTraits traits;
  for (const simdjson::dom::key_value_pair field : object) {
    const std::string_view key = field.key;
    bool* flag = key == "conj" ? &traits.conj : key == "neg" ? &traits.neg : key == "param" ? &traits.parameter
               : key == "grad" ? &traits.requires_grad : nullptr;
    std::string_view name;
    if (flag && field.value.get_bool().get(*flag) == simdjson::SUCCESS) continue;
    if (key == "dtype" && field.value.get_string().get(name) == simdjson::SUCCESS && !name.empty()) {
      traits.framework_dtype = std::string(name);
      continue;
    }
    impl.corrupt("the tensor at '" + path + "' has an unknown or malformed trait '" + std::string(key) + "'");
  }
  return traits;
}

TensorRecord parse_tensor(element body, const std::string& path, const RankFileHeader::Impl& impl) {
  // [storage, dtype, shape, strides, offset] and, from version 2, an optional traits object.
  simdjson::dom::array list;
  std::array<element, 6> fields;
  size_t n = 0;
  if (body.get_array().get(list) == simdjson::SUCCESS && (list.size() == 5 || list.size() == 6)) {
    for (const element item : list) fields[n++] = item;
  }
  std::string_view dtype_text;
  if (n < 5 || fields[1].get_string().get(dtype_text) != simdjson::SUCCESS) {
    impl.corrupt("the tensor at '" + path + "' is malformed");
  }
  TensorRecord r;
  r.path = path;
  r.entry = to_u64(fields[0], "a tensor's storage", impl);
  if (r.entry >= impl.entries.size()) impl.corrupt("the tensor at '" + path + "' names a missing storage");
  const auto dtype = dtype_from_name(dtype_text);
  if (!dtype) impl.corrupt("the tensor at '" + path + "' has an unknown dtype");
  r.dtype = *dtype;
  r.shape = to_dims(fields[2], "a tensor shape", impl);
  r.strides = to_dims(fields[3], "a tensor's strides", impl);
  r.offset = to_i64(fields[4], "a tensor offset", impl);
  if (r.shape.size() != r.strides.size()) impl.corrupt("the tensor at '" + path + "' has shape and strides of different lengths");
  if (n == 6) r.traits = parse_traits(fields[5], path, impl);
  // Checked here, not only when a Tensor is made, so that tensors() (inspect, verify) refuses what
  // a load refuses.
  if (std::string why = view_problem(r.dtype, r.shape, r.strides, r.offset, impl.entries[r.entry].nbytes);
      !why.empty()) {
    impl.corrupt("the tensor at '" + path + "' does not fit its storage: " + why);
  }
  return r;
}

using ShardedRecord = RankFileHeader::ShardedRecord;

// A sharded tensor record (version 3): [global shape, dtype, [[global offset, tensor fields], ...]]
// and, for a replica, [replica index, replica count]. Checked as ShardedTensor::validate checks a
// leaf at save, so that a file that passes holds what a save could have written.
ShardedRecord parse_sharded(element body, const std::string& path, const RankFileHeader::Impl& impl) {
  auto bad = [&](const std::string& what) { impl.corrupt("the sharded tensor at '" + path + "' " + what); };
  if (impl.version < 3) bad("is in a file of format version " + std::to_string(impl.version) + ", before version 3");
  simdjson::dom::array list;
  std::array<element, 4> fields;
  size_t n = 0;
  if (body.get_array().get(list) == simdjson::SUCCESS && (list.size() == 3 || list.size() == 4)) {
    for (const element item : list) fields[n++] = item;
  }
  std::string_view dtype_text;
  if (n < 3 || fields[1].get_string().get(dtype_text) != simdjson::SUCCESS || !fields[2].is_array()) bad("is malformed");
  ShardedRecord r;
  r.path = path;
  const auto dtype = dtype_from_name(dtype_text);
  if (!dtype || dtype_is_sub_byte(*dtype)) bad("has an unknown or sub-byte dtype");
  r.dtype = *dtype;
  r.global_shape = to_dims(fields[0], "a global shape", impl);
  if (n == 4) {
    const auto replica = fixed_items<2>(fields[3]);
    if (!replica) bad("has a malformed replica record");
    const int64_t index = to_i64((*replica)[0], "a replica index", impl);
    const int64_t count = to_i64((*replica)[1], "a replica count", impl);
    if (count < 2 || count > INT32_MAX || index < 0 || index >= count) bad("is replica " + std::to_string(index) + " of " + std::to_string(count));
    r.replica_index = static_cast<int>(index);
    r.replica_count = static_cast<int>(count);
  }
  std::vector<Box> boxes;
  for (const element chunk : items_of(fields[2])) {
    const auto pair = fixed_items<2>(chunk);
    if (!pair) bad("has a malformed chunk");
    Dims offset = to_dims((*pair)[0], "a chunk offset", impl);
    TensorRecord t = parse_tensor((*pair)[1], path, impl);
    if (t.dtype != r.dtype) bad("has a chunk of dtype " + std::string(dtype_name(t.dtype)) + " in a tensor of " + std::string(dtype_name(r.dtype)));
    boxes.push_back(Box{offset, t.shape});
    r.chunks.emplace_back(std::move(offset), std::move(t));
  }
  if (const std::string why = chunk_layout_problem(r.dtype, r.global_shape, boxes); !why.empty()) bad(why);
  return r;
}

}  // namespace

Value RankFileHeader::build_tree(const std::vector<Storage>& storages) const {
  const Impl& impl = *impl_;
  if (storages.size() != impl.entries.size()) throw Error(ErrorCode::kInternal, "build_tree: one storage per entry");
  if (impl.version == 0) {
    Value out = Value::dict();
    for (size_t i = 0; i < impl.entries.size(); ++i) {
      const StoredEntry& e = impl.entries[i];
      out.insert(DictKey(e.name), Value(Tensor::contiguous(storages[i], e.dtype, e.shape)));
    }
    return out;
  }
  auto make = [&](const TensorRecord& r, const std::string& path) {
    try {
      Tensor t(storages[r.entry], r.dtype, r.shape, r.strides, r.offset);
      if (!r.traits.is_default()) t.set_traits(r.traits);
      return t;
    } catch (const Error& e) {
      impl.corrupt("the tensor at '" + path + "' does not fit its storage: " + e.what());
    }
  };
  return build_value(
      impl.tree, impl, [&](element body, const std::string& path) { return Value(make(parse_tensor(body, path, impl), path)); },
      [&](element body, const std::string& path) {
        ShardedRecord r = parse_sharded(body, path, impl);
        ShardedTensor out;
        out.global_shape = std::move(r.global_shape);
        out.dtype = r.dtype;
        out.replica_index = r.replica_index;
        out.replica_count = r.replica_count;
        for (auto& [offset, t] : r.chunks) out.chunks.push_back({std::move(offset), make(t, path)});
        return Value(std::move(out));
      });
}

std::vector<RankFileHeader::TensorRecord> RankFileHeader::tensors() const {
  const Impl& impl = *impl_;
  std::vector<TensorRecord> out;
  if (impl.version == 0) {
    for (size_t i = 0; i < impl.entries.size(); ++i) {
      const StoredEntry& e = impl.entries[i];
      out.push_back({e.name, i, e.dtype, e.shape, contiguous_strides(e.shape), 0, {}});
    }
    return out;
  }
  // The tree is walked for its paths; the values built on the way are dropped.
  (void)build_value(
      impl.tree, impl,
      [&](element body, const std::string& path) {
        out.push_back(parse_tensor(body, path, impl));
        return Value();
      },
      [&](element body, const std::string& path) {
        for (auto& chunk : parse_sharded(body, path, impl).chunks) out.push_back(std::move(chunk.second));
        return Value();
      });
  return out;
}

std::vector<RankFileHeader::ShardedRecord> RankFileHeader::sharded() const {
  const Impl& impl = *impl_;
  std::vector<ShardedRecord> out;
  if (impl.version < 3) return out;
  (void)build_value(
      impl.tree, impl, [&](element body, const std::string& path) { (void)parse_tensor(body, path, impl); return Value(); },
      [&](element body, const std::string& path) {
        out.push_back(parse_sharded(body, path, impl));
        return Value();
      });
  return out;
}

}  // namespace fastdcp
