// Rank files crafted by hand, committed with a manifest that matches them, through every way a
// checkpoint is read: a full load (read into one image, or mapped), an in-place load and verify.
// Each either gives back exactly what the file holds or refuses it with Error(kDataLoss).

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstring>
#include <filesystem>

#include "fastdcp/checkpoint/checkpoint.h"
#include "fastdcp/common/error.h"
#include "fastdcp/format/checksum.h"
#include "fastdcp/format/rank_file.h"
#include "fastdcp/io/file.h"
#include "support/crafted_checkpoint.h"
#include "support/test_support.h"

namespace fastdcp {
namespace {

class HostileFileTest : public ::testing::Test {
 protected:
  // Commits a checkpoint of one rank file holding `bytes` at a fresh path.
  const std::string& commit(std::string_view bytes) {
    path_ = join_path(temp_.path(), "ck" + std::to_string(++count_));
    std::filesystem::create_directories(path_);
    testing::commit_rank_file(path_, bytes);
    return path_;
  }
  testing::TempDir temp_{"fastdcp_hostile"};
  std::string path_;
  int count_ = 0;
};

// The ways to read a checkpoint that take the whole state dict.
std::vector<std::pair<std::string, ReadOptions>> full_loads() {
  return {{"image", ReadOptions{}},
          {"buffered", ReadOptions{.direct_io = false}},
          {"mmap", ReadOptions{.use_mmap = true}},
          {"unverified", ReadOptions{.verify_checksums = false}}};
}

std::string cli_output(const std::string& arguments, int& status) {
#ifdef FASTDCP_CLI
  const std::string command = std::string(FASTDCP_CLI) + " " + arguments + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  std::string output;
  char buffer[4096];
  while (size_t n = std::fread(buffer, 1, sizeof buffer, pipe)) output.append(buffer, n);
  const int raw = ::pclose(pipe);
  status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;  // -1: killed by a signal
  return output;
#else
  status = 0;
  return "(no CLI built) " + arguments;
#endif
}

// safetensors' layout: entries sorted by dtype size, then name; a header padded with spaces.
std::string plain_safetensors(size_t header_padding = 0) {
  std::string header =
      R"({"__metadata__":{"format":"pt"},"b":{"dtype":"I32","shape":[2],"data_offsets":[8,16]},)"
      R"("a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},"e":{"dtype":"F32","shape":[0,3],"data_offsets":[16,16]}})";
  header.append(header_padding + (8 - header.size() % 8) % 8, ' ');  // data 8-byte aligned, as safetensors writes it
  std::string data(16, '\0');
  const double a = 2.5;
  const int32_t b[2] = {7, -9};
  std::memcpy(data.data(), &a, 8);
  std::memcpy(data.data() + 8, b, 8);
  return testing::rank_file_bytes(header, data);
}

void expect_plain_values(const Value& v) {
  ASSERT_EQ(v.size(), 3u);
  EXPECT_EQ(v.entries()[0].first.as_string(), "a");  // file order
  const Tensor& a = v.at("a").as_tensor();
  const Tensor& b = v.at("b").as_tensor();
  EXPECT_EQ(a.dtype(), DType::kF64);
  double a0 = 0;
  std::memcpy(&a0, a.data_ptr(), sizeof a0);
  EXPECT_EQ(a0, 2.5);
  EXPECT_EQ(b.shape(), (Dims{2}));
  int32_t b1 = 0;
  std::memcpy(&b1, static_cast<const char*>(b.data_ptr()) + 4, sizeof b1);
  EXPECT_EQ(b1, -9);
  EXPECT_EQ(v.at("e").as_tensor().shape(), (Dims{0, 3}));
}

TEST_F(HostileFileTest, PlainSafetensorsFilesLoadEveryWayAndVerifyAsUnchecksummed) {
  // A small header, and one large enough that the data is read while it parses.
  for (const size_t padding : {size_t{0}, size_t{2} << 20}) {
    SCOPED_TRACE(padding);
    const std::string& path = commit(plain_safetensors(padding));
    for (const auto& [name, options] : full_loads()) {
      SCOPED_TRACE(name);
      expect_plain_values(CheckpointReader({}, options).read(path));
    }
    for (const bool strict : {false, true}) {
      Value target = Value::dict();
      target.insert("a", Value(Tensor::empty_cpu(DType::kF64, {1})));
      target.insert("b", Value(Tensor::empty_cpu(DType::kI32, {2})));
      target.insert("e", Value(Tensor::empty_cpu(DType::kF32, {0, 3})));
      const LoadResult result = CheckpointReader().read_into(path, target, strict);
      EXPECT_TRUE(result.missing_keys.empty() && result.unexpected_keys.empty());
      expect_plain_values(target);
    }
    const VerifyReport report = verify_checkpoint(path);
    EXPECT_EQ(report.files, 1);
    EXPECT_EQ(report.files_without_checksums, 1);
    EXPECT_EQ(report.chunks, 0u);
    int status = 0;
    const std::string out = cli_output("verify " + path, status);
    EXPECT_EQ(status, 0) << out;
#ifdef FASTDCP_CLI
    EXPECT_NE(out.find("1 file is without checksums (plain safetensors)"), std::string::npos) << out;
#endif
  }
}

std::string nested_lists(size_t levels, const std::string& leaf) {
  std::string tree;
  for (size_t i = 0; i < levels; ++i) tree += R"({"l":[)";
  tree += leaf;
  for (size_t i = 0; i < levels; ++i) tree += "]}";
  return tree;
}

TEST_F(HostileFileTest, EveryReadAndVerifyRefusesWhatTheFormatForbids) {
  const std::string x = R"({"T":[0,"F32",[4],[1],0]})";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"d":[["x",)" + x + R"(],["x",)" + x + "]]}", "has the key 'x' twice"},
      {R"({"d":[["x",{"T":[0,"F32",[2,2],[576460752303423488,1],0]}]]})", "does not fit its storage"},
      {R"({"d":[["x",{"T":[0,"F32",[576460752303423488],[1],0]}]]})", "does not fit its storage"},
      {R"({"d":[["x",{"T":[0,"F32",[4294967296,4294967296],[1,1],0]}]]})", "does not fit its storage"},
      {R"({"d":[["x",{"T":[0,"F32",[2],[-4],4]}]]})", "negative stride"},
      {nested_lists(kMaxTreeDepth + 1, ""), "containers nest more than 10000 levels deep, the format's limit"},
  };
  for (const auto& [tree, what] : cases) {
    SCOPED_TRACE(what);
    const std::string& path = commit(testing::one_storage_file(tree));
    const auto refused = [&](const char* how, auto&& f) {
      SCOPED_TRACE(how);
      try {
        f();
        ADD_FAILURE() << "expected an error";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::kDataLoss) << e.what();
        EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find(rank_file_name(0, 1)), std::string::npos) << e.what();
      }
    };
    for (const auto& [name, options] : full_loads()) refused(name.c_str(), [&] { CheckpointReader({}, options).read(path); });
    for (const bool strict : {false, true}) {
      Value target = Value::dict();
      target.insert("x", Value(Tensor::empty_cpu(DType::kF32, {4})));
      refused(strict ? "strict in place" : "in place", [&] { CheckpointReader().read_into(path, target, strict); });
    }
    refused("verify", [&] { verify_checkpoint(path); });
    int status = 0;
    const std::string out = cli_output("verify " + path, status);
#ifdef FASTDCP_CLI
    EXPECT_EQ(status, 1) << out;
    EXPECT_NE(out.find(what), std::string::npos) << out;
#endif
  }
  // The same file with one well-formed tree loads.
  const Value v = CheckpointReader().read(commit(testing::one_storage_file(R"({"d":[["x",)" + x + "]]}")));
  EXPECT_EQ(v.at("x").as_tensor().shape(), (Dims{4}));
  EXPECT_EQ(verify_checkpoint(path_).chunks, 1u);
}

TEST_F(HostileFileTest, AFileThatIsNotARankFileIsNamedWithoutEchoingIt) {
  static constexpr char kZip[] = "PK\x03\x04\x14\x00\x08\x00 and the rest of a zip file";
  const std::string& path = commit(std::string_view(kZip, sizeof kZip - 1));
  try {
    CheckpointReader().read(path);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
    EXPECT_NE(std::string(e.what()).find("is not a fastdcp or safetensors rank file"), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).find("2251885780355920"), std::string::npos) << e.what();  // the first 8 bytes
  }
}

}  // namespace
}  // namespace fastdcp
