// The `mem` backend: the conformance suite, and the registry of named in-process stores.

#include <atomic>
#include <thread>

#include "fastdcp/common/error.h"
#include "fastdcp/storage/store.h"
#include "storage/store_conformance.h"
#include "support/test_support.h"

namespace fastdcp::testing {
namespace {

using storage::open_store;

// A fresh name for each test's store: named stores live as long as the process.
std::string fresh_memory_spec() {
  static std::atomic<int> counter{0};
  return "mem://conformance_" + std::to_string(counter++);
}

INSTANTIATE_TEST_SUITE_P(Memory, StoreConformance,
                         ::testing::Values(StoreBackend{"mem",
                                                        [] {
                                                          auto home = std::make_unique<StoreHome>();
                                                          home->spec = fresh_memory_spec();
                                                          return home;
                                                        }}),
                         [](const auto& info) { return info.param.name; });

TEST(MemoryStore, NamesAreSeparateStores) {
  open_store("mem://first")->put_if_absent("blob", "1", 1);
  open_store("mem://second")->put_if_absent("blob", "2", 1);
  char c = 0;
  open_store("mem://first")->open_reader("blob")->read_at(&c, 1, 0);
  EXPECT_EQ(c, '1');
  open_store("mem://second")->open_reader("blob")->read_at(&c, 1, 0);
  EXPECT_EQ(c, '2');
}

TEST(MemoryStore, ThreadsOpeningOneNameShareOneStore) {
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([t] { open_store("mem://opened_by_threads")->put_if_absent("t" + std::to_string(t), "x", 1); });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(open_store("mem://opened_by_threads")->list().size(), 8u);
}

TEST(MemoryStore, AMappingOutlivesItsReaderAndItsBlob) {
  auto store = open_store("mem://mapping");
  store->put_if_absent("blob", "abcd", 4);
  auto mapping = store->open_reader("blob")->map();
  store->remove("blob");
  ASSERT_EQ(mapping->size, 4u);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(mapping->data), 4), "abcd");
}

}  // namespace
}  // namespace fastdcp::testing
