#include <gtest/gtest.h>

#include <atomic>
#include <deque>
#include <cstring>
#include <new>
#include <numeric>
#include <thread>
#include <unistd.h>

#include "fastdcp/common/logging.h"
#include "fastdcp/staging/stager.h"
#include "support/test_support.h"

// Counts heap allocations while enabled (see the WarmStagingAllocatesNothingPerTensor test).
namespace {
std::atomic<bool> g_count_allocations{false};
std::atomic<uint64_t> g_allocations{0};
}  // namespace
void* operator new(size_t n) {
  if (g_count_allocations.load(std::memory_order_relaxed)) g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }

namespace fastdcp {
namespace {


std::shared_ptr<const CudaRuntime> no_cuda() { return CudaRuntime::unavailable("CPU-only test"); }

void fill(const Tensor& t, uint8_t seed) {
  auto* p = static_cast<uint8_t*>(t.storage().data());
  for (size_t i = 0; i < t.storage().nbytes(); ++i) p[i] = static_cast<uint8_t>(seed + i * 31);
}

bool same_bytes(const Storage& a, const Storage& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

std::shared_ptr<const Value> share(Value v) { return std::make_shared<const Value>(std::move(v)); }

TEST(DefaultStager, SixViewsOfOneBaseStageIntoOneBuffer) {
  Tensor base = Tensor::empty_cpu(DType::kF32, {10, 10});
  fill(base, 1);
  Value sd = Value::dict();
  sd.insert("flat", base.view_as({100}, {1}, 0));
  sd.insert("square", base);
  sd.insert("inner", base.view_as({6, 6}, {10, 1}, 22));   // [2:8, 2:8]
  sd.insert("left", base.view_as({10, 5}, {10, 1}, 0));    // [:, :5]
  sd.insert("flat_mid", base.view_as({50}, {1}, 10));      // view(100)[10:60]
  sd.insert("transposed", base.view_as({10, 10}, {1, 10}, 0));

  DefaultStager stager(testing::cpu_staging(), no_cuda());
  Value staged = stager.stage_now(sd);
  const Storage& buffer = staged.at("square").as_tensor().storage();
  EXPECT_NE(buffer, base.storage());
  EXPECT_TRUE(same_bytes(buffer, base.storage()));
  for (const auto& [key, value] : staged.entries()) {
    const Tensor& out = value.as_tensor();
    const Tensor& in = sd.at(key).as_tensor();
    EXPECT_EQ(out.storage(), buffer) << key.str();
    EXPECT_EQ(out.shape(), in.shape()) << key.str();
    EXPECT_EQ(out.strides(), in.strides()) << key.str();
    EXPECT_EQ(out.storage_offset(), in.storage_offset()) << key.str();
    EXPECT_TRUE(out.device().is_cpu());
  }
  EXPECT_EQ(stager.stats().bytes_copied, 400u);  // the storage is copied once
}

TEST(DefaultStager, StagedTensorsKeepTheirTraits) {
  Tensor z = Tensor::empty_cpu(DType::kC64, {4});
  z.set_traits({.conj = true, .neg = true, .requires_grad = true, .parameter = true, .framework_dtype = "x"});
  Value sd = Value::dict();
  sd.insert("z", z);
  sd.insert("tail", z.view_as({2}, {1}, 2));
  sd.insert("plain", Tensor::empty_cpu(DType::kF32, {2}));
  DefaultStager stager(testing::cpu_staging(), no_cuda());
  const Value staged = stager.stage_now(sd);
  EXPECT_EQ(staged.at("z").as_tensor().traits(), z.traits());
  EXPECT_EQ(staged.at("tail").as_tensor().traits(), z.traits());  // a view keeps them too
  EXPECT_TRUE(staged.at("plain").as_tensor().traits().is_default());
}

TEST(DefaultStager, CacheReusesBuffersAcrossCallsAndShowsNewValues) {
  Tensor a = Tensor::empty_cpu(DType::kF32, {1000});
  Tensor b = Tensor::empty_cpu(DType::kI64, {10});
  Value sd = Value::dict();
  sd.insert("a", a);
  sd.insert("b", b);
  DefaultStager stager(testing::cpu_staging(), no_cuda());
  fill(a, 1);
  Value first = stager.stage_now(sd);
  fill(a, 2);
  Value second = stager.stage_now(sd);
  EXPECT_EQ(first.at("a").as_tensor().data_ptr(), second.at("a").as_tensor().data_ptr());
  EXPECT_EQ(first.at("b").as_tensor().data_ptr(), second.at("b").as_tensor().data_ptr());
  EXPECT_TRUE(same_bytes(second.at("a").as_tensor().storage(), a.storage()));
  StagerStats s = stager.stats();
  EXPECT_EQ(s.cache_misses, 2u);
  EXPECT_EQ(s.cache_hits, 2u);
  EXPECT_EQ(s.cache_entries, 2u);
}

// Note [Staging leases]: a held buffer is never written; once released it is reused.
TEST(DefaultStager, LeasedBuffersAreNotOverwrittenUntilReleased) {
  Tensor a = Tensor::empty_cpu(DType::kU8, {int64_t{3} << 20});  // a buffer of its own
  Tensor b = Tensor::empty_cpu(DType::kU8, {100});               // a slab block
  Value sd = Value::dict();
  sd.insert("a", a);
  sd.insert("b", b);
  DefaultStager stager(testing::cpu_staging(/*async=*/true, /*shared=*/true), no_cuda());
  auto stage = [&](uint8_t seed, std::shared_ptr<const void> lease) {
    fill(a, seed);
    fill(b, seed);
    StageCallOptions call;
    call.lease = std::move(lease);
    return stager.stage(share(sd.clone()), call).take();
  };
  auto lease1 = std::make_shared<int>(1);
  Value first = stage(1, lease1);
  auto lease2 = std::make_shared<int>(2);
  Value second = stage(2, lease2);
  for (const char* key : {"a", "b"}) {
    EXPECT_NE(second.at(key).as_tensor().data_ptr(), first.at(key).as_tensor().data_ptr()) << key;
    EXPECT_TRUE(same_bytes(second.at(key).as_tensor().storage(), sd.at(key).as_tensor().storage())) << key;
  }
  EXPECT_EQ(stager.stats().leased_skips, 2u);
  fill(a, 1);
  fill(b, 1);
  EXPECT_TRUE(same_bytes(first.at("a").as_tensor().storage(), a.storage()));  // untouched by the later call
  EXPECT_TRUE(same_bytes(first.at("b").as_tensor().storage(), b.storage()));

  // An unleased call respects holds too, and stages into the cached buffers once they are released.
  Value third = stage(3, nullptr);
  EXPECT_NE(third.at("a").as_tensor().data_ptr(), second.at("a").as_tensor().data_ptr());
  EXPECT_EQ(stager.stats().leased_skips, 4u);
  Value fourth = stage(4, nullptr);
  EXPECT_EQ(fourth.at("a").as_tensor().data_ptr(), third.at("a").as_tensor().data_ptr());
  EXPECT_EQ(stager.stats().leased_skips, 4u);

  // Two saves in flight, round after round: released buffers return to the pool and are reused.
  lease1.reset();
  lease2.reset();
  first = Value();
  second = Value();
  third = Value();
  fourth = Value();
  std::deque<std::pair<std::shared_ptr<int>, Value>> in_flight;
  uint64_t reserved_after_warmup = 0;
  for (int round = 0; round < 12; ++round) {
    auto lease = std::make_shared<int>(round);
    Value staged = stage(static_cast<uint8_t>(round), lease);
    in_flight.emplace_back(std::move(lease), std::move(staged));
    if (in_flight.size() > 2) in_flight.pop_front();  // the oldest write finished
    if (round == 3) reserved_after_warmup = stager.memory_stats().total_reserved();
  }
  EXPECT_EQ(stager.memory_stats().total_reserved(), reserved_after_warmup);
}

TEST(DefaultStager, StagedCopyIsIndependentOfLaterSourceChanges) {
  Tensor t = Tensor::empty_cpu(DType::kU8, {4096});
  fill(t, 3);
  Value sd = Value::dict();
  sd.insert("t", t);
  DefaultStager stager(testing::cpu_staging(), no_cuda());
  Value staged = stager.stage_now(sd);
  std::vector<uint8_t> expected(static_cast<uint8_t*>(t.data_ptr()), static_cast<uint8_t*>(t.data_ptr()) + 4096);
  std::memset(t.data_ptr(), 0xFF, 4096);
  EXPECT_EQ(std::memcmp(staged.at("t").as_tensor().data_ptr(), expected.data(), 4096), 0);
}

TEST(DefaultStager, ResizedStorageGetsANewBuffer) {
  Tensor t = Tensor::empty_cpu(DType::kF32, {16});
  Value sd = Value::dict();
  sd.insert("t", t);
  DefaultStager stager(testing::cpu_staging(), no_cuda());
  Value first = stager.stage_now(sd);
  // Free to zero and regrow bigger, as sharded-parameter frameworks do.
  Storage storage = t.storage();
  storage.reset(nullptr, 0);
  Storage bigger = Storage::allocate_cpu(256);
  std::memset(bigger.data(), 9, 256);
  storage.reset(bigger.data(), 256, std::make_shared<Storage>(bigger));
  Value resized = Value::dict();
  resized.insert("t", Tensor::contiguous(storage, DType::kF32, {64}));
  Value second = stager.stage_now(resized);
  const Tensor& out = second.at("t").as_tensor();
  EXPECT_EQ(out.storage().nbytes(), 256u);
  EXPECT_TRUE(same_bytes(out.storage(), bigger));
  EXPECT_EQ(first.at("t").as_tensor().storage().nbytes(), 64u);  // the earlier result is intact
}

TEST(DefaultStager, EntriesOfDeadStoragesAreDropped) {
  DefaultStager stager(testing::cpu_staging(), no_cuda());
  {
    Value sd = Value::dict();
    sd.insert("t", Tensor::empty_cpu(DType::kF32, {1 << 20}));
    stager.stage_now(sd);
    EXPECT_EQ(stager.stats().cache_entries, 1u);
  }
  Value other = Value::dict();
  other.insert("u", Tensor::empty_cpu(DType::kF32, {4}));
  stager.stage_now(other);
  EXPECT_EQ(stager.stats().cache_entries, 1u);  // "t" is gone, "u" was added
  stager.release_unused_memory();
  // The 4 MiB buffer of "t" is unmapped; only the slab holding "u" remains.
  EXPECT_EQ(stager.memory_stats().total_reserved(), HostPoolOptions{}.slab_bytes);
}

TEST(DefaultStager, EmptyZeroDimAndNonTensorLeaves) {
  Value sd = Value::dict();
  Tensor scalar = Tensor::empty_cpu(DType::kF64, {});
  *static_cast<double*>(scalar.data_ptr()) = 2.5;
  sd.insert("scalar", scalar);
  sd.insert("empty", Tensor::empty_cpu(DType::kF32, {0, 3}));
  sd.insert("step", 7);
  sd.insert("lr", 1e-3);
  sd.insert("name", "adam");
  sd.insert("blob", Bytes{std::string("\0\1\2", 3)});
  sd.insert("flag", true);
  sd.insert("nothing", Value());
  Value groups = Value::list();
  Value& betas = groups.append(Value::tuple());
  betas.append(0.9);
  betas.append(0.999);
  sd.insert("betas", std::move(groups));

  DefaultStager stager(testing::cpu_staging(), no_cuda());
  Value staged = stager.stage_now(sd);
  EXPECT_DOUBLE_EQ(*static_cast<double*>(staged.at("scalar").as_tensor().data_ptr()), 2.5);
  EXPECT_EQ(staged.at("scalar").as_tensor().dim(), 0u);
  EXPECT_EQ(staged.at("empty").as_tensor().shape(), (Dims{0, 3}));
  EXPECT_EQ(staged.at("step").as_int(), 7);
  EXPECT_DOUBLE_EQ(staged.at("lr").as_double(), 1e-3);
  EXPECT_EQ(staged.at("name").as_string(), "adam");
  EXPECT_EQ(staged.at("blob").as_bytes().data, std::string("\0\1\2", 3));
  EXPECT_TRUE(staged.at("flag").as_bool());
  EXPECT_TRUE(staged.at("nothing").is_none());
  EXPECT_EQ(staged.at("betas")[0].kind(), Value::Kind::kTuple);
  EXPECT_DOUBLE_EQ(staged.at("betas")[0][1].as_double(), 0.999);
  EXPECT_EQ(staged.entries()[3].first.as_string(), "lr");  // order kept
}

TEST(DefaultStager, EveryDTypeAndIntegerKeys) {
  Value state = Value::dict();
  for (int i = 0; i < kNumDTypes; ++i) {
    const auto dtype = static_cast<DType>(i);
    Tensor t = Tensor::empty_cpu(dtype, {2, 8});
    fill(t, static_cast<uint8_t>(i));
    state.insert(i, t);
  }
  Value sd = Value::dict();
  sd.insert("state", std::move(state));
  DefaultStager stager(testing::cpu_staging(), no_cuda());
  Value staged = stager.stage_now(sd);
  const Value& out = staged.at("state");
  ASSERT_EQ(out.size(), static_cast<size_t>(kNumDTypes));
  for (int i = 0; i < kNumDTypes; ++i) {
    EXPECT_TRUE(out.entries()[i].first.is_int());
    const Tensor& in = sd.at("state").at(i).as_tensor();
    const Tensor& got = out.at(i).as_tensor();
    EXPECT_EQ(got.dtype(), in.dtype());
    EXPECT_TRUE(same_bytes(got.storage(), in.storage())) << dtype_name(in.dtype());
  }
}

TEST(DefaultStager, HundredThousandTinyTensors) {
  constexpr int kCount = 100000;
  Value sd = Value::dict();
  std::vector<Tensor> sources;
  sources.reserve(kCount);
  for (int i = 0; i < kCount; ++i) {
    Tensor t = Tensor::empty_cpu(DType::kI32, {1});
    *static_cast<int32_t*>(t.data_ptr()) = i;
    sources.push_back(t);
    sd.insert(i, t);
  }
  DefaultStager stager(testing::cpu_staging(), no_cuda());
  for (int round = 0; round < 2; ++round) {
    Value staged = stager.stage_now(sd);
    ASSERT_EQ(staged.size(), static_cast<size_t>(kCount));
    for (int i = 0; i < kCount; i += 997) {
      EXPECT_EQ(*static_cast<int32_t*>(staged.entries()[i].second.as_tensor().data_ptr()), i);
    }
  }
  EXPECT_EQ(stager.stats().cache_hits, static_cast<uint64_t>(kCount));
  // Tiny storages share slabs instead of taking a mapping each.
  EXPECT_LT(stager.memory_stats().buffers, 100u);
}

TEST(DefaultStager, TenThousandLevelsDeep) {
  constexpr int kDepth = 10000;
  Value root = Value::dict();
  Value* cursor = &root;
  Tensor t = Tensor::empty_cpu(DType::kF32, {4});
  fill(t, 5);
  for (int i = 0; i < kDepth; ++i) {
    cursor = i % 2 ? &cursor->append(Value::dict()) : &cursor->insert("next", Value::list());
  }
  cursor->insert("leaf", t);
  DefaultStager stager(testing::cpu_staging(/*async=*/true), no_cuda());
  Value staged = stager.stage(share(std::move(root))).take();
  const Value* c = &staged;
  for (int i = 0; i < kDepth; ++i) c = i % 2 ? &(*c)[0] : &c->at("next");
  EXPECT_TRUE(same_bytes(c->at("leaf").as_tensor().storage(), t.storage()));
}

TEST(DefaultStager, NonContiguousAndOverlappingViews) {
  Tensor base = Tensor::empty_cpu(DType::kF16, {8, 8});
  fill(base, 11);
  Value sd = Value::list();
  sd.append(base.view_as({8, 8}, {1, 8}, 0));       // transposed
  sd.append(base.view_as({4, 8}, {0, 1}, 8));       // broadcast row (stride 0)
  sd.append(base.view_as({3, 3}, {9, 1}, 1));       // diagonal-ish strides
  DefaultStager stager(testing::cpu_staging(), no_cuda());
  Value staged = stager.stage_now(sd);
  for (size_t i = 0; i < 3; ++i) {
    const Tensor& in = sd[i].as_tensor();
    const Tensor& out = staged[i].as_tensor();
    EXPECT_EQ(out.strides(), in.strides());
    EXPECT_EQ(out.storage(), staged[0].as_tensor().storage());
    // Element-by-element through the strides.
    for (int64_t r = 0; r < in.shape()[0]; ++r) {
      for (int64_t c = 0; c < in.shape()[1]; ++c) {
        const int64_t off = (in.storage_offset() + r * in.strides()[0] + c * in.strides()[1]) * 2;
        EXPECT_EQ(std::memcmp(static_cast<char*>(out.storage().data()) + off,
                              static_cast<char*>(in.storage().data()) + off, 2), 0);
      }
    }
  }
}

TEST(DefaultStager, AsyncStagingFromSeveralThreadsKeepsEachResultRight) {
  DefaultStager stager(testing::cpu_staging(/*async=*/true), no_cuda());
  constexpr int kThreads = 4, kPerThread = 25;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        // Each thread stages its own fresh storages: results must not mix.
        Tensor x = Tensor::empty_cpu(DType::kI32, {256});
        std::iota(static_cast<int32_t*>(x.data_ptr()), static_cast<int32_t*>(x.data_ptr()) + 256, t * 1000 + i);
        Value sd = Value::dict();
        sd.insert("x", x);
        Value staged = stager.stage(share(std::move(sd))).take();
        const auto* got = static_cast<const int32_t*>(staged.at("x").as_tensor().data_ptr());
        if (got[0] != t * 1000 + i || got[255] != t * 1000 + i + 255) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(stager.stats().stage_calls, static_cast<uint64_t>(kThreads * kPerThread));
}

TEST(DefaultStager, AsyncStagesRunInSubmissionOrder) {
  DefaultStager stager(testing::cpu_staging(/*async=*/true), no_cuda());
  Tensor t = Tensor::empty_cpu(DType::kI32, {1});
  auto sd = std::make_shared<Value>(Value::dict());
  sd->insert("t", t);
  std::vector<int> order;
  std::mutex m;
  std::vector<Future<Value>> futures;
  for (int i = 0; i < 20; ++i) {
    futures.push_back(stager.stage(sd));
    futures.back().on_ready([&, i](const Future<Value>&) {
      std::lock_guard lock(m);
      order.push_back(i);
    });
  }
  stager.close();  // callbacks run on the staging thread, which close() joins
  std::lock_guard lock(m);
  std::vector<int> expected(20);
  std::iota(expected.begin(), expected.end(), 0);
  EXPECT_EQ(order, expected);
}

TEST(DefaultStager, SharedMemoryBuffersAreReportedAndMappable) {
  Tensor t = Tensor::empty_cpu(DType::kF32, {1 << 18});
  fill(t, 4);
  Value sd = Value::dict();
  sd.insert("t", t);
  sd.insert("small", Tensor::empty_cpu(DType::kF32, {3}));
  DefaultStager stager(testing::cpu_staging(false, /*shared=*/true), no_cuda());
  Value staged = stager.stage_now(sd);
  for (const auto& [key, value] : staged.entries()) {
    const HostMemoryInfo& info = value.as_tensor().storage().host_info();
    EXPECT_TRUE(info.shared) << key.str();
    EXPECT_FALSE(info.pinned) << key.str();
    EXPECT_GE(info.shared_fd, 0) << key.str();
  }
  const HostMemoryInfo& info = staged.at("t").as_tensor().storage().host_info();
  std::vector<char> via_fd(1 << 20);
  ASSERT_EQ(pread(info.shared_fd, via_fd.data(), via_fd.size(), static_cast<off_t>(info.shared_offset)),
            static_cast<ssize_t>(via_fd.size()));
  EXPECT_EQ(std::memcmp(via_fd.data(), t.data_ptr(), via_fd.size()), 0);
  EXPECT_GT(stager.memory_stats().shared_bytes(), 0u);
}

TEST(DefaultStager, NonBlockingCopyWithoutAcceleratorNamesTheOption) {
  StagingOptions o = testing::cpu_staging();
  o.use_non_blocking_copy = true;
  try {
    DefaultStager stager(o, no_cuda());
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("use_non_blocking_copy"), std::string::npos) << e.what();
  }
}

TEST(DefaultStager, PinnedWithoutCudaIsDowngradedWithAWarning) {
  std::string warning;
  auto previous = set_warning_sink([&](const std::string& m) { warning = m; });
  StagingOptions o = testing::cpu_staging();
  o.use_pinned_memory = true;
  DefaultStager stager(o, no_cuda());
  set_warning_sink(previous);
  EXPECT_TRUE(stager.pinning_downgraded());
  EXPECT_NE(warning.find("pin_memory"), std::string::npos);
  Value sd = Value::dict();
  sd.insert("t", Tensor::empty_cpu(DType::kF32, {100}));
  EXPECT_FALSE(stager.stage_now(sd).at("t").as_tensor().storage().host_info().pinned);
}

TEST(DefaultStager, CudaTensorWithoutCudaIsAClearError) {
  Storage fake_device = Storage::wrap(reinterpret_cast<void*>(0x1000), 64, Device::cuda(0));
  Value sd = Value::dict();
  sd.insert("w", Tensor::contiguous(fake_device, DType::kF32, {16}));
  DefaultStager stager(testing::cpu_staging(), no_cuda());
  try {
    stager.stage_now(sd);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cuda:0"), std::string::npos) << e.what();
  }
}

TEST(DefaultStager, UseAfterCloseIsAClearErrorAndStagedTreesSurvive) {
  DefaultStager stager(testing::cpu_staging(/*async=*/true), no_cuda());
  Value sd = Value::dict();
  Tensor t = Tensor::empty_cpu(DType::kF32, {1000});
  fill(t, 8);
  sd.insert("t", t);
  Value staged = stager.stage(share(sd.clone())).take();
  stager.close();
  stager.close();  // idempotent
  EXPECT_TRUE(stager.closed());
  EXPECT_THROW(stager.stage(share(sd.clone())), Error);
  EXPECT_THROW(stager.stage_now(sd), Error);
  EXPECT_TRUE(same_bytes(staged.at("t").as_tensor().storage(), t.storage()));
}

TEST(DefaultStager, CloseFinishesQueuedWorkAndDestructionInFlightIsSafe) {
  std::vector<Future<Value>> futures;
  Tensor t = Tensor::empty_cpu(DType::kU8, {8 << 20});
  fill(t, 1);
  auto sd = std::make_shared<Value>(Value::dict());
  sd->insert("t", t);
  {
    DefaultStager stager(testing::cpu_staging(/*async=*/true), no_cuda());
    for (int i = 0; i < 8; ++i) futures.push_back(stager.stage(sd));
    stager.close();
    for (auto& f : futures) EXPECT_TRUE(f.ready());
    futures.clear();
  }
  {
    DefaultStager stager(testing::cpu_staging(/*async=*/true), no_cuda());
    for (int i = 0; i < 8; ++i) futures.push_back(stager.stage(sd));
  }  // destroyed with work queued
  for (auto& f : futures) EXPECT_TRUE(same_bytes(f.get().at("t").as_tensor().storage(), t.storage()));
}

TEST(DefaultStager, MemoryBudgetExceededIsAClearError) {
  StagingOptions o = testing::cpu_staging();
  o.memory_budget_bytes = 1 << 20;
  DefaultStager stager(o, no_cuda());
  Value sd = Value::dict();
  sd.insert("big", Tensor::empty_cpu(DType::kU8, {4 << 20}));
  try {
    stager.stage_now(sd);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kResourceExhausted);
  }
  Value small = Value::dict();
  small.insert("ok", Tensor::empty_cpu(DType::kU8, {1000}));
  EXPECT_NO_THROW(stager.stage_now(small));  // the stager still works
}

TEST(DefaultStager, WarmStagingAllocatesNothingPerTensor) {
  constexpr int kCount = 5000;
  Value sd = Value::dict();
  for (int i = 0; i < kCount; ++i) {
    sd.insert("model.layers." + std::to_string(i) + ".self_attn.q_proj.weight", Tensor::empty_cpu(DType::kBF16, {4, 8}));
  }
  DefaultStager stager(testing::cpu_staging(), no_cuda());
  stager.stage_now(sd);  // cold: buffers, cache entries and scratch space are created
  g_allocations = 0;
  g_count_allocations = true;
  Value staged = stager.stage_now(sd);
  g_count_allocations = false;
  EXPECT_EQ(staged.size(), static_cast<size_t>(kCount));
  // A handful for the result's containers, none per tensor.
  EXPECT_LT(g_allocations.load(), 16u) << g_allocations.load() << " allocations for " << kCount << " tensors";
}

}  // namespace
}  // namespace fastdcp
