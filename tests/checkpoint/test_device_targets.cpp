// Loads into CUDA tensors (Note [Loading into device tensors]), against the fake libcudart: values,
// the bytes between a strided view's elements, views of one storage, and a refused load that
// leaves device memory alone.

#include "fastdcp/checkpoint/device_targets.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "fake_cuda/fake_cudart_control.h"
#include "fastdcp/checkpoint/checkpoint.h"
#include "fastdcp/common/error.h"
#include "fastdcp/io/file.h"
#include "support/test_support.h"

namespace fastdcp {
namespace {

FakeCudaControl& fake() {
  static FakeCudaControl control(FASTDCP_FAKE_CUDART);
  return control;
}

int count_lines(const std::string& log, const std::string& prefix) {
  int n = 0;
  for (size_t pos = log.find(prefix); pos != std::string::npos; pos = log.find(prefix, pos + 1)) ++n;
  return n;
}

class DeviceTargetsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fake().reset(1);
    cuda_ = CudaRuntime::load(FASTDCP_FAKE_CUDART);
    ASSERT_TRUE(cuda_->available()) << cuda_->unavailable_reason();
  }
  void TearDown() override { EXPECT_EQ(fake().call_log().find("HAZARD"), std::string::npos) << fake().call_log(); }

  // A device storage of `n` floats, each `fill`.
  Storage device_floats(size_t n, float fill) {
    void* ptr = cuda_->device_malloc(n * sizeof(float));
    auto runtime = cuda_;
    std::shared_ptr<const void> keep_alive(ptr, [runtime](const void* p) { runtime->device_free(const_cast<void*>(p)); });
    const std::vector<float> values(n, fill);
    cuda_->memcpy_host_to_device(ptr, values.data(), n * sizeof(float));
    return Storage::wrap(ptr, n * sizeof(float), Device::cuda(0), std::move(keep_alive));
  }
  std::vector<float> device_values(const Storage& storage) {
    std::vector<float> out(storage.nbytes() / sizeof(float));
    cuda_->memcpy_device_to_host(out.data(), storage.data(), storage.nbytes());
    return out;
  }
  // Saves {"w": 0..11 as F32[3, 4], "b": 100..105}.
  void save() {
    Tensor w = Tensor::empty_cpu(DType::kF32, {3, 4});
    Tensor b = Tensor::empty_cpu(DType::kF32, {6});
    for (int i = 0; i < 12; ++i) static_cast<float*>(w.data_ptr())[i] = static_cast<float>(i);
    for (int i = 0; i < 6; ++i) static_cast<float*>(b.data_ptr())[i] = 100.0f + static_cast<float>(i);
    Value root = Value::dict();
    root.insert("w", Value(w));
    root.insert("b", Value(b));
    CheckpointWriter().write(path_, root);
  }
  ReadOptions options() const {
    ReadOptions o;
    o.cuda = cuda_;
    return o;
  }

  std::shared_ptr<CudaRuntime> cuda_;
  testing::TempDir temp_{"fastdcp_device_targets"};
  const std::string path_ = join_path(temp_.path(), "ck");
};

TEST_F(DeviceTargetsTest, ReadIntoFillsDeviceTensorsAndKeepsTheBytesBetweenAStridedViewsElements) {
  save();
  const Storage w = device_floats(12, -1.0f);
  const Storage b = device_floats(15, -1.0f);  // "b" is every other float from element 3
  Value target = Value::dict();
  target.insert("w", Value(Tensor::contiguous(w, DType::kF32, {3, 4})));
  target.insert("b", Value(Tensor(b, DType::kF32, {6}, {2}, 3)));
  fake().reset(-1);
  const LoadResult result = CheckpointReader({}, options()).read_into(path_, target);
  const std::string log = fake().call_log();
  EXPECT_TRUE(result.missing_keys.empty() && result.unexpected_keys.empty());

  const std::vector<float> w_values = device_values(w);
  for (int i = 0; i < 12; ++i) EXPECT_EQ(w_values[i], static_cast<float>(i)) << i;
  const std::vector<float> b_values = device_values(b);
  for (int i = 0; i < 15; ++i) {
    EXPECT_EQ(b_values[i], i >= 3 && i % 2 == 1 ? 100.0f + static_cast<float>((i - 3) / 2) : -1.0f) << i;
  }
  // The caller's tree holds its own device tensors again.
  EXPECT_EQ(target.at("w").as_tensor().data_ptr(), w.data());
  EXPECT_EQ(target.at("b").as_tensor().storage(), b);
  EXPECT_TRUE(target.at("b").as_tensor().device().is_cuda());
  // "w" (48 bytes) covers its storage: written to the device only. "b" has gaps: its range (56
  // bytes, from the aligned start of its storage to its last element) is read first, then written.
  EXPECT_EQ(count_lines(log, "cudaMemcpy n=56 kind=2 "), 1) << log;  // device to host
  EXPECT_EQ(count_lines(log, "cudaMemcpy n=56 kind=1 "), 1) << log;  // host to device
  EXPECT_EQ(count_lines(log, "cudaMemcpy n=48 kind=2 "), 0) << log;
  EXPECT_EQ(count_lines(log, "cudaMemcpy n=48 kind=1 "), 1) << log;
}

TEST_F(DeviceTargetsTest, ViewsOfOneDeviceStorageShareOneHostCopy) {
  save();
  // "w" and "b" both view one storage: w its first 12 floats, b the 6 after them.
  const Storage storage = device_floats(18, -1.0f);
  Value target = Value::dict();
  target.insert("w", Value(Tensor::contiguous(storage, DType::kF32, {3, 4})));
  target.insert("b", Value(Tensor::contiguous(storage, DType::kF32, {6}, 12)));
  fake().reset(-1);
  CheckpointReader({}, options()).read_into(path_, target);
  const std::string log = fake().call_log();
  EXPECT_EQ(count_lines(log, "cudaMemcpy "), 2) << log;  // one range, read and written
  const std::vector<float> values = device_values(storage);
  for (int i = 0; i < 18; ++i) EXPECT_EQ(values[i], i < 12 ? static_cast<float>(i) : 100.0f + static_cast<float>(i - 12)) << i;
}

TEST_F(DeviceTargetsTest, ARefusedLoadLeavesDeviceMemoryAndTheTreeAlone) {
  save();
  const Storage w = device_floats(12, -1.0f);
  Value target = Value::dict();
  target.insert("w", Value(Tensor::contiguous(w, DType::kF32, {3, 4})));
  target.insert("extra", Value(Tensor::contiguous(device_floats(2, -1.0f), DType::kF32, {2})));
  const Error error = testing::expect_error([&] { CheckpointReader({}, options()).read_into(path_, target, /*strict=*/true); });
  EXPECT_EQ(error.code(), ErrorCode::kFailedPrecondition);
  for (float v : device_values(w)) EXPECT_EQ(v, -1.0f);
  EXPECT_EQ(target.at("w").as_tensor().storage(), w);
  // A wrong shape is refused the same way, naming the key.
  Value wrong = Value::dict();
  wrong.insert("w", Value(Tensor::contiguous(w, DType::kF32, {4, 3})));
  const Error shape = testing::expect_error([&] { CheckpointReader({}, options()).read_into(path_, wrong); });
  EXPECT_NE(std::string(shape.what()).find("cannot load 'w'"), std::string::npos) << shape.what();
  EXPECT_TRUE(wrong.at("w").as_tensor().device().is_cuda());
}

TEST_F(DeviceTargetsTest, AFailedCopyToTheDeviceIsACudaError) {
  save();
  const Storage w = device_floats(12, -1.0f);
  Value target = Value::dict();
  target.insert("w", Value(Tensor::contiguous(w, DType::kF32, {3, 4})));
  fake().fail("cudaMemcpy", 0, 2);
  const Error error = testing::expect_error([&] { CheckpointReader({}, options()).read_into(path_, target); });
  EXPECT_EQ(error.code(), ErrorCode::kCudaError);
  EXPECT_NE(std::string(error.what()).find("cudaMemcpy"), std::string::npos) << error.what();
  EXPECT_EQ(target.at("w").as_tensor().storage(), w);
}

}  // namespace
}  // namespace fastdcp
