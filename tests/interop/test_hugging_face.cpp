// Hugging Face model directories: the shard splitting, the casts, export and import (the Python
// tests hold the safetensors and torch oracles), hostile directories, and the CLI command.

#include "fastdcp/interop/hugging_face.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "fastdcp/io/file.h"
#include "support/test_support.h"

namespace fastdcp {
namespace {

using testing::expect_error;
using testing::patterned_tensor;

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

#if defined(__has_feature)
#define FASTDCP_HAS_SANITIZER (__has_feature(address_sanitizer) || __has_feature(thread_sanitizer))
#else
#define FASTDCP_HAS_SANITIZER 0
#endif

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && a.is_contiguous() && b.is_contiguous() &&
         std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()) == 0;
}

// ---- shard splitting -----------------------------------------------------------------------

TEST(HfShards, GreedyInOrderWithAnOversizedItemAlone) {
  // base 10, limit 100: [40, 40] fits (90), 30 starts a new shard, 200 is alone, 5 after it starts another.
  EXPECT_EQ(hf::plan_shards({40, 40, 30, 200, 5, 5}, 10, 100), (std::vector<size_t>{0, 2, 3, 4}));
  EXPECT_EQ(hf::plan_shards({1, 1, 1}, 0, 1000), (std::vector<size_t>{0}));
  EXPECT_EQ(hf::plan_shards({}, 0, 10), std::vector<size_t>{});
  // Exactly at the limit stays in the shard; one byte over does not.
  EXPECT_EQ(hf::plan_shards({45, 45}, 10, 100), (std::vector<size_t>{0}));
  EXPECT_EQ(hf::plan_shards({45, 46}, 10, 100), (std::vector<size_t>{0, 1}));
  EXPECT_EQ(hf::shard_file_name(1, 12), "model-00002-of-00012.safetensors");
}

TEST(HfShards, SizesAndDtypesParseAsTransformersWritesThem) {
  EXPECT_EQ(hf::parse_size("5GB", "x"), 5'000'000'000u);
  EXPECT_EQ(hf::parse_size("2GiB", "x"), uint64_t{2} << 30);
  EXPECT_EQ(hf::parse_size("500mb", "x"), 500'000'000u);
  EXPECT_EQ(hf::parse_size("1.5KB", "x"), 1500u);
  EXPECT_EQ(hf::parse_size("4096", "x"), 4096u);
  for (const char* bad : {"", "GB", "5XB", "-1GB", "0", "5 GB"}) {
    const Error e = expect_error([&] { hf::parse_size(bad, "--max-shard-size"); });
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << bad;
    EXPECT_TRUE(contains(e.what(), "--max-shard-size")) << e.what();
  }
  EXPECT_EQ(hf::parse_float_dtype("bfloat16", "x"), DType::kBF16);
  EXPECT_EQ(hf::parse_float_dtype("FP16", "x"), DType::kF16);
  EXPECT_EQ(hf::parse_float_dtype("float", "x"), DType::kF32);
  EXPECT_EQ(expect_error([] { hf::parse_float_dtype("int8", "--dtype"); }).code(), ErrorCode::kInvalidArgument);
}

// ---- casts ---------------------------------------------------------------------------------

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t to16(float f, DType dtype) {
  uint16_t out;
  hf::cast_elements(&f, DType::kF32, &out, dtype, 1);
  return out;
}

TEST(HfCast, Bf16RoundsToNearestEvenAsTorch) {
  EXPECT_EQ(to16(1.0f, DType::kBF16), 0x3F80);
  EXPECT_EQ(to16(bits_float(0x3F808000), DType::kBF16), 0x3F80);  // a tie goes to the even 0x3F80
  EXPECT_EQ(to16(bits_float(0x3F818000), DType::kBF16), 0x3F82);  // a tie goes to the even 0x3F82
  EXPECT_EQ(to16(bits_float(0x3F808001), DType::kBF16), 0x3F81);  // above the tie rounds up
  EXPECT_EQ(to16(std::nanf(""), DType::kBF16), 0x7FC0);
  EXPECT_EQ(to16(bits_float(0x7F7FFFFF), DType::kBF16), 0x7F80);  // FLT_MAX rounds to infinity
  EXPECT_EQ(to16(-0.0f, DType::kBF16), 0x8000);
  // Back to F32 is exact.
  const uint16_t b = 0x4049;
  float f = 0;
  hf::cast_elements(&b, DType::kBF16, &f, DType::kF32, 1);
  EXPECT_EQ(float_bits(f), 0x40490000u);
}

// Every half widens to a float and narrows back to itself (a NaN to a NaN).
TEST(HfCast, EveryF16RoundTripsThroughF32) {
  for (uint32_t h = 0; h <= 0xFFFF; ++h) {
    const auto half = static_cast<uint16_t>(h);
    float f = 0;
    hf::cast_elements(&half, DType::kF16, &f, DType::kF32, 1);
    uint16_t back = 0;
    hf::cast_elements(&f, DType::kF32, &back, DType::kF16, 1);
    if ((h & 0x7C00u) == 0x7C00u && (h & 0x3FFu) != 0) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << h;
      ASSERT_EQ(back & 0x7E00u, 0x7E00u) << std::hex << h;
    } else {
      ASSERT_EQ(back, half) << std::hex << h;
    }
  }
  uint16_t one = 0x3C00, min_sub = 0x0001;
  float f = 0;
  hf::cast_elements(&one, DType::kF16, &f, DType::kF32, 1);
  EXPECT_EQ(f, 1.0f);
  hf::cast_elements(&min_sub, DType::kF16, &f, DType::kF32, 1);
  EXPECT_EQ(f, std::ldexp(1.0f, -24));
}

TEST(HfCast, F16RoundsOverflowsAndKeepsSubnormals) {
  EXPECT_EQ(to16(1.0f, DType::kF16), 0x3C00);
  EXPECT_EQ(to16(65504.0f, DType::kF16), 0x7BFF);
  EXPECT_EQ(to16(70000.0f, DType::kF16), 0x7C00);             // beyond the largest half: infinity
  EXPECT_EQ(to16(bits_float(0x33800000), DType::kF16), 0x0001);  // 2^-24, the smallest subnormal
  EXPECT_EQ(to16(1.0f + 1.0f / 2048, DType::kF16), 0x3C00);    // a tie goes to the even 0x3C00
}

TEST(HfCast, F64ToHalfRoundsThroughF32AsTorch) {
  // 1 + 2^-11 + 2^-40: rounding once would go up to 1 + 2^-10; through F32 it becomes the tie
  // 1 + 2^-11 first, which goes to the even 1.0, as torch's Half(float) gives.
  const double v = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
  uint16_t out;
  hf::cast_elements(&v, DType::kF64, &out, DType::kF16, 1);
  EXPECT_EQ(out, 0x3C00);
  const double w = 1.5;
  double back = 0;
  hf::cast_elements(&w, DType::kF64, &out, DType::kBF16, 1);
  hf::cast_elements(&out, DType::kBF16, &back, DType::kF64, 1);
  EXPECT_EQ(back, 1.5);
  EXPECT_EQ(expect_error([&] { hf::cast_elements(&w, DType::kI64, &out, DType::kF16, 1); }).code(),
            ErrorCode::kInvalidArgument);
}

// ---- export and import ---------------------------------------------------------------------

class HfTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Value root = Value::dict();
    Value model = Value::dict();
    model.insert("embed", Value(patterned_tensor(DType::kF32, {64, 32}, 1)));     // 8192 bytes
    model.insert("norm", Value(patterned_tensor(DType::kBF16, {32}, 2)));         // 64 bytes
    model.insert("head", Value(patterned_tensor(DType::kF32, {32, 64}, 3)));      // 8192 bytes
    model.insert("ids", Value(patterned_tensor(DType::kI64, {10}, 4)));           // 80 bytes
    model.insert("big", Value(patterned_tensor(DType::kF32, {100, 100}, 5)));     // 40000 bytes
    root.insert("model", std::move(model));
    root.insert("optim", Value(patterned_tensor(DType::kF32, {4}, 6)));
    root.insert("step", Value(int64_t{7}));
    CheckpointWriter().write(checkpoint_, root);
  }
  testing::TempDir temp_{"fastdcp_hf"};
  const std::string checkpoint_ = join_path(temp_.path(), "ck");
  const std::string out_ = join_path(temp_.path(), "hf");
};

TEST_F(HfTest, ExportShardsUnderTheLimitAndLoadsBackFlat) {
  HfExportOptions options;
  options.max_shard_bytes = 20'000;
  options.prefix = "model.";
  options.strip_prefix = true;
  const HfExportReport report = export_hugging_face(checkpoint_, out_, options);
  EXPECT_EQ(report.tensors, 5u);
  EXPECT_EQ(report.total_size, 8192u + 64 + 8192 + 80 + 40000);
  ASSERT_EQ(report.files.size(), 2u);  // [embed, norm, head, ids] [big]: split by the limit
  EXPECT_EQ(report.index_file, kHfIndexFile);
  EXPECT_TRUE(report.skipped.empty());  // "step" and "optim" lie outside the prefix
  for (const std::string& file : report.files) {
    const uint64_t size = std::filesystem::file_size(join_path(out_, file));
    if (file != hf::shard_file_name(1, 2)) EXPECT_LE(size, options.max_shard_bytes) << file;  // "big" is alone
  }
  const std::string index = read_text(join_path(out_, std::string(kHfIndexFile)));
  EXPECT_TRUE(contains(index, "\"total_size\": 56528")) << index;
  EXPECT_TRUE(contains(index, "\"big\": \"model-00002-of-00002.safetensors\"")) << index;
  // No temporary name is left.
  for (const auto& entry : std::filesystem::directory_iterator(out_)) {
    EXPECT_FALSE(entry.path().filename().string().starts_with(".")) << entry.path();
  }

  const Value loaded = read_hugging_face(out_);
  const Value original = CheckpointReader().read(checkpoint_);
  ASSERT_EQ(loaded.size(), 5u);
  for (const char* name : {"embed", "norm", "head", "ids", "big"}) {
    EXPECT_TRUE(same_bytes(loaded.at(name).as_tensor(), original.at("model").at(name).as_tensor())) << name;
  }
}

TEST_F(HfTest, ExportCastsOnlyFloatingTensorsAndReportsWhatItSkips) {
  HfExportOptions options;
  options.dtype = DType::kBF16;
  const HfExportReport report = export_hugging_face(checkpoint_, out_, options);
  ASSERT_EQ(report.files, std::vector<std::string>{std::string(kHfSingleFile)});
  EXPECT_TRUE(report.index_file.empty());
  EXPECT_FALSE(std::filesystem::exists(join_path(out_, std::string(kHfIndexFile))));
  ASSERT_EQ(report.skipped.size(), 1u);
  EXPECT_EQ(report.skipped[0].first, "step");
  const Value loaded = read_hugging_face(out_);
  EXPECT_EQ(loaded.at("model.embed").as_tensor().dtype(), DType::kBF16);
  EXPECT_EQ(loaded.at("model.ids").as_tensor().dtype(), DType::kI64);  // not floating: as saved
  const Value original = CheckpointReader().read(checkpoint_);
  const Tensor& embed = original.at("model").at("embed").as_tensor();
  const Tensor expected = Tensor::empty_cpu(DType::kBF16, embed.shape());
  hf::cast_elements(embed.data_ptr(), DType::kF32, expected.data_ptr(), DType::kBF16, 64 * 32);
  EXPECT_TRUE(same_bytes(loaded.at("model.embed").as_tensor(), expected));
}

TEST_F(HfTest, ExportRefusesAFullDirectoryAndNeverWritesThroughALink) {
  std::filesystem::create_directories(out_);
  const std::string victim = join_path(temp_.path(), "victim");
  write_text(victim, "precious");
  std::filesystem::create_symlink(victim, join_path(out_, std::string(kHfSingleFile)));
  const Error e = expect_error([&] { export_hugging_face(checkpoint_, out_); });
  EXPECT_EQ(e.code(), ErrorCode::kFailedPrecondition);
  EXPECT_TRUE(contains(e.what(), "is not empty")) << e.what();
  EXPECT_TRUE(contains(e.what(), "overwrite")) << e.what();

  write_text(join_path(out_, "config.json"), "{}");
  write_text(join_path(out_, "model-00001-of-00009.safetensors"), "stale");
  HfExportOptions options;
  options.overwrite = true;
  export_hugging_face(checkpoint_, out_, options);
  EXPECT_EQ(read_text(victim), "precious");  // the link was replaced, not followed
  EXPECT_FALSE(std::filesystem::is_symlink(join_path(out_, std::string(kHfSingleFile))));
  EXPECT_EQ(read_text(join_path(out_, "config.json")), "{}");  // not ours: left alone
  EXPECT_FALSE(std::filesystem::exists(join_path(out_, "model-00001-of-00009.safetensors")));  // stale shard gone
  EXPECT_EQ(read_hugging_face(out_).size(), 6u);
}

TEST_F(HfTest, ImportFillsATemplateAndCastsOnlyWhenAsked) {
  HfExportOptions export_options;
  export_options.dtype = DType::kBF16;
  export_options.prefix = "model.";
  export_hugging_face(checkpoint_, out_, export_options);
  const Tensor target = Tensor::empty_cpu(DType::kF32, {64, 32});
  Value model = Value::dict();
  model.insert("embed", Value(target));
  Value root = Value::dict();
  root.insert("model", std::move(model));
  HfImportOptions options;
  options.strict = false;
  const Error e = expect_error([&] { load_hugging_face(out_, root, options); });
  EXPECT_TRUE(contains(e.what(), "model.embed")) << e.what();
  EXPECT_TRUE(contains(e.what(), "cast")) << e.what();
  options.cast = true;
  const LoadResult result = load_hugging_face(out_, root, options);
  EXPECT_TRUE(result.missing_keys.empty());
  EXPECT_EQ(result.unexpected_keys.size(), 4u);
  // bf16 into f32: the bf16 values, widened.
  const Value flat = read_hugging_face(out_);
  const Tensor widened = Tensor::empty_cpu(DType::kF32, {64, 32});
  hf::cast_elements(flat.at("model.embed").as_tensor().data_ptr(), DType::kBF16, widened.data_ptr(), DType::kF32,
                    64 * 32);
  EXPECT_TRUE(same_bytes(target, widened));
  // Strict: unexpected keys refuse the load before anything changes.
  options.strict = true;
  std::memset(target.data_ptr(), 0, target.nbytes());
  const Error strict = expect_error([&] { load_hugging_face(out_, root, options); });
  EXPECT_EQ(strict.code(), ErrorCode::kFailedPrecondition);
  EXPECT_TRUE(contains(strict.what(), "Not in the target: ") && contains(strict.what(), "model.norm")) << strict.what();
  EXPECT_EQ(static_cast<const float*>(target.data_ptr())[5], 0.0f);
}

TEST_F(HfTest, ImportReadsOnlyTheBoxesOfAShardedTarget) {
  export_hugging_face(checkpoint_, out_);
  const Value original = CheckpointReader().read(checkpoint_);
  const Tensor& big = original.at("model").at("big").as_tensor();
  const float* all = static_cast<const float*>(big.data_ptr());
  // This rank holds rows 10..40 of columns 20..70 and, strided into a larger buffer, rows 90..100.
  ShardedTensor sharded;
  sharded.global_shape = {100, 100};
  sharded.dtype = DType::kF32;
  const Tensor box = Tensor::empty_cpu(DType::kF32, {30, 50});
  const Tensor wide = Tensor::empty_cpu(DType::kF32, {10, 200});
  const Tensor strided = wide.view_as({10, 100}, {200, 1}, 50);
  sharded.chunks.push_back({{10, 20}, box});
  sharded.chunks.push_back({{90, 0}, strided});
  Value root = Value::dict();
  root.insert("model.big", Value(std::move(sharded)));
  HfImportOptions options;
  options.strict = false;
  load_hugging_face(out_, root, options);
  const float* b = static_cast<const float*>(box.data_ptr());
  for (int r = 0; r < 30; ++r) {
    for (int c = 0; c < 50; ++c) ASSERT_EQ(b[r * 50 + c], all[(10 + r) * 100 + 20 + c]) << r << "," << c;
  }
  const float* w = static_cast<const float*>(wide.data_ptr());
  for (int r = 0; r < 10; ++r) {
    for (int c = 0; c < 100; ++c) ASSERT_EQ(w[r * 200 + 50 + c], all[(90 + r) * 100 + c]) << r << "," << c;
    EXPECT_EQ(w[r * 200], 0.0f);  // outside the view: untouched
  }
}

TEST_F(HfTest, HostileDirectoriesNameTheFileAndTheKey) {
  HfExportOptions options;
  options.max_shard_bytes = 20'000;
  export_hugging_face(checkpoint_, out_, options);
  const std::string index_path = join_path(out_, std::string(kHfIndexFile));
  const std::string index = read_text(index_path);
  const auto with_index = [&](const std::string& text) {
    write_text(index_path, text);
    return expect_error([&] { read_hugging_face(out_); });
  };
  Error e = with_index(R"({"weight_map": {"model.big": "model-00009-of-00009.safetensors"}})");
  EXPECT_EQ(e.code(), ErrorCode::kNotFound);
  EXPECT_TRUE(contains(e.what(), "model-00009-of-00009.safetensors") && contains(e.what(), "model.big")) << e.what();
  e = with_index(R"({"weight_map": {"model.nothing": "model-00001-of-00003.safetensors"}})");
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_TRUE(contains(e.what(), "model.nothing") && contains(e.what(), "holds no tensor")) << e.what();
  e = with_index(R"({"weight_map": {"model.big": "../ck/manifest.json"}})");
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_TRUE(contains(e.what(), "not a file name in the model directory")) << e.what();
  e = with_index(R"({"weight_map": [)");
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_TRUE(contains(e.what(), kHfIndexFile.data())) << e.what();

  write_text(index_path, index);
  const std::string shard = join_path(out_, "model-00001-of-00003.safetensors");
  std::filesystem::resize_file(shard, std::filesystem::file_size(shard) - 3);
  e = expect_error([&] { read_hugging_face(out_); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_TRUE(contains(e.what(), shard) && contains(e.what(), "truncated")) << e.what();
  EXPECT_EQ(expect_error([&] { read_hugging_face(temp_.path()); }).code(), ErrorCode::kNotFound);
}

TEST(HfExport, ACheckpointOfSeveralRanksExportsTheNamedRanksPart) {
  testing::TempDir temp("fastdcp_hf_ranks");
  const std::string checkpoint = join_path(temp.path(), "ck");
  const auto state_of = [](int rank) {
    Value root = Value::dict();
    root.insert("w", Value(patterned_tensor(DType::kF32, {5, 3}, 20 + rank)));
    return root;
  };
  std::thread other([&] { CheckpointWriter(RankInfo{1, 2}).write(checkpoint, state_of(1)); });
  CheckpointWriter(RankInfo{0, 2}).write(checkpoint, state_of(0));
  other.join();
  for (int rank = 0; rank < 2; ++rank) {
    const std::string out = join_path(temp.path(), "hf" + std::to_string(rank));
    HfExportOptions options;
    options.rank = rank;
    export_hugging_face(checkpoint, out, options);
    EXPECT_TRUE(same_bytes(read_hugging_face(out).at("w").as_tensor(), state_of(rank).at("w").as_tensor())) << rank;
  }
  HfExportOptions options;
  options.rank = 2;
  const Error e = expect_error([&] { export_hugging_face(checkpoint, join_path(temp.path(), "hf2"), options); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_TRUE(contains(e.what(), "written by 2 ranks")) << e.what();
}

// A field of /proc/self/status ("VmRSS", "VmHWM"), in bytes.
uint64_t status_bytes(const std::string& field) {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);) {
    if (line.starts_with(field + ":")) return std::stoull(line.substr(field.size() + 1)) * 1024;  // kB
  }
  ADD_FAILURE() << field << " not in /proc/self/status";
  return 0;
}

// 32 keys of 4 MiB, each cut in rows over 4 ranks, exported against a limit of two keys a file:
// the export assembles them a file at a time, never the 128 MiB checkpoint at once.
TEST(HfExport, ShardedKeysAreAssembledOneFileAtATime) {
  testing::TempDir temp("fastdcp_hf_sharded");
  const std::string checkpoint = join_path(temp.path(), "ck");
  constexpr int kRanks = 4, kKeys = 32;
  constexpr int64_t kRows = 256, kCols = 4096;
  constexpr uint64_t kKeyBytes = kRows * kCols * 4;
  std::vector<Tensor> globals;
  for (int k = 0; k < kKeys; ++k) globals.push_back(patterned_tensor(DType::kF32, {kRows, kCols}, k));
  const auto state_of = [&](int rank) {
    Value root = Value::dict();
    for (int k = 0; k < kKeys; ++k) {
      const Box box{Dims{kRows / kRanks * rank, 0}, Dims{kRows / kRanks, kCols}};
      ShardedTensor s;
      s.global_shape = globals[static_cast<size_t>(k)].shape();
      s.dtype = DType::kF32;
      Tensor local = Tensor::empty_cpu(DType::kF32, box.sizes);
      copy_tensor(local, box_view(globals[static_cast<size_t>(k)], Dims{0, 0}, box));
      s.chunks.push_back({box.offset, std::move(local)});
      root.insert("w" + std::to_string(k), Value(std::move(s)));
    }
    return root;
  };
  {
    auto barrier = std::make_shared<testing::ThreadBarrier>(kRanks);
    std::vector<std::thread> ranks;
    for (int r = 0; r < kRanks; ++r) {
      ranks.emplace_back([&, r] { CheckpointWriter({r, kRanks}, {}, barrier).write(checkpoint, state_of(r)); });
    }
    for (std::thread& t : ranks) t.join();
  }
  HfExportOptions options;
  options.max_shard_bytes = 2 * kKeyBytes + 4096;  // two keys and their header
  for (const bool verify : {false, true}) {
    const std::string out = join_path(temp.path(), verify ? "hf_verified" : "hf");
    options.verify_checksums = verify;
    // Without checksums nothing reads the mapped pages of this rank's file, so the resident peak
    // is what the export allocates.
    std::ofstream("/proc/self/clear_refs") << "5";  // resets VmHWM to VmRSS
    const uint64_t before = status_bytes("VmRSS");
    const HfExportReport report = export_hugging_face(checkpoint, out, options);
    const uint64_t growth = status_bytes("VmHWM") - before;
    EXPECT_EQ(report.tensors, static_cast<size_t>(kKeys));
    EXPECT_EQ(report.files.size(), static_cast<size_t>(kKeys / 2));
    EXPECT_EQ(report.peak_sharded_bytes, 2 * kKeyBytes);
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__) && !FASTDCP_HAS_SANITIZER
    // Sanitizers keep freed memory (quarantine) and shadow it: their resident peaks say nothing.
    if (!verify) EXPECT_LT(growth, kKeys * kKeyBytes / 4) << "peak resident growth " << growth;
#else
    (void)growth;
#endif
    const Value loaded = read_hugging_face(out);
    for (int k = 0; k < kKeys; ++k) {
      EXPECT_TRUE(same_bytes(loaded.at("w" + std::to_string(k)).as_tensor(), globals[static_cast<size_t>(k)])) << k;
    }
  }
}

// Two key paths of one tensor (an LM head tied to the embedding) export once, under the first
// name; a slice or a transpose of the same storage exports with its own values.
TEST(HfExport, TiedWeightsExportOnceUnderTheFirstName) {
  testing::TempDir temp("fastdcp_hf_tied");
  const std::string checkpoint = join_path(temp.path(), "ck");
  const Tensor embed = patterned_tensor(DType::kF32, {6, 4}, 9);
  Value root = Value::dict();
  root.insert("embed", Value(embed));
  root.insert("row", Value(embed.view_as({4}, {1}, 4)));
  root.insert("transposed", Value(embed.view_as({4, 6}, {1, 4}, 0)));
  root.insert("head", Value(embed));
  CheckpointWriter().write(checkpoint, root);
  const std::string out = join_path(temp.path(), "hf");
  const HfExportReport report = export_hugging_face(checkpoint, out);
  EXPECT_EQ(report.tensors, 3u);
  ASSERT_EQ(report.skipped.size(), 1u);
  EXPECT_EQ(report.skipped[0].first, "head");
  EXPECT_TRUE(contains(report.skipped[0].second, "tied") && contains(report.skipped[0].second, "'embed'"))
      << report.skipped[0].second;
  const Value loaded = read_hugging_face(out);
  EXPECT_EQ(loaded.size(), 3u);
  EXPECT_TRUE(same_bytes(loaded.at("embed").as_tensor(), embed));
  Tensor row = Tensor::empty_cpu(DType::kF32, {4});
  copy_tensor(row, embed.view_as({4}, {1}, 4));
  EXPECT_TRUE(same_bytes(loaded.at("row").as_tensor(), row));
  Tensor transposed = Tensor::empty_cpu(DType::kF32, {4, 6});
  copy_tensor(transposed, embed.view_as({4, 6}, {1, 4}, 0));
  EXPECT_TRUE(same_bytes(loaded.at("transposed").as_tensor(), transposed));

  // Back into a template whose head is its embedding: the one stored name fills both, and a strict
  // load finds nothing missing.
  const Tensor tied = Tensor::empty_cpu(DType::kF32, {6, 4});
  Value target = Value::dict();
  target.insert("head", Value(tied));
  target.insert("embed", Value(tied));
  target.insert("row", Value(Tensor::empty_cpu(DType::kF32, {4})));
  target.insert("transposed", Value(Tensor::empty_cpu(DType::kF32, {4, 6})));
  const LoadResult result = load_hugging_face(out, target);
  EXPECT_TRUE(result.missing_keys.empty() && result.unexpected_keys.empty());
  EXPECT_TRUE(same_bytes(tied, embed));
  // An untied template still misses the name that was not exported.
  Value untied = Value::dict();
  untied.insert("head", Value(Tensor::empty_cpu(DType::kF32, {6, 4})));
  untied.insert("embed", Value(Tensor::empty_cpu(DType::kF32, {6, 4})));
  HfImportOptions loose;
  loose.strict = false;
  EXPECT_EQ(load_hugging_face(out, untied, loose).missing_keys, std::vector<std::string>{"head"});
}

#ifdef FASTDCP_CLI
TEST_F(HfTest, CliExportsAndRefusesBadUsage) {
  const auto run = [](const std::string& arguments) {
    const std::string command = std::string(FASTDCP_CLI) + " " + arguments + " >/dev/null 2>&1";
    const int status = std::system(command.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  };
  EXPECT_EQ(run("export-hf " + checkpoint_ + " " + out_ + " --max-shard-size 20KB --dtype bf16 --prefix model. "
                "--strip-prefix"),
            0);
  const Value loaded = read_hugging_face(out_);
  EXPECT_EQ(loaded.at("big").as_tensor().dtype(), DType::kBF16);
  EXPECT_EQ(run("export-hf " + checkpoint_ + " " + out_), 1);  // not empty now
  EXPECT_EQ(run("export-hf " + checkpoint_ + " " + out_ + " --overwrite"), 0);
  EXPECT_EQ(run("export-hf " + checkpoint_ + " " + out_ + " --max-shard-size 5XB --overwrite"), 2);
  EXPECT_EQ(run("export-hf " + checkpoint_ + " " + out_ + " --dtype int8 --overwrite"), 2);
  EXPECT_EQ(run("export-hf " + checkpoint_ + " " + out_ + " --rank 3 --overwrite"), 2);
}
#endif

}  // namespace
}  // namespace fastdcp
