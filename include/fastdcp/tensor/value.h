#pragma once
// The state-dict model: a tree of values. Leaves are none, bool, int64, double, string, bytes,
// tensors and sharded tensors (this rank's boxes of a tensor that ranks share, Note [Sharded
// tensors]); containers are list, tuple and dict. Dicts keep insertion order and have string or
// integer keys (optimizer state is keyed by parameter index).
//
// Note [Deep trees]
// Values are move-only and destroyed iteratively, and every traversal in fastdcp uses an explicit
// stack, so trees nested tens of thousands of levels deep neither overflow the stack nor take
// quadratic time. Copy a tree explicitly with clone().

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "fastdcp/tensor/sharded.h"
#include "fastdcp/tensor/tensor.h"

namespace fastdcp {

// A dict key: an integer or an immutable, shared string (copying a key never allocates).
class DictKey {
 public:
  DictKey(int64_t index) : key_(index) {}  // NOLINT(google-explicit-constructor)
  DictKey(int index) : key_(int64_t{index}) {}  // NOLINT
  DictKey(std::string_view name) : key_(std::make_shared<const std::string>(name)) {}  // NOLINT
  DictKey(const char* name) : DictKey(std::string_view(name)) {}  // NOLINT
  DictKey(const std::string& name) : DictKey(std::string_view(name)) {}  // NOLINT

  bool is_int() const { return std::holds_alternative<int64_t>(key_); }
  bool is_string() const { return !is_int(); }
  int64_t as_int() const;
  const std::string& as_string() const;
  std::string str() const;  // the key as it appears in a key path
  size_t hash() const;
  friend bool operator==(const DictKey& a, const DictKey& b);

 private:
  std::variant<int64_t, std::shared_ptr<const std::string>> key_;
};

struct DictKeyHash {
  size_t operator()(const DictKey& key) const { return key.hash(); }
};

class Value;
struct Bytes {
  std::string data;
  friend bool operator==(const Bytes&, const Bytes&) = default;
};
using ValueList = std::vector<Value>;
using DictEntries = std::vector<std::pair<DictKey, Value>>;

class Value {
 public:
  enum class Kind : uint8_t { kNone, kBool, kInt, kDouble, kString, kBytes, kTensor, kList, kTuple, kDict, kSharded };

  Value() = default;
  Value(std::nullptr_t) {}              // NOLINT
  Value(bool v) : data_(v) {}           // NOLINT
  Value(int v) : data_(int64_t{v}) {}   // NOLINT
  Value(int64_t v) : data_(v) {}        // NOLINT
  Value(double v) : data_(v) {}         // NOLINT
  Value(std::string v) : data_(std::move(v)) {}  // NOLINT
  Value(const char* v) : data_(std::string(v)) {}  // NOLINT
  Value(Bytes v) : data_(std::move(v)) {}  // NOLINT
  Value(Tensor v) : data_(std::move(v)) {}  // NOLINT
  Value(ShardedTensor v) : data_(std::move(v)) {}  // NOLINT
  static Value list(ValueList items = {});
  static Value tuple(ValueList items = {});
  static Value dict(DictEntries entries = {});

  Value(Value&&) noexcept = default;
  Value& operator=(Value&& other) noexcept;
  Value(const Value&) = delete;
  Value& operator=(const Value&) = delete;
  ~Value();

  // A deep copy of the tree; tensors are shared handles (their storage is not copied).
  Value clone() const;

  Kind kind() const;
  bool is_none() const { return kind() == Kind::kNone; }
  bool is_tensor() const { return kind() == Kind::kTensor; }
  bool is_sharded() const { return kind() == Kind::kSharded; }
  bool is_container() const;

  bool as_bool() const;
  int64_t as_int() const;
  double as_double() const;
  const std::string& as_string() const;
  const Bytes& as_bytes() const;
  const Tensor& as_tensor() const;
  Tensor& as_tensor();
  const ShardedTensor& as_sharded() const;
  ShardedTensor& as_sharded();

  // List and tuple items.
  const ValueList& items() const;
  ValueList& items();
  // Dict entries, in insertion order.
  const DictEntries& entries() const;
  DictEntries& entries();
  // Number of items or entries of a container.
  size_t size() const;

  // Appends to a list or tuple; returns the new item.
  Value& append(Value item);
  // Inserts a new dict entry; a key that is already present is an error naming it.
  Value& insert(DictKey key, Value value);
  // Dict lookup; nullptr if absent. Dicts with many entries keep a hash index, rebuilt after
  // entries() was used for writing (a const lookup falls back to a linear scan until then).
  const Value* find(const DictKey& key) const;
  Value* find(const DictKey& key);
  // Dict lookup that throws naming the key if absent.
  const Value& at(const DictKey& key) const;
  const Value& operator[](size_t index) const { return items().at(index); }

  static const char* kind_name(Kind kind);

 private:
  struct Sequence {
    bool is_tuple = false;
    ValueList items;
  };
  // Dicts of at least kIndexThreshold entries keep a hash index, valid unless entries() handed
  // out mutable access since it was built. Lookups build a stale index first, const ones too
  // (under a lock, so that concurrent readers may share a tree): a dict filled through entries()
  // must not cost a linear scan per lookup.
  static constexpr size_t kIndexThreshold = 16;
  struct Dict {
    DictEntries entries;
    mutable std::unordered_map<DictKey, size_t, DictKeyHash> index;
    mutable std::atomic<bool> index_valid{false};
    mutable std::mutex index_mutex;

    void ensure_index() const;
    const Value* find(const DictKey& key) const;
  };
  using Data = std::variant<std::monostate, bool, int64_t, double, std::string, Bytes, Tensor,
                            std::unique_ptr<Sequence>, std::unique_ptr<Dict>, ShardedTensor>;
  [[noreturn]] void wrong_kind(const char* wanted) const;
  Sequence& sequence(const char* wanted) const;
  Dict& dict_node(const char* wanted) const;
  // Moves the children of every container below into a flat list, so destruction never recurses.
  void release_iteratively() noexcept;

  Data data_;
};

// Inline: every traversal asks each node its kind.
inline Value::Kind Value::kind() const {
  switch (data_.index()) {
    case 0: return Kind::kNone;
    case 1: return Kind::kBool;
    case 2: return Kind::kInt;
    case 3: return Kind::kDouble;
    case 4: return Kind::kString;
    case 5: return Kind::kBytes;
    case 6: return Kind::kTensor;
    case 7: {
      const auto& seq = std::get<std::unique_ptr<Sequence>>(data_);
      if (!seq) return Kind::kNone;  // moved-from
      return seq->is_tuple ? Kind::kTuple : Kind::kList;
    }
    case 8:
      return std::get<std::unique_ptr<Dict>>(data_) ? Kind::kDict : Kind::kNone;
    default:
      return Kind::kSharded;
  }
}

inline bool Value::is_container() const {
  const Kind k = kind();
  return k == Kind::kList || k == Kind::kTuple || k == Kind::kDict;
}

// Appends one step to a key path, as upstream spells them: dict keys (string or integer) joined by
// '.', sequence indices in brackets: "state.0.exp_avg", "param_groups[0].lr".
void append_key_path(std::string& path, const DictKey& key);
void append_index_path(std::string& path, size_t index);

// Calls visit(key_path, leaf) for every value of the tree that is not a container, in tree order,
// with an explicit stack (Note [Deep trees]). `Tree` is Value or const Value; key paths start at
// `root_path`. A `visit` that takes the leaf alone gets no key paths, and none are built.
template <class Tree, class Visit>
void for_each_leaf(Tree& root, Visit&& visit, std::string root_path = {}) {
  constexpr bool kPaths = !std::is_invocable_v<Visit&, Tree&>;
  struct Frame {
    Tree* value;
    std::string path;
  };
  std::vector<Frame> stack;
  stack.push_back({&root, std::move(root_path)});
  while (!stack.empty()) {
    Frame frame = std::move(stack.back());
    stack.pop_back();
    Tree& v = *frame.value;
    if (v.kind() == Value::Kind::kDict) {
      auto& entries = v.entries();
      for (size_t i = entries.size(); i-- > 0;) {
        std::string p;
        if constexpr (kPaths) {
          p = frame.path;
          append_key_path(p, entries[i].first);
        }
        stack.push_back({&entries[i].second, std::move(p)});
      }
    } else if (v.kind() == Value::Kind::kList || v.kind() == Value::Kind::kTuple) {
      auto& items = v.items();
      for (size_t i = items.size(); i-- > 0;) {
        std::string p;
        if constexpr (kPaths) {
          p = frame.path;
          append_index_path(p, i);
        }
        stack.push_back({&items[i], std::move(p)});
      }
    } else if constexpr (kPaths) {
      visit(frame.path, v);
    } else {
      visit(v);
    }
  }
}

}  // namespace fastdcp
