#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include "fastdcp/common/error.h"
#include "fastdcp/memory/host_pool.h"

namespace fastdcp {
namespace {

TEST(HostBuffer, PlainBufferIsPageAlignedAndWritable) {
  HostBuffer b = HostBuffer::allocate(10, {});
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data()) % page_size(), 0u);
  EXPECT_EQ(b.size(), page_size());
  EXPECT_FALSE(b.shared());
  EXPECT_FALSE(b.pinned());
  std::memset(b.data(), 1, b.size());
}

TEST(HostBuffer, SharedBufferIsVisibleThroughItsFd) {
  HostBuffer b = HostBuffer::allocate(1 << 16, {.shared = true});
  ASSERT_TRUE(b.shared());
  ASSERT_GE(b.fd(), 0);
  std::memcpy(b.data(), "fastdcp", 8);
  // Another mapping of the same fd (as a writer process would make) sees the bytes.
  void* other = mmap(nullptr, b.size(), PROT_READ, MAP_SHARED, b.fd(), 0);
  ASSERT_NE(other, MAP_FAILED);
  EXPECT_STREQ(static_cast<const char*>(other), "fastdcp");
  munmap(other, b.size());
}

TEST(HostBuffer, MoveTransfersOwnership) {
  HostBuffer a = HostBuffer::allocate(100, {.shared = true});
  void* data = a.data();
  HostBuffer b = std::move(a);
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(a.fd(), -1);
  EXPECT_EQ(b.data(), data);
}

TEST(HostBuffer, PinnedWithoutCudaIsAClearError) {
  try {
    HostBuffer::allocate(100, {.pinned = true}, CudaRuntime::unavailable("test"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnavailable);
    EXPECT_NE(std::string(e.what()).find("test"), std::string::npos);
  }
}

TEST(HostMemoryPool, SmallAllocationsShareSlabsAndAreReused) {
  HostMemoryPool pool;
  std::vector<std::shared_ptr<HostAllocation>> allocs;
  for (int i = 0; i < 1000; ++i) allocs.push_back(pool.allocate(4096, {}));
  HostMemoryStats s = pool.stats();
  EXPECT_LE(s.buffers, 2u);  // 1000 x 4 KiB fit in one 4 MiB slab
  EXPECT_EQ(s.allocations, 1000u);
  for (auto& a : allocs) EXPECT_EQ(reinterpret_cast<uintptr_t>(a->data()) % 64, 0u);
  void* first = allocs[0]->data();
  allocs.clear();
  EXPECT_EQ(pool.stats().total_in_use(), 0u);
  EXPECT_GT(pool.stats().total_reserved(), 0u);  // cached for reuse
  auto again = pool.allocate(4000, {});
  EXPECT_EQ(again->capacity(), 4096u);
  (void)first;
  EXPECT_EQ(pool.stats().buffers, s.buffers);  // no new mapping
}

TEST(HostMemoryPool, SizeClassesWasteAtMostAQuarter) {
  HostMemoryPool pool;
  for (size_t n : {1u, 64u, 65u, 100u, 1000u, 5000u, 70000u, 1u << 20}) {
    auto a = pool.allocate(n, {});
    EXPECT_GE(a->capacity(), n);
    EXPECT_LE(a->capacity(), std::max<size_t>(64, n + n / 4 + 1)) << n;
  }
}

TEST(HostMemoryPool, LargeBuffersAreCachedByAndReusedForTheirSize) {
  HostMemoryPool pool;
  void* data = nullptr;
  {
    auto a = pool.allocate(8 << 20, {});
    data = a->data();
  }
  auto b = pool.allocate(8 << 20, {});
  EXPECT_EQ(b->data(), data);
  auto c = pool.allocate(8 << 20, {});
  EXPECT_NE(c->data(), data);
}

TEST(HostMemoryPool, AccountingByKind) {
  HostMemoryPool pool;
  auto shared = pool.allocate(2 << 20, {.shared = true});
  auto plain = pool.allocate(3 << 20, {});
  HostMemoryStats s = pool.stats();
  EXPECT_EQ(s.reserved_bytes[1], 2u << 20);
  EXPECT_EQ(s.reserved_bytes[0], 3u << 20);
  EXPECT_EQ(s.shared_bytes(), 2u << 20);
  EXPECT_EQ(s.pinned_bytes(), 0u);
  EXPECT_GE(shared->shared_fd(), 0);
  EXPECT_EQ(plain->shared_fd(), -1);
}

TEST(HostMemoryPool, SharedSmallAllocationsReportTheirOffsetInTheMemfd) {
  HostMemoryPool pool;
  auto a = pool.allocate(100, {.shared = true});
  auto b = pool.allocate(100, {.shared = true});
  EXPECT_EQ(a->shared_fd(), b->shared_fd());
  EXPECT_NE(a->shared_offset(), b->shared_offset());
  std::memcpy(b->data(), "xyz", 4);
  char got[4] = {};
  ASSERT_EQ(pread(b->shared_fd(), got, 4, static_cast<off_t>(b->shared_offset())), 4);
  EXPECT_STREQ(got, "xyz");
}

TEST(HostMemoryPool, BudgetIsEnforcedAfterTrimmingCachedMemory) {
  HostMemoryPool pool({.budget_bytes = 10 << 20});
  { auto cached = pool.allocate(6 << 20, {}); }
  // 6 MiB are cached; a new 9 MiB buffer fits only once the cache is trimmed.
  auto big = pool.allocate(9 << 20, {});
  EXPECT_LE(pool.stats().total_reserved(), 10u << 20);
  try {
    pool.allocate(2 << 20, {});
    FAIL() << "expected the budget to be exceeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kResourceExhausted);
    EXPECT_NE(std::string(e.what()).find("budget"), std::string::npos) << e.what();
  }
}

TEST(HostMemoryPool, TrimReleasesEverythingUnused) {
  HostMemoryPool pool;
  auto keep = pool.allocate(100, {});
  { auto a = pool.allocate(2 << 20, {}), b = pool.allocate(5000, {}); }
  EXPECT_GT(pool.trim(), 0u);
  HostMemoryStats s = pool.stats();
  EXPECT_EQ(s.buffers, 1u);  // the slab still holding `keep`
  keep.reset();
  pool.trim();
  EXPECT_EQ(pool.stats().total_reserved(), 0u);
  EXPECT_EQ(pool.stats().buffers, 0u);
}

TEST(HostMemoryPool, AllocationsMayOutliveThePool) {
  std::shared_ptr<HostAllocation> survivor;
  {
    HostMemoryPool pool;
    survivor = pool.allocate(1000, {});
  }
  std::memset(survivor->data(), 0, 1000);
  survivor.reset();
}

}  // namespace
}  // namespace fastdcp
