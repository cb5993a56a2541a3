// Loads into CUDA tensors (Note [Loading into device tensors]) and whole loads onto a device (Note
// [Loading onto a device]), against the fake libcudart: values, the bytes between a strided view's
// elements, views of one storage, a refused load that leaves device memory alone, and failures that
// free what they allocated.

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

// Device memory from the fake runtime, counted: what a framework's allocator would hand out.
class CountingAllocator : public DeviceAllocator {
 public:
  explicit CountingAllocator(std::shared_ptr<CudaRuntime> cuda) : cuda_(std::move(cuda)) {}
  Storage allocate(Device device, uint64_t nbytes) override {
    sizes.push_back(nbytes);
    devices.push_back(device.index);
    void* data = nbytes ? cuda_->device_malloc(nbytes) : nullptr;
    ++*live_;
    auto runtime = cuda_;
    auto live = live_;
    std::shared_ptr<const void> owner(data, [runtime, live](const void* p) {
      if (p) runtime->device_free(const_cast<void*>(p));
      --*live;
    });
    return Storage::wrap(data, nbytes, device, std::move(owner));
  }
  int live() const { return *live_; }
  std::vector<uint64_t> sizes;
  std::vector<int> devices;

 private:
  std::shared_ptr<CudaRuntime> cuda_;
  std::shared_ptr<int> live_ = std::make_shared<int>(0);
};

class LoadOntoDeviceTest : public DeviceTargetsTest {
 protected:
  // Saves {"w": 0..11 as F32[3, 4], "row": w's second row (a view of w's storage), "b": 100..105,
  // "step": 7}; the source tensors stay as the oracle.
  void save_with_a_tie() {
    w_ = Tensor::empty_cpu(DType::kF32, {3, 4});
    b_ = Tensor::empty_cpu(DType::kF32, {6});
    for (int i = 0; i < 12; ++i) static_cast<float*>(w_.data_ptr())[i] = static_cast<float>(i) + 0.5f;
    for (int i = 0; i < 6; ++i) static_cast<float*>(b_.data_ptr())[i] = 100.0f + static_cast<float>(i);
    Value root = Value::dict();
    root.insert("w", Value(w_));
    root.insert("row", Value(Tensor(w_.storage(), DType::kF32, {4}, {1}, 4)));
    root.insert("b", Value(b_));
    root.insert("step", Value(int64_t{7}));
    CheckpointWriter().write(path_, root);
  }
  ReadOptions onto(Device device) const {
    ReadOptions o = options();
    o.device = device;
    return o;
  }
  std::vector<float> values_of(const Tensor& t) {
    std::vector<float> storage = device_values(t.storage());
    std::vector<float> out;
    for (int64_t i = 0; i < t.numel(); ++i) out.push_back(storage[static_cast<size_t>(t.storage_offset() + i)]);
    return out;
  }
  static std::vector<float> host_values(const Tensor& t) {
    const float* data = static_cast<const float*>(t.data_ptr());
    return {data, data + t.numel()};
  }
  Tensor w_, b_;
};

TEST_F(LoadOntoDeviceTest, EveryTensorGoesToTheDeviceWithItsValuesAndTiesKept) {
  save_with_a_tie();
  fake().reset(2);
  cuda_ = CudaRuntime::load(FASTDCP_FAKE_CUDART);  // sees two devices
  const Value loaded = CheckpointReader({}, onto(Device::cuda(1))).read(path_);
  const std::string log = fake().call_log();
  const Tensor& w = loaded.at("w").as_tensor();
  const Tensor& row = loaded.at("row").as_tensor();
  const Tensor& b = loaded.at("b").as_tensor();
  for (const Tensor* t : {&w, &row, &b}) EXPECT_EQ(t->device(), Device::cuda(1));
  EXPECT_EQ(values_of(w), host_values(w_));
  EXPECT_EQ(values_of(b), host_values(b_));
  const std::vector<float> all_w = host_values(w_);
  EXPECT_EQ(values_of(row), std::vector<float>(all_w.begin() + 4, all_w.begin() + 8));
  // The tie survives: "row" views the storage of "w"; "b" has its own.
  EXPECT_EQ(row.storage(), w.storage());
  EXPECT_EQ(row.storage_offset(), 4);
  EXPECT_FALSE(b.storage() == w.storage());
  EXPECT_EQ(loaded.at("step").as_int(), 7);
  // One copy per saved storage, host to device, on the device asked for.
  EXPECT_EQ(count_lines(log, "cudaMemcpy "), 2) << log;
  EXPECT_EQ(count_lines(log, "kind=1 "), 2) << log;
  EXPECT_EQ(count_lines(log, "cudaMalloc "), 2) << log;
  EXPECT_EQ(count_lines(log, "device=1\ncudaMemcpy "), 2) << log;  // allocated there, then filled
}

TEST_F(LoadOntoDeviceTest, TheFrameworksAllocatorGivesTheMemoryAndGetsItBack) {
  save_with_a_tie();
  auto allocator = std::make_shared<CountingAllocator>(cuda_);
  ReadOptions o = onto(Device::cuda(0));
  o.device_allocator = allocator;
  {
    const Value loaded = CheckpointReader({}, o).read(path_);
    EXPECT_EQ(allocator->sizes, (std::vector<uint64_t>{48, 24}));  // w's storage (with row), then b's
    EXPECT_EQ(allocator->devices, (std::vector<int>{0, 0}));
    EXPECT_EQ(allocator->live(), 2);
    EXPECT_EQ(values_of(loaded.at("b").as_tensor()), host_values(b_));
  }
  EXPECT_EQ(allocator->live(), 0);
}

TEST_F(LoadOntoDeviceTest, AFailedCopyFreesWhatItAllocatedAndIsACudaError) {
  save_with_a_tie();
  auto allocator = std::make_shared<CountingAllocator>(cuda_);
  ReadOptions o = onto(Device::cuda(0));
  o.device_allocator = allocator;
  fake().fail("cudaMemcpy", 1, 2);  // the second storage's copy
  const Error error = testing::expect_error([&] { CheckpointReader({}, o).read(path_); });
  EXPECT_EQ(error.code(), ErrorCode::kCudaError);
  EXPECT_NE(std::string(error.what()).find("cudaMemcpy"), std::string::npos) << error.what();
  EXPECT_EQ(allocator->sizes.size(), 2u);
  EXPECT_EQ(allocator->live(), 0);
}

TEST_F(LoadOntoDeviceTest, TheDeviceIsCheckedBeforeAnythingIsRead) {
  save_with_a_tie();
  fake().reset(1);
  // A device this process does not see: refused, naming it and the option, before the file is opened
  // (a missing checkpoint would be kNotFound otherwise).
  const Error missing = testing::expect_error(
      [&] { CheckpointReader({}, onto(Device::cuda(3))).read(join_path(temp_.path(), "absent")); });
  EXPECT_EQ(missing.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(std::string(missing.what()).find("cuda:3"), std::string::npos) << missing.what();
  EXPECT_NE(std::string(missing.what()).find("map_location"), std::string::npos) << missing.what();
  EXPECT_EQ(count_lines(fake().call_log(), "cudaMalloc"), 0);
  // Without CUDA: a failed precondition that says why and what to do.
  ReadOptions without = onto(Device::cuda(0));
  without.cuda = CudaRuntime::unavailable("no driver here");
  const Error unavailable = testing::expect_error([&] { CheckpointReader({}, without).read(path_); });
  EXPECT_EQ(unavailable.code(), ErrorCode::kFailedPrecondition);
  EXPECT_NE(std::string(unavailable.what()).find("no driver here"), std::string::npos) << unavailable.what();
  EXPECT_NE(std::string(unavailable.what()).find("onto the CPU"), std::string::npos) << unavailable.what();
}

TEST_F(LoadOntoDeviceTest, AnEmptyTensorLandsOnTheDeviceWithoutACopy) {
  // A 0-element tensor has no bytes to copy; it still lands on the device.
  Value root = Value::dict();
  root.insert("empty", Value(Tensor::empty_cpu(DType::kF32, {0, 3})));
  CheckpointWriter().write(path_, root);
  fake().reset(-1);
  const Value loaded = CheckpointReader({}, onto(Device::cuda(0))).read(path_);
  EXPECT_EQ(loaded.at("empty").as_tensor().device(), Device::cuda(0));
  EXPECT_EQ(loaded.at("empty").as_tensor().shape(), (Dims{0, 3}));
  EXPECT_EQ(count_lines(fake().call_log(), "cudaMemcpy "), 0) << fake().call_log();
}

// Note [Device tensors in a synchronous write]
TEST_F(DeviceTargetsTest, ASynchronousWriteCopiesItsDeviceTensorsToTheHostAndKeepsTheirTies) {
  const Storage storage = device_floats(18, 0.0f);
  std::vector<float> values(18);
  for (int i = 0; i < 18; ++i) values[i] = static_cast<float>(i) * 1.5f;
  cuda_->memcpy_host_to_device(storage.data(), values.data(), sizeof(float) * values.size());
  Tensor host = Tensor::empty_cpu(DType::kF32, {2});
  static_cast<float*>(host.data_ptr())[0] = 7.0f;
  static_cast<float*>(host.data_ptr())[1] = 8.0f;
  Value root = Value::dict();
  root.insert("w", Value(Tensor::contiguous(storage, DType::kF32, {3, 4})));
  root.insert("b", Value(Tensor::contiguous(storage, DType::kF32, {6}, 12)));
  root.insert("h", Value(host));
  WriterOptions o;
  o.cuda = cuda_;
  fake().reset(-1);
  CheckpointWriter({}, o).write(path_, root);
  EXPECT_NE(fake().call_log().find("kind=2"), std::string::npos) << fake().call_log();  // device to host
  // The caller's tree is unchanged; the checkpoint holds the device's values, one storage for both views.
  EXPECT_TRUE(root.at("w").as_tensor().device().is_cuda());
  const Value loaded = CheckpointReader().read(path_);
  const Tensor& w = loaded.at("w").as_tensor();
  const Tensor& b = loaded.at("b").as_tensor();
  for (int i = 0; i < 12; ++i) EXPECT_EQ(static_cast<const float*>(w.data_ptr())[i], values[i]) << i;
  for (int i = 0; i < 6; ++i) EXPECT_EQ(static_cast<const float*>(b.data_ptr())[i], values[12 + i]) << i;
  EXPECT_EQ(w.storage(), b.storage());
  EXPECT_EQ(static_cast<const float*>(loaded.at("h").as_tensor().data_ptr())[1], 8.0f);
}

TEST_F(DeviceTargetsTest, AFailedDeviceCopyFailsTheWriteAndLeavesTheCommittedCheckpoint) {
  save();  // {"w": 0..11, "b": 100..105}, on the host
  Value root = Value::dict();
  root.insert("w", Value(Tensor::contiguous(device_floats(12, -1.0f), DType::kF32, {3, 4})));
  WriterOptions o;
  o.cuda = cuda_;
  o.overwrite = true;
  fake().fail("cudaMemcpyAsync", 0, 2);
  const Error error = testing::expect_error([&] { CheckpointWriter({}, o).write(path_, root); });
  EXPECT_EQ(error.code(), ErrorCode::kCudaError) << error.what();
  const Value loaded = CheckpointReader().read(path_);
  EXPECT_EQ(static_cast<const float*>(loaded.at("w").as_tensor().data_ptr())[11], 11.0f);
  EXPECT_EQ(static_cast<const float*>(loaded.at("b").as_tensor().data_ptr())[0], 100.0f);
}

}  // namespace
}  // namespace fastdcp
