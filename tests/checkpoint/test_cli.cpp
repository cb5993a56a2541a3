// The fastdcp command on real checkpoints: what it prints and its exit status.

#include <gtest/gtest.h>

#include <cstdio>
#include <thread>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>

#include "fastdcp/checkpoint/checkpoint.h"
#include "fastdcp/io/file.h"
#include "support/test_support.h"

#ifdef FASTDCP_CLI
namespace fastdcp {
namespace {

struct CliRun {
  int status;
  std::string output;
};

CliRun run_cli(const std::string& arguments) {
  const std::string command = std::string(FASTDCP_CLI) + " " + arguments + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  CliRun result{-1, ""};
  char buffer[4096];
  while (size_t n = std::fread(buffer, 1, sizeof buffer, pipe)) result.output.append(buffer, n);
  const int status = ::pclose(pipe);
  result.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Value root = Value::dict();
    Value model = Value::dict();
    model.insert("weight", Value(Tensor::empty_cpu(DType::kBF16, {128, 64})));
    model.insert("bias", Value(Tensor::empty_cpu(DType::kF32, {64})));
    root.insert("model", std::move(model));
    root.insert("step", Value(int64_t{9}));
    CheckpointWriter().write(path_, root);
  }
  testing::TempDir temp_{"fastdcp_cli"};
  const std::string& dir_ = temp_.path();
  const std::string path_ = join_path(dir_, "ck");
};

TEST_F(CliTest, InspectShowsTheCommitAndEveryTensor) {
  const CliRun r = run_cli("inspect " + path_);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("generation 1, 1 rank"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("model.weight"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("BF16   [128, 64]  16.4 KB"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("model.bias"), std::string::npos) << r.output;
}

TEST_F(CliTest, InspectShowsEachShardedKeysGlobalShapeAndSplit) {
  const std::string path = join_path(dir_, "sharded");
  constexpr int kRanks = 2;
  auto barrier = std::make_shared<testing::ThreadBarrier>(kRanks);
  std::vector<std::thread> ranks;
  for (int r = 0; r < kRanks; ++r) {
    ranks.emplace_back([&, r] {
      ShardedTensor s;
      s.global_shape = {6, 4};
      s.dtype = DType::kF32;
      s.chunks.push_back({{r * 3, 0}, Tensor::empty_cpu(DType::kF32, {3, 4})});
      Value root = Value::dict();
      root.insert("w", Value(std::move(s)));
      CheckpointWriter({r, kRanks}, {}, barrier).write(path, root);
    });
  }
  for (auto& t : ranks) t.join();
  const CliRun r = run_cli("inspect " + path);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("sharded tensors (global index): 1"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("F32    [6, 4]  2 chunks; chunks per rank 0:1, 1:1"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("rank 1 [3:6, 0:4]"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("[1] w"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("chunk [3:6, 0:4] of [6, 4]"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("format version 3"), std::string::npos) << r.output;
}

TEST_F(CliTest, InspectNamesTheFrameworkDtypeOfBytesStoredUnderAnother) {
  Tensor half = Tensor::empty_cpu(DType::kU32, {3});
  half.set_traits({.framework_dtype = "complex32"});
  Value root = Value::dict();
  root.insert("half", Value(half));
  const std::string path = join_path(dir_, "traits");
  CheckpointWriter().write(path, root);
  const CliRun r = run_cli("inspect " + path);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("format version 2"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("complex32 [3]  12 B"), std::string::npos) << r.output;
}

TEST_F(CliTest, VerifyExitsZeroThenOneOnDamageNamingTheTensor) {
  CliRun r = run_cli("verify " + path_);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("OK, 1 file"), std::string::npos) << r.output;
  const std::string file = join_path(path_, read_manifest(path_).ranks[0].file);
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-3, std::ios::end);
    f.put('\x7f');
  }
  r = run_cli("verify " + path_);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("corrupt data"), std::string::npos) << r.output;
}

TEST_F(CliTest, BadUsageAndMissingCheckpoints) {
  EXPECT_EQ(run_cli("").status, 2);
  EXPECT_EQ(run_cli("inspect").status, 2);
  EXPECT_EQ(run_cli("verify " + path_ + " --bogus").status, 2);
  EXPECT_EQ(run_cli("--help").status, 0);
  const CliRun r = run_cli("inspect " + join_path(dir_, "nothing"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("does not exist"), std::string::npos) << r.output;
}

TEST_F(CliTest, HelpExitsZeroWithTheUsage) {
  CliRun r = run_cli("--help");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("inspect"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("verify"), std::string::npos) << r.output;
  r = run_cli("inspect --help");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("--rank"), std::string::npos) << r.output;
}

// Every bad argument is refused with status 2 and a message that names it; none is taken for
// "all ranks".
TEST_F(CliTest, BadArgumentsExitTwoNamingTheOption) {
  const std::pair<std::string, std::string> cases[] = {
      {"inspect " + path_ + " --rank abc", "--rank"},
      {"inspect " + path_ + " --rank -1", "--rank"},
      {"inspect " + path_ + " --rank 1.5", "--rank"},
      {"inspect " + path_ + " --rank 99999999999", "--rank"},
      {"inspect " + path_ + " --rank", "--rank"},
      {"inspect " + path_ + " --bogus", "--bogus"},
      {"verify " + path_ + " --rank 0", "--rank"},
      {"verify " + path_ + " " + path_, path_},
      {"inspect", "PATH"},
      {"bogus " + path_, "bogus"},
      {"", "a command is required: inspect, verify, convert or export-hf"},
      {"convert " + path_, "DST"},
  };
  for (const auto& [arguments, named] : cases) {
    const CliRun r = run_cli(arguments);
    EXPECT_EQ(r.status, 2) << arguments << "\n" << r.output;
    EXPECT_NE(r.output.find(named), std::string::npos) << arguments << "\n" << r.output;
    EXPECT_EQ(r.output.find("model.weight"), std::string::npos) << arguments << "\n" << r.output;
  }
}

// `convert` runs the Python conversion: with the interpreter FASTDCP_PYTHON names (here a script
// that reports its arguments and exits 3), its arguments passed and its exit status kept.
TEST_F(CliTest, ConvertRunsThePythonConversionWithTheNamedInterpreter) {
  const std::string fake = join_path(dir_, "fake_python");
  {
    std::ofstream script(fake);
    script << "#!/bin/sh\necho \"args: $*\"\nexit 3\n";
  }
  std::filesystem::permissions(fake, std::filesystem::perms::owner_all);
  ::setenv("FASTDCP_PYTHON", fake.c_str(), 1);
  CliRun r = run_cli("convert " + path_ + " " + dir_ + "/out --overwrite");
  EXPECT_EQ(r.status, 3) << r.output;
  EXPECT_NE(r.output.find("args: -m fastdcp.torch.convert " + path_ + " " + dir_ + "/out --overwrite"),
            std::string::npos) << r.output;
  // An interpreter that cannot be started: status 1, naming it and the way out.
  ::setenv("FASTDCP_PYTHON", (dir_ + "/no_python").c_str(), 1);
  r = run_cli("convert " + path_ + " " + dir_ + "/out");
  ::unsetenv("FASTDCP_PYTHON");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find(dir_ + "/no_python"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("FASTDCP_PYTHON"), std::string::npos) << r.output;
}

TEST_F(CliTest, InspectRankBeyondTheCheckpointIsAnError) {
  CliRun r = run_cli("inspect " + path_ + " --rank 5");
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("--rank 5"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("1 rank"), std::string::npos) << r.output;
  r = run_cli("inspect " + path_ + " --rank 0");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("[0] model.weight"), std::string::npos) << r.output;
}

TEST_F(CliTest, AManifestPathNamesItsCheckpoint) {
  const std::string manifest = join_path(path_, "manifest.json");
  CliRun r = run_cli("verify " + manifest);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("OK, 1 file"), std::string::npos) << r.output;
  r = run_cli("inspect " + manifest);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("model.bias"), std::string::npos) << r.output;
  // A directory without a commit is named as such, not as a missing manifest path.
  const std::string uncommitted = join_path(dir_, "uncommitted");
  std::filesystem::create_directories(uncommitted);
  r = run_cli("verify " + join_path(uncommitted, "manifest.json"));
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("'" + uncommitted + "' holds no committed checkpoint"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace fastdcp
#endif
