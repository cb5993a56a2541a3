// Parsing a rank file's header (simdjson, used only in this file). See Note [Rank file layout].

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <optional>
#include <simdjson.h>
#include <unordered_map>

#include "fastdcp/common/error.h"
#include "format/rank_file_internal.h"

namespace fastdcp {
using namespace rank_file_detail;
namespace {

// The deepest JSON the parser takes: a tree level costs up to three JSON levels (a dict's {"d":[
// and the [key, value] pair), so any tree within kMaxTreeDepth parses, and deeper JSON is a tree
// beyond it (Note [Tree depth limit]). The parser's depth bookkeeping costs 9 bytes a level, so it
// is sized to what a document of its length can nest.
constexpr size_t kMaxJsonDepth = 3 * kMaxTreeDepth + 8;

}  // namespace

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
  by_name.reserve(header.size());  // 100,000 entries: growing costs as much as the rest of the loop
  entries.reserve(header.size());
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
  sorted.reserve(entries.size());
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
  impl->entries.reserve(entries.size());
  for (const element& s : storages) {
    const auto record = fixed_items<2>(s);
    std::string_view name;
    if (!record || (*record)[0].get_string().get(name) != simdjson::SUCCESS) impl->corrupt("a storage record is malformed");
    // fastdcp renders the entries in storage order: storage k names entry k, found without hashing.
    size_t index = impl->entries.size();
    if (named[index] || entries[index].name != name) {
      const auto it = by_name.find(name);
      if (it == by_name.end()) impl->corrupt("a storage names a missing entry '" + std::string(name) + "'");
      index = it->second;
    }
    if (named[index]) impl->corrupt("two storages name the entry '" + std::string(name) + "'");
    named[index] = true;
    StoredEntry e = std::move(entries[index]);  // each entry is taken once
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
