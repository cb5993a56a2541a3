// Copy-on-write staging (Note [Copy-on-write staging]): after on_sources_released the sources may
// change, and the staged bytes are still those at the stage() call.

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "fastdcp/common/fault.h"
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

// --- failures of the system calls copy-on-write staging depends on ---------------------------
// Note [Copy-on-write failures]: each one fails the save with its reason; a training thread
// writing its tensors meanwhile finishes; nothing stays protected; no thread is left behind.

// Ends the process, naming the test, when a scope outlives its deadline: a hang fails the test
// instead of hanging CI.
class Watchdog {
 public:
  explicit Watchdog(std::chrono::seconds limit)
      : thread_([this, limit] {
          std::unique_lock lock(mutex_);
          if (!cv_.wait_for(lock, limit, [&] { return done_; })) {
            std::cerr << "watchdog: " << ::testing::UnitTest::GetInstance()->current_test_info()->name()
                      << " hung for " << limit.count() << " s" << std::endl;
            std::abort();
          }
        }) {}
  ~Watchdog() {
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

struct ArmedFault : fault::Scope {
  ArmedFault(const char* call, const fault::Fault& armed) { fault::inject(call, armed); }
};

size_t thread_count() {
  return static_cast<size_t>(std::distance(std::filesystem::directory_iterator("/proc/self/task"),
                                           std::filesystem::directory_iterator()));
}

// The threads of this process once the huge-page collapser is idle and threads that have
// finished their work (joined or about to be) are gone, waiting up to 5 s for more than
// `at_most` to go.
size_t settled_thread_count(size_t at_most = SIZE_MAX) {
  if (auto* copier = detail::WriteProtectCopier::instance()) copier->wait_for_collapses();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (thread_count() > at_most && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return thread_count();
}

// Two 4 MiB sources 64 KiB apart in one mapping (protected as one range), each 2 MiB-aligned.
struct TwoSources {
  static constexpr size_t kMiB = size_t{1} << 20, kBytes = 4 * kMiB, kGap = size_t{64} << 10;
  Mapping map{12 * kMiB};
  unsigned char* a = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(map.bytes()) + 2 * kMiB - 1) &
                                                      ~(2 * kMiB - 1));
  unsigned char* gap = a + kBytes;
  unsigned char* b = gap + kGap;
  TwoSources() {
    fill_pattern(a, kBytes, 21);
    fill_pattern(b, kBytes, 22);
  }
  Value tree() const { return dict_of({{"a", tensor_over(a, kBytes)}, {"b", tensor_over(b, kBytes)}}); }
  // Writes every page of both sources and of the memory between them, as training would.
  void write_all(unsigned char value) const { std::memset(a, value, 2 * kBytes + kGap); }
};

enum class Release { kYes, kNo, kEither };

// Stages `sources` while a training thread writes them from the moment they are released. Returns
// the save's outcome: "" when it succeeded (and the staged bytes are checked), else its message.
std::string save_while_training(const TwoSources& sources, Release expect_release = Release::kYes) {
  const size_t threads_before = settled_thread_count();
  std::string outcome;
  {
    DefaultStager stager(cpu_staging(/*async=*/true));
    std::atomic<bool> released{false}, stop{false};
    std::atomic<bool> trained{false};
    std::thread training([&] {
      while (!released.load() && !stop.load()) std::this_thread::yield();
      if (!released.load()) return;
      sources.write_all(0x5C);  // must finish whether or not the save does
      trained.store(true);
    });
    StageCallOptions call;
    call.on_sources_released = [&] { released.store(true); };
    Future<Value> future = stager.stage(std::make_shared<Value>(sources.tree()), call);
    EXPECT_TRUE(future.wait_for(std::chrono::seconds(20)));
    try {
      Value staged = future.take();
      EXPECT_TRUE(has_pattern(staged_bytes(staged, "a"), TwoSources::kBytes, 21));
      EXPECT_TRUE(has_pattern(staged_bytes(staged, "b"), TwoSources::kBytes, 22));
    } catch (const Error& e) {
      outcome = e.what();
      if (outcome.empty()) outcome = "?";
    }
    stop.store(true);
    training.join();
    if (expect_release != Release::kEither) EXPECT_EQ(released.load(), expect_release == Release::kYes);
    EXPECT_EQ(trained.load(), released.load());  // a released training thread always finishes
  }
  fault::clear();
  // Nothing stays protected: these writes would wait forever on a protected page.
  sources.write_all(0x6D);
  EXPECT_EQ(sources.b[TwoSources::kBytes - 1], 0x6D);
  EXPECT_LE(settled_thread_count(threads_before), threads_before);
  return outcome;
}

// Stages `sources` on this thread, which writes them all once they are released; checks the
// staged bytes and returns the stager's stats.
StagerStats stage_and_write(const TwoSources& sources) {
  DefaultStager stager(cpu_staging());
  StageCallOptions call;
  call.on_sources_released = [&] { sources.write_all(0); };
  fill_pattern(sources.a, TwoSources::kBytes, 21);
  fill_pattern(sources.b, TwoSources::kBytes, 22);
  Value staged = stager.stage_now(sources.tree(), call);
  EXPECT_TRUE(has_pattern(staged_bytes(staged, "a"), TwoSources::kBytes, 21));
  EXPECT_TRUE(has_pattern(staged_bytes(staged, "b"), TwoSources::kBytes, 22));
  return stager.stats();
}

void expect_names(const std::string& message, const std::string& call, int errnum) {
  EXPECT_NE(message.find(call), std::string::npos) << message;
  EXPECT_NE(message.find(std::strerror(errnum)), std::string::npos) << message;
}

// With `fault` armed for `call`, a save fails naming it and the errno while training goes on; the
// next save, without faults, is staged copy-on-write again, and correctly.
struct FailedCall {
  const char* test;
  const char* call;
  fault::Fault fault;
  Release release;
};

class CopyOnWriteFailure : public CopyOnWriteTest, public ::testing::WithParamInterface<FailedCall> {};

TEST_P(CopyOnWriteFailure, FailsTheSaveNamingTheCallAndTrainingGoesOn) {
  const FailedCall& failed = GetParam();
  Watchdog watchdog(std::chrono::seconds(60));
  TwoSources sources;
  {
    ArmedFault armed(failed.call, failed.fault);
    expect_names(save_while_training(sources, failed.release), failed.call, failed.fault.error);
  }
  EXPECT_EQ(stage_and_write(sources).bytes_copied_after_release, 2 * TwoSources::kBytes);
}

INSTANTIATE_TEST_SUITE_P(
    Calls, CopyOnWriteFailure,
    ::testing::Values(
        // The fault handler's and the copy's unprotects all fail: the pages are unregistered instead.
        FailedCall{"EveryUnprotect", "ioctl(UFFDIO_WRITEPROTECT) unprotecting",
                   {.nth = 1, .times = fault::kAlways, .error = EIO}, Release::kYes},
        FailedCall{"OneUnprotect", "ioctl(UFFDIO_WRITEPROTECT) unprotecting", {.nth = 1, .times = 1, .error = EIO},
                   Release::kYes},
        FailedCall{"Protect", "ioctl(UFFDIO_WRITEPROTECT) protecting", {.nth = 1, .times = 1, .error = ENOMEM},
                   Release::kNo},
        // EINVAL, EPERM and EBUSY mean memory that cannot be protected, copied before release instead.
        FailedCall{"Register", "ioctl(UFFDIO_REGISTER)", {.nth = 1, .times = fault::kAlways, .error = EFAULT},
                   Release::kNo},
        // The range's unregister fails; its sources' own ranges are unregistered instead.
        FailedCall{"Unregister", "ioctl(UFFDIO_UNREGISTER)", {.nth = 1, .times = 1, .error = EIO}, Release::kYes},
        // Before release (the copy sees the failure early) or after it.
        FailedCall{"Poll", "poll on the userfaultfd", {.nth = 1, .times = fault::kAlways, .error = EBADF},
                   Release::kEither},
        FailedCall{"StateMapping", "mmap", {.nth = 1, .times = 1, .error = ENOMEM}, Release::kNo}),
    [](const ::testing::TestParamInfo<FailedCall>& info) { return std::string(info.param.test); });

TEST_F(CopyOnWriteTest, MemoryTheKernelWillNotRegisterIsCopiedBeforeRelease) {
  Watchdog watchdog(std::chrono::seconds(60));
  TwoSources sources;
  for (int errnum : {EINVAL, EPERM, EBUSY}) {
    ArmedFault armed("ioctl(UFFDIO_REGISTER)", {.nth = 1, .times = fault::kAlways, .error = errnum});
    EXPECT_EQ(stage_and_write(sources).bytes_copied_after_release, 0u) << errnum;
  }
}

TEST_F(CopyOnWriteTest, UnregisteringThatKeepsFailingTurnsCopyOnWriteOff) {
  // Nothing can be unregistered: the userfaultfd is closed, which unregisters everything, and later
  // saves copy before release. Run in a process of its own, as it turns copy-on-write off for good.
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        Watchdog watchdog(std::chrono::seconds(60));
        TwoSources sources;
        {
          ArmedFault armed("ioctl(UFFDIO_UNREGISTER)", {.nth = 1, .times = fault::kAlways, .error = EIO});
          expect_names(save_while_training(sources), "ioctl(UFFDIO_UNREGISTER)", EIO);
        }
        std::string why;
        EXPECT_FALSE(DefaultStager(cpu_staging()).copy_on_write_available(&why));
        expect_names(why, "ioctl(UFFDIO_UNREGISTER)", EIO);
        EXPECT_EQ(stage_and_write(sources).bytes_copied_after_release, 0u);
        std::exit(::testing::Test::HasFailure() ? 1 : 0);
      },
      ::testing::ExitedWithCode(0), "");
}

TEST_F(CopyOnWriteTest, FailingReadFailsTheSaveAndTrainingGoesOn) {
  Watchdog watchdog(std::chrono::seconds(60));
  TwoSources sources;
  {
    ArmedFault armed("read of the userfaultfd", {.nth = 1, .times = fault::kAlways, .error = EIO});
    // The read only happens once a write faults, which the training thread may or may not beat
    // the copy to; when it does, the save must fail naming the read.
    const std::string outcome = save_while_training(sources);
    if (!outcome.empty()) expect_names(outcome, "read of the userfaultfd", EIO);
  }
  EXPECT_EQ(stage_and_write(sources).bytes_copied_after_release, 2 * TwoSources::kBytes);
}

TEST_F(CopyOnWriteTest, FailedCollapseLeavesTheSaveAndTheNextOnesAlone) {
  Watchdog watchdog(std::chrono::seconds(60));
  TwoSources sources;
  ArmedFault armed("madvise(MADV_COLLAPSE)", {.nth = 1, .times = fault::kAlways, .error = EIO});
  EXPECT_EQ(save_while_training(sources), "");
  EXPECT_EQ(stage_and_write(sources).bytes_copied_after_release, 2 * TwoSources::kBytes);
}

TEST(CopyOnWriteSetup, FailedUserfaultfdOrApiSaysWhy) {
  std::string why;
  {
    ArmedFault armed("userfaultfd", {.nth = 1, .times = fault::kAlways, .error = ENOSYS});
    EXPECT_LT(detail::open_write_protect_fd(why), 0);
    expect_names(why, "userfaultfd failed", ENOSYS);
  }
  {
    ArmedFault armed("ioctl(UFFDIO_API)", {.nth = 1, .times = fault::kAlways, .error = EINVAL});
    const int fd = detail::open_write_protect_fd(why);
    if (fd >= 0) close(fd);
    // Where userfaultfd itself is not permitted, that is the reason given.
    if (why.find("userfaultfd failed") == std::string::npos) {
      EXPECT_LT(fd, 0);
      expect_names(why, "ioctl(UFFDIO_API)", EINVAL);
    }
  }
}

// Note [Copy-on-write failures]: memory between two grouped sources that another thread unmaps
// and maps again after the group was registered, before it is protected, fails protecting the
// group (ENOENT, with the pages before it already protected). Those sources used to be copied
// before release, and the protected pages left to fault until the end of the copy (the flaky
// Python test's missing 12 MiB after release: 3 such 4 MiB tensors).
void remap_gap(void* context) {
  auto* gap = static_cast<unsigned char*>(context);
  munmap(gap, TwoSources::kGap);
  mmap(gap, TwoSources::kGap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
}

TEST_F(CopyOnWriteTest, MemoryBetweenSourcesRemappedBeforeProtectingStillProtectsThem) {
  Watchdog watchdog(std::chrono::seconds(60));
  TwoSources sources;
  ArmedFault armed("ioctl(UFFDIO_WRITEPROTECT) protecting",
                   {.nth = 1, .times = 1, .error = 0, .before = remap_gap, .context = sources.gap});
  EXPECT_EQ(stage_and_write(sources).bytes_copied_after_release, 2 * TwoSources::kBytes);
  EXPECT_EQ(sources.b[0], 0);
}

TEST_F(CopyOnWriteTest, WriteBetweenSourcesBeforeReleaseLeavesThemProtected) {
  // Another thread (here the copy's own, before release) writes the memory between two grouped
  // sources: that page is unprotected, and the sources beside it are still copied after release,
  // not early (the flaky Python test's missing 4 MiB per save: a tensor beside Python's own memory).
  Watchdog watchdog(std::chrono::seconds(60));
  TwoSources sources;
  detail::WriteProtectCopier* copier = detail::WriteProtectCopier::instance();
  std::vector<unsigned char> a(TwoSources::kBytes), b(TwoSources::kBytes);
  const auto result = copier->copy({{a.data(), sources.a, TwoSources::kBytes}, {b.data(), sources.b, TwoSources::kBytes}},
                                   [&](const std::vector<detail::CopyOp>&) { std::memset(sources.gap, 7, TwoSources::kGap); },
                                   [] {});
  EXPECT_EQ(result.bytes_copied_after_release, 2 * TwoSources::kBytes);
  EXPECT_EQ(result.write_faults, 0u);  // no chunk was copied early
  EXPECT_TRUE(has_pattern(a.data(), TwoSources::kBytes, 21));
  EXPECT_TRUE(has_pattern(b.data(), TwoSources::kBytes, 22));
  EXPECT_EQ(sources.gap[TwoSources::kGap - 1], 7);
}

TEST_F(CopyOnWriteTest, BytesCopiedAfterReleaseAreCountedPerChunk) {
  // Note [Counting copies after release]. Each source is two 2 MiB chunks. A write before the
  // release has one chunk copied early, by the handler: exactly that chunk is left out, whether it
  // is a source's first chunk (counted nothing of the source before) or its last (counted all).
  // A chunk the handler copies for a write after the release counts like any other.
  Watchdog watchdog(std::chrono::seconds(60));
  constexpr size_t kChunk = size_t{2} << 20;
  detail::WriteProtectCopier* copier = detail::WriteProtectCopier::instance();
  ASSERT_NE(copier, nullptr);
  for (bool first_chunk : {true, false}) {
    TwoSources sources;
    std::vector<unsigned char> a(TwoSources::kBytes), b(TwoSources::kBytes);
    unsigned char* written_early = first_chunk ? sources.a : sources.a + TwoSources::kBytes - 1;
    const auto result = copier->copy(
        {{a.data(), sources.a, TwoSources::kBytes}, {b.data(), sources.b, TwoSources::kBytes}},
        [&](const std::vector<detail::CopyOp>&) { *written_early = 0xEE; },
        [&] { sources.b[0] = 0xDD; });
    EXPECT_EQ(result.bytes_copied_after_release, 2 * TwoSources::kBytes - kChunk) << first_chunk;
    EXPECT_EQ(result.write_faults, 2u) << first_chunk;
    EXPECT_TRUE(has_pattern(a.data(), TwoSources::kBytes, 21)) << first_chunk;  // copied before the writes
    EXPECT_TRUE(has_pattern(b.data(), TwoSources::kBytes, 22)) << first_chunk;
    EXPECT_EQ(*written_early, 0xEE) << first_chunk;
    EXPECT_EQ(sources.b[0], 0xDD) << first_chunk;
  }
}

TEST_F(CopyOnWriteTest, DestinationBetweenGroupedSourcesIsNotProtected) {
  // A staged buffer in the memory between two sources less than 256 KiB apart, in the chunk the
  // copy is copying: protecting it with the sources made the copy fault on its own write, and the
  // handler wait for that chunk's copy forever.
  Watchdog watchdog(std::chrono::seconds(60));
  constexpr size_t kMiB = size_t{1} << 20, kSmall = size_t{16} << 10;
  Mapping map(8 * kMiB);
  auto* chunk = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(map.bytes()) + 2 * kMiB - 1) &
                                                 ~(2 * kMiB - 1));
  unsigned char* big = chunk;                          // [0, 1.5 MiB)
  unsigned char* small_dst = chunk + 3 * kMiB / 2 + 4096;  // in the gap, its own pages
  unsigned char* small = small_dst + kSmall + 4096;    // [.., + 16 KiB)
  std::vector<unsigned char> big_dst(3 * kMiB / 2);
  fill_pattern(big, 3 * kMiB / 2, 31);
  fill_pattern(small, kSmall, 32);
  std::memset(small_dst, 0, kSmall);
  detail::WriteProtectCopier* copier = detail::WriteProtectCopier::instance();
  ASSERT_NE(copier, nullptr);
  bool released = false;
  copier->copy({{big_dst.data(), big, 3 * kMiB / 2}, {small_dst, small, kSmall}},
               [](const std::vector<detail::CopyOp>& ops) {
                 for (const auto& op : ops) std::memcpy(op.dst, op.src, op.nbytes);
               },
               [&] { released = true; });
  EXPECT_TRUE(released);
  EXPECT_TRUE(has_pattern(big_dst.data(), big_dst.size(), 31));
  EXPECT_TRUE(has_pattern(small_dst, kSmall, 32));
}

}  // namespace
}  // namespace fastdcp
