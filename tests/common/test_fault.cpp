// The fault-injection seam (Note [Fault injection]): names compared whole, nth/times, the before
// hook, re-arming and clearing, and asking without locks or allocations while others arm.

#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "fastdcp/common/error.h"
#include "fastdcp/common/fault.h"

namespace {
thread_local bool counting = false;
thread_local int allocations = 0;
}  // namespace

// Counts this thread's allocations while `counting`: the fault handler must never allocate.
void* operator new(size_t bytes) {
  if (counting) ++allocations;
  if (void* p = std::malloc(bytes == 0 ? 1 : bytes)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }

namespace fastdcp {
namespace {

std::vector<int> ask(const char* call, int n) {
  std::vector<int> answers;
  for (int i = 0; i < n; ++i) answers.push_back(fault::injected(call));
  return answers;
}

TEST(FaultTest, FailsTheNthCallAndTheTimesAfterItOfThatNameOnly) {
  const fault::Scope faults;
  fault::inject("ioctl(UFFDIO_WRITEPROTECT) unprotecting", 2, EIO, /*times=*/2);
  EXPECT_EQ(fault::injected("ioctl(UFFDIO_WRITEPROTECT) protecting"), 0);
  EXPECT_EQ(fault::injected("ioctl(UFFDIO_WRITEPROTECT) unprotectin"), 0);
  EXPECT_EQ(ask("ioctl(UFFDIO_WRITEPROTECT) unprotecting", 5), (std::vector<int>{0, EIO, EIO, 0, 0}));
  fault::inject("pwritev", 1, ENOSPC, fault::kAlways);
  EXPECT_EQ(fault::injected("pwrite"), 0);
  EXPECT_EQ(ask("pwritev", 1000), std::vector<int>(1000, ENOSPC));
}

TEST(FaultTest, ArmingAgainReplacesAndClearingDisarms) {
  {
    const fault::Scope faults;
    fault::inject("fsync", 3, EIO);
    fault::inject("fsync", 1, ENOSPC);  // replaces: counted afresh
    EXPECT_EQ(ask("fsync", 3), (std::vector<int>{ENOSPC, 0, 0}));
    fault::inject("fsync", 1, EIO, fault::kAlways);
    fault::clear();
    EXPECT_EQ(fault::injected("fsync"), 0);
    fault::inject("fsync", 1, EIO, fault::kAlways);
  }
  EXPECT_EQ(fault::injected("fsync"), 0);  // the scope ended
}

TEST(FaultTest, BeforeRunsJustBeforeEachArmedCall) {
  const fault::Scope faults;
  int runs = 0;
  fault::inject("mmap", {.nth = 2, .times = 2, .error = 0, .before = [](void* c) { ++*static_cast<int*>(c); },
                         .context = &runs});
  EXPECT_EQ(ask("mmap", 4), std::vector<int>(4, 0));  // error 0: the calls are made
  EXPECT_EQ(runs, 2);
}

TEST(FaultTest, ANameTooLongIsRefused) {
  const fault::Scope faults;
  try {
    fault::inject(std::string(fault::kMaxCallName + 1, 'x'), 1, EIO);
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  }
  fault::inject(std::string(fault::kMaxCallName, 'x'), 1, EIO);
  EXPECT_EQ(fault::injected(std::string(fault::kMaxCallName, 'x')), EIO);
}

// The userfaultfd fault handler asks while a test arms other calls: no lock, no allocation, no
// data race (run under TSan by scripts/test.sh).
TEST(FaultTest, AskingNeitherLocksNorAllocatesWhileOthersArm) {
  const fault::Scope faults;
  fault::inject("poll", 1, EBADF, fault::kAlways);
  std::atomic<bool> stop{false};
  std::vector<std::thread> askers;
  std::atomic<int> failures{0}, allocated{0}, asked{0};
  for (int t = 0; t < 3; ++t) {
    askers.emplace_back([&] {
      counting = true;
      while (!stop.load()) {
        if (fault::injected("poll") != EBADF) failures.fetch_add(1);
        const int read = fault::injected("read");
        if (read != 0 && read != EIO) failures.fetch_add(1);
        asked.fetch_add(1, std::memory_order_relaxed);
      }
      counting = false;
      allocated.fetch_add(allocations);
    });
  }
  for (int i = 0; i < 2000 || asked.load() < 100000; ++i) {
    fault::inject("read", 1 + i % 3, EIO, 1 + i % 2);
    if (i < 2000 && i % 100 == 0) fault::inject("name " + std::to_string(i / 100), 1, EIO);  // new names
  }
  stop.store(true);
  for (auto& t : askers) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(allocated.load(), 0);
}

}  // namespace
}  // namespace fastdcp
