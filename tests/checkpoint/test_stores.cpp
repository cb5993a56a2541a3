// Checkpoints in every store backend, chosen by the path (Note [Stores]): saves, loads, failed and
// racing saves, damaged blobs, and the writer process, run alike over file, mem and shm.

#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <thread>

#include "fastdcp/checkpoint/checkpointer.h"
#include "fastdcp/common/error.h"
#include "fastdcp/storage/store.h"
#include "support/test_support.h"

namespace fastdcp {
namespace {

using testing::expect_error;
using testing::patterned_tensor;

struct Backend {
  std::string name;
  // A fresh checkpoint path of this backend, under `root` for file.
  std::function<std::string(const std::string& root, int n)> path;
};

void PrintTo(const Backend& backend, std::ostream* os) { *os << backend.name; }

std::string shm_name(int n) { return "test_ckpt_" + std::to_string(::getpid()) + "_" + std::to_string(n); }

class StoreCheckpointTest : public ::testing::TestWithParam<Backend> {
 protected:
  ~StoreCheckpointTest() override {
    for (int n = 0; n < made_; ++n) std::filesystem::remove_all("/dev/shm/fastdcp/" + shm_name(n));
  }
  std::string fresh_path() { return GetParam().path(dir_.path(), made_++); }

  testing::TempDir dir_{"fastdcp_stores"};
  int made_ = 0;
};

INSTANTIATE_TEST_SUITE_P(
    Backends, StoreCheckpointTest,
    ::testing::Values(Backend{"file", [](const std::string& root, int n) { return root + "/step" + std::to_string(n); }},
                      Backend{"mem",
                              [](const std::string&, int n) {
                                static std::atomic<int> unique{0};
                                return "mem://job" + std::to_string(unique++) + "/step" + std::to_string(n);
                              }},
                      Backend{"shm", [](const std::string&, int n) { return "shm://" + shm_name(n) + "/step10"; }}),
    [](const auto& info) { return info.param.name; });

Value state(int seed) {
  Value root = Value::dict();
  Value model = Value::dict();
  Tensor weight = patterned_tensor(DType::kF32, {1024, 1536}, seed);  // 6 MiB: two checksum chunks
  model.insert("weight", Value(weight));
  model.insert("weight_t", Value(weight.view_as({1536, 1024}, {1, 1536}, 0)));
  model.insert("bias", Value(patterned_tensor(DType::kBF16, {77}, seed + 1)));
  root.insert("model", std::move(model));
  root.insert("step", Value(int64_t{seed}));
  return root;
}

void expect_state(const Value& loaded, int seed) {
  EXPECT_EQ(loaded.at("step").as_int(), seed);
  const Value want = state(seed);
  for (const char* key : {"weight", "bias"}) {
    const Tensor& a = loaded.at("model").at(key).as_tensor();
    const Tensor& b = want.at("model").at(key).as_tensor();
    ASSERT_EQ(a.nbytes(), b.nbytes()) << key;
    EXPECT_EQ(std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()), 0) << key;
  }
  EXPECT_EQ(loaded.at("model").at("weight_t").as_tensor().storage(), loaded.at("model").at("weight").as_tensor().storage());
}

const WriterOptions kOverwrite{.overwrite = true};

TEST_P(StoreCheckpointTest, SavesAndLoadsEveryWay) {
  const std::string path = fresh_path();
  auto checkpointer = make_sync_checkpointer();
  checkpointer->save(path, state(1));
  expect_state(checkpointer->load(path), 1);
  expect_state(CheckpointReader({}, ReadOptions{.use_mmap = true}).read(path), 1);
  expect_state(CheckpointReader({}, ReadOptions{.verify_checksums = false, .direct_io = false}).read(path), 1);
  Value target = state(9);
  checkpointer->load_into(path, target, /*strict=*/true);
  expect_state(target, 1);
  const VerifyReport report = verify_checkpoint(path);
  EXPECT_EQ(report.files, 1);
  EXPECT_EQ(report.chunks, 3u);
  EXPECT_EQ(read_manifest(path).generation, 1u);
}

// A mapped load of a store whose mapping is shared (mem) gets a copy: writing to a loaded tensor
// never changes the checkpoint.
TEST_P(StoreCheckpointTest, LoadedTensorsNeverWriteIntoTheCheckpoint) {
  const std::string path = fresh_path();
  CheckpointWriter().write(path, state(1));
  for (const bool mmap : {true, false}) {
    const Value loaded = CheckpointReader({}, ReadOptions{.use_mmap = mmap}).read(path);
    std::memset(loaded.at("model").at("weight").as_tensor().data_ptr(), 0xAB, 64);
  }
  expect_state(CheckpointReader().read(path), 1);
  EXPECT_NO_THROW(verify_checkpoint(path));
}

TEST_P(StoreCheckpointTest, ReplacingIsAskedForAndLeavesOnlyTheNewGeneration) {
  const std::string path = fresh_path();
  CheckpointWriter().write(path, state(1));
  const Error refused = expect_error([&] { CheckpointWriter().write(path, state(2)); });
  EXPECT_EQ(refused.code(), ErrorCode::kFailedPrecondition) << refused.what();
  EXPECT_NE(std::string(refused.what()).find(path), std::string::npos) << refused.what();
  CheckpointWriter({}, kOverwrite).write(path, state(2));
  expect_state(CheckpointReader().read(path), 2);
  std::vector<std::string> blobs = storage::open_store(path)->list();
  std::erase_if(blobs, [](const std::string& name) { return name.ends_with(".lock"); });
  EXPECT_EQ(blobs, (std::vector<std::string>{"checkpoint_0.g2.safetensors", "manifest.json"}));
}

// A save that fails in the middle (after its data is written, before the commit) commits nothing:
// the previous checkpoint loads, and the next save commits.
TEST_P(StoreCheckpointTest, AFailedSaveLeavesTheCommittedCheckpoint) {
  struct FailingHook : WriterHook {
    void pre_commit(const std::string&) override { throw Error(ErrorCode::kInternal, "crash before the vote"); }
    void post_commit(const std::string&) override {}
  };
  const std::string path = fresh_path();
  CheckpointWriter().write(path, state(1));
  const Error e = expect_error(
      [&] { CheckpointWriter({}, kOverwrite, nullptr, std::make_shared<FailingHook>()).write(path, state(2)); });
  EXPECT_NE(std::string(e.what()).find("crash before the vote"), std::string::npos) << e.what();
  expect_state(CheckpointReader().read(path), 1);
  EXPECT_NO_THROW(verify_checkpoint(path));
  CheckpointWriter({}, kOverwrite).write(path, state(3));
  expect_state(CheckpointReader().read(path), 3);
  EXPECT_EQ(read_manifest(path).generation, 3u);  // generation 2 was abandoned, and is not used again
}

// Ranks vote through the store and rank 0 commits once every vote is in.
TEST_P(StoreCheckpointTest, RanksVoteAndCommitThroughTheStore) {
  const std::string path = fresh_path();
  auto barrier = std::make_shared<testing::ThreadBarrier>(3);
  std::vector<std::thread> ranks;
  std::atomic<int> failures{0};
  for (int r = 0; r < 3; ++r) {
    ranks.emplace_back([&, r] {
      try {
        CheckpointWriter({r, 3}, {}, barrier).write(path, state(10 + r));
      } catch (const Error&) {
        ++failures;
      }
    });
  }
  for (std::thread& t : ranks) t.join();
  EXPECT_EQ(failures, 0);
  for (int r = 0; r < 3; ++r) expect_state(CheckpointReader({r, 3}).read(path), 10 + r);
  EXPECT_EQ(verify_checkpoint(path).files, 3);
}

// Savers racing for one rank of one path: exactly one commits (the lock, or the manifest put if
// absent, refuses the other), and what is committed is whole.
TEST_P(StoreCheckpointTest, RacingSaversOfOneRankCommitExactlyOnce) {
  for (int round = 0; round < 4; ++round) {
    const std::string path = fresh_path();
    std::atomic<int> committed{0};
    std::vector<std::thread> savers;
    for (int s = 0; s < 3; ++s) {
      savers.emplace_back([&, s] {
        try {
          CheckpointWriter().write(path, state(20 + s));
          ++committed;
        } catch (const Error& e) {
          EXPECT_TRUE(e.code() == ErrorCode::kFailedPrecondition || e.code() == ErrorCode::kAlreadyExists) << e.what();
        }
      });
    }
    for (std::thread& t : savers) t.join();
    EXPECT_EQ(committed, 1);
    const Value loaded = CheckpointReader().read(path);
    expect_state(loaded, static_cast<int>(loaded.at("step").as_int()));
    EXPECT_NO_THROW(verify_checkpoint(path));
  }
}

// A rank file damaged in the store, by any backend: the load names the blob and the tensor.
TEST_P(StoreCheckpointTest, ADamagedRankFileIsDataLossNamingIt) {
  const std::string path = fresh_path();
  CheckpointWriter().write(path, state(1));
  auto store = storage::open_store(path);
  const std::string file = read_manifest(path).ranks[0].file;
  auto reader = store->open_reader(file);
  std::vector<char> bytes(reader->size());
  reader->read_at(bytes.data(), bytes.size(), 0);
  bytes[bytes.size() / 2] ^= 1;  // in the weight's data
  auto writer = store->open_writer(file);
  writer->append(bytes.data(), bytes.size());
  writer->commit();
  for (int how = 0; how < 3; ++how) {
    const Error e = expect_error([&] {
      if (how == 0) CheckpointReader().read(path);
      if (how == 1) verify_checkpoint(path);
      Value target = state(5);
      if (how == 2) CheckpointReader().read_into(path, target);
    });
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss) << e.what();
    EXPECT_NE(std::string(e.what()).find(path + "/" + file), std::string::npos) << e.what();
  }
  store->remove(file);
  const Error missing = expect_error([&] { CheckpointReader().read(path); });
  EXPECT_EQ(missing.code(), ErrorCode::kNotFound) << missing.what();
}

// The writer process saves to the stores it shares with the trainer (file, shm), and the trainer
// loads what it wrote; an in-process store is refused before anything is staged for it.
TEST_P(StoreCheckpointTest, TheWriterProcessSavesWhereItSharesTheStore) {
  CheckpointerOptions options;
  auto checkpointer = make_async_checkpointer(options);
  const std::string path = fresh_path();
  if (GetParam().name == "mem") {
    const Error e = expect_error([&] { checkpointer->save(path, std::make_shared<Value>(state(1))); });
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find("'" + path + "'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("shm://"), std::string::npos) << e.what();
    return;
  }
  auto [staged, written] = checkpointer->save(path, std::make_shared<Value>(state(1)));
  staged.get();
  const WriteStats stats = written.get();
  EXPECT_EQ(stats.bytes_written, storage::open_store(path)->open_reader(stats.file)->size());
  expect_state(checkpointer->load(path), 1);
  checkpointer->close();
}

TEST(StoreCheckpoint, AnUnknownSchemeIsAnInvalidArgumentNamingThePath) {
  for (const auto& op : std::vector<std::function<void()>>{[] { CheckpointWriter().write("s3://bucket/ckpt", state(1)); },
                                                           [] { CheckpointReader().read("s3://bucket/ckpt"); }}) {
    const Error e = expect_error(op);
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find("s3://bucket/ckpt"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("known: file://"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace fastdcp
