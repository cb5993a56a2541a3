// Real-GPU staging tests: correctness of device-to-host staging and its measured bandwidth.
// Every test skips when no CUDA device is available (see Note [CUDA is optional]).

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "fastdcp/common/error.h"
#include "fastdcp/memory/cuda_runtime.h"
#include "fastdcp/memory/host_buffer.h"
#include "fastdcp/staging/stager.h"
#include "fastdcp/tensor/tensor.h"
#include "fastdcp/tensor/value.h"

namespace fastdcp {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double gbps(uint64_t bytes, double seconds) { return static_cast<double>(bytes) / seconds / 1e9; }

// A host pattern that differs per storage and per byte position.
std::vector<uint8_t> make_pattern(size_t nbytes, uint64_t seed) {
  std::vector<uint8_t> out(nbytes);
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  size_t i = 0;
  for (; i + 8 <= nbytes; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(out.data() + i, &x, 8);
  }
  for (; i < nbytes; ++i) out[i] = static_cast<uint8_t>(i ^ seed);
  return out;
}

class GpuStaging : public ::testing::Test {
 protected:
  void SetUp() override {
    cuda_ = CudaRuntime::instance();
    if (!cuda_->available()) GTEST_SKIP() << cuda_->unavailable_reason();
  }

  // A device storage holding `pattern`, freed with its last handle.
  Storage device_storage(const std::vector<uint8_t>& pattern) {
    void* ptr = cuda_->device_malloc(pattern.size());
    cuda_->memcpy_host_to_device(ptr, pattern.data(), pattern.size());
    auto runtime = cuda_;
    std::shared_ptr<const void> keep_alive(ptr, [runtime](const void* p) { runtime->device_free(const_cast<void*>(p)); });
    return Storage::wrap(ptr, pattern.size(), Device::cuda(cuda_->current_device()), std::move(keep_alive));
  }

  // A pageable host-to-device cudaMemcpy may return before the data reaches the device; a
  // device-to-host cudaMemcpy does not, and orders after it on the legacy stream.
  void drain(const Storage& any) {
    uint8_t byte = 0;
    cuda_->memcpy_device_to_host(&byte, any.data(), 1);
  }

  static StagingOptions options() {
    StagingOptions o;
    o.use_async_staging = true;
    o.use_shared_memory = true;
    return o;
  }

  std::shared_ptr<CudaRuntime> cuda_;
};

TEST_F(GpuStaging, LargeBufferStagesCorrectlyAndReportsBandwidth) {
  constexpr size_t kBytes = size_t{256} << 20;
  const auto pattern = make_pattern(kBytes, 1);
  Storage storage = device_storage(pattern);
  drain(storage);
  Tensor t = Tensor::contiguous(storage, DType::kF32, {static_cast<int64_t>(kBytes / 4)});
  auto make_tree = [&] {
    Value tree = Value::dict();
    tree.insert("weight", Value(t));
    return std::make_shared<const Value>(std::move(tree));
  };

  DefaultStager stager(options(), cuda_);
  ASSERT_FALSE(stager.pinning_downgraded());
  const auto cold_start = Clock::now();
  Value cold = stager.stage(make_tree()).take();
  const double cold_s = seconds_since(cold_start);
  const Tensor& staged = cold.at("weight").as_tensor();
  ASSERT_TRUE(staged.device().is_cpu());
  ASSERT_EQ(staged.storage().nbytes(), kBytes);
  EXPECT_TRUE(staged.storage().host_info().pinned);
  EXPECT_EQ(std::memcmp(staged.storage().data(), pattern.data(), kBytes), 0);

  // Warm: the cached pinned buffer is reused, so this measures the copy path alone.
  const auto changed = make_pattern(kBytes, 2);
  cuda_->memcpy_host_to_device(storage.data(), changed.data(), kBytes);
  drain(storage);
  const auto warm_start = Clock::now();
  Value warm = stager.stage(make_tree()).take();
  const double warm_s = seconds_since(warm_start);
  EXPECT_EQ(std::memcmp(warm.at("weight").as_tensor().storage().data(), changed.data(), kBytes), 0);

  // Baseline: one synchronous cudaMemcpy into pinned memory of the same size (after a warm-up).
  HostBuffer pinned = HostBuffer::allocate(kBytes, {.pinned = true}, cuda_);
  cuda_->memcpy_device_to_host(pinned.data(), storage.data(), kBytes);
  const auto plain_start = Clock::now();
  cuda_->memcpy_device_to_host(pinned.data(), storage.data(), kBytes);
  const double plain_s = seconds_since(plain_start);
  EXPECT_EQ(std::memcmp(pinned.data(), changed.data(), kBytes), 0);

  std::cout << std::fixed << std::setprecision(2) << "[gpu] 256 MiB D2H: cold stage " << gbps(kBytes, cold_s)
            << " GB/s, warm stage " << gbps(kBytes, warm_s) << " GB/s, plain pinned cudaMemcpy "
            << gbps(kBytes, plain_s) << " GB/s" << std::endl;
  stager.close();
}

TEST_F(GpuStaging, ThousandSmallBuffersStageCorrectly) {
  constexpr int kCount = 1000;
  std::vector<std::vector<uint8_t>> patterns;
  std::vector<Tensor> tensors;
  uint64_t total = 0;
  for (int i = 0; i < kCount; ++i) {
    // 4 bytes .. ~150 KiB, mostly a few KiB, like biases, norms and embeddings shards.
    const size_t nbytes = 4 * static_cast<size_t>(1 + (i * 7919) % (i % 10 == 0 ? 38000 : 1500));
    patterns.push_back(make_pattern(nbytes, 100 + static_cast<uint64_t>(i)));
    tensors.push_back(Tensor::contiguous(device_storage(patterns.back()), DType::kF32,
                                         {static_cast<int64_t>(nbytes / 4)}));
    total += nbytes;
  }
  drain(tensors.front().storage());
  auto make_tree = [&] {
    Value tree = Value::dict();
    for (int i = 0; i < kCount; ++i) tree.insert("p" + std::to_string(i), Value(tensors[i]));
    return std::make_shared<const Value>(std::move(tree));
  };

  CudaStream producer = cuda_->create_stream(cuda_->current_device());
  StageCallOptions call;
  call.producer_streams.push_back(ProducerStream{cuda_->current_device(), producer});

  DefaultStager stager(options(), cuda_);
  Value cold = stager.stage(make_tree(), call).take();
  const auto warm_start = Clock::now();
  Value warm = stager.stage(make_tree(), call).take();
  const double warm_s = seconds_since(warm_start);

  for (const Value* staged : {&cold, &warm}) {
    for (int i = 0; i < kCount; ++i) {
      const Tensor& s = staged->at("p" + std::to_string(i)).as_tensor();
      ASSERT_TRUE(s.device().is_cpu());
      ASSERT_EQ(s.storage().nbytes(), patterns[i].size()) << i;
      ASSERT_EQ(std::memcmp(s.storage().data(), patterns[i].data(), patterns[i].size()), 0) << "tensor " << i;
      // Every storage is at least pin_memory_min_bytes (5) except the 4-byte ones.
      if (patterns[i].size() >= stager.options().pin_memory_min_bytes) {
        EXPECT_TRUE(s.storage().host_info().pinned) << i;
      }
    }
  }
  std::cout << std::fixed << std::setprecision(2) << "[gpu] " << kCount << " small buffers (" << total
            << " bytes): warm stage " << warm_s * 1e3 << " ms, " << gbps(total, warm_s) << " GB/s" << std::endl;
  stager.close();
  cuda_->destroy_stream(cuda_->current_device(), producer);
}

TEST_F(GpuStaging, ViewsAndOffsetsSurviveStaging) {
  const auto pattern = make_pattern(1 << 20, 3);
  Storage storage = device_storage(pattern);
  drain(storage);
  Tensor whole = Tensor::contiguous(storage, DType::kF32, {1 << 18});
  Tensor part = whole.view_as({256, 16}, {32, 1}, 1024);
  Value tree = Value::dict();
  tree.insert("whole", Value(whole));
  tree.insert("part", Value(part));

  DefaultStager stager(options(), cuda_);
  Value staged = stager.stage(std::make_shared<const Value>(std::move(tree))).take();
  const Tensor& s_whole = staged.at("whole").as_tensor();
  const Tensor& s_part = staged.at("part").as_tensor();
  EXPECT_TRUE(s_whole.storage() == s_part.storage());
  EXPECT_EQ(s_part.storage_offset(), 1024);
  EXPECT_EQ(s_part.strides(), part.strides());
  EXPECT_EQ(std::memcmp(s_whole.storage().data(), pattern.data(), pattern.size()), 0);
}

}  // namespace
}  // namespace fastdcp
