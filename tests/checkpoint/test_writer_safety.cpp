// The writer in a directory it does not own: links and foreign files planted under the names it
// writes (Note [Files the writer creates]), two processes saving to one path (Note [One writer per
// checkpoint path]), and every system call of the save and load failing in turn
// (Note [Fault injection]).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "fastdcp/checkpoint/checkpoint.h"
#include "fastdcp/common/error.h"
#include "fastdcp/common/fault.h"
#include "fastdcp/io/file.h"
#include "support/test_support.h"

namespace fastdcp {
namespace {

using testing::expect_error;
using testing::patterned_tensor;

// `extra_mib` MiB more in one tensor: several 16 MiB write batches.
Value state(int seed, int extra_mib = 0) {
  Value model = Value::dict();
  model.insert("big", Value(patterned_tensor(DType::kBF16, {3 << 20}, seed)));
  model.insert("w", Value(patterned_tensor(DType::kF32, {16, 16}, seed + 1)));
  if (extra_mib > 0) model.insert("more", Value(patterned_tensor(DType::kU8, {int64_t{extra_mib} << 20}, seed + 2)));
  Value root = Value::dict();
  root.insert("model", std::move(model));
  root.insert("step", Value(int64_t{seed}));
  return root;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()) == 0;
}

// The checkpoint at `path` verifies and holds exactly state(seed).
void expect_holds(const std::string& path, int seed) {
  EXPECT_NO_THROW(verify_checkpoint(path));
  const Value loaded = CheckpointReader().read(path);
  EXPECT_EQ(loaded.at("step").as_int(), seed);
  EXPECT_TRUE(same_bytes(loaded.at("model").at("big").as_tensor(), state(seed).at("model").at("big").as_tensor()));
}

std::string contents(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void put(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

size_t open_fds() {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

class WriterSafetyTest : public ::testing::Test {
 protected:
  void link(const std::string& target, const std::string& name) {
    ASSERT_EQ(::symlink(target.c_str(), join_path(path_, name).c_str()), 0) << name;
  }
  testing::TempDir temp_{"fastdcp_safety"};
  const std::string& dir_ = temp_.path();
  const std::string path_ = join_path(dir_, "step");
  const std::string victim_ = join_path(dir_, "victim");
  const WriterOptions overwrite_{.overwrite = true};
};

// Links planted under every name the next save writes: the save writes none of them through.
TEST_F(WriterSafetyTest, LinksPlantedUnderTheWritersNamesAreNeverWrittenThrough) {
  CheckpointWriter().write(path_, state(1));
  put(victim_, "precious");
  for (const char* name : {"checkpoint_0.g2.safetensors", ".checkpoint_0.g2.safetensors.tmp", ".rank_0.g2.json.tmp",
                           ".manifest.json.tmp"}) {
    link(victim_, name);
  }
  CheckpointWriter({}, overwrite_).write(path_, state(2));
  EXPECT_EQ(contents(victim_), "precious");
  expect_holds(path_, 2);
  for (const std::string& name : list_directory(path_)) {
    EXPECT_TRUE(name == "manifest.json" || name == "checkpoint_0.g2.safetensors") << name;
  }
}

// Removing the files of other generations removes a link by its name, never its target, and
// leaves a directory of such a name alone: it is not ours.
TEST_F(WriterSafetyTest, RemovingOldGenerationsNeverFollowsLinksOrRemovesDirectories) {
  put(victim_, "precious");
  std::filesystem::create_directories(path_);
  link(victim_, "checkpoint_0.g7.safetensors");
  link(victim_, "rank_3.g5.json");
  std::filesystem::create_directory(join_path(path_, "checkpoint_1.g5.safetensors"));
  put(join_path(path_, "checkpoint_1.g5.safetensors/inner"), "theirs");
  put(join_path(path_, "notes.txt"), "theirs");
  CheckpointWriter().write(path_, state(1));
  expect_holds(path_, 1);
  EXPECT_EQ(contents(victim_), "precious");
  EXPECT_FALSE(std::filesystem::is_symlink(join_path(path_, "checkpoint_0.g7.safetensors")));
  EXPECT_FALSE(std::filesystem::is_symlink(join_path(path_, "rank_3.g5.json")));
  EXPECT_EQ(contents(join_path(path_, "checkpoint_1.g5.safetensors/inner")), "theirs");
  EXPECT_EQ(contents(join_path(path_, "notes.txt")), "theirs");
}

// A checkpoint directory that is the user's link is theirs to save into and load from, and so is
// a checkpoint whose files are linked from a cache.
TEST_F(WriterSafetyTest, CheckpointsReachedThroughTheUsersLinksSaveAndLoad) {
  const std::string real = join_path(dir_, "real");
  std::filesystem::create_directories(real);
  std::filesystem::create_directory_symlink(real, path_);
  CheckpointWriter().write(path_, state(1));
  CheckpointWriter({}, overwrite_).write(path_, state(2));
  expect_holds(path_, 2);
  EXPECT_TRUE(path_exists(join_path(real, "manifest.json")));
  EXPECT_TRUE(std::filesystem::is_symlink(path_));
  // A checkpoint whose every file links into a cache.
  const std::string cached = join_path(dir_, "cached");
  std::filesystem::create_directories(cached);
  for (const std::string& name : list_directory(real)) {
    std::filesystem::create_symlink(join_path(real, name), join_path(cached, name));
  }
  EXPECT_NO_THROW(verify_checkpoint(cached));
  EXPECT_EQ(CheckpointReader().read(cached).at("step").as_int(), 2);
  EXPECT_EQ(CheckpointReader({}, ReadOptions{.use_mmap = true}).read(cached).at("step").as_int(), 2);
}

// A crashed save's files under this generation's names, and its lock file, do not stop the next
// save: they are ours, and no live writer holds them.
TEST_F(WriterSafetyTest, ACrashedSavesLeftoversAreReplaced) {
  CheckpointWriter().write(path_, state(1));
  for (const char* name : {"checkpoint_0.g2.safetensors", ".rank_0.g2.json.tmp", ".manifest.json.tmp", "rank_0.lock",
                           "rank_0.g2.failed.json"}) {
    put(join_path(path_, name), "left by a crashed save");
  }
  // A stale receipt of this generation would commit the crashed save's file record.
  put(join_path(path_, "rank_0.g2.json"), "{}");
  CheckpointWriter({}, overwrite_).write(path_, state(2));
  expect_holds(path_, 2);
  EXPECT_EQ(list_directory(path_).size(), 2u);
}

// Two processes save to one path at once, many times: one of them gets the path, the other a
// clear error at once, and whatever reported success is what loads and verifies.
TEST_F(WriterSafetyTest, TwoProcessesSavingToOnePathNeverCorruptIt) {
  constexpr int kRounds = 6;
  int losers = 0;
  for (int round = 0; round < kRounds; ++round) {
    int go[2];
    int outcomes[2];  // each child's (index, outcome): its exit status may be a sanitizer's
    ASSERT_EQ(::pipe(go), 0);
    ASSERT_EQ(::pipe(outcomes), 0);
    std::vector<pid_t> children;
    for (int child = 0; child < 2; ++child) {
      const int seed = 10 * (round + 1) + child;
      const pid_t pid = ::fork();
      ASSERT_GE(pid, 0);
      if (pid == 0) {
        ::close(go[1]);
        ::close(outcomes[0]);
        const Value mine = state(seed, 32);
        char byte;
        if (::read(go[0], &byte, 1) != 0) ::_exit(9);  // both start when the pipe closes
        char outcome[2] = {static_cast<char>(child), 0};
        try {
          CheckpointWriter({}, WriterOptions{.overwrite = true}).write(path_, mine);
        } catch (const Error& e) {
          const std::string what = e.what();
          const bool clear = e.code() == ErrorCode::kFailedPrecondition &&
                             what.find("another process is saving") != std::string::npos &&
                             what.find(path_) != std::string::npos;
          if (!clear) std::fprintf(stderr, "unexpected error: %s\n", e.what());
          outcome[1] = clear ? 1 : 2;
        }
        ::_exit(::write(outcomes[1], outcome, 2) == 2 ? 0 : 9);
      }
      children.push_back(pid);
    }
    ::close(go[0]);
    ::close(outcomes[1]);
    ::usleep(300 * 1000);  // both children have built their state
    ::close(go[1]);
    char outcome[4] = {};
    size_t got = 0;
    for (ssize_t n; got < sizeof outcome && (n = ::read(outcomes[0], outcome + got, sizeof outcome - got)) > 0;) {
      got += static_cast<size_t>(n);
    }
    ::close(outcomes[0]);
    for (const pid_t pid : children) ASSERT_EQ(::waitpid(pid, nullptr, 0), pid);
    ASSERT_EQ(got, sizeof outcome) << "round " << round << ": a child did not report";
    std::set<int> succeeded;
    for (size_t i = 0; i < sizeof outcome; i += 2) {
      const int child = outcome[i];
      const int code = outcome[i + 1];
      ASSERT_TRUE(code == 0 || code == 1) << "round " << round << ": child " << child << " failed unexpectedly";
      if (code == 0) succeeded.insert(10 * (round + 1) + child);
      if (code == 1) ++losers;
    }
    ASSERT_FALSE(succeeded.empty()) << "round " << round;
    ASSERT_NO_THROW(verify_checkpoint(path_)) << "round " << round;
    const Value loaded = CheckpointReader().read(path_);
    const int step = static_cast<int>(loaded.at("step").as_int());
    ASSERT_TRUE(succeeded.count(step)) << "round " << round << ": loaded " << step << ", which did not report success";
    const Value expected = state(step, 32);
    EXPECT_TRUE(same_bytes(loaded.at("model").at("more").as_tensor(), expected.at("model").at("more").as_tensor()));
  }
  std::printf("%d of %d rounds had a loser\n", losers, kRounds);
}

// The same rank saved twice at once from one process is refused too (flock is per open file).
TEST_F(WriterSafetyTest, ASecondSaveOfTheSameRankWhileOneRunsIsRefused) {
  struct Hook : WriterHook {
    std::function<void()> inside;
    void pre_commit(const std::string&) override { inside(); }
    void post_commit(const std::string&) override {}
  };
  auto hook = std::make_shared<Hook>();
  hook->inside = [&] {
    const Error e = expect_error([&] { CheckpointWriter({}, overwrite_).write(path_, state(3)); });
    EXPECT_EQ(e.code(), ErrorCode::kFailedPrecondition);
    EXPECT_NE(std::string(e.what()).find(join_path(path_, "rank_0.lock")), std::string::npos) << e.what();
  };
  CheckpointWriter({}, overwrite_, nullptr, hook).write(path_, state(1));
  expect_holds(path_, 1);
}

// Where the file system has no flock, a save goes on without the lock (as before it existed); any
// other failure to lock is an error.
TEST_F(WriterSafetyTest, AFileSystemWithoutFlockSavesWithoutTheLock) {
  const fault::Scope faults;
  fault::inject("flock", 1, ENOLCK);
  CheckpointWriter().write(path_, state(1));
  expect_holds(path_, 1);
  fault::inject("flock", 1, EIO);
  const Error e = expect_error([&] { CheckpointWriter({}, overwrite_).write(path_, state(2)); });
  EXPECT_EQ(e.code(), ErrorCode::kIoError);
  EXPECT_NE(std::string(e.what()).find("flock"), std::string::npos) << e.what();
  expect_holds(path_, 1);
}

struct Fault {
  const char* call;
  int nth;
  int error;
};

std::string describe(const ::testing::TestParamInfo<Fault>& info) {
  return std::string(info.param.call) + "_" + std::to_string(info.param.nth) + "_" + std::to_string(info.param.error);
}

class SaveFaultTest : public WriterSafetyTest, public ::testing::WithParamInterface<Fault> {};

// Each call of a save failing: a clear Error(kIoError) naming the call, the file and the errno;
// the committed checkpoint intact; no descriptor leaked; nothing left but files of the failed
// generation, which the next save removes.
TEST_P(SaveFaultTest, LeavesTheCommittedCheckpointAndNoLeaks) {
  const Fault fault = GetParam();
  CheckpointWriter().write(path_, state(1));
  const std::string committed = read_manifest(path_).ranks[0].file;
  const Value next = state(2, 40);  // 40 MiB more: several write batches
  const size_t fds = open_fds();
  {
    const fault::Scope faults;
    fault::inject(fault.call, fault.nth, fault.error);
    const Error e = expect_error([&] { CheckpointWriter({}, overwrite_).write(path_, next); });
    EXPECT_EQ(e.code(), ErrorCode::kIoError) << e.what();
    const std::string what = e.what();
    for (const std::string& part : {std::string(fault.call), path_, "errno " + std::to_string(fault.error)}) {
      EXPECT_NE(what.find(part), std::string::npos) << "no '" << part << "' in: " << what;
    }
  }
  EXPECT_EQ(open_fds(), fds);
  expect_holds(path_, 1);
  for (const std::string& name : list_directory(path_)) {
    const bool tmp = name.starts_with(".") && name.ends_with(".tmp");
    const uint64_t g = generation_of(tmp ? name.substr(1, name.size() - 5) : name);
    EXPECT_TRUE(name == "manifest.json" || name == committed || g == 2) << "left behind: " << name;
  }
  CheckpointWriter({}, overwrite_).write(path_, state(3));
  expect_holds(path_, 3);
  EXPECT_EQ(list_directory(path_).size(), 2u);
}

INSTANTIATE_TEST_SUITE_P(Calls, SaveFaultTest,
                         ::testing::Values(Fault{"openat", 1, EACCES},  // the lock file
                                           Fault{"openat", 2, EMFILE},  // the data file
                                           Fault{"openat", 3, EACCES},  // the receipt
                                           Fault{"openat", 4, EROFS},   // the manifest
                                           Fault{"fallocate", 1, ENOSPC}, Fault{"pwritev", 1, EIO},
                                           Fault{"pwritev", 3, ENOSPC},  // mid-way through the data
                                           Fault{"fdatasync", 1, EIO}, Fault{"fdatasync", 2, EIO},
                                           Fault{"fdatasync", 3, EIO}, Fault{"fsync", 1, EIO},
                                           Fault{"renameat", 1, EIO}, Fault{"renameat", 2, EXDEV},
                                           Fault{"unlinkat", 1, EACCES}, Fault{"close", 1, EIO}),
                         describe);

// Rank 0 failing to write the manifest marks the attempt abandoned: the other ranks fail at once
// instead of waiting out their timeout, and the next save commits.
TEST_F(WriterSafetyTest, AFailedCommitFailsTheOtherRanksAtOnce) {
  const WriterOptions options{.barrier_timeout = std::chrono::seconds(60)};
  const auto start = std::chrono::steady_clock::now();
  {
    const fault::Scope faults;
    // Only the commit links a name into place (the manifest put if absent; votes and data files
    // are renamed), and only rank 0 commits.
    fault::inject("linkat", 1, EIO);
    std::string rank1;
    std::thread other([&] {
      try {
        CheckpointWriter({1, 2}, options).write(path_, state(11));
      } catch (const Error& e) {
        rank1 = e.what();
      }
    });
    const Error e = expect_error([&] { CheckpointWriter({0, 2}, options).write(path_, state(10)); });
    other.join();
    EXPECT_NE(std::string(e.what()).find("linkat"), std::string::npos) << e.what();
    EXPECT_NE(rank1.find("was not committed: rank 0 failed to commit"), std::string::npos) << rank1;
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
  EXPECT_THROW(read_manifest(path_), Error);
  std::thread other([&] { CheckpointWriter({1, 2}, options).write(path_, state(13)); });
  CheckpointWriter({0, 2}, options).write(path_, state(12));
  other.join();
  EXPECT_EQ(CheckpointReader({1, 2}).read(path_).at("step").as_int(), 13);
  EXPECT_NO_THROW(verify_checkpoint(path_));
}

class LoadFaultTest : public WriterSafetyTest, public ::testing::WithParamInterface<Fault> {};

// EIO and friends on the way in: a clear Error(kIoError) naming the call, the file and the errno,
// no leaked descriptor, and the checkpoint still loads once the disk answers again.
TEST_P(LoadFaultTest, IsAClearErrorAndLeaksNothing) {
  const Fault fault = GetParam();
  CheckpointWriter().write(path_, state(1));
  const size_t fds = open_fds();
  int failed = 0;
  for (int how = 0; how < 3; ++how) {
    const fault::Scope faults;
    fault::inject(fault.call, fault.nth, fault.error);
    try {
      if (how == 0) CheckpointReader({}, ReadOptions{.direct_io = false}).read(path_);
      if (how == 1) verify_checkpoint(path_);
      if (how == 2) {
        Value target = state(5);
        CheckpointReader().read_into(path_, target);
      }
      fault::clear();
      continue;  // this way of loading does not make that call
    } catch (const Error& e) {
      ++failed;
      EXPECT_EQ(e.code(), ErrorCode::kIoError) << e.what();
      const std::string what = e.what();
      for (const std::string& part : {std::string(fault.call), path_, "errno " + std::to_string(fault.error)}) {
        EXPECT_NE(what.find(part), std::string::npos) << "no '" << part << "' in: " << what;
      }
    }
    EXPECT_EQ(open_fds(), fds);
  }
  EXPECT_GE(failed, 1) << "no way of loading makes the call " << fault.call;
  expect_holds(path_, 1);
}

INSTANTIATE_TEST_SUITE_P(Calls, LoadFaultTest,
                         ::testing::Values(Fault{"open", 1, EIO}, Fault{"open", 2, EACCES}, Fault{"pread", 1, EIO},
                                           Fault{"preadv", 1, EIO}, Fault{"preadv", 2, EIO}),
                         describe);

}  // namespace
}  // namespace fastdcp
