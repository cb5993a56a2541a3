// Planning a rank file's layout and rendering its header's JSON (by hand). See Note [Rank file
// layout].

#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>
#include <unordered_map>
#include <unordered_set>

#include "fastdcp/common/error.h"
#include "format/rank_file_internal.h"

namespace fastdcp {
using namespace rank_file_detail;
namespace {

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

  std::unordered_set<std::string_view> names;  // views of uses[i].first_path
  names.reserve(uses.size());
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
    StorageUse& u = uses[i];
    e.nbytes = u.storage.nbytes();
    if (plain[i]) {
      e.name = std::move(u.first_path);  // its last use
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
  int version = 1;
  std::string tree = render_tree(state_dict, index_of, unwritten, version);
  // Growing a header of megabytes would copy it over and over: room for about what it takes (the
  // tree and the storage list escaped, and some 80 bytes an entry).
  text.reserve(tree.size() + tree.size() / 4 + storages.size() + storages.size() / 4 + total_chunks * 8 +
               plan.entries_.size() * 96 + kDataAlignment);
  const auto field = [&](std::string_view key, std::string_view value) {
    append_json_string(text, key);
    text += ':';
    append_json_string(text, value);
    text += ',';
  };
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
  plan.omits_replicas_ = !unwritten.empty();
  return plan;
}

// Note [Trusting the plan]
// The writer process takes the trainer's plan without parsing its header (Note [Shared state
// dicts]): parsing and checking 100,000 entries' JSON cost as much as rendering it. The plan comes
// from our own trainer over a private socketpair, so what the writer must guard against is not a
// forged file but a bug that would make it read or write out of bounds: adopt() checks exactly
// that (entries tiling the data in order, storages as large as their entries, checksum slots
// inside the header). A header that disagrees with its table would make a file that a load
// refuses: a load parses and checks every header, and every chunk against its checksum.
RankFilePlan RankFilePlan::adopt(Parts parts, const std::string& name) {
  auto corrupt = [&](const std::string& what) -> Error {
    return Error(ErrorCode::kDataLoss, "corrupt rank file plan in '" + name + "': " + what);
  };
  const std::string& header = parts.header;
  unsigned char prefix[8] = {};
  if (header.size() < sizeof prefix || parts.data_size > std::numeric_limits<uint64_t>::max() - header.size()) {
    throw corrupt("its header is truncated, or its data size is out of range");
  }
  std::memcpy(prefix, header.data(), sizeof prefix);
  if (parse_header_length(prefix, header.size() + parts.data_size, name) != header.size() - sizeof prefix) {
    throw corrupt("its length prefix does not match its header's size");
  }
  if (parts.storages.size() != parts.entries.size()) {
    throw Error(ErrorCode::kInternal, "RankFilePlan::adopt: storages and entries differ in number");
  }
  RankFilePlan plan;
  plan.first_chunk_.reserve(parts.entries.size());
  // The entries in file order (an empty one before the one that starts where it is): make() lays
  // them out without gaps (Note [Rank file layout]).
  std::vector<std::tuple<uint64_t, uint64_t, size_t>> order;
  order.reserve(parts.entries.size());
  size_t total_chunks = 0;
  for (size_t i = 0; i < parts.entries.size(); ++i) {
    const StoredEntry& e = parts.entries[i];
    if (e.begin > e.end || e.nbytes > e.end - e.begin || e.chunk_crc32c.size() != e.num_chunks()) {
      throw corrupt("entry '" + e.name + "' has a range that does not hold its bytes");
    }
    if (parts.storages[i].nbytes() < e.nbytes) {
      throw Error(ErrorCode::kInternal, "RankFilePlan::adopt: a storage smaller than its entry");
    }
    order.emplace_back(e.begin, e.end, i);
    plan.first_chunk_.push_back(total_chunks);
    total_chunks += e.num_chunks();
  }
  std::sort(order.begin(), order.end());
  uint64_t at = 0;
  for (const auto& [begin, end, i] : order) {
    if (begin != at) throw corrupt("entry '" + parts.entries[i].name + "' does not start where the one before it ends");
    at = end;
  }
  if (at != parts.data_size) throw corrupt("its entries do not fill its data size");
  if (parts.checksums_offset < sizeof prefix || parts.checksums_offset > header.size() ||
      total_chunks > (header.size() - parts.checksums_offset) / 8) {
    throw corrupt("its checksum table lies outside its header");
  }
  plan.entries_ = std::move(parts.entries);
  plan.storages_ = std::move(parts.storages);
  plan.sharded_ = std::move(parts.sharded);
  plan.checksums_at_ = parts.checksums_offset;
  plan.data_size_ = parts.data_size;
  plan.header_ = std::move(parts.header);
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

}  // namespace fastdcp
