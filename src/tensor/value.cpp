#include "fastdcp/tensor/value.h"

#include <functional>

#include "fastdcp/common/error.h"

namespace fastdcp {
void Value::Dict::ensure_index() const {
  if (entries.size() < kIndexThreshold || index_valid.load(std::memory_order_acquire)) return;
  std::lock_guard lock(index_mutex);
  if (index_valid.load(std::memory_order_relaxed)) return;
  index.clear();
  index.reserve(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) index.emplace(entries[i].first, i);
  index_valid.store(true, std::memory_order_release);
}

const Value* Value::Dict::find(const DictKey& key) const {
  if (entries.size() >= kIndexThreshold) {
    ensure_index();
    auto it = index.find(key);
    return it == index.end() ? nullptr : &entries[it->second].second;
  }
  for (const auto& [k, v] : entries) {
    if (k == key) return &v;
  }
  return nullptr;
}

size_t DictKey::hash() const {
  if (is_int()) return std::hash<int64_t>()(std::get<int64_t>(key_));
  return std::hash<std::string>()(*std::get<1>(key_)) ^ 0x9e3779b97f4a7c15ULL;
}

int64_t DictKey::as_int() const {
  if (!is_int()) throw Error(ErrorCode::kInvalidArgument, "dict key '" + str() + "' is a string, not an integer");
  return std::get<int64_t>(key_);
}

const std::string& DictKey::as_string() const {
  if (is_int()) throw Error(ErrorCode::kInvalidArgument, "dict key " + str() + " is an integer, not a string");
  return *std::get<1>(key_);
}

std::string DictKey::str() const { return is_int() ? std::to_string(std::get<int64_t>(key_)) : *std::get<1>(key_); }

bool operator==(const DictKey& a, const DictKey& b) {
  if (a.is_int() != b.is_int()) return false;
  if (a.is_int()) return std::get<int64_t>(a.key_) == std::get<int64_t>(b.key_);
  const auto& x = std::get<1>(a.key_);
  const auto& y = std::get<1>(b.key_);
  return x == y || *x == *y;
}

void append_key_path(std::string& path, const DictKey& key) {
  if (!path.empty()) path += '.';
  path += key.str();
}

void append_index_path(std::string& path, size_t index) { path += "[" + std::to_string(index) + "]"; }

Value Value::list(ValueList items) {
  Value v;
  v.data_ = std::make_unique<Sequence>(Sequence{false, std::move(items)});
  return v;
}

Value Value::tuple(ValueList items) {
  Value v;
  v.data_ = std::make_unique<Sequence>(Sequence{true, std::move(items)});
  return v;
}

Value Value::dict(DictEntries entries) {
  Value v;
  auto node = std::make_unique<Dict>();
  node->entries = std::move(entries);
  v.data_ = std::move(node);
  return v;
}

Value& Value::operator=(Value&& other) noexcept {
  if (this != &other) {
    Value old(std::move(*this));  // destroyed iteratively after `other` has been moved in
    data_ = std::move(other.data_);
  }
  return *this;
}

Value::~Value() {
  if (is_container()) release_iteratively();
}

void Value::release_iteratively() noexcept {
  // Moves container children out so that each node dies with only leaves below it.
  std::vector<Value> pending;
  auto detach_children = [&pending](Value& node) {
    if (auto* seq = std::get_if<std::unique_ptr<Sequence>>(&node.data_); seq && *seq) {
      for (auto& item : (*seq)->items) {
        if (item.is_container()) pending.push_back(std::move(item));
      }
    } else if (auto* dict = std::get_if<std::unique_ptr<Dict>>(&node.data_); dict && *dict) {
      for (auto& [key, item] : (*dict)->entries) {
        if (item.is_container()) pending.push_back(std::move(item));
      }
    }
  };
  detach_children(*this);
  while (!pending.empty()) {
    Value node = std::move(pending.back());
    pending.pop_back();
    detach_children(node);
  }
}

const char* Value::kind_name(Kind kind) {
  switch (kind) {
    case Kind::kNone: return "none";
    case Kind::kBool: return "bool";
    case Kind::kInt: return "int";
    case Kind::kDouble: return "float";
    case Kind::kString: return "str";
    case Kind::kBytes: return "bytes";
    case Kind::kTensor: return "tensor";
    case Kind::kList: return "list";
    case Kind::kTuple: return "tuple";
    case Kind::kDict: return "dict";
    case Kind::kSharded: return "sharded tensor";
  }
  return "?";
}

void Value::wrong_kind(const char* wanted) const {
  throw Error(ErrorCode::kInvalidArgument, std::string("value is a ") + kind_name(kind()) + ", not a " + wanted);
}

bool Value::as_bool() const {
  if (auto* v = std::get_if<bool>(&data_)) return *v;
  wrong_kind("bool");
}
int64_t Value::as_int() const {
  if (auto* v = std::get_if<int64_t>(&data_)) return *v;
  wrong_kind("int");
}
double Value::as_double() const {
  if (auto* v = std::get_if<double>(&data_)) return *v;
  wrong_kind("float");
}
const std::string& Value::as_string() const {
  if (auto* v = std::get_if<std::string>(&data_)) return *v;
  wrong_kind("str");
}
const Bytes& Value::as_bytes() const {
  if (auto* v = std::get_if<Bytes>(&data_)) return *v;
  wrong_kind("bytes");
}
const Tensor& Value::as_tensor() const {
  if (auto* v = std::get_if<Tensor>(&data_)) return *v;
  wrong_kind("tensor");
}
Tensor& Value::as_tensor() {
  if (auto* v = std::get_if<Tensor>(&data_)) return *v;
  wrong_kind("tensor");
}
const ShardedTensor& Value::as_sharded() const {
  if (auto* v = std::get_if<ShardedTensor>(&data_)) return *v;
  wrong_kind("sharded tensor");
}
ShardedTensor& Value::as_sharded() {
  if (auto* v = std::get_if<ShardedTensor>(&data_)) return *v;
  wrong_kind("sharded tensor");
}

Value::Sequence& Value::sequence(const char* wanted) const {
  if (auto* seq = std::get_if<std::unique_ptr<Sequence>>(&data_); seq && *seq) return **seq;
  wrong_kind(wanted);
}
Value::Dict& Value::dict_node(const char* wanted) const {
  if (auto* dict = std::get_if<std::unique_ptr<Dict>>(&data_); dict && *dict) return **dict;
  wrong_kind(wanted);
}

const ValueList& Value::items() const { return sequence("list or tuple").items; }
ValueList& Value::items() { return sequence("list or tuple").items; }
const DictEntries& Value::entries() const { return dict_node("dict").entries; }
DictEntries& Value::entries() {
  Dict& dict = dict_node("dict");
  dict.index_valid.store(false, std::memory_order_relaxed);  // the caller may change keys
  return dict.entries;
}

size_t Value::size() const {
  if (kind() == Kind::kDict) return entries().size();
  return sequence("container").items.size();
}

Value& Value::append(Value item) {
  auto& items = sequence("list or tuple").items;
  items.push_back(std::move(item));
  return items.back();
}

Value& Value::insert(DictKey key, Value value) {
  Dict& dict = dict_node("dict");
  if (dict.find(key)) throw Error(ErrorCode::kInvalidArgument, "duplicate dict key '" + key.str() + "'");
  if (dict.index_valid.load(std::memory_order_relaxed)) dict.index.emplace(key, dict.entries.size());
  dict.entries.emplace_back(std::move(key), std::move(value));
  return dict.entries.back().second;
}

const Value* Value::find(const DictKey& key) const { return dict_node("dict").find(key); }

Value* Value::find(const DictKey& key) { return const_cast<Value*>(dict_node("dict").find(key)); }

const Value& Value::at(const DictKey& key) const {
  if (const Value* v = find(key)) return *v;
  throw Error(ErrorCode::kInvalidArgument, "dict has no key '" + key.str() + "'");
}

Value Value::clone() const {
  // Explicit stack: see Note [Deep trees].
  auto shallow = [](const Value& src) -> Value {
    switch (src.kind()) {
      case Kind::kList: return Value::list(ValueList(src.items().size()));
      case Kind::kTuple: return Value::tuple(ValueList(src.items().size()));
      case Kind::kDict: {
        DictEntries entries;
        entries.reserve(src.entries().size());
        for (const auto& [k, v] : src.entries()) entries.emplace_back(k, Value());
        return Value::dict(std::move(entries));
      }
      default: {
        Value out;
        std::visit(
            [&](const auto& x) {
              using X = std::decay_t<decltype(x)>;
              if constexpr (std::is_copy_constructible_v<X>) out.data_ = x;
            },
            src.data_);
        return out;
      }
    }
  };
  Value root = shallow(*this);
  std::vector<std::pair<const Value*, Value*>> stack{{this, &root}};
  while (!stack.empty()) {
    auto [src, dst] = stack.back();
    stack.pop_back();
    if (src->kind() == Kind::kDict) {
      auto& out = dst->entries();
      const auto& in = src->entries();
      for (size_t i = 0; i < in.size(); ++i) {
        out[i].second = shallow(in[i].second);
        if (in[i].second.is_container()) stack.emplace_back(&in[i].second, &out[i].second);
      }
    } else if (src->is_container()) {
      auto& out = dst->items();
      const auto& in = src->items();
      for (size_t i = 0; i < in.size(); ++i) {
        out[i] = shallow(in[i]);
        if (in[i].is_container()) stack.emplace_back(&in[i], &out[i]);
      }
    }
  }
  return root;
}

}  // namespace fastdcp
