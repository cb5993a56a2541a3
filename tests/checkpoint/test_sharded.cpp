// Sharded tensors (Note [Sharded tensors]): saved on N simulated ranks, each with its own
// CheckpointWriter and one in-process barrier, and loaded on M ranks with other cuts. The oracle
// is the global tensor the shards were cut from: every loaded byte is compared with it.

#include <gtest/gtest.h>

#include <barrier>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "checkpoint/reshard.h"
#include "fastdcp/checkpoint/checkpoint.h"
#include "fastdcp/checkpoint/checkpointer.h"
#include "fastdcp/checkpoint/shared_state_dict.h"
#include "fastdcp/common/error.h"
#include "fastdcp/format/rank_file.h"
#include "fastdcp/staging/stager.h"
#include "support/test_support.h"

namespace fastdcp {
namespace {

using testing::patterned_tensor;
using testing::TempDir;

// Runs rank r's `work(r)` on n threads; returns each rank's error message ("" if none).
std::vector<std::string> on_ranks(int n, const std::function<void(int)>& work) {
  std::vector<std::string> errors(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      try {
        work(r);
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

// Saves trees(r) on n ranks; returns each rank's error.
std::vector<std::string> save(const std::string& path, int n, const std::function<Value(int)>& tree) {
  auto barrier = std::make_shared<testing::ThreadBarrier>(n);
  const WriterOptions options{.overwrite = true, .barrier_timeout = std::chrono::seconds(60)};
  return on_ranks(n, [&](int r) { CheckpointWriter({r, n}, options, barrier).write(path, tree(r)); });
}

void expect_no_errors(const std::vector<std::string>& errors) {
  for (size_t r = 0; r < errors.size(); ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

RankFileHeader read_header(const std::string& file) {
  const File f = File::open(file, File::Mode::kRead);
  return RankFileHeader::read([&](void* dst, uint64_t at, uint64_t n) { f.read_at(dst, n, at); }, f.size(), file);
}

Dims dims_of(std::vector<int64_t> v) { return Dims(std::span<const int64_t>(v)); }

// The view of `box` inside a global tensor.
Tensor box_view(const Tensor& global, const Box& box) {
  return fastdcp::box_view(global, Dims::zeros(global.dim()), box);
}

Tensor contiguous_copy(const Tensor& t) {
  Tensor out = Tensor::empty_cpu(t.dtype(), t.shape());
  copy_tensor(out, t);
  return out;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.shape() != b.shape()) return false;
  const Tensor ca = contiguous_copy(a), cb = contiguous_copy(b);
  return std::memcmp(ca.data_ptr(), cb.data_ptr(), ca.nbytes()) == 0;
}

// A random cut of `shape`: per dim, k pieces at random (uneven, possibly empty) cut points; the
// grid's non-empty cells.
std::vector<Box> random_grid(const Dims& shape, std::mt19937& rng) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> pieces(shape.size());
  for (size_t d = 0; d < shape.size(); ++d) {
    const int k = std::uniform_int_distribution<int>(1, 4)(rng);
    std::vector<int64_t> cuts{0, shape[d]};
    for (int i = 1; i < k; ++i) cuts.push_back(std::uniform_int_distribution<int64_t>(0, shape[d])(rng));
    std::sort(cuts.begin(), cuts.end());
    for (size_t i = 0; i + 1 < cuts.size(); ++i) pieces[d].emplace_back(cuts[i], cuts[i + 1] - cuts[i]);
  }
  std::vector<Box> out{Box{}};
  for (size_t d = 0; d < shape.size(); ++d) {
    std::vector<Box> next;
    for (const Box& b : out) {
      for (const auto& [at, size] : pieces[d]) {
        std::vector<int64_t> o(b.offset.begin(), b.offset.end()), s(b.sizes.begin(), b.sizes.end());
        o.push_back(at);
        s.push_back(size);
        next.push_back(Box{dims_of(o), dims_of(s)});
      }
    }
    out = std::move(next);
  }
  std::erase_if(out, [](const Box& b) { return b.empty(); });
  return out;
}

// A rank's sharded leaf holding `boxes` of `global`: the chunks are views of ONE local storage,
// each placed at a random gap and, at random, transposed-strided (a non-contiguous view), as a
// strided shard's narrowed views are.
ShardedTensor hold(const Tensor& global, const std::vector<Box>& boxes, std::mt19937& rng, bool filled = true) {
  ShardedTensor out;
  out.global_shape = global.shape();
  out.dtype = global.dtype();
  const int64_t item = dtype_bits(global.dtype()) / 8;
  int64_t total = 0;
  std::vector<int64_t> at;
  for (const Box& b : boxes) {
    total += std::uniform_int_distribution<int64_t>(0, 3)(rng);
    at.push_back(total);
    total += b.numel();
  }
  Tensor local = Tensor::empty_cpu(DType::kU8, {std::max<int64_t>(total, 1) * item});
  std::memset(local.data_ptr(), 0xEE, static_cast<size_t>(local.nbytes()));
  for (size_t i = 0; i < boxes.size(); ++i) {
    const Box& b = boxes[i];
    Dims strides = contiguous_strides(b.sizes);
    if (b.sizes.size() >= 2 && std::uniform_int_distribution<int>(0, 1)(rng)) {
      // Column-major: the strides of a transposed tensor.
      int64_t s = 1;
      for (size_t d = 0; d < b.sizes.size(); ++d) {
        strides[d] = s;
        s *= b.sizes[d];
      }
    }
    Tensor view(local.storage(), global.dtype(), b.sizes, strides, at[i]);
    if (filled) copy_tensor(view, box_view(global, b));
    out.chunks.push_back({b.offset, view});
  }
  return out;
}

DType random_dtype(std::mt19937& rng) {
  static const DType kDtypes[] = {DType::kF32, DType::kF16, DType::kBF16, DType::kC64, DType::kU8, DType::kI64, DType::kF64};
  return kDtypes[std::uniform_int_distribution<size_t>(0, std::size(kDtypes) - 1)(rng)];
}

Dims random_shape(std::mt19937& rng) {
  const int rank = std::uniform_int_distribution<int>(1, 4)(rng);
  std::vector<int64_t> s;
  for (int d = 0; d < rank; ++d) s.push_back(std::uniform_int_distribution<int>(0, 3)(rng) == 0 ? 1 : std::uniform_int_distribution<int64_t>(2, 11)(rng));
  return dims_of(s);
}

// Spreads `boxes` over `ranks` ranks at random; some ranks may hold none, some several.
std::vector<std::vector<Box>> deal(const std::vector<Box>& boxes, int ranks, std::mt19937& rng) {
  std::vector<std::vector<Box>> out(static_cast<size_t>(ranks));
  for (const Box& b : boxes) out[std::uniform_int_distribution<size_t>(0, out.size() - 1)(rng)].push_back(b);
  return out;
}

class ShardedTest : public ::testing::Test {
 protected:
  TempDir dir_{"fastdcp_sharded"};
  std::string path_ = dir_.path() + "/ckpt";
};

// The central property: random tensors, random cuts at save and at load, any world sizes; every
// byte equals the global tensor's, through sharded targets, plain targets and full loads.
TEST_F(ShardedTest, RandomCutsSavedOnNRanksLoadOnMRanksByteForByte) {
  for (int round = 0; round < 24; ++round) {
    std::mt19937 rng(1000 + round);
    const int saved_ranks = std::uniform_int_distribution<int>(1, 5)(rng);
    // Replicas: groups of R ranks hold the same boxes (R divides the world size).
    const int replicas = saved_ranks % 2 == 0 && round % 3 == 0 ? 2 : 1;
    std::vector<Tensor> globals;
    std::vector<std::vector<std::vector<Box>>> held;  // per key, per rank
    for (int k = 0; k < 3; ++k) {
      Tensor g = patterned_tensor(random_dtype(rng), random_shape(rng), 7 * round + k);
      held.push_back(deal(random_grid(g.shape(), rng), saved_ranks / replicas, rng));
      globals.push_back(g);
    }
    SCOPED_TRACE("round " + std::to_string(round) + ", " + std::to_string(saved_ranks) + " ranks, replicas " +
                 std::to_string(replicas));
    expect_no_errors(save(path_, saved_ranks, [&](int r) {
      std::mt19937 local(r * 31 + round);
      Value sd = Value::dict();
      for (size_t k = 0; k < globals.size(); ++k) {
        ShardedTensor s = hold(globals[k], held[k][static_cast<size_t>(r / replicas)], local);
        s.replica_index = r % replicas;
        s.replica_count = replicas;
        sd.insert("k" + std::to_string(k), Value(std::move(s)));
      }
      sd.insert("step", Value(int64_t{100 + r}));
      return sd;
    }));
    const Manifest manifest = read_manifest(path_);
    EXPECT_EQ(manifest.version, 2);
    ASSERT_EQ(manifest.index.size(), globals.size());
    EXPECT_EQ(verify_checkpoint(path_).files, saved_ranks);

    for (const int load_ranks : {1, 2, 3, 4, 8}) {
      std::vector<std::vector<std::vector<Box>>> wanted;
      for (const Tensor& g : globals) wanted.push_back(deal(random_grid(g.shape(), rng), load_ranks, rng));
      expect_no_errors(on_ranks(load_ranks, [&](int r) {
        std::mt19937 local(r * 17 + round);
        Value target = Value::dict();
        for (size_t k = 0; k < globals.size(); ++k) {
          if (k == 2) {  // a plain tensor target receives the whole tensor
            Tensor t = Tensor::empty_cpu(globals[k].dtype(), globals[k].shape());
            target.insert("k2", Value(t));
          } else {
            target.insert("k" + std::to_string(k), Value(hold(globals[k], wanted[k][static_cast<size_t>(r)], local, false)));
          }
        }
        target.insert("step", Value(int64_t{0}));
        const LoadResult result = CheckpointReader({r, load_ranks}).read_into(path_, target, /*strict=*/true);
        EXPECT_TRUE(result.missing_keys.empty());
        for (size_t k = 0; k < 2; ++k) {
          for (const ShardChunk& c : target.at("k" + std::to_string(k)).as_sharded().chunks) {
            EXPECT_TRUE(same_bytes(c.data, box_view(globals[k], c.box()))) << "k" << k << " at " << dims_text(c.offset);
          }
        }
        EXPECT_TRUE(same_bytes(target.at("k2").as_tensor(), globals[2]));
        // Not sharded: from this rank's own file, or rank 0's beyond the saved world size.
        EXPECT_EQ(target.at("step").as_int(), 100 + (r < saved_ranks ? r : 0));
      }));
    }
    // A load without a template: full tensors.
    const Value full = CheckpointReader({0, 3}).read(path_);
    for (size_t k = 0; k < globals.size(); ++k) {
      EXPECT_TRUE(same_bytes(full.at("k" + std::to_string(k)).as_tensor(), globals[k])) << "k" << k;
    }
  }
}

// Note [Writing replicas]: the replicas share the writing evenly, deterministically.
TEST_F(ShardedTest, ReplicasShareTheWritingAndEachBoxIsWrittenOnce) {
  constexpr int kLeaves = 6;
  std::vector<Tensor> globals;
  for (int k = 0; k < kLeaves; ++k) globals.push_back(patterned_tensor(DType::kF32, {64, 8}, k));
  expect_no_errors(save(path_, 2, [&](int r) {
    std::mt19937 rng(5);
    Value sd = Value::dict();
    for (int k = 0; k < kLeaves; ++k) {
      ShardedTensor s = hold(globals[k], {Box{{0, 0}, {64, 8}}}, rng);
      s.replica_index = r;
      s.replica_count = 2;
      sd.insert("p" + std::to_string(k), Value(std::move(s)));
    }
    return sd;
  }));
  const Manifest manifest = read_manifest(path_);
  int by_rank[2] = {0, 0};
  for (const IndexEntry& e : manifest.index) {
    ASSERT_EQ(e.chunks.size(), 1u) << e.key;  // written once
    ++by_rank[e.chunks[0].rank];
  }
  EXPECT_EQ(by_rank[0], kLeaves / 2);
  EXPECT_EQ(by_rank[1], kLeaves / 2);
  // Every copy is filled by a load.
  expect_no_errors(on_ranks(2, [&](int r) {
    std::mt19937 rng(9);
    Value target = Value::dict();
    for (int k = 0; k < kLeaves; ++k) {
      ShardedTensor s = hold(globals[k], {Box{{0, 0}, {64, 8}}}, rng, false);
      s.replica_index = r;
      s.replica_count = 2;
      target.insert("p" + std::to_string(k), Value(std::move(s)));
    }
    CheckpointReader({r, 2}).read_into(path_, target, true);
    for (int k = 0; k < kLeaves; ++k) {
      EXPECT_TRUE(same_bytes(target.at("p" + std::to_string(k)).as_sharded().chunks[0].data, globals[k]));
    }
  }));
}

TEST(ReplicaWrites, GreedyByBytesTiesToTheLowestReplica) {
  std::vector<ShardedTensor> leaves(4);
  const int64_t sizes[] = {100, 10, 10, 100};
  for (size_t i = 0; i < 4; ++i) {
    leaves[i].global_shape = {sizes[i]};
    leaves[i].dtype = DType::kU8;
    leaves[i].replica_count = 2;
    leaves[i].chunks.push_back({{0}, Tensor::empty_cpu(DType::kU8, {sizes[i]})});
  }
  std::vector<const ShardedTensor*> ptrs;
  for (auto& l : leaves) ptrs.push_back(&l);
  // Replica 0 takes 100, replica 1 takes 10 and 10, then 100 goes to replica 1 (20 < 100).
  EXPECT_EQ(replica_writes(ptrs), (std::vector<bool>{true, false, false, false}));
  for (auto& l : leaves) l.replica_index = 1;
  EXPECT_EQ(replica_writes(ptrs), (std::vector<bool>{false, true, true, true}));
}

// A rank file's "S" record: the local shard is a plain safetensors entry named by the key path,
// and the file is version 3; a file without sharded leaves stays version 1.
TEST_F(ShardedTest, RankFileRecordAndPlainEntryNaming) {
  const Tensor global = patterned_tensor(DType::kF32, {6, 4}, 3);
  expect_no_errors(save(path_, 2, [&](int r) {
    Value sd = Value::dict();
    ShardedTensor s;
    s.global_shape = {6, 4};
    s.dtype = DType::kF32;
    s.chunks.push_back({{r * 3, 0}, contiguous_copy(box_view(global, Box{{r * 3, 0}, {3, 4}}))});
    Value model = Value::dict();
    model.insert("w", Value(std::move(s)));
    sd.insert("model", std::move(model));
    return sd;
  }));
  const Manifest manifest = read_manifest(path_);
  const std::string file = join_path(path_, manifest.ranks[1].file);
  const RankFileHeader header = read_header(file);
  EXPECT_EQ(header.format_version(), 3);
  ASSERT_EQ(header.entries().size(), 1u);
  EXPECT_EQ(header.entries()[0].name, "model.w");
  EXPECT_EQ(header.entries()[0].shape, (Dims{3, 4}));
  const auto sharded = header.sharded();
  ASSERT_EQ(sharded.size(), 1u);
  EXPECT_EQ(sharded[0].path, "model.w");
  EXPECT_EQ(sharded[0].global_shape, (Dims{6, 4}));
  ASSERT_EQ(sharded[0].chunks.size(), 1u);
  EXPECT_EQ(sharded[0].chunks[0].first, (Dims{3, 0}));
  // The index: per key, dtype, global shape and every rank's box.
  ASSERT_EQ(manifest.index.size(), 1u);
  EXPECT_EQ(manifest.index[0].key, "model.w");
  ASSERT_EQ(manifest.index[0].chunks.size(), 2u);
  EXPECT_EQ(manifest.index[0].chunks[1].rank, 1);
  EXPECT_EQ(manifest.index[0].chunks[1].offset, (Dims{3, 0}));
  // Rank 1's part read on its own, as saved: its box of the global tensor.
  Value target = Value::dict();
  Value model = Value::dict();
  ShardedTensor mine;
  mine.global_shape = {6, 4};
  mine.dtype = DType::kF32;
  mine.chunks.push_back({{3, 0}, Tensor::empty_cpu(DType::kF32, {3, 4})});
  model.insert("w", Value(std::move(mine)));
  target.insert("model", std::move(model));
  CheckpointReader({1, 2}).read_into(path_, target, true);
  EXPECT_TRUE(same_bytes(target.at("model").at("w").as_sharded().chunks[0].data, box_view(global, Box{{3, 0}, {3, 4}})));
}

TEST_F(ShardedTest, SavesRefuseChunksThatDoNotTileDisagreeOrRepeatAKeyPath) {
  const Tensor global = patterned_tensor(DType::kF32, {8, 2}, 1);
  auto leaf = [&](std::vector<Box> boxes, DType dtype = DType::kF32, Dims shape = {8, 2}) {
    ShardedTensor s;
    s.global_shape = shape;
    s.dtype = dtype;
    for (const Box& b : boxes) s.chunks.push_back({b.offset, Tensor::empty_cpu(dtype, b.sizes)});
    return s;
  };
  auto expect_all_fail = [&](const std::vector<std::string>& errors, const std::string& needle) {
    for (size_t r = 0; r < errors.size(); ++r) EXPECT_NE(errors[r].find(needle), std::string::npos) << "rank " << r << ": " << errors[r];
  };
  // A gap: rank 1 holds rows 4..6 of 8.
  auto errors = save(path_, 2, [&](int r) {
    Value sd = Value::dict();
    sd.insert("w", Value(leaf({r == 0 ? Box{{0, 0}, {4, 2}} : Box{{4, 0}, {2, 2}}})));
    return sd;
  });
  expect_all_fail(errors, "'w'");
  expect_all_fail(errors, "cover 12 of its 16 elements");
  EXPECT_THROW(read_manifest(path_), Error);  // nothing committed
  // An overlap between ranks.
  errors = save(path_, 2, [&](int r) {
    Value sd = Value::dict();
    sd.insert("w", Value(leaf({r == 0 ? Box{{0, 0}, {5, 2}} : Box{{3, 0}, {5, 2}}})));
    return sd;
  });
  expect_all_fail(errors, "overlap");
  // Ranks disagree on the global shape.
  errors = save(path_, 2, [&](int r) {
    Value sd = Value::dict();
    sd.insert("w", Value(leaf({Box{{r * 4, 0}, {4, 2}}}, DType::kF32, r == 0 ? Dims{8, 2} : Dims{9, 2})));
    return sd;
  });
  expect_all_fail(errors, "disagree on the sharded tensor at 'w'");
  // A chunk outside the global shape, and two leaves spelling one key path: refused by the rank.
  errors = save(path_, 1, [&](int) {
    Value sd = Value::dict();
    sd.insert("w", Value(leaf({Box{{6, 0}, {4, 2}}})));
    return sd;
  });
  EXPECT_NE(errors[0].find("outside its global shape"), std::string::npos) << errors[0];
  errors = save(path_, 1, [&](int) {
    Value sd = Value::dict();
    Value a = Value::dict();
    a.insert("b", Value(leaf({Box{{0, 0}, {8, 2}}})));
    sd.insert("a", std::move(a));
    sd.insert("a.b", Value(leaf({Box{{0, 0}, {8, 2}}})));
    return sd;
  });
  EXPECT_NE(errors[0].find("two sharded tensors at the key path 'a.b'"), std::string::npos) << errors[0];
}

// Saves 4 ranks of row blocks of two keys and returns the globals.
std::vector<Tensor> save_rows(const std::string& path) {
  std::vector<Tensor> globals{patterned_tensor(DType::kF32, {16, 4}, 1), patterned_tensor(DType::kI64, {16, 4}, 2)};
  expect_no_errors(save(path, 4, [&](int r) {
    Value sd = Value::dict();
    for (size_t k = 0; k < globals.size(); ++k) {
      ShardedTensor s;
      s.global_shape = {16, 4};
      s.dtype = globals[k].dtype();
      s.chunks.push_back({{r * 4, 0}, contiguous_copy(box_view(globals[k], Box{{r * 4, 0}, {4, 4}}))});
      sd.insert(k == 0 ? "a" : "b", Value(std::move(s)));
    }
    return sd;
  }));
  return globals;
}

Value full_target(const Tensor& like, const char* key) {
  Value t = Value::dict();
  t.insert(key, Value(Tensor::empty_cpu(like.dtype(), like.shape())));
  return t;
}

void flip_byte(const std::string& file, uint64_t at) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(at));
  char c;
  f.read(&c, 1);
  c ^= 0x5A;
  f.seekp(static_cast<std::streamoff>(at));
  f.write(&c, 1);
}

// A load reads only what it needs: damage in one key's bytes fails only loads of that key, naming
// the file and the key.
TEST_F(ShardedTest, DamagedChunkBytesFailOnlyTheLoadsThatReadThemNamingFileAndKey) {
  const auto globals = save_rows(path_);
  const Manifest manifest = read_manifest(path_);
  const std::string file = join_path(path_, manifest.ranks[2].file);
  const RankFileHeader header = read_header(file);
  const StoredEntry* b = nullptr;
  for (const StoredEntry& e : header.entries()) {
    if (e.name == "b") b = &e;
  }
  ASSERT_NE(b, nullptr);
  flip_byte(file, header.data_offset() + b->begin + 5);
  Value a = full_target(globals[0], "a");
  CheckpointReader({0, 1}).read_into(path_, a);
  EXPECT_TRUE(same_bytes(a.at("a").as_tensor(), globals[0]));
  Value bt = full_target(globals[1], "b");
  try {
    CheckpointReader({0, 1}).read_into(path_, bt);
    ADD_FAILURE() << "damage not detected";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
    EXPECT_NE(std::string(e.what()).find(manifest.ranks[2].file), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("'b'"), std::string::npos) << e.what();
  }
  EXPECT_THROW(verify_checkpoint(path_), Error);
  // A truncated file of another rank: named, with the key that needed it.
  std::filesystem::resize_file(join_path(path_, manifest.ranks[3].file), header.data_offset() + 10);
  try {
    CheckpointReader({0, 1}).read_into(path_, a);
    ADD_FAILURE() << "truncation not detected";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
    EXPECT_NE(std::string(e.what()).find(manifest.ranks[3].file), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("'a'"), std::string::npos) << e.what();
  }
}

// Within one stored tensor, a load reads (and verifies) only the 4 MiB checksum chunks that its
// boxes touch: damage elsewhere in the same tensor does not fail it.
TEST_F(ShardedTest, ASmallBoxReadsOnlyTheChecksumChunksItTouches) {
  constexpr int64_t kElements = int64_t{4} << 20;  // F32: 16 MiB, four checksum chunks
  const Tensor global = patterned_tensor(DType::kF32, {kElements}, 6);
  expect_no_errors(save(path_, 1, [&](int) {
    ShardedTensor s;
    s.global_shape = {kElements};
    s.dtype = DType::kF32;
    s.chunks.push_back({{0}, global});
    Value sd = Value::dict();
    sd.insert("big", Value(std::move(s)));
    return sd;
  }));
  const Manifest manifest = read_manifest(path_);
  const std::string file = join_path(path_, manifest.ranks[0].file);
  const RankFileHeader header = read_header(file);
  flip_byte(file, header.data_offset() + header.entries()[0].begin + (uint64_t{12} << 20) + 5);  // chunk 3
  auto load_box = [&](int64_t at, int64_t n) {
    Value target = Value::dict();
    ShardedTensor s;
    s.global_shape = {kElements};
    s.dtype = DType::kF32;
    s.chunks.push_back({{at}, Tensor::empty_cpu(DType::kF32, {n})});
    target.insert("big", Value(std::move(s)));
    CheckpointReader({0, 2}).read_into(path_, target, true);
    return target.at("big").as_sharded().chunks[0].data;
  };
  const Tensor first = load_box(1000, 5000);
  EXPECT_TRUE(same_bytes(first, box_view(global, Box{{1000}, {5000}})));
  try {
    (void)load_box(int64_t{3} << 20, 10);
    ADD_FAILURE() << "damage in chunk 3 not detected";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
    EXPECT_NE(std::string(e.what()).find("'big'"), std::string::npos) << e.what();
  }
}

// Note [Landing reads in the target]: overlaps that start and end inside checksum chunks (a
// 2 -> 3 reshard of a 24 MiB tensor) land in their targets, while the bytes only the checksums need
// go to scratch: the values are the saved ones, with or without checksums, and damage anywhere in
// a chunk an overlap touches fails the load, in the part it wants or in the part it does not.
TEST_F(ShardedTest, OverlapsInsideChecksumChunksLandInTheTargetAndEveryChunkTheyTouchIsVerified) {
  constexpr int64_t kRows = 6 * 1024 + 77, kCols = 1024;  // F32 rows of 4 KiB: about 24 MiB
  const Tensor global = patterned_tensor(DType::kF32, {kRows, kCols}, 11);
  const int64_t split = kRows / 2 + 5;  // saved on 2 ranks, unevenly
  expect_no_errors(save(path_, 2, [&](int r) {
    ShardedTensor s;
    s.global_shape = global.shape();
    s.dtype = DType::kF32;
    const Box box = r == 0 ? Box{dims_of({0, 0}), dims_of({split, kCols})}
                           : Box{dims_of({split, 0}), dims_of({kRows - split, kCols})};
    s.chunks.push_back({box.offset, contiguous_copy(box_view(global, box))});
    Value sd = Value::dict();
    sd.insert("w", Value(std::move(s)));
    return sd;
  }));
  // Three ranks' rows, and a box of columns (a strided overlap) beside them.
  const std::vector<Box> boxes = {Box{dims_of({0, 0}), dims_of({kRows / 3, kCols})},
                                  Box{dims_of({kRows / 3, 0}), dims_of({kRows / 3 + 1, kCols})},
                                  Box{dims_of({2 * (kRows / 3) + 1, 0}), dims_of({kRows - 2 * (kRows / 3) - 1, kCols})},
                                  Box{dims_of({100, 3}), dims_of({kRows - 200, 5})}};
  auto load = [&](const Box& box, bool verify) {
    ReadOptions options;
    options.verify_checksums = verify;
    Value target = Value::dict();
    ShardedTensor s;
    s.global_shape = global.shape();
    s.dtype = DType::kF32;
    s.chunks.push_back({box.offset, Tensor::empty_cpu(DType::kF32, box.sizes)});
    target.insert("w", Value(std::move(s)));
    CheckpointReader({0, 3}, options).read_into(path_, target, true);
    return target.at("w").as_sharded().chunks[0].data;
  };
  for (const bool verify : {true, false}) {
    for (const Box& box : boxes) {
      EXPECT_TRUE(same_bytes(load(box, verify), box_view(global, box)))
          << "box at " << dims_text(box.offset) << ", verify " << verify;
    }
  }
  const Manifest manifest = read_manifest(path_);
  const std::string file = join_path(path_, manifest.ranks[1].file);
  const RankFileHeader header = read_header(file);
  const uint64_t entry_begin = header.data_offset() + header.entries()[0].begin;
  // Rank 1's rows start at row `split`; the middle box starts inside the same chunk, later.
  const Box& middle = boxes[1];
  const uint64_t row_bytes = kCols * 4;
  const uint64_t wanted_from = static_cast<uint64_t>(middle.offset[0] + middle.sizes[0] - split) * row_bytes;
  ASSERT_GT(wanted_from % kChecksumChunkBytes, uint64_t{0}) << "the box must end inside a chunk";
  // Damage after the middle box's last row, in the chunk holding it: only the checksum reads it.
  const uint64_t unwanted = wanted_from + 100;
  ASSERT_EQ(unwanted / kChecksumChunkBytes, wanted_from / kChecksumChunkBytes);
  flip_byte(file, entry_begin + unwanted);
  try {
    (void)load(middle, true);
    ADD_FAILURE() << "damage in bytes the box does not want, in a chunk it reads, not detected";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
    EXPECT_NE(std::string(e.what()).find("'w'"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(same_bytes(load(boxes[0], true), box_view(global, boxes[0])));  // rank 0's file alone
  flip_byte(file, entry_begin + unwanted);  // mended
  flip_byte(file, entry_begin + wanted_from - 100);  // now in bytes the box wants
  EXPECT_THROW((void)load(middle, true), Error);
}

// The manifest and the rank files must agree (verify and loads check it); the manifest's index
// itself must tile.
TEST_F(ShardedTest, AnIndexThatDisagreesWithTheRankFilesOrDoesNotTileIsRefused) {
  const auto globals = save_rows(path_);
  const std::string manifest_file = join_path(path_, kManifestName);
  std::string original;
  {
    std::ifstream in(manifest_file);
    original.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto rewrite = [&](const std::function<void(Manifest&)>& edit) {
    Manifest m = parse_manifest(original, manifest_file);
    edit(m);
    std::ofstream(manifest_file, std::ios::trunc) << render_manifest(m);
  };
  // Rank 1's and rank 2's boxes of 'a' swapped: still a tiling, but not what the files hold.
  rewrite([](Manifest& m) { std::swap(m.index[0].chunks[1].rank, m.index[0].chunks[2].rank); });
  for (const auto& run : std::vector<std::function<void()>>{
           [&] { (void)verify_checkpoint(path_); },
           [&] {
             Value t = full_target(globals[0], "a");
             CheckpointReader({0, 1}).read_into(path_, t);
           }}) {
    try {
      run();
      ADD_FAILURE() << "disagreement not detected";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
      EXPECT_NE(std::string(e.what()).find("disagrees with the manifest's index at 'a'"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("checkpoint_"), std::string::npos) << e.what();
    }
  }
  // A chunk moved outside the shape; a chunk dropped (a gap): the manifest is refused.
  rewrite([](Manifest& m) { m.index[0].chunks[3].offset = {14, 0}; });
  EXPECT_THROW(read_manifest(path_), Error);
  rewrite([](Manifest& m) { m.index[1].chunks.pop_back(); });
  try {
    read_manifest(path_);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
    EXPECT_NE(std::string(e.what()).find("'b'"), std::string::npos) << e.what();
  }
}

TEST_F(ShardedTest, MismatchedTargetsAreRefusedNamingTheKey) {
  const auto globals = save_rows(path_);
  Value wrong_shape = Value::dict();
  wrong_shape.insert("a", Value(Tensor::empty_cpu(DType::kF32, {16, 5})));
  Value wrong_dtype = Value::dict();
  ShardedTensor s;
  s.global_shape = {16, 4};
  s.dtype = DType::kF64;
  s.chunks.push_back({{0, 0}, Tensor::empty_cpu(DType::kF64, {2, 4})});
  wrong_dtype.insert("a", Value(std::move(s)));
  for (Value* t : {&wrong_shape, &wrong_dtype}) {
    for (bool strict : {false, true}) {
      try {
        CheckpointReader({0, 2}).read_into(path_, *t, strict);
        ADD_FAILURE();
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
        EXPECT_NE(std::string(e.what()).find("'a'"), std::string::npos) << e.what();
      }
    }
  }
}

// Without an index, another world size is refused as before.
TEST_F(ShardedTest, ACheckpointWithoutIndexStillLoadsOnlyAtItsWorldSize) {
  expect_no_errors(save(path_, 2, [](int r) {
    Value sd = Value::dict();
    sd.insert("t", Value(patterned_tensor(DType::kF32, {4}, r)));
    return sd;
  }));
  EXPECT_EQ(read_manifest(path_).version, 1);
  try {
    CheckpointReader({0, 3}).read(path_);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("written by 2 ranks"), std::string::npos) << e.what();
  }
}

// A checkpoint of one rank, unsharded (a consolidated one), fills sharded targets at any world size:
// each rank's boxes, strided views included, are cut from the saved tensor.
TEST_F(ShardedTest, OneRanksUnshardedCheckpointFillsShardedTargetsAtAnyWorldSize) {
  std::mt19937 rng(7);
  const Tensor global = patterned_tensor(DType::kBF16, {9, 5}, 3);
  expect_no_errors(save(path_, 1, [&](int) {
    Value sd = Value::dict();
    sd.insert("w", Value(global));
    sd.insert("step", Value(int64_t{12}));
    return sd;
  }));
  for (int world : {1, 2, 3}) {
    const std::vector<Box> boxes = random_grid(global.shape(), rng);
    const auto dealt = deal(boxes, world, rng);
    for (int r = 0; r < world; ++r) {
      Value target = Value::dict();
      target.insert("w", Value(hold(global, dealt[static_cast<size_t>(r)], rng, /*filled=*/false)));
      target.insert("step", Value(int64_t{0}));
      CheckpointReader({r, world}).read_into(path_, target, /*strict=*/true);
      for (const ShardChunk& c : target.at("w").as_sharded().chunks) {
        EXPECT_TRUE(same_bytes(c.data, box_view(global, c.box()))) << "world " << world << " at " << dims_text(c.offset);
      }
      EXPECT_EQ(target.at("step").as_int(), 12);
    }
  }
  // Another dtype or global shape is refused, naming the key.
  for (const auto& [dtype, shape] : {std::pair{DType::kF32, Dims{9, 5}}, std::pair{DType::kBF16, Dims{9, 6}}}) {
    ShardedTensor s;
    s.global_shape = shape;
    s.dtype = dtype;
    s.chunks.push_back({{0, 0}, Tensor::empty_cpu(dtype, {2, 5})});
    Value target = Value::dict();
    target.insert("w", Value(std::move(s)));
    try {
      CheckpointReader({0, 2}).read_into(path_, target);
      ADD_FAILURE();
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find("'w'"), std::string::npos) << e.what();
    }
  }
}

TEST(ShardedBoxes, BoxViewIsTheBoxInsideItsHolder) {
  const Tensor global = patterned_tensor(DType::kF32, {6, 4}, 1);
  const Tensor rows = box_view(global, Box{{2, 0}, {3, 4}});  // rows 2-4, held at offset [2, 0]
  const Tensor inner = fastdcp::box_view(rows, {2, 0}, Box{{3, 1}, {2, 2}});
  EXPECT_TRUE(same_bytes(inner, box_view(global, Box{{3, 1}, {2, 2}})));
  EXPECT_THROW(fastdcp::box_view(rows, {2, 0}, Box{{1, 0}, {2, 2}}), Error);  // starts above the holder
  EXPECT_THROW(fastdcp::box_view(rows, {2, 0}, Box{{4, 3}, {2, 2}}), Error);  // ends past it
}

// Staging keeps a sharded leaf a sharded leaf over staged storages; views of one local storage
// stay views of one staged storage; the writer process's message carries every replica's chunks.
TEST(ShardedStaging, ChunksStageAsViewsAndTravelToTheWriterProcess) {
  const Tensor global = patterned_tensor(DType::kBF16, {10, 6}, 4);
  std::mt19937 rng(3);
  ShardedTensor s = hold(global, {Box{{0, 0}, {3, 6}}, Box{{5, 2}, {4, 3}}}, rng);
  s.replica_index = 1;
  s.replica_count = 3;
  Value sd = Value::dict();
  sd.insert("w", Value(s));
  DefaultStager stager(testing::cpu_staging(), CudaRuntime::unavailable("CPU-only test"));
  const Value staged = stager.stage_now(sd);
  const ShardedTensor& st = staged.at("w").as_sharded();
  ASSERT_EQ(st.chunks.size(), 2u);
  EXPECT_EQ(st.chunks[0].data.storage(), st.chunks[1].data.storage());
  EXPECT_NE(st.chunks[0].data.storage(), s.chunks[0].data.storage());
  EXPECT_EQ(st.replica_index, 1);
  EXPECT_EQ(st.replica_count, 3);
  EXPECT_EQ(st.global_shape, s.global_shape);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(st.chunks[i].offset, s.chunks[i].offset);
    EXPECT_EQ(st.chunks[i].data.strides(), s.chunks[i].data.strides());
    EXPECT_TRUE(same_bytes(st.chunks[i].data, box_view(global, s.chunks[i].box())));
  }
  const SharedStateDict shared = share_state_dict(staged);
  std::vector<int> fds;
  for (int fd : shared.fds) fds.push_back(::dup(fd));
  const Value attached = attach_state_dict(shared.message, fds);
  const ShardedTensor& at = attached.at("w").as_sharded();
  EXPECT_EQ(at.replica_index, 1);
  EXPECT_EQ(at.replica_count, 3);
  ASSERT_EQ(at.chunks.size(), 2u);
  for (size_t i = 0; i < 2; ++i) EXPECT_TRUE(same_bytes(at.chunks[i].data, box_view(global, s.chunks[i].box())));
}

// The async checkpointer: staged, sent to the writer process, written there (the writer process
// assigns the replicas' writing), loaded whole.
TEST_F(ShardedTest, TheAsyncCheckpointerSavesShardedLeavesThroughItsWriterProcess) {
  const Tensor global = patterned_tensor(DType::kF16, {9, 5}, 8);
  std::mt19937 rng(4);
  ShardedTensor s = hold(global, {Box{{0, 0}, {4, 5}}, Box{{4, 0}, {5, 2}}, Box{{4, 2}, {5, 3}}}, rng);
  s.replica_count = 2;  // replica 0 of 2, with one leaf: it writes
  auto sd = std::make_shared<Value>(Value::dict());
  sd->insert("w", Value(std::move(s)));
  auto checkpointer = make_async_checkpointer();
  auto [staged, written] = checkpointer->save(path_, sd);
  staged.get();
  written.get();
  EXPECT_TRUE(same_bytes(checkpointer->load(path_).at("w").as_tensor(), global));
  checkpointer->close();
  ASSERT_EQ(read_manifest(path_).index.size(), 1u);
  EXPECT_EQ(read_manifest(path_).index[0].chunks.size(), 3u);
}

// ---- the planner ---------------------------------------------------------------------------

TEST(ReshardPlanner, OverlapsPerTargetBoxAndCoverage) {
  IndexEntry e{"w", DType::kF32, {8, 4}, {}};
  for (int r = 0; r < 4; ++r) e.chunks.push_back({r, {r * 2, 0}, {2, 4}});
  // Rows 1..5 touch chunks 0, 1, 2.
  const auto overlaps = detail::plan_overlaps(e, {Box{{1, 0}, {5, 4}}, Box{{0, 0}, {8, 4}}});
  ASSERT_EQ(overlaps.size(), 7u);
  EXPECT_EQ(overlaps[0].box, (Box{{1, 0}, {1, 4}}));
  EXPECT_EQ(overlaps[2].box, (Box{{4, 0}, {2, 4}}));
  e.chunks.pop_back();
  try {
    (void)detail::plan_overlaps(e, {Box{{5, 0}, {3, 4}}});
    ADD_FAILURE();
  } catch (const Error& err) {
    EXPECT_EQ(err.code(), ErrorCode::kDataLoss);
    EXPECT_NE(std::string(err.what()).find("'w'"), std::string::npos);
  }
}

TEST(ReshardPlanner, ContiguousRunsAreOneRequest) {
  // Rows 2..5 of a row-major [8, 4] F32 view: one run of 64 bytes at byte 32.
  EXPECT_EQ(detail::view_byte_ranges(4, {4, 4}, {4, 1}, 8), (std::vector<detail::ByteRange>{{32, 96}}));
  // Column 1 of the same: 8 runs of one element, 12 bytes apart.
  const auto column = detail::view_byte_ranges(4, {8, 1}, {4, 1}, 1);
  ASSERT_EQ(column.size(), 8u);
  EXPECT_EQ(column[0], (detail::ByteRange{4, 8}));
  EXPECT_EQ(detail::merge_ranges(column, 64), (std::vector<detail::ByteRange>{{4, 120}}));
  // Aligned to checksum chunks of 100 bytes, capped at the storage's 250.
  EXPECT_EQ(detail::merge_ranges({{10, 20}, {230, 240}}, 0, 100, 250),
            (std::vector<detail::ByteRange>{{0, 100}, {200, 250}}));
  // A transposed view: each column is a run.
  EXPECT_EQ(detail::view_byte_ranges(1, {3, 2}, {1, 3}, 0), (std::vector<detail::ByteRange>{{0, 6}}));
}

TEST(ShardedBoxes, OverlapSweepAndTiling) {
  std::vector<Box> grid;
  for (int i = 0; i < 64; ++i) {
    for (int j = 0; j < 64; ++j) grid.push_back(Box{{i * 2, j * 3}, {2, 3}});
  }
  EXPECT_FALSE(find_overlap(grid));
  EXPECT_EQ(tiling_problem({128, 192}, grid), "");
  grid.push_back(Box{{5, 7}, {1, 1}});
  EXPECT_TRUE(find_overlap(grid));
  grid.pop_back();
  grid.pop_back();
  EXPECT_NE(tiling_problem({128, 192}, grid).find("cover"), std::string::npos);
}

}  // namespace
}  // namespace fastdcp
