#include "fastdcp/checkpoint/checkpoint.h"

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <algorithm>
#include <barrier>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "fastdcp/common/error.h"
#include "fastdcp/format/rank_file.h"
#include "fastdcp/io/file.h"
#include "fastdcp/memory/host_buffer.h"
#include "support/test_support.h"

namespace fastdcp {
namespace {

using testing::expect_error;
using testing::patterned_tensor;

bool same_bytes(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.shape() != b.shape()) return false;
  Tensor ca = Tensor::empty_cpu(a.dtype(), a.shape());
  Tensor cb = Tensor::empty_cpu(b.dtype(), b.shape());
  copy_tensor(ca, a);
  copy_tensor(cb, b);
  return std::memcmp(ca.data_ptr(), cb.data_ptr(), ca.nbytes()) == 0;
}

Value state(int seed) {
  Tensor base = patterned_tensor(DType::kF32, {64, 64}, seed);
  Value model = Value::dict();
  model.insert("big", Value(patterned_tensor(DType::kBF16, {3 << 20}, seed)));  // 6 MiB: two checksum chunks
  model.insert("w", Value(patterned_tensor(DType::kF32, {16, 16}, seed + 1)));
  model.insert("base", Value(base));
  model.insert("cols", Value(base.view_as({64, 8}, {64, 1}, 3)));
  Value root = Value::dict();
  root.insert("model", std::move(model));
  root.insert("step", Value(int64_t{seed}));
  root.insert("lr", Value(0.5));
  return root;
}

class CheckpointTest : public ::testing::Test {
 protected:
  std::string data_file() const { return join_path(path_, read_manifest(path_).ranks[0].file); }
  testing::TempDir temp_{"fastdcp_ckpt"};
  const std::string& dir_ = temp_.path();
  const std::string path_ = join_path(dir_, "step");
};

void expect_contains(const Error& e, const std::string& text) {
  EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
}

TEST_F(CheckpointTest, RoundTripKeepsValuesViewsAndAliasing) {
  const Value source = state(1);
  const WriteStats stats = CheckpointWriter().write(path_, source);
  EXPECT_GT(stats.bytes_written, 6u << 20);
  for (const ReadOptions options : {ReadOptions{}, ReadOptions{.use_mmap = true}, ReadOptions{.direct_io = false}}) {
    const Value loaded = CheckpointReader({}, options).read(path_);
    const Value& m = loaded.at("model");
    for (const char* key : {"big", "w", "base", "cols"}) {
      EXPECT_TRUE(same_bytes(m.at(key).as_tensor(), source.at("model").at(key).as_tensor())) << key;
    }
    EXPECT_EQ(m.at("cols").as_tensor().storage(), m.at("base").as_tensor().storage());
    EXPECT_EQ(loaded.at("step").as_int(), 1);
    EXPECT_EQ(loaded.at("lr").as_double(), 0.5);
  }
  const VerifyReport report = verify_checkpoint(path_);
  EXPECT_EQ(report.files, 1);
  EXPECT_GE(report.chunks, 4u);
}

TEST_F(CheckpointTest, OverwriteMustBeAskedForAndReplacesTheOldFiles) {
  CheckpointWriter().write(path_, state(1));
  const std::string first = data_file();
  expect_contains(expect_error([&] { CheckpointWriter().write(path_, state(2)); }), "overwrite");
  EXPECT_EQ(CheckpointReader().read(path_).at("step").as_int(), 1);  // untouched
  CheckpointWriter({}, WriterOptions{.overwrite = true}).write(path_, state(2));
  EXPECT_EQ(CheckpointReader().read(path_).at("step").as_int(), 2);
  EXPECT_FALSE(path_exists(first));
  EXPECT_EQ(read_manifest(path_).generation, 2u);
  // Only the manifest and the new data file remain.
  EXPECT_EQ(list_directory(path_).size(), 2u);
}

TEST_F(CheckpointTest, MissingAndUncommittedCheckpointsAreClearErrors) {
  Error e = expect_error([&] { CheckpointReader().read(join_path(dir_, "none")); });
  EXPECT_EQ(e.code(), ErrorCode::kNotFound);
  create_directories(path_);
  e = expect_error([&] { CheckpointReader().read(path_); });
  EXPECT_EQ(e.code(), ErrorCode::kFailedPrecondition);
  expect_contains(e, "no committed checkpoint");
  CheckpointWriter().write(path_, state(1));
  std::filesystem::remove(data_file());
  e = expect_error([&] { CheckpointReader().read(path_); });
  EXPECT_EQ(e.code(), ErrorCode::kNotFound);
  expect_contains(e, "rank 0");
}

TEST_F(CheckpointTest, AFlippedByteIsDetectedAndNamesTheTensorAndChunk) {
  CheckpointWriter().write(path_, state(1));
  const RankFileHeader header = [&] {
    File f = File::open(data_file(), File::Mode::kRead);
    return RankFileHeader::read([&](void* d, uint64_t o, uint64_t n) { f.read_at(d, n, o); }, f.size(), data_file());
  }();
  const auto it = std::find_if(header.entries().begin(), header.entries().end(),
                               [](const StoredEntry& e) { return e.name == "model.big"; });
  ASSERT_NE(it, header.entries().end());
  {
    std::fstream f(data_file(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(header.data_offset() + it->begin + (5u << 20)));
    f.put('\x5a');
  }
  for (const ReadOptions options : {ReadOptions{}, ReadOptions{.use_mmap = true}, ReadOptions{.direct_io = false}}) {
    const Error e = expect_error([&] { CheckpointReader({}, options).read(path_); });
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
    expect_contains(e, "tensor 'model.big', chunk 1 of 2");
  }
  expect_contains(expect_error([&] { verify_checkpoint(path_); }), "model.big");
  // Without verification the damaged bytes load.
  EXPECT_NO_THROW(CheckpointReader({}, ReadOptions{.verify_checksums = false}).read(path_));
}

// Full loads through every path: O_DIRECT or buffered, io_uring or threads (Note [I/O engines]).
std::vector<ReadOptions> every_read_path() {
  std::vector<ReadOptions> paths;
  for (const IoEngine engine : {IoEngine::kThreads, IoEngine::kAuto}) {  // kAuto: io_uring where available
    for (const bool direct : {true, false}) paths.push_back(ReadOptions{.direct_io = direct, .io_engine = engine});
  }
  return paths;
}

// Note [File-image reads]: one allocation holds the data region as it is in the file, read in
// 16 MiB windows; a chunk that straddles two windows is checked once both have landed.
TEST_F(CheckpointTest, AFullLoadReadsTheFileImageIntoOneAllocation) {
  Value source = Value::dict();
  source.insert("a_small", Value(patterned_tensor(DType::kF64, {375}, 1)));  // first: entries go by alignment
  source.insert("b_big", Value(patterned_tensor(DType::kF32, {5 << 20}, 2)));  // 20 MiB: across the first window
  source.insert("c_tail", Value(patterned_tensor(DType::kI16, {77}, 3)));
  CheckpointWriter().write(path_, source);
  File file = File::open(data_file(), File::Mode::kRead);
  const RankFileHeader header =
      RankFileHeader::read([&](void* d, uint64_t o, uint64_t n) { file.read_at(d, n, o); }, file.size(), data_file());
  const auto entry = [&](const std::string& name) {
    return *std::find_if(header.entries().begin(), header.entries().end(),
                         [&](const StoredEntry& e) { return e.name == name; });
  };
  for (const ReadOptions& options : every_read_path()) {
    const Value loaded = CheckpointReader({}, options).read(path_);
    for (const char* key : {"a_small", "b_big", "c_tail"}) {
      EXPECT_TRUE(same_bytes(loaded.at(key).as_tensor(), source.at(key).as_tensor())) << key;
      // Each tensor sits where its bytes sit in the file, relative to the others.
      const auto at = [&](const char* k) { return static_cast<const char*>(loaded.at(k).as_tensor().data_ptr()); };
      EXPECT_EQ(at(key) - at("a_small"), static_cast<std::ptrdiff_t>(entry(key).begin - entry("a_small").begin)) << key;
    }
  }
  const StoredEntry big = entry("b_big");
  const uint64_t window_end = uint64_t{16} << 20;
  ASSERT_NE((window_end - big.begin) % kChecksumChunkBytes, 0u) << "the test needs a chunk across the window";
  const size_t chunk = (window_end - big.begin) / kChecksumChunkBytes;
  {
    std::fstream f(data_file(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(header.data_offset() + window_end + 10));
    f.put('\x5a');
  }
  for (const ReadOptions& options : every_read_path()) {
    const Error e = expect_error([&] { CheckpointReader({}, options).read(path_); });
    expect_contains(e, "tensor 'b_big', chunk " + std::to_string(chunk) + " of " + std::to_string(big.num_chunks()));
  }
}

// Note [Reading while the header parses]: a header over 1 MiB parses while the data is read, and
// the chunks are verified afterwards.
TEST_F(CheckpointTest, ManyTensorsAreReadWhileTheHeaderParses) {
  Value source = Value::dict();
  for (int i = 0; i < 8000; ++i) source.insert("t" + std::to_string(i), Value(patterned_tensor(DType::kF32, {16}, i)));
  CheckpointWriter().write(path_, source);
  File file = File::open(data_file(), File::Mode::kRead);
  const RankFileHeader header =
      RankFileHeader::read([&](void* d, uint64_t o, uint64_t n) { file.read_at(d, n, o); }, file.size(), data_file());
  ASSERT_GT(header.data_offset(), uint64_t{1} << 20) << "the test needs a header over 1 MiB";
  for (const ReadOptions& options : every_read_path()) {
    const Value loaded = CheckpointReader({}, options).read(path_);
    ASSERT_EQ(loaded.size(), 8000u);
    for (const int i : {0, 4321, 7999}) {
      const std::string key = "t" + std::to_string(i);
      EXPECT_TRUE(same_bytes(loaded.at(key).as_tensor(), source.at(key).as_tensor())) << key;
    }
  }
  const StoredEntry& victim = *std::find_if(header.entries().begin(), header.entries().end(),
                                            [](const StoredEntry& e) { return e.name == "t5000"; });
  {
    std::fstream f(data_file(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(header.data_offset() + victim.begin + 7));
    f.put('\x5a');
  }
  for (const ReadOptions& options : every_read_path()) {
    const Error e = expect_error([&] { CheckpointReader({}, options).read(path_); });
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
    expect_contains(e, "tensor 't5000', chunk 0 of 1");
  }
  EXPECT_NO_THROW(CheckpointReader({}, ReadOptions{.verify_checksums = false}).read(path_));
}

TEST_F(CheckpointTest, DamageInAViewedStorageNamesItsViews) {
  CheckpointWriter().write(path_, state(1));
  const std::string file = data_file();
  File f = File::open(file, File::Mode::kRead);
  const RankFileHeader header =
      RankFileHeader::read([&](void* d, uint64_t o, uint64_t n) { f.read_at(d, n, o); }, f.size(), file);
  const auto raw = std::find_if(header.entries().begin(), header.entries().end(),
                                [](const StoredEntry& e) { return e.name.starts_with("__fastdcp__"); });
  ASSERT_NE(raw, header.entries().end());
  {
    std::fstream out(file, std::ios::in | std::ios::out | std::ios::binary);
    out.seekp(static_cast<std::streamoff>(header.data_offset() + raw->begin + 1));
    out.put('\x11');
  }
  expect_contains(expect_error([&] { CheckpointReader().read(path_); }), "tensor 'model.base' (and 1 more");
}

TEST_F(CheckpointTest, TruncationAndHeaderDamageAreDetected) {
  CheckpointWriter().write(path_, state(1));
  std::filesystem::resize_file(data_file(), std::filesystem::file_size(data_file()) - 1);
  Error e = expect_error([&] { CheckpointReader().read(path_); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  expect_contains(e, "truncated");
  CheckpointWriter({}, WriterOptions{.overwrite = true}).write(path_, state(1));
  {
    std::fstream out(data_file(), std::ios::in | std::ios::out | std::ios::binary);
    out.seekp(20);
    out.put(' ');
  }
  e = expect_error([&] { CheckpointReader().read(path_); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
}

TEST_F(CheckpointTest, PartialLoadFillsTargetsInPlaceAndReportsKeys) {
  CheckpointWriter().write(path_, state(3));
  const Value source = state(3);
  Tensor big = Tensor::empty_cpu(DType::kBF16, {3 << 20});
  const void* big_memory = big.data_ptr();
  // A non-contiguous target: the transposed view of a 16x16 buffer.
  Tensor buffer = Tensor::empty_cpu(DType::kF32, {16, 16});
  Tensor w_t = buffer.view_as({16, 16}, {1, 16}, 0);
  Value target = Value::dict();
  Value model = Value::dict();
  model.insert("big", Value(big));
  model.insert("w", Value(w_t));
  model.insert("extra", Value(int64_t{5}));
  target.insert("model", std::move(model));
  target.insert("step", Value());
  const LoadResult result = CheckpointReader().read_into(path_, target);
  EXPECT_EQ(target.at("model").at("big").as_tensor().data_ptr(), big_memory);  // in place
  EXPECT_TRUE(same_bytes(big, source.at("model").at("big").as_tensor()));
  EXPECT_TRUE(same_bytes(w_t, source.at("model").at("w").as_tensor()));
  EXPECT_EQ(target.at("step").as_int(), 3);
  EXPECT_EQ(result.missing_keys, (std::vector<std::string>{"model.extra"}));
  std::vector<std::string> unexpected = result.unexpected_keys;
  std::sort(unexpected.begin(), unexpected.end());
  EXPECT_EQ(unexpected, (std::vector<std::string>{"lr", "model.base", "model.cols"}));
}

TEST_F(CheckpointTest, NoneInATargetTakesWhatTheCheckpointHoldsThere) {
  // Note [None in a load target]: a None tensor leaf and a None subtree get the checkpoint's
  // values, read in full; views keep sharing a storage, and a storage that a filled target
  // tensor also views is not read into the target's memory (which the None subtree would alias).
  CheckpointWriter().write(path_, state(4));
  const Value source = state(4);
  Tensor base = Tensor::empty_cpu(DType::kF32, {64, 64});
  Value model = Value::dict();
  model.insert("w", Value());
  model.insert("base", Value(base));
  model.insert("cols", Value());
  Value target = Value::dict();
  target.insert("model", std::move(model));
  Value subtree_target = Value::dict();
  subtree_target.insert("model", Value());
  subtree_target.insert("step", Value());
  for (Value* t : {&target, &subtree_target}) {
    const LoadResult result = CheckpointReader().read_into(path_, *t);
    const Value& m = t->at("model");
    for (const char* key : {"w", "base", "cols"}) {
      EXPECT_TRUE(same_bytes(m.at(key).as_tensor(), source.at("model").at(key).as_tensor())) << key;
    }
    EXPECT_NE(m.at("cols").as_tensor().storage(), base.storage());
    EXPECT_TRUE(result.missing_keys.empty());
  }
  const Value& m = subtree_target.at("model");
  EXPECT_TRUE(same_bytes(m.at("big").as_tensor(), source.at("model").at("big").as_tensor()));
  EXPECT_EQ(m.at("cols").as_tensor().storage(), m.at("base").as_tensor().storage());
  EXPECT_EQ(subtree_target.at("step").as_int(), 4);
}

TEST_F(CheckpointTest, ATargetWhoseTraitsChangeTheValuesIsRefused) {
  Tensor z = patterned_tensor(DType::kC64, {4}, 1);
  TensorTraits conj;
  conj.conj = true;
  z.set_traits(conj);
  Value saved = Value::dict();
  saved.insert("z", Value(z));
  CheckpointWriter().write(path_, saved);
  EXPECT_EQ(CheckpointReader().read(path_).at("z").as_tensor().traits(), conj);
  Value target = Value::dict();
  target.insert("z", Value(Tensor::empty_cpu(DType::kC64, {4})));  // not conjugated
  expect_contains(expect_error([&] { CheckpointReader().read_into(path_, target); }), "'z'");
}

TEST_F(CheckpointTest, StrictLoadAndMismatchesChangeNothing) {
  CheckpointWriter().write(path_, state(3));
  Tensor w = Tensor::empty_cpu(DType::kF32, {16, 16});
  std::memset(w.data_ptr(), 0, w.nbytes());
  Value target = Value::dict();
  Value model = Value::dict();
  model.insert("w", Value(w));
  target.insert("model", std::move(model));
  Error e = expect_error([&] { CheckpointReader().read_into(path_, target, /*strict=*/true); });
  expect_contains(e, "nothing was changed");
  expect_contains(e, "model.big");
  EXPECT_EQ(e.code(), ErrorCode::kFailedPrecondition);  // RuntimeError in Python, as upstream's strict load
  EXPECT_EQ(static_cast<const float*>(w.data_ptr())[5], 0.0f);
  // A shape mismatch names the key, strict or not.
  Value wrong = Value::dict();
  Value wrong_model = Value::dict();
  wrong_model.insert("w", Value(Tensor::empty_cpu(DType::kF32, {4, 4})));
  wrong.insert("model", std::move(wrong_model));
  e = expect_error([&] { CheckpointReader().read_into(path_, wrong); });
  expect_contains(e, "'model.w'");
}

TEST(LoadInto, FillsATargetFromAStateDictInMemoryWithReadIntosRules) {
  // A checkpoint of another format, already read into memory, loads by the same rules.
  const Value source = state(5);
  Tensor buffer = Tensor::empty_cpu(DType::kF32, {16, 16});
  Tensor w_t = buffer.view_as({16, 16}, {1, 16}, 0);  // a non-contiguous target
  Value model = Value::dict();
  model.insert("w", Value(w_t));
  model.insert("extra", Value(int64_t{1}));
  model.insert("base", Value());
  model.insert("cols", Value());
  Value target = Value::dict();
  target.insert("model", std::move(model));
  target.insert("step", Value(int64_t{0}));
  // Strict: refused, naming the source and both kinds of keys, before anything changes.
  std::memset(buffer.data_ptr(), 0, buffer.nbytes());
  Error e = expect_error([&] { load_into(target, source, /*strict=*/true, "dcp:/x"); });
  EXPECT_EQ(e.code(), ErrorCode::kFailedPrecondition);
  expect_contains(e, "'dcp:/x'");
  expect_contains(e, "model.extra");
  expect_contains(e, "model.big");
  EXPECT_EQ(static_cast<const float*>(buffer.data_ptr())[3], 0.0f);
  EXPECT_EQ(target.at("step").as_int(), 0);
  const LoadResult result = load_into(target, source, /*strict=*/false, "dcp:/x");
  EXPECT_EQ(result.missing_keys, (std::vector<std::string>{"model.extra"}));
  std::vector<std::string> unexpected = result.unexpected_keys;
  std::sort(unexpected.begin(), unexpected.end());
  EXPECT_EQ(unexpected, (std::vector<std::string>{"lr", "model.big"}));
  const Value& m = target.at("model");
  EXPECT_EQ(m.at("w").as_tensor().data_ptr(), w_t.data_ptr());  // in place
  EXPECT_TRUE(same_bytes(w_t, source.at("model").at("w").as_tensor()));
  EXPECT_EQ(target.at("step").as_int(), 5);
  // None leaves take copies: views of one storage stay views of one copy, none aliases the source.
  const Tensor& base = m.at("base").as_tensor();
  const Tensor& cols = m.at("cols").as_tensor();
  EXPECT_TRUE(same_bytes(base, source.at("model").at("base").as_tensor()));
  EXPECT_TRUE(same_bytes(cols, source.at("model").at("cols").as_tensor()));
  EXPECT_EQ(base.storage(), cols.storage());
  EXPECT_NE(base.storage(), source.at("model").at("base").as_tensor().storage());
  EXPECT_EQ(cols.storage_offset(), 3);
  // Mismatches name the key, as read_into's do.
  Value wrong = Value::dict();
  wrong.insert("lr", Value(Tensor::empty_cpu(DType::kF32, {1})));
  expect_contains(expect_error([&] { load_into(wrong, source, false, "dcp:/x"); }), "'lr'");
  // A device tensor in the source is refused before anything changes (its memory is never touched).
  float host[4] = {};
  Value on_device = Value::dict();
  on_device.insert("w", Value(Tensor::contiguous(Storage::wrap(host, sizeof host, Device::cuda(0)), DType::kF32, {4})));
  on_device.insert("step", Value(int64_t{9}));
  Value small = Value::dict();
  small.insert("step", Value(int64_t{1}));
  e = expect_error([&] { load_into(small, on_device, false, "dcp:/x"); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(small.at("step").as_int(), 1);
}

TEST_F(CheckpointTest, ManyRanksCommitOnceAllHaveWritten) {
  constexpr int kRanks = 4;
  struct ThreadBarrier : Barrier {
    std::barrier<> b{kRanks};
    void execute(std::chrono::milliseconds) override { b.arrive_and_wait(); }
  };
  auto barrier = std::make_shared<ThreadBarrier>();
  std::vector<std::thread> ranks;
  for (int r = 0; r < kRanks; ++r) {
    ranks.emplace_back([&, r] { CheckpointWriter({r, kRanks}, {}, barrier).write(path_, state(10 + r)); });
  }
  for (auto& t : ranks) t.join();
  const Manifest manifest = read_manifest(path_);
  EXPECT_EQ(manifest.world_size, kRanks);
  for (int r = 0; r < kRanks; ++r) {
    EXPECT_EQ(CheckpointReader({r, kRanks}).read(path_).at("step").as_int(), 10 + r);
  }
  expect_contains(expect_error([&] { CheckpointReader({0, 2}).read(path_); }), "written by 4 ranks");
  EXPECT_EQ(verify_checkpoint(path_).files, kRanks);
}

// Note [Commit protocol]: one rank's failure is every rank's failure, at once, and the committed
// checkpoint stays as it was.
TEST_F(CheckpointTest, OneFailingRankAbandonsTheSaveOnEveryRankWithoutWaitingOutTheTimeout) {
  constexpr int kRanks = 4;
  struct ThreadBarrier : Barrier {
    std::barrier<> b{kRanks};
    void execute(std::chrono::milliseconds) override { b.arrive_and_wait(); }
  };
  auto run_ranks = [&](int failing_rank, std::vector<std::string>& errors) {
    auto barrier = std::make_shared<ThreadBarrier>();
    errors.assign(kRanks, "");
    std::vector<std::thread> ranks;
    for (int r = 0; r < kRanks; ++r) {
      ranks.emplace_back([&, r] {
        Value sd = state(20 + r);
        // A value the format refuses: this rank fails while planning its file.
        if (r == failing_rank) sd.insert("bad", Value(std::string("\xff\xfe")));
        const WriterOptions options{.overwrite = true, .barrier_timeout = std::chrono::seconds(60)};
        try {
          CheckpointWriter({r, kRanks}, options, barrier).write(path_, sd);
        } catch (const Error& e) {
          errors[r] = e.what();
        }
      });
    }
    for (auto& t : ranks) t.join();
  };
  std::vector<std::string> errors;
  run_ranks(/*failing_rank=*/-1, errors);
  for (const auto& e : errors) EXPECT_EQ(e, "");
  const uint64_t committed = read_manifest(path_).generation;

  for (int failing : {2, 0}) {
    const auto start = std::chrono::steady_clock::now();
    run_ranks(failing, errors);
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20)) << "a rank waited out its timeout";
    for (int r = 0; r < kRanks; ++r) {
      EXPECT_NE(errors[r].find(r == failing ? "not valid UTF-8" : "rank " + std::to_string(failing) + " failed"),
                std::string::npos)
          << "rank " << r << ": " << errors[r];
    }
    EXPECT_EQ(read_manifest(path_).generation, committed);
    for (int r = 0; r < kRanks; ++r) EXPECT_EQ(CheckpointReader({r, kRanks}).read(path_).at("step").as_int(), 20 + r);
  }
  // The next save commits, and leaves no vote or file of the abandoned ones behind.
  run_ranks(-1, errors);
  for (const auto& e : errors) EXPECT_EQ(e, "");
  for (const auto& entry : std::filesystem::directory_iterator(path_)) {
    const std::string name = entry.path().filename().string();
    EXPECT_TRUE(name == "manifest.json" || generation_of(name) == read_manifest(path_).generation) << name;
  }
}

// A rank whose state never reached its writer votes against the save from where it is.
TEST_F(CheckpointTest, ARankThatAbandonsTheSaveFailsEveryRankAtOnce) {
  const WriterOptions options{.barrier_timeout = std::chrono::seconds(60)};
  const auto start = std::chrono::steady_clock::now();
  std::thread rank1([&] { CheckpointWriter({1, 2}, options).abandon(path_, "staging failed"); });
  const Error e = expect_error([&] { CheckpointWriter({0, 2}, options).write(path_, state(1)); });
  rank1.join();
  expect_contains(e, "rank 1 failed: staging failed");
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
  EXPECT_THROW(read_manifest(path_), Error);
}

TEST_F(CheckpointTest, ARankWhoseCommitNeverComesFailsWithinTheTimeout) {
  const Error e = expect_error([&] {
    CheckpointWriter({1, 2}, WriterOptions{.barrier_timeout = std::chrono::milliseconds(100)}).write(path_, state(1));
  });
  expect_contains(e, "rank 0 did not commit");
  EXPECT_THROW(read_manifest(path_), Error);
}

TEST_F(CheckpointTest, ACommitWaitsForMissingRanksOnlyUntilTheTimeout) {
  const Error e = expect_error([&] {
    CheckpointWriter({0, 2}, WriterOptions{.barrier_timeout = std::chrono::milliseconds(50)}).write(path_, state(1));
  });
  expect_contains(e, "rank 1 did not finish");
  EXPECT_THROW(read_manifest(path_), Error);  // nothing committed
}

TEST_F(CheckpointTest, AFullDiskLeavesThePreviousCheckpointIntact) {
  CheckpointWriter().write(path_, state(1));
  // A limit smaller than one data file.
  EXPECT_TRUE(testing::fails_with_file_size_limit(
      1 << 20, [&] { CheckpointWriter({}, WriterOptions{.overwrite = true}).write(path_, state(2)); }));
  EXPECT_EQ(CheckpointReader().read(path_).at("step").as_int(), 1);
  EXPECT_NO_THROW(verify_checkpoint(path_));
  // The next save cleans up what the failed one left.
  CheckpointWriter({}, WriterOptions{.overwrite = true}).write(path_, state(3));
  EXPECT_EQ(list_directory(path_).size(), 2u);
}

}  // namespace
}  // namespace fastdcp

namespace fastdcp {
namespace {

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Note [Buffered writes]: once a buffered save is durable its pages leave the page cache.
TEST_F(CheckpointTest, BufferedSavesLeaveTheirPagesOutOfThePageCache) {
  CheckpointWriter().write(path_, state(3));
  const File file = File::open(data_file(), File::Mode::kRead);
  const size_t size = file.size();
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, file.fd(), 0);
  ASSERT_NE(map, MAP_FAILED);
  std::vector<unsigned char> resident((size + page_size() - 1) / page_size());
  ASSERT_EQ(::mincore(map, size, resident.data()), 0);
  ::munmap(map, size);
  const size_t cached = static_cast<size_t>(std::count_if(resident.begin(), resident.end(), [](unsigned char r) { return r & 1; }));
  EXPECT_EQ(cached, 0u) << "of " << resident.size() << " pages";
}

TEST_F(CheckpointTest, DirectIoWritesTheSameBytesWithEitherEngine) {
  const Value source = state(5);
  CheckpointWriter({}, WriterOptions{.direct_io = false}).write(path_, source);
  const std::string buffered = file_bytes(data_file());
  std::vector<IoEngine> engines{IoEngine::kThreads};
  if (IoRing::available()) engines.push_back(IoEngine::kIoUring);  // Note [I/O engines]
  for (const IoEngine engine : engines) {
    const std::string direct_path = join_path(dir_, std::string("direct_") + to_string(engine));
    CheckpointWriter({}, WriterOptions{.direct_io = true, .io_engine = engine}).write(direct_path, source);
    const std::string direct = file_bytes(join_path(direct_path, read_manifest(direct_path).ranks[0].file));
    EXPECT_EQ(direct.size(), buffered.size()) << to_string(engine);
    EXPECT_TRUE(direct == buffered) << to_string(engine);
    for (const IoEngine read_engine : engines) {
      for (const bool direct_read : {true, false}) {
        const Value loaded =
            CheckpointReader({}, ReadOptions{.direct_io = direct_read, .io_engine = read_engine}).read(direct_path);
        EXPECT_EQ(loaded.at("step").as_int(), 5);
        EXPECT_TRUE(same_bytes(loaded.at("model").at("big").as_tensor(), source.at("model").at("big").as_tensor()));
      }
    }
  }
}

}  // namespace
}  // namespace fastdcp

namespace fastdcp {
namespace {

TEST(CheckpointOnTmpfs, WritesFallBackToBufferedWhereODirectIsRefused) {
  if (!path_exists("/dev/shm")) GTEST_SKIP() << "no /dev/shm on this machine";
  char pattern[] = "/dev/shm/fastdcp_tmpfs_XXXXXX";
  const std::string dir = ::mkdtemp(pattern);
  const std::string path = join_path(dir, "ck");
  CheckpointWriter().write(path, state(4));
  EXPECT_EQ(CheckpointReader().read(path).at("step").as_int(), 4);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace fastdcp
