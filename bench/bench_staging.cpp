// Staging throughput against memcpy baselines.
//
// Note [Staging engine] (stager.h) says staging cost grows with bytes, not tensor count, and that
// host copies use every copy thread. So each shape (1 x 1 GiB, 1024 x 1 MiB, 100,000 x 4 KiB) is
// measured as: memcpy of the same tensors on one thread and split over all hardware threads (the
// ideal), then DefaultStager::stage_now warm, cold, into shared memory, and async stage().
//
// Benchmarks are registered shape by shape (see main), and a shape's data is built on first use and
// dropped when the next shape starts, so only one shape's gigabytes are resident at a time and the
// expensive first touch of memory is paid once per shape, not once per repetition.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "fastdcp/memory/cuda_runtime.h"
#include "fastdcp/staging/stager.h"
#include "fastdcp/tensor/storage.h"
#include "fastdcp/tensor/tensor.h"
#include "fastdcp/tensor/value.h"

namespace {

using namespace fastdcp;

struct Shape {
  int64_t count;
  int64_t bytes_each;
  const char* name;
  uint64_t total() const { return static_cast<uint64_t>(count) * static_cast<uint64_t>(bytes_each); }
};

const Shape kShapes[] = {
    {1, int64_t{1} << 30, "1x1GiB"},
    {1024, int64_t{1} << 20, "1024x1MiB"},
    {100000, 4096, "100000x4KiB"},
};

// Timed bytes per repetition: enough iterations that one run is not dominated by noise, few
// enough that the whole suite with 5 repetitions stays within a few minutes on 2 cores.
constexpr uint64_t kWarmBytesPerRun = uint64_t{4} << 30;
constexpr uint64_t kColdBytesPerRun = uint64_t{1} << 30;  // each cold iteration faults in new memory

int64_t iterations_for(const Shape& shape, uint64_t bytes_per_run) {
  return std::max<int64_t>(1, static_cast<int64_t>((bytes_per_run + shape.total() - 1) / shape.total()));
}

unsigned hardware_threads() { return std::max(1u, std::thread::hardware_concurrency()); }

// A persistent set of copy threads, so the all-core baseline times the copy and not thread
// creation. The calling thread is worker 0; two barriers start and finish each job.
class CopyPool {
 public:
  explicit CopyPool(unsigned threads) : threads_(threads), start_(threads), done_(threads) {
    for (unsigned i = 1; i < threads_; ++i) workers_.emplace_back([this, i] { work(i); });
  }
  ~CopyPool() {
    stop_ = true;  // published to the workers by the barrier
    start_.arrive_and_wait();
    for (auto& worker : workers_) worker.join();
  }
  unsigned threads() const { return threads_; }

  void run(const std::function<void(unsigned)>& job) {
    job_ = &job;
    start_.arrive_and_wait();
    job(0);
    done_.arrive_and_wait();
  }

 private:
  void work(unsigned index) {
    for (;;) {
      start_.arrive_and_wait();
      if (stop_) return;
      (*job_)(index);
      done_.arrive_and_wait();
    }
  }

  unsigned threads_;
  std::barrier<> start_;
  std::barrier<> done_;
  bool stop_ = false;
  const std::function<void(unsigned)>* job_ = nullptr;
  std::vector<std::thread> workers_;
};

CopyPool& copy_pool() {
  static CopyPool pool(hardware_threads());
  return pool;
}

struct Segment {
  const std::byte* src;
  std::byte* dst;
  size_t n;
};

// Everything the benchmarks of one shape share.
struct ShapeData {
  const Shape* shape = nullptr;
  std::shared_ptr<const Value> dict;
  // memcpy baselines: one prefaulted destination arena, source tensor i -> its slice.
  std::vector<std::byte> arena;
  std::vector<Segment> segments;
  std::vector<std::vector<Segment>> per_thread;  // `segments` cut into equal byte shares
  std::vector<std::byte> flat_source;            // contiguous copy of all bytes (flat baseline)
  // The warm stager of the variant that ran last (warming costs a full first-touch staging).
  int stager_variant = -1;
  std::unique_ptr<DefaultStager> stager;
};

std::unique_ptr<ShapeData> build_shape(const Shape& shape) {
  auto data = std::make_unique<ShapeData>();
  data->shape = &shape;
  // Value::dict takes all entries at once: inserting 100,000 keys one by one checks duplicates
  // against every earlier key.
  DictEntries entries;
  entries.reserve(static_cast<size_t>(shape.count));
  for (int64_t i = 0; i < shape.count; ++i) {
    Storage storage = Storage::allocate_cpu(static_cast<size_t>(shape.bytes_each));
    // Non-zero data, so no layer can get away with mapping zero pages.
    std::memset(storage.data(), static_cast<int>(i % 255) + 1, static_cast<size_t>(shape.bytes_each));
    Tensor tensor = Tensor::contiguous(storage, DType::kF32, Dims{shape.bytes_each / 4});
    entries.emplace_back(DictKey("layers." + std::to_string(i) + ".weight"), Value(std::move(tensor)));
  }
  data->dict = std::make_shared<const Value>(Value::dict(std::move(entries)));
  return data;
}

ShapeData& shape_data(const Shape& shape) {
  static std::unique_ptr<ShapeData> current;
  if (!current || current->shape != &shape) {
    current.reset();  // free the previous shape before allocating this one
    current = build_shape(shape);
  }
  return *current;
}

// Fills the memcpy plan of `data` on first use.
ShapeData& memcpy_data(const Shape& shape) {
  ShapeData& data = shape_data(shape);
  if (!data.segments.empty()) return data;
  const uint64_t total = shape.total();
  data.arena.resize(total);  // value-initialised: the destination is faulted in up front
  data.segments.reserve(static_cast<size_t>(shape.count));
  uint64_t offset = 0;
  for (const auto& [key, value] : data.dict->entries()) {
    const Tensor& tensor = value.as_tensor();
    data.segments.push_back({static_cast<const std::byte*>(tensor.data_ptr()), data.arena.data() + offset,
                             static_cast<size_t>(tensor.nbytes())});
    offset += tensor.nbytes();
  }
  // Thread t copies bytes [t*total/T, (t+1)*total/T) of the concatenated tensors: a big tensor is
  // cut into parts, small ones are dealt out in runs (what the stager's engine promises to do).
  const unsigned threads = copy_pool().threads();
  data.per_thread.assign(threads, {});
  size_t seg = 0;
  uint64_t seg_begin = 0;  // byte position of segments[seg] in the concatenation
  for (unsigned t = 0; t < threads; ++t) {
    const uint64_t begin = total * t / threads;
    const uint64_t end = total * (t + 1) / threads;
    uint64_t pos = begin;
    while (pos < end) {
      while (seg_begin + data.segments[seg].n <= pos) seg_begin += data.segments[seg++].n;
      const Segment& s = data.segments[seg];
      const uint64_t skip = pos - seg_begin;
      const uint64_t n = std::min<uint64_t>(s.n - skip, end - pos);
      data.per_thread[t].push_back({s.src + skip, s.dst + skip, static_cast<size_t>(n)});
      pos += n;
    }
  }
  return data;
}

void copy_segments(const std::vector<Segment>& segments) {
  for (const Segment& s : segments) std::memcpy(s.dst, s.src, s.n);
}

void finish(benchmark::State& state, const Shape& shape) {
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(shape.total()));
  state.counters["tensors"] = static_cast<double>(shape.count);
}

void bm_memcpy_one_thread(benchmark::State& state, const Shape* shape) {
  ShapeData& data = memcpy_data(*shape);
  for (auto _ : state) {
    copy_segments(data.segments);
    benchmark::ClobberMemory();
  }
  finish(state, *shape);
}

void bm_memcpy_all_threads(benchmark::State& state, const Shape* shape) {
  ShapeData& data = memcpy_data(*shape);
  const std::function<void(unsigned)> job = [&data](unsigned t) { copy_segments(data.per_thread[t]); };
  for (auto _ : state) {
    copy_pool().run(job);
    benchmark::ClobberMemory();
  }
  finish(state, *shape);
}

// One memcpy of the shape's total bytes: the floor for staging many small tensors.
void bm_memcpy_flat_one_thread(benchmark::State& state, const Shape* shape) {
  ShapeData& data = memcpy_data(*shape);
  if (data.flat_source.empty()) {
    data.flat_source.resize(shape->total());
    for (const Segment& s : data.segments)
      std::memcpy(data.flat_source.data() + (s.dst - data.arena.data()), s.src, s.n);
  }
  for (auto _ : state) {
    std::memcpy(data.arena.data(), data.flat_source.data(), data.flat_source.size());
    benchmark::ClobberMemory();
  }
  finish(state, *shape);
}

enum Variant { kWarm, kCold, kWarmShared, kAsyncWarm };

StagingOptions options_for(Variant variant) {
  StagingOptions options;
  options.use_pinned_memory = false;
  options.use_shared_memory = variant == kWarmShared;
  options.use_async_staging = variant == kAsyncWarm;
  options.use_non_blocking_copy = false;
  return options;
}

std::shared_ptr<const CudaRuntime> no_cuda() {
  static const std::shared_ptr<const CudaRuntime> runtime = CudaRuntime::unavailable("bench");
  return runtime;
}

// A stager that has staged this shape once, so its cache holds every buffer.
DefaultStager& warm_stager(ShapeData& data, Variant variant) {
  if (data.stager_variant != variant) {
    data.stager.reset();
    data.stager_variant = -1;
    data.stager = std::make_unique<DefaultStager>(options_for(variant), no_cuda());
    data.stager->stage(data.dict).get();
    data.stager_variant = variant;
  }
  return *data.stager;
}

void bm_stage_warm(benchmark::State& state, const Shape* shape, Variant variant) {
  ShapeData& data = shape_data(*shape);
  DefaultStager& stager = warm_stager(data, variant);
  for (auto _ : state) {
    Value staged = stager.stage_now(*data.dict);
    benchmark::DoNotOptimize(&staged);
    // Dropping the staged tree is its consumer's cost, not staging's.
    state.PauseTiming();
    staged = Value();
    state.ResumeTiming();
  }
  finish(state, *shape);
}

void bm_stage_async_warm(benchmark::State& state, const Shape* shape) {
  ShapeData& data = shape_data(*shape);
  DefaultStager& stager = warm_stager(data, kAsyncWarm);
  for (auto _ : state) {
    Future<Value> future = stager.stage(data.dict);
    benchmark::DoNotOptimize(&future.get());
    state.PauseTiming();
    future = Future<Value>();
    state.ResumeTiming();
  }
  finish(state, *shape);
}

// A new stager per iteration: staging pays for allocating and first-touching its buffers.
void bm_stage_cold(benchmark::State& state, const Shape* shape) {
  ShapeData& data = shape_data(*shape);
  data.stager.reset();  // no warm buffers of an earlier variant stay resident
  data.stager_variant = -1;
  std::unique_ptr<DefaultStager> stager;
  Value staged;
  for (auto _ : state) {
    state.PauseTiming();
    staged = Value();
    stager.reset();
    stager = std::make_unique<DefaultStager>(options_for(kCold), no_cuda());
    state.ResumeTiming();
    staged = stager->stage_now(*data.dict);
    benchmark::DoNotOptimize(&staged);
  }
  finish(state, *shape);
}

void register_benchmarks() {
  for (const Shape& shape : kShapes) {
    const std::string suffix = std::string("/") + shape.name;
    const int64_t warm = iterations_for(shape, kWarmBytesPerRun);
    const int64_t cold = iterations_for(shape, kColdBytesPerRun);
    auto add = [&](const std::string& name, int64_t iterations, auto fn) {
      benchmark::RegisterBenchmark((name + suffix).c_str(), fn, &shape)
          ->Iterations(iterations)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
    };
    add("memcpy_1thread", warm, bm_memcpy_one_thread);
    add("memcpy_all_threads", warm, bm_memcpy_all_threads);
    if (shape.count > 1024) add("memcpy_flat_1thread", warm, bm_memcpy_flat_one_thread);
    add("stage_warm", warm, [](benchmark::State& s, const Shape* sh) { bm_stage_warm(s, sh, kWarm); });
    add("stage_cold", cold, bm_stage_cold);
    add("stage_warm_shm", warm, [](benchmark::State& s, const Shape* sh) { bm_stage_warm(s, sh, kWarmShared); });
    add("stage_async_warm", warm, bm_stage_async_warm);
  }
  benchmark::AddCustomContext("copy_threads", std::to_string(hardware_threads()));
}

}  // namespace

int main(int argc, char** argv) {
  register_benchmarks();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
