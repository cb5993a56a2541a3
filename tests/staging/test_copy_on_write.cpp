// Copy-on-write staging (Note [Copy-on-write staging]): after on_sources_released the sources may
// change, and the staged bytes are still those at the stage() call.

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "fastdcp/staging/stager.h"
#include "staging/write_protect_copier.h"
#include "support/test_support.h"

namespace fastdcp {
namespace {

using testing::cpu_staging;
using testing::patterned_tensor;

// A page-aligned anonymous mapping, so that tests can place sources at chosen offsets.
class Mapping {
 public:
  explicit Mapping(size_t bytes, int fd = -1) : bytes_(bytes) {
    data_ = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | (fd < 0 ? MAP_ANONYMOUS : 0), fd, 0);
    if (data_ == MAP_FAILED) throw std::runtime_error("mmap failed");
  }
  ~Mapping() { munmap(data_, bytes_); }
  unsigned char* bytes() const { return static_cast<unsigned char*>(data_); }

 private:
  size_t bytes_;
  void* data_;
};

Tensor tensor_over(void* data, uint64_t nbytes) {
  Storage storage = Storage::wrap(data, nbytes, Device::cpu());
  return Tensor(storage, DType::kU8, Dims{static_cast<int64_t>(nbytes)}, Dims{1}, 0);
}

void fill_pattern(unsigned char* p, size_t n, int seed) {
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<unsigned char>(i * 31 + seed);
}

bool has_pattern(const unsigned char* p, size_t n, int seed) {
  for (size_t i = 0; i < n; ++i) {
    if (p[i] != static_cast<unsigned char>(i * 31 + seed)) return false;
  }
  return true;
}

Value dict_of(std::vector<std::pair<std::string, Tensor>> tensors) {
  Value out = Value::dict();
  for (auto& [key, tensor] : tensors) out.insert(key, std::move(tensor));
  return out;
}

const unsigned char* staged_bytes(const Value& staged, const std::string& key) {
  return static_cast<const unsigned char*>(staged.at(key).as_tensor().data_ptr());
}

class CopyOnWriteTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    DefaultStager probe(cpu_staging());
    if (!probe.copy_on_write_available(&why)) GTEST_SKIP() << "copy-on-write staging unavailable here: " << why;
  }
};

TEST_F(CopyOnWriteTest, WritesAfterReleaseDoNotReachTheStagedBytes) {
  constexpr size_t kBytes = size_t{16} << 20;
  Tensor source = patterned_tensor(DType::kU8, {static_cast<int64_t>(kBytes)}, 7);
  std::vector<unsigned char> expected(static_cast<unsigned char*>(source.data_ptr()),
                                      static_cast<unsigned char*>(source.data_ptr()) + kBytes);
  DefaultStager stager(cpu_staging());
  int released = 0;
  StageCallOptions call;
  // Runs on the staging thread before the protected copy: every chunk is written before it is copied.
  call.on_sources_released = [&] {
    ++released;
    std::memset(source.data_ptr(), 0xAB, kBytes);
  };
  Value staged = stager.stage_now(dict_of({{"w", source}}), call);
  EXPECT_EQ(released, 1);
  EXPECT_EQ(std::memcmp(staged_bytes(staged, "w"), expected.data(), kBytes), 0);
  EXPECT_EQ(static_cast<unsigned char*>(source.data_ptr())[kBytes - 1], 0xAB);  // the writes went through
  const StagerStats stats = stager.stats();
  EXPECT_EQ(stats.bytes_copied_after_release, kBytes);
  EXPECT_GE(stats.write_faults, kBytes / (size_t{2} << 20) - 1);
}

TEST_F(CopyOnWriteTest, ConcurrentWritesAndMallocDuringTheCopy) {
  // Small tensors from malloc share pages with malloc's own bookkeeping, so the writer thread's
  // malloc/free calls fault while holding malloc's locks: the handler must not need them.
  constexpr int kTensors = 300;
  constexpr int64_t kBytes = 40 << 10;
  std::vector<Tensor> sources;
  std::vector<std::vector<unsigned char>> expected;
  Value tree = Value::dict();
  for (int i = 0; i < kTensors; ++i) {
    sources.push_back(patterned_tensor(DType::kU8, {kBytes}, i));
    auto* p = static_cast<unsigned char*>(sources.back().data_ptr());
    expected.emplace_back(p, p + kBytes);
    tree.insert("t" + std::to_string(i), sources.back());
  }
  DefaultStager stager(cpu_staging(/*async=*/true));
  for (int round = 0; round < 3; ++round) {
    std::atomic<bool> go{false}, stop{false};
    std::thread writer([&] {
      while (!go.load()) std::this_thread::yield();
      unsigned seed = static_cast<unsigned>(round);
      while (!stop.load()) {
        seed = seed * 1103515245u + 12345u;
        auto* p = static_cast<unsigned char*>(sources[seed % kTensors].data_ptr());
        p[(seed >> 8) % kBytes] ^= 0x5A;
        std::free(std::malloc(64 + (seed & 1023)));
      }
    });
    StageCallOptions call;
    call.on_sources_released = [&] { go.store(true); };
    Future<Value> future = stager.stage(std::make_shared<Value>(tree.clone()), call);
    Value staged = future.take();
    stop.store(true);
    go.store(true);
    writer.join();
    for (int i = 0; i < kTensors; ++i) {
      ASSERT_EQ(std::memcmp(staged_bytes(staged, "t" + std::to_string(i)), expected[i].data(), kBytes), 0)
          << "tensor " << i << ", round " << round;
      auto* p = static_cast<unsigned char*>(sources[i].data_ptr());
      expected[i].assign(p, p + kBytes);  // the next round stages the written values
    }
  }
  EXPECT_GT(stager.stats().bytes_copied_after_release, 0u);
}

TEST_F(CopyOnWriteTest, BytesBesideTheSourcesStayWritable) {
  // Two sources not aligned to pages, in one mapping; the bytes around them are written after release.
  constexpr size_t kMap = size_t{12} << 20;
  Mapping map(kMap);
  const size_t a_off = 100, a_len = (size_t{3} << 20) + 77;
  const size_t b_off = a_off + a_len + 5000, b_len = size_t{2} << 20;
  fill_pattern(map.bytes() + a_off, a_len, 1);
  fill_pattern(map.bytes() + b_off, b_len, 2);
  DefaultStager stager(cpu_staging());
  StageCallOptions call;
  call.on_sources_released = [&] {
    std::memset(map.bytes(), 0x11, a_off);
    std::memset(map.bytes() + a_off + a_len, 0x22, b_off - (a_off + a_len));
    std::memset(map.bytes() + b_off + b_len, 0x33, kMap - (b_off + b_len));
    std::memset(map.bytes() + a_off, 0, a_len);
  };
  Value staged = stager.stage_now(
      dict_of({{"a", tensor_over(map.bytes() + a_off, a_len)}, {"b", tensor_over(map.bytes() + b_off, b_len)}}),
      call);
  EXPECT_TRUE(has_pattern(staged_bytes(staged, "a"), a_len, 1));
  EXPECT_TRUE(has_pattern(staged_bytes(staged, "b"), b_len, 2));
  EXPECT_EQ(map.bytes()[a_off - 1], 0x11);
  EXPECT_EQ(map.bytes()[b_off - 1], 0x22);
  EXPECT_EQ(map.bytes()[kMap - 1], 0x33);
  EXPECT_EQ(stager.stats().bytes_copied_after_release, a_len + b_len);
}

TEST_F(CopyOnWriteTest, MemoryBetweenSourcesUnmappedDuringTheCopy) {
  // Sources less than 256 KiB apart are protected as one range, the memory between them included.
  // That memory may be unmapped, and mapped again, while the copy runs: the sources are still
  // copied and released, and nothing stays protected.
  constexpr size_t kMiB = size_t{1} << 20, kGap = size_t{64} << 10;
  Mapping map(12 * kMiB);
  unsigned char* a = map.bytes();
  unsigned char* gap = a + 4 * kMiB;
  unsigned char* b = gap + kGap;
  fill_pattern(a, 4 * kMiB, 9);
  fill_pattern(b, 4 * kMiB, 10);
  DefaultStager stager(cpu_staging());
  StageCallOptions call;
  call.on_sources_released = [&] {
    ASSERT_EQ(munmap(gap, kGap), 0);  // a hole in the protected range, then unprotected memory
    ASSERT_EQ(mmap(gap, kGap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0), gap);
    std::memset(a, 0, 4 * kMiB);
    std::memset(b, 0, 4 * kMiB);
  };
  Value staged = stager.stage_now(dict_of({{"a", tensor_over(a, 4 * kMiB)}, {"b", tensor_over(b, 4 * kMiB)}}), call);
  EXPECT_TRUE(has_pattern(staged_bytes(staged, "a"), 4 * kMiB, 9));
  EXPECT_TRUE(has_pattern(staged_bytes(staged, "b"), 4 * kMiB, 10));
  EXPECT_EQ(stager.stats().bytes_copied_after_release, 8 * kMiB);
  std::memset(a, 1, 12 * kMiB);
  EXPECT_EQ(a[12 * kMiB - 1], 1);
}

TEST_F(CopyOnWriteTest, MemoryThatCannotBeProtectedIsCopiedBeforeRelease) {
  // A private file mapping cannot be write-protected; an anonymous source beside it still is.
  testing::TempDir dir;
  const std::string path = dir.path() + "/source.bin";
  constexpr size_t kBytes = size_t{4} << 20;
  {
    std::vector<unsigned char> bytes(kBytes);
    fill_pattern(bytes.data(), kBytes, 3);
    const int fd = open(path.c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(write(fd, bytes.data(), kBytes), static_cast<ssize_t>(kBytes));
    close(fd);
  }
  const int fd = open(path.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  Mapping file_map(kBytes, fd);
  close(fd);
  Mapping anon(kBytes);
  fill_pattern(anon.bytes(), kBytes, 4);
  DefaultStager stager(cpu_staging());
  StageCallOptions call;
  call.on_sources_released = [&] {
    std::memset(file_map.bytes(), 0, kBytes);
    std::memset(anon.bytes(), 0, kBytes);
  };
  Value staged = stager.stage_now(dict_of({{"file", tensor_over(file_map.bytes(), kBytes)}, {"anon", tensor_over(anon.bytes(), kBytes)}}),
                                  call);
  EXPECT_TRUE(has_pattern(staged_bytes(staged, "file"), kBytes, 3));
  EXPECT_TRUE(has_pattern(staged_bytes(staged, "anon"), kBytes, 4));
  EXPECT_EQ(stager.stats().bytes_copied_after_release, kBytes);  // the anonymous one only
}

// The size of the transparent huge pages backing the mapping that holds `address`, in KiB.
uint64_t anon_huge_kib(const void* address) {
  std::ifstream smaps("/proc/self/smaps");
  const auto at = reinterpret_cast<uintptr_t>(address);
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    uintptr_t begin = 0, end = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &begin, &end) == 2 && line.find(':') > line.find(' ')) {
      inside = begin <= at && at < end;
    } else if (inside && line.rfind("AnonHugePages:", 0) == 0) {
      return std::stoull(line.substr(14));
    }
  }
  return 0;
}

TEST_F(CopyOnWriteTest, LargeSourcesAreCollapsedIntoHugePagesForTheNextSave) {
  // Note [Huge pages for protected sources]: protecting huge pages costs 1/500 of 4 KiB pages.
  std::ifstream thp("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string modes((std::istreambuf_iterator<char>(thp)), std::istreambuf_iterator<char>());
  if (modes.empty() || modes.find("[never]") != std::string::npos) GTEST_SKIP() << "transparent huge pages are off";
  constexpr size_t kHuge = size_t{2} << 20;
  Mapping map(6 * kHuge);
  auto* start = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(map.bytes()) + kHuge - 1) & ~(kHuge - 1));
  detail::WriteProtectCopier* copier = detail::WriteProtectCopier::instance();
  copier->wait_for_collapses();  // earlier tests' sources, whose addresses this mapping may reuse
  fill_pattern(start, 4 * kHuge, 8);  // faulted in as 4 KiB pages: the mapping was not madvised
  ASSERT_EQ(anon_huge_kib(start), 0u);
  DefaultStager stager(cpu_staging());
  StageCallOptions call;
  call.on_sources_released = [] {};
  Value staged = stager.stage_now(dict_of({{"w", tensor_over(start, 4 * kHuge)}}), call);
  EXPECT_TRUE(has_pattern(staged_bytes(staged, "w"), 4 * kHuge, 8));
  copier->wait_for_collapses();  // collapsed in the background, after the copy
  EXPECT_EQ(anon_huge_kib(start), 4u * 2048);
  EXPECT_TRUE(has_pattern(start, 4 * kHuge, 8));  // the same bytes, in other pages
}

TEST(CopyOnWriteOption, OffMeansCopiedBeforeRelease) {
  StagingOptions options = cpu_staging(/*async=*/true);
  options.copy_on_write = false;
  DefaultStager stager(options);
  std::string why;
  EXPECT_FALSE(stager.copy_on_write_available(&why));
  EXPECT_NE(why.find("copy_on_write"), std::string::npos) << why;
  Tensor source = patterned_tensor(DType::kU8, {int64_t{8} << 20}, 5);
  std::atomic<int> released{0};
  StageCallOptions call;
  call.on_sources_released = [&] { released.fetch_add(1); };
  Future<Value> future = stager.stage(std::make_shared<Value>(dict_of({{"w", source}})), call);
  future.wait();
  EXPECT_EQ(released.load(), 1);
  EXPECT_EQ(stager.stats().bytes_copied_after_release, 0u);
}

TEST(CopyOnWriteOption, NotReleasedWhenStagingFails) {
  DefaultStager stager(cpu_staging());
  int released = 0;
  StageCallOptions call;
  call.on_sources_released = [&] { ++released; };
  static char device_bytes[64];
  const Tensor on_gpu(Storage::wrap(device_bytes, sizeof(device_bytes), Device::cuda(0)), DType::kU8, Dims{64},
                      Dims{1}, 0);
  Tensor big = patterned_tensor(DType::kU8, {int64_t{4} << 20}, 6);
  EXPECT_THROW(stager.stage_now(dict_of({{"big", big}, {"gpu", on_gpu}}), call), Error);
  EXPECT_EQ(released, 0);
}

}  // namespace
}  // namespace fastdcp
