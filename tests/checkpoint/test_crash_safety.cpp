// Note [Kill test]
// A child process saves checkpoint after checkpoint over the same path; the parent SIGKILLs it at
// a random moment, then checks that what is committed loads, verifies, and is exactly one of the
// saved states, never older than the last one seen, and that a directory with nothing committed
// is never read as a checkpoint.

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include "fastdcp/checkpoint/checkpoint.h"
#include "fastdcp/common/error.h"
#include "fastdcp/io/file.h"
#include "support/test_support.h"

namespace fastdcp {
namespace {

// The state of save number `step`: every byte derived from the step.
Value state_for(int64_t step) {
  Value root = Value::dict();
  Value layers = Value::list();
  for (int i = 0; i < 40; ++i) {
    Tensor t = Tensor::empty_cpu(DType::kF32, {1024 * (1 + i % 7)});
    std::memset(t.data_ptr(), static_cast<int>((step * 31 + i) & 0xFF), t.nbytes());
    layers.append(Value(t));
  }
  Tensor big = Tensor::empty_cpu(DType::kU8, {6 << 20});
  std::memset(big.data_ptr(), static_cast<int>(step & 0xFF), big.nbytes());
  root.insert("layers", std::move(layers));
  root.insert("big", Value(big));
  root.insert("step", Value(step));
  return root;
}

bool matches(const Value& loaded, int64_t step) {
  const Value expected = state_for(step);
  for (size_t i = 0; i < 40; ++i) {
    const Tensor& a = loaded.at("layers")[i].as_tensor();
    const Tensor& b = expected.at("layers")[i].as_tensor();
    if (a.nbytes() != b.nbytes() || std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()) != 0) return false;
  }
  const Tensor& a = loaded.at("big").as_tensor();
  return a.nbytes() == (6u << 20) &&
         std::memcmp(a.data_ptr(), expected.at("big").as_tensor().data_ptr(), a.nbytes()) == 0;
}

TEST(CrashSafety, KilledWritersNeverDamageOrFakeACommit) {
  const testing::TempDir dir("fastdcp_kill");
  const std::string path = join_path(dir.path(), "ck");
  std::mt19937 rng(std::random_device{}());
  int64_t last_committed = 0;
  // Kill moments spread over a few saves, however long a save takes in this build (sanitizers
  // make it 10x slower), so that rounds both commit new saves and interrupt them.
  const auto timing_start = std::chrono::steady_clock::now();
  CheckpointWriter().write(join_path(dir.path(), "timing"), state_for(0));
  const auto save_us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() -
                                                                             timing_start).count();
  const int max_delay_us = static_cast<int>(std::max<int64_t>(200000, 4 * save_us));
  int kills = 0, rounds_with_new_commit = 0, rounds_uncommitted = 0;
  constexpr int kRounds = 80;
  for (int round = 0; round < kRounds; ++round) {
    const int64_t first_step = last_committed + 1;
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      for (int64_t step = first_step;; ++step) {
        // Both write paths: buffered (the default) and O_DIRECT.
        CheckpointWriter({}, WriterOptions{.overwrite = true, .direct_io = step % 2 == 1}).write(path, state_for(step));
      }
    }
    std::this_thread::sleep_for(std::chrono::microseconds(std::uniform_int_distribution<int>(500, max_delay_us)(rng)));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status)) << "the writer exited by itself in round " << round;
    ++kills;
    try {
      const Value loaded = CheckpointReader().read(path);
      const int64_t step = loaded.at("step").as_int();
      ASSERT_GE(step, last_committed) << "round " << round;
      ASSERT_TRUE(matches(loaded, step)) << "round " << round << ": committed state differs from save " << step;
      ASSERT_NO_THROW(verify_checkpoint(path));
      if (step > last_committed) ++rounds_with_new_commit;
      last_committed = step;
    } catch (const Error& e) {
      // Only acceptable before anything was ever committed, and then as "no committed checkpoint".
      ASSERT_EQ(last_committed, 0) << e.what();
      ASSERT_TRUE(e.code() == ErrorCode::kFailedPrecondition || e.code() == ErrorCode::kNotFound) << e.what();
      ++rounds_uncommitted;
    }
  }
  std::printf("[ kill test ] %d SIGKILLs within %d ms, %d rounds committed something new (last save %lld), %d before "
              "any commit\n",
              kills, max_delay_us / 1000, rounds_with_new_commit, static_cast<long long>(last_committed),
              rounds_uncommitted);
  EXPECT_EQ(kills, kRounds);
  EXPECT_GT(rounds_with_new_commit, 0);
}

}  // namespace
}  // namespace fastdcp
