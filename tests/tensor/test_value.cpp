#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "fastdcp/common/error.h"
#include "fastdcp/tensor/value.h"

namespace fastdcp {
namespace {

TEST(Value, ScalarsAndKinds) {
  EXPECT_TRUE(Value().is_none());
  EXPECT_EQ(Value(true).as_bool(), true);
  EXPECT_EQ(Value(3).as_int(), 3);
  EXPECT_EQ(Value(int64_t{1} << 40).as_int(), int64_t{1} << 40);
  EXPECT_DOUBLE_EQ(Value(0.5).as_double(), 0.5);
  EXPECT_EQ(Value("lr").as_string(), "lr");
  EXPECT_EQ(Value(Bytes{"\x00\x01"}).as_bytes().data, std::string("\x00\x01"));
  EXPECT_EQ(Value::tuple().kind(), Value::Kind::kTuple);
  try {
    Value(1).as_string();
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "value is a int, not a str");
  }
}

TEST(Value, DictKeepsInsertionOrderAndIntegerKeys) {
  Value d = Value::dict();
  d.insert("b", 1);
  d.insert(0, 2);
  d.insert("a", 3);
  ASSERT_EQ(d.size(), 3u);
  EXPECT_EQ(d.entries()[0].first.as_string(), "b");
  EXPECT_TRUE(d.entries()[1].first.is_int());
  EXPECT_EQ(d.at(0).as_int(), 2);
  EXPECT_EQ(d.find("0"), nullptr);  // the string "0" is not the integer 0
  EXPECT_THROW(d.insert("a", 4), Error);
  EXPECT_THROW(d.at("zzz"), Error);
}

TEST(Value, CloneIsDeepButSharesTensors) {
  Value d = Value::dict();
  Tensor t = Tensor::empty_cpu(DType::kF32, {2});
  d.insert("t", t);
  d.insert("l", Value::list()).append(Value::tuple()).append(1.5);
  Value copy = d.clone();
  EXPECT_EQ(copy.at("t").as_tensor().storage(), t.storage());
  EXPECT_DOUBLE_EQ(copy.at("l")[0][0].as_double(), 1.5);
  copy.entries()[1].second.items().clear();
  EXPECT_EQ(d.at("l").size(), 1u);
}

TEST(Value, DeepNestingNeitherOverflowsNorRecursesOnDestruction) {
  constexpr int kDepth = 200000;
  Value root = Value::list();
  Value* cursor = &root;
  for (int i = 0; i < kDepth; ++i) {
    Value child = i % 2 ? Value::list() : Value::dict();
    cursor = cursor->kind() == Value::Kind::kDict ? &cursor->insert("k", std::move(child))
                                                  : &cursor->append(std::move(child));
  }
  Value copy = root.clone();
  int depth = 0;
  const Value* c = &copy;
  while (c->size() > 0) {
    c = c->kind() == Value::Kind::kDict ? &c->entries()[0].second : &(*c)[0];
    ++depth;
  }
  EXPECT_EQ(depth, kDepth);
  // Both trees are destroyed here without recursing.
}

// Large dicts answer lookups from an index that lookups build on demand, const ones included,
// and that changes made through entries() invalidate.
TEST(Value, LargeDictLookupsFollowChangesMadeThroughEntries) {
  DictEntries entries;
  for (int i = 0; i < 1000; ++i) entries.emplace_back(DictKey("k" + std::to_string(i)), Value(int64_t{i}));
  Value dict = Value::dict(std::move(entries));
  const Value& view = dict;
  ASSERT_NE(view.find(DictKey("k500")), nullptr);
  EXPECT_EQ(view.find(DictKey("k500"))->as_int(), 500);
  EXPECT_EQ(view.find(DictKey("k1000")), nullptr);
  dict.entries()[500].first = DictKey("renamed");  // the index built above is now stale
  EXPECT_EQ(view.find(DictKey("k500")), nullptr);
  EXPECT_EQ(view.find(DictKey("renamed"))->as_int(), 500);
  dict.insert(DictKey("k1000"), Value(int64_t{1000}));
  EXPECT_EQ(view.find(DictKey("k1000"))->as_int(), 1000);
  EXPECT_THROW(dict.insert(DictKey("k999"), Value()), Error);
}

TEST(Value, ConcurrentConstLookupsShareOneIndex) {
  DictEntries entries;
  for (int i = 0; i < 5000; ++i) entries.emplace_back(DictKey(int64_t{i}), Value(int64_t{2 * i}));
  const Value dict = Value::dict(std::move(entries));
  std::vector<std::thread> readers;
  std::atomic<int> wrong{0};
  for (int t = 0; t < 4; ++t) {
    readers.emplace_back([&, t] {
      for (int i = t; i < 5000; i += 3) {
        const Value* v = dict.find(DictKey(int64_t{i}));
        if (!v || v->as_int() != 2 * i) ++wrong;
      }
    });
  }
  for (auto& r : readers) r.join();
  EXPECT_EQ(wrong.load(), 0);
}

TEST(Value, KeyPaths) {
  std::string path;
  append_key_path(path, "state");
  append_key_path(path, 0);
  append_key_path(path, "exp_avg");
  EXPECT_EQ(path, "state.0.exp_avg");
  std::string p2 = "param_groups";
  append_index_path(p2, 0);
  append_key_path(p2, "lr");
  EXPECT_EQ(p2, "param_groups[0].lr");
}

}  // namespace
}  // namespace fastdcp
