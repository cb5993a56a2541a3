// DefaultStager with CUDA tensors, against the fake libcudart: values, pinning, view sharing, the
// order of stream operations, chunking, error delivery and option checks.

#include <gtest/gtest.h>

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "fake_cuda/fake_cudart_control.h"
#include "fastdcp/common/error.h"
#include "fastdcp/common/logging.h"
#include "fastdcp/memory/cuda_runtime.h"
#include "fastdcp/staging/stager.h"
#include "fastdcp/tensor/tensor.h"
#include "fastdcp/tensor/value.h"

namespace fastdcp {
namespace {

FakeCudaControl& fake() {
  static FakeCudaControl control(FASTDCP_FAKE_CUDART);
  return control;
}

// Formats a pointer the way the fake's call log does.
std::string hex(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%" PRIxPTR, reinterpret_cast<uintptr_t>(p));
  return buf;
}

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

// The value of "key=" in a log line, or "".
std::string field(const std::string& line, const std::string& key) {
  const std::string needle = " " + key + "=";
  auto pos = line.find(needle);
  if (pos == std::string::npos) return {};
  pos += needle.size();
  return line.substr(pos, line.find(' ', pos) - pos);
}

class StagerCudaFake : public ::testing::Test {
 protected:
  void SetUp() override {
    fake().reset(1);
    cuda_ = CudaRuntime::load(FASTDCP_FAKE_CUDART);
    ASSERT_TRUE(cuda_->available()) << cuda_->unavailable_reason();
  }
  void TearDown() override {
    // No copy may have been left queued into memory that was given back.
    EXPECT_EQ(fake().call_log().find("HAZARD"), std::string::npos) << fake().call_log();
  }

  static StagingOptions sync_options() {
    StagingOptions options;
    options.use_async_staging = false;
    options.use_shared_memory = false;
    options.copy_threads = 2;
    return options;
  }

  // A device storage of `nbytes` filled with a pattern that depends on `seed`; freed with its
  // last handle.
  Storage cuda_storage(size_t nbytes, int seed, int device = 0) {
    void* ptr = nullptr;
    {
      CudaDeviceGuard guard(*cuda_, device);
      ptr = cuda_->device_malloc(nbytes);
    }
    fill_device(ptr, nbytes, seed);
    auto runtime = cuda_;
    std::shared_ptr<const void> keep_alive(ptr, [runtime](const void* p) { runtime->device_free(const_cast<void*>(p)); });
    return Storage::wrap(ptr, nbytes, Device::cuda(device), std::move(keep_alive));
  }

  void fill_device(void* ptr, size_t nbytes, int seed) {
    std::vector<uint8_t> pattern(nbytes);
    for (size_t i = 0; i < nbytes; ++i) pattern[i] = static_cast<uint8_t>((i * 31 + static_cast<size_t>(seed) * 17 + 1) % 251 + 1);
    cuda_->memcpy_host_to_device(ptr, pattern.data(), nbytes);
  }

  std::vector<uint8_t> device_bytes(const Storage& storage) {
    std::vector<uint8_t> out(storage.nbytes());
    cuda_->memcpy_device_to_host(out.data(), storage.data(), out.size());
    return out;
  }

  static std::vector<uint8_t> host_bytes(const Storage& storage) {
    const auto* p = static_cast<const uint8_t*>(storage.data());
    return {p, p + storage.nbytes()};
  }

  // Checks a staged tensor against its source: same layout, on the CPU, same storage bytes.
  void expect_staged_copy(const Tensor& staged, const Tensor& source) {
    // Read the staged bytes before any CUDA call: reading the device flushes the fake's queue and
    // would hide a stager that returned without waiting for its copies.
    const auto staged_bytes = host_bytes(staged.storage());
    EXPECT_EQ(fake().pending_copies(), 0u) << "stage() returned with device-to-host copies still queued";
    EXPECT_TRUE(staged.device().is_cpu());
    EXPECT_EQ(staged.dtype(), source.dtype());
    EXPECT_EQ(staged.shape(), source.shape());
    EXPECT_EQ(staged.strides(), source.strides());
    EXPECT_EQ(staged.storage_offset(), source.storage_offset());
    ASSERT_EQ(staged.storage().nbytes(), source.storage().nbytes());
    EXPECT_EQ(staged_bytes, device_bytes(source.storage()));
  }

  std::string log_since(size_t offset) { return fake().call_log().substr(offset); }

  std::shared_ptr<CudaRuntime> cuda_;
};

Value stage_sync(DefaultStager& stager, Value tree, const StageCallOptions& call = {}) {
  auto future = stager.stage(std::make_shared<const Value>(std::move(tree)), call);
  return future.take();
}

TEST_F(StagerCudaFake, StagedValuesEqualDeviceContents) {
  DefaultStager stager(sync_options(), cuda_);
  Tensor a = Tensor::contiguous(cuda_storage(256 * 4, 1), DType::kF32, {256});
  Tensor b = Tensor::contiguous(cuda_storage(100 * 8, 2), DType::kI64, {10, 10});
  Value tree = Value::dict();
  tree.insert("a", Value(a));
  tree.insert("b", Value(b));
  tree.insert("step", Value(int64_t{7}));

  Value staged = stage_sync(stager, tree.clone());
  expect_staged_copy(staged.at("a").as_tensor(), a);
  expect_staged_copy(staged.at("b").as_tensor(), b);
  EXPECT_EQ(staged.at("step").as_int(), 7);
  EXPECT_EQ(fake().pending_copies(), 0u);

  // Later device writes do not reach the staged copy.
  const auto before = host_bytes(staged.at("a").as_tensor().storage());
  fill_device(a.storage().data(), a.storage().nbytes(), 99);
  EXPECT_EQ(host_bytes(staged.at("a").as_tensor().storage()), before);
  stager.close();
}

TEST_F(StagerCudaFake, StagedBuffersArePinnedAboveTheThreshold) {
  StagingOptions options = sync_options();
  options.pin_memory_min_bytes = 1024;
  DefaultStager stager(options, cuda_);
  EXPECT_FALSE(stager.pinning_downgraded());
  Tensor big = Tensor::contiguous(cuda_storage(64 << 10, 3), DType::kU8, {64 << 10});
  Tensor small = Tensor::contiguous(cuda_storage(64, 4), DType::kU8, {64});
  Value tree = Value::dict();
  tree.insert("big", Value(big));
  tree.insert("small", Value(small));

  Value staged = stage_sync(stager, std::move(tree));
  const Storage& big_staged = staged.at("big").as_tensor().storage();
  const Storage& small_staged = staged.at("small").as_tensor().storage();
  EXPECT_TRUE(big_staged.host_info().pinned);
  const auto* big_data = static_cast<const uint8_t*>(big_staged.data());
  EXPECT_GT(fake().is_registered(big_data), 0u);
  EXPECT_GT(fake().is_registered(big_data + big_staged.nbytes() - 1), 0u);
  EXPECT_FALSE(small_staged.host_info().pinned);
  EXPECT_EQ(fake().is_registered(small_staged.data()), 0u);
  expect_staged_copy(staged.at("big").as_tensor(), big);
  expect_staged_copy(staged.at("small").as_tensor(), small);
}

TEST_F(StagerCudaFake, SharedMemoryStagingIsPinnedToo) {
  StagingOptions options = sync_options();
  options.use_shared_memory = true;
  DefaultStager stager(options, cuda_);
  Tensor t = Tensor::contiguous(cuda_storage(8192, 5), DType::kF32, {2048});
  Value tree = Value::dict();
  tree.insert("t", Value(t));
  Value staged = stage_sync(stager, std::move(tree));
  const Storage& s = staged.at("t").as_tensor().storage();
  EXPECT_TRUE(s.host_info().pinned);
  EXPECT_TRUE(s.host_info().shared);
  EXPECT_GT(fake().is_registered(s.data()), 0u);
  expect_staged_copy(staged.at("t").as_tensor(), t);
}

TEST_F(StagerCudaFake, ViewsOfOneStorageStayViewsOfOneBuffer) {
  DefaultStager stager(sync_options(), cuda_);
  Storage storage = cuda_storage(4096, 6);
  Tensor whole = Tensor::contiguous(storage, DType::kF32, {1024});
  Tensor tail = whole.view_as({128}, {1}, 256);
  Tensor strided = whole.view_as({4, 4}, {64, 2}, 8);
  Tensor other = Tensor::contiguous(cuda_storage(512, 7), DType::kF32, {128});
  Value tree = Value::dict();
  tree.insert("whole", Value(whole));
  tree.insert("tail", Value(tail));
  Value list = Value::list();
  list.append(Value(strided));
  list.append(Value(other));
  tree.insert("list", std::move(list));

  const size_t log_start = fake().call_log().size();
  Value staged = stage_sync(stager, std::move(tree));
  const Tensor& s_whole = staged.at("whole").as_tensor();
  const Tensor& s_tail = staged.at("tail").as_tensor();
  const Tensor& s_strided = staged.at("list")[0].as_tensor();
  const Tensor& s_other = staged.at("list")[1].as_tensor();
  EXPECT_TRUE(s_whole.storage() == s_tail.storage());
  EXPECT_TRUE(s_whole.storage() == s_strided.storage());
  EXPECT_FALSE(s_whole.storage() == s_other.storage());
  expect_staged_copy(s_whole, whole);
  expect_staged_copy(s_tail, tail);
  expect_staged_copy(s_strided, strided);
  expect_staged_copy(s_other, other);

  // Each storage's bytes cross once.
  uint64_t copied = 0;
  for (const auto& line : split_lines(log_since(log_start))) {
    if (starts_with(line, "cudaMemcpyAsync ")) copied += std::stoull(field(line, "n"));
  }
  EXPECT_EQ(copied, 4096u + 512u);
}

// Checks, in the log of one stage call, that the copy stream waits on an event recorded on the
// producer stream before any copy, that all copies go on that copy stream, and that completion is
// awaited through an event on it. Returns the copy stream.
std::string expect_stream_ordering(const std::vector<std::string>& lines, const std::vector<std::string>& producers) {
  size_t record = lines.size();
  std::string event;
  for (size_t i = 0; i < lines.size() && record == lines.size(); ++i) {
    if (!starts_with(lines[i], "cudaEventRecord ")) continue;
    for (const auto& p : producers) {
      if (field(lines[i], "stream") == p) {
        record = i;
        event = field(lines[i], "ev");
      }
    }
  }
  EXPECT_LT(record, lines.size()) << "no cudaEventRecord on the producer stream";
  if (record == lines.size()) return {};

  size_t wait = lines.size();
  std::string copy_stream;
  for (size_t i = record + 1; i < lines.size(); ++i) {
    if (starts_with(lines[i], "cudaStreamWaitEvent ") && field(lines[i], "ev") == event) {
      wait = i;
      copy_stream = field(lines[i], "stream");
      break;
    }
  }
  EXPECT_LT(wait, lines.size()) << "no cudaStreamWaitEvent on the producer's event after it was recorded";
  if (wait == lines.size()) return {};
  for (const auto& p : producers) EXPECT_NE(copy_stream, p) << "copies must not go on the producer stream";

  size_t copies = 0;
  size_t last_copy = 0;
  for (size_t i = 0; i < lines.size(); ++i) {
    if (!starts_with(lines[i], "cudaMemcpyAsync ")) continue;
    EXPECT_GT(i, wait) << "copy issued before the copy stream waited on the producer: " << lines[i];
    EXPECT_EQ(field(lines[i], "stream"), copy_stream) << lines[i];
    EXPECT_EQ(lines[i].find("-> error"), std::string::npos) << lines[i];
    ++copies;
    last_copy = i;
  }
  EXPECT_GT(copies, 0u);

  // Completion: an event recorded on the copy stream after the last copy, then synchronized.
  bool completed = false;
  for (size_t i = last_copy + 1; i < lines.size() && !completed; ++i) {
    if (!starts_with(lines[i], "cudaEventRecord ") || field(lines[i], "stream") != copy_stream) continue;
    const std::string done = field(lines[i], "ev");
    for (size_t j = i + 1; j < lines.size(); ++j) {
      if (lines[j] == "cudaEventSynchronize ev=" + done) completed = true;
    }
  }
  EXPECT_TRUE(completed) << "no cudaEventSynchronize of an event recorded on the copy stream after the copies";
  for (const auto& line : lines) EXPECT_FALSE(starts_with(line, "cudaDeviceSynchronize")) << "device-wide sync";
  return copy_stream;
}

TEST_F(StagerCudaFake, CopyStreamWaitsOnProducerAndCompletesByEvent) {
  DefaultStager stager(sync_options(), cuda_);
  CudaStream producer = cuda_->create_stream(0);
  Tensor a = Tensor::contiguous(cuda_storage(4096, 8), DType::kF32, {1024});
  Tensor b = Tensor::contiguous(cuda_storage(2048, 9), DType::kF32, {512});
  StageCallOptions call;
  call.producer_streams.push_back(ProducerStream{0, producer});

  for (int round = 0; round < 2; ++round) {  // cold, then warm (cached buffers)
    Value tree = Value::dict();
    tree.insert("a", Value(a));
    tree.insert("b", Value(b));
    const size_t log_start = fake().call_log().size();
    Value staged = stage_sync(stager, std::move(tree), call);
    SCOPED_TRACE("round " + std::to_string(round));
    expect_stream_ordering(split_lines(log_since(log_start)), {hex(producer)});
    expect_staged_copy(staged.at("a").as_tensor(), a);
    expect_staged_copy(staged.at("b").as_tensor(), b);
  }
  stager.close();
  cuda_->destroy_stream(0, producer);
}

TEST_F(StagerCudaFake, DefaultProducerIsTheLegacyStream) {
  DefaultStager stager(sync_options(), cuda_);
  Tensor a = Tensor::contiguous(cuda_storage(4096, 10), DType::kF32, {1024});
  Value tree = Value::dict();
  tree.insert("a", Value(a));
  const size_t log_start = fake().call_log().size();
  Value staged = stage_sync(stager, std::move(tree));
  // nullptr or cudaStreamLegacy.
  expect_stream_ordering(split_lines(log_since(log_start)), {"0x0", "0x1"});
  expect_staged_copy(staged.at("a").as_tensor(), a);
}

TEST_F(StagerCudaFake, AsyncStagingRecordsTheProducerEventInsideStage) {
  StagingOptions options = sync_options();
  options.use_async_staging = true;
  DefaultStager stager(options, cuda_);
  CudaStream producer = cuda_->create_stream(0);
  Tensor a = Tensor::contiguous(cuda_storage(1 << 20, 11), DType::kF32, {1 << 18});
  Value tree = Value::dict();
  tree.insert("a", Value(a));
  StageCallOptions call;
  call.producer_streams.push_back(ProducerStream{0, producer});

  const size_t log_start = fake().call_log().size();
  auto future = stager.stage(std::make_shared<const Value>(std::move(tree)), call);
  // Work queued on the producer after stage() returns must not be waited for, so the event is
  // recorded before stage() returns, not later on the worker.
  bool recorded = false;
  for (const auto& line : split_lines(log_since(log_start))) {
    if (starts_with(line, "cudaEventRecord ") && field(line, "stream") == hex(producer)) recorded = true;
  }
  EXPECT_TRUE(recorded) << log_since(log_start);
  Value staged = future.take();
  expect_stream_ordering(split_lines(log_since(log_start)), {hex(producer)});
  expect_staged_copy(staged.at("a").as_tensor(), a);
  stager.close();
  cuda_->destroy_stream(0, producer);
}

TEST_F(StagerCudaFake, LargeStoragesAreCopiedInChunks) {
  StagingOptions options = sync_options();
  options.cuda_copy_chunk_bytes = 64 << 10;
  DefaultStager stager(options, cuda_);
  const size_t nbytes = (300 << 10) + 12;
  Tensor t = Tensor::contiguous(cuda_storage(nbytes, 12), DType::kU8, {static_cast<int64_t>(nbytes)});
  Value tree = Value::dict();
  tree.insert("t", Value(t));
  const size_t log_start = fake().call_log().size();
  Value staged = stage_sync(stager, std::move(tree));

  size_t calls = 0;
  uint64_t copied = 0;
  for (const auto& line : split_lines(log_since(log_start))) {
    if (!starts_with(line, "cudaMemcpyAsync ")) continue;
    ++calls;
    const uint64_t n = std::stoull(field(line, "n"));
    EXPECT_LE(n, uint64_t{64} << 10) << line;
    copied += n;
  }
  EXPECT_GE(calls, 5u);  // ceil(300 KiB / 64 KiB)
  EXPECT_EQ(copied, nbytes);
  expect_staged_copy(staged.at("t").as_tensor(), t);
}

TEST_F(StagerCudaFake, RestagingReusesBuffersAndSeesNewValues) {
  DefaultStager stager(sync_options(), cuda_);
  Tensor t = Tensor::contiguous(cuda_storage(64 << 10, 13), DType::kF32, {16 << 10});
  Value tree = Value::dict();
  tree.insert("t", Value(t));
  Value first = stage_sync(stager, tree.clone());
  const size_t registrations = fake().registration_count();
  fill_device(t.storage().data(), t.storage().nbytes(), 14);
  Value second = stage_sync(stager, tree.clone());
  EXPECT_EQ(first.at("t").as_tensor().storage().data(), second.at("t").as_tensor().storage().data());
  expect_staged_copy(second.at("t").as_tensor(), t);
  EXPECT_EQ(fake().registration_count(), registrations);
}

TEST_F(StagerCudaFake, AsyncCopyFailureIsDeliveredThroughTheFuture) {
  StagingOptions options = sync_options();
  options.use_async_staging = true;
  options.cuda_copy_chunk_bytes = 16 << 10;
  DefaultStager stager(options, cuda_);
  Tensor a = Tensor::contiguous(cuda_storage(64 << 10, 15), DType::kU8, {64 << 10});
  Tensor b = Tensor::contiguous(cuda_storage(64 << 10, 16), DType::kU8, {64 << 10});
  auto make_tree = [&] {
    Value tree = Value::dict();
    tree.insert("a", Value(a));
    tree.insert("b", Value(b));
    return std::make_shared<const Value>(std::move(tree));
  };

  // Some copies are queued before the failing one.
  fake().fail("cudaMemcpyAsync", 2, 2);
  auto failed = stager.stage(make_tree());
  try {
    failed.get();
    ADD_FAILURE() << "the injected cudaMemcpyAsync failure was not reported";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCudaError) << e.what();
    EXPECT_NE(std::string(e.what()).find("cudaMemcpyAsync"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("fake cuda error 2"), std::string::npos) << e.what();
  }

  auto ok = stager.stage(make_tree());
  Value staged = ok.take();
  expect_staged_copy(staged.at("a").as_tensor(), a);
  expect_staged_copy(staged.at("b").as_tensor(), b);
  stager.close();
  stager.release_unused_memory();
}

TEST_F(StagerCudaFake, SyncCopyFailureThrowsFromStage) {
  DefaultStager stager(sync_options(), cuda_);
  Tensor a = Tensor::contiguous(cuda_storage(4096, 17), DType::kU8, {4096});
  Value tree = Value::dict();
  tree.insert("a", Value(a));
  fake().fail("cudaEventSynchronize", 0, 2);
  EXPECT_THROW(
      {
        try {
          stager.stage_now(tree);
        } catch (const Error& e) {
          EXPECT_EQ(e.code(), ErrorCode::kCudaError);
          EXPECT_NE(std::string(e.what()).find("cudaEventSynchronize"), std::string::npos) << e.what();
          throw;
        }
      },
      Error);
  Value staged = stager.stage_now(tree);
  expect_staged_copy(staged.at("a").as_tensor(), a);
}

TEST_F(StagerCudaFake, BlockingCopiesStillGiveCorrectValues) {
  StagingOptions options = sync_options();
  options.use_non_blocking_copy = false;
  DefaultStager stager(options, cuda_);
  Tensor a = Tensor::contiguous(cuda_storage(32 << 10, 18), DType::kF32, {8 << 10});
  Value tree = Value::dict();
  tree.insert("a", Value(a));
  const size_t log_start = fake().call_log().size();
  Value staged = stager.stage_now(tree);
  expect_staged_copy(staged.at("a").as_tensor(), a);
  EXPECT_EQ(log_since(log_start).find("cudaDeviceSynchronize"), std::string::npos);
}

TEST_F(StagerCudaFake, TensorsOnTwoDevicesUseOneCopyStreamEach) {
  fake().reset(2);
  cuda_ = CudaRuntime::load(FASTDCP_FAKE_CUDART);
  ASSERT_EQ(cuda_->device_count(), 2);
  DefaultStager stager(sync_options(), cuda_);
  CudaStream p0 = cuda_->create_stream(0);
  CudaStream p1 = cuda_->create_stream(1);
  Tensor a = Tensor::contiguous(cuda_storage(4096, 19, 0), DType::kF32, {1024});
  Tensor b = Tensor::contiguous(cuda_storage(4096, 20, 1), DType::kF32, {1024});
  Value tree = Value::dict();
  tree.insert("a", Value(a));
  tree.insert("b", Value(b));
  StageCallOptions call;
  call.producer_streams = {ProducerStream{0, p0}, ProducerStream{1, p1}};

  const size_t log_start = fake().call_log().size();
  Value staged = stage_sync(stager, std::move(tree), call);
  expect_staged_copy(staged.at("a").as_tensor(), a);
  expect_staged_copy(staged.at("b").as_tensor(), b);
  // Every CUDA call succeeded (the fake refuses, e.g., an event and a stream of different devices).
  const auto lines = split_lines(log_since(log_start));
  for (const auto& line : lines) EXPECT_EQ(line.find("-> error"), std::string::npos) << line;
  bool waited[2] = {false, false};
  for (const auto& line : lines) {
    if (!starts_with(line, "cudaEventRecord ")) continue;
    if (field(line, "stream") == hex(p0)) waited[0] = true;
    if (field(line, "stream") == hex(p1)) waited[1] = true;
  }
  EXPECT_TRUE(waited[0]);
  EXPECT_TRUE(waited[1]);
  for (const auto& line : lines) EXPECT_FALSE(starts_with(line, "cudaDeviceSynchronize"));
  stager.close();
  cuda_->destroy_stream(0, p0);
  cuda_->destroy_stream(1, p1);
}

TEST_F(StagerCudaFake, DeviceWithoutANamedProducerWaitsForItsLegacyStream) {
  // A rank whose current device is cuda:0 in the calling thread (a helper thread's default) but
  // whose tensors live on cuda:1: the copies on cuda:1 must still wait for that device's work.
  fake().reset(2);
  cuda_ = CudaRuntime::load(FASTDCP_FAKE_CUDART);
  DefaultStager stager(sync_options(), cuda_);
  CudaStream p0 = cuda_->create_stream(0);
  Tensor b = Tensor::contiguous(cuda_storage(4096, 21, 1), DType::kF32, {1024});
  Value tree = Value::dict();
  tree.insert("b", Value(b));
  StageCallOptions call;
  call.producer_streams = {ProducerStream{0, p0}};

  const size_t log_start = fake().call_log().size();
  Value staged = stage_sync(stager, std::move(tree), call);
  expect_staged_copy(staged.at("b").as_tensor(), b);
  const auto lines = split_lines(log_since(log_start));
  for (const auto& line : lines) EXPECT_EQ(line.find("-> error"), std::string::npos) << line;
  expect_stream_ordering(lines, {"0x0", "0x1"});
  stager.close();
  cuda_->destroy_stream(0, p0);
}

TEST_F(StagerCudaFake, NonBlockingCopyWithoutDevicesIsRejected) {
  fake().reset(0);
  auto none = CudaRuntime::load(FASTDCP_FAKE_CUDART);
  ASSERT_FALSE(none->available());
  StagingOptions options;
  options.use_non_blocking_copy = true;
  try {
    DefaultStager stager(options, none);
    ADD_FAILURE() << "use_non_blocking_copy without a device was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find("use_non_blocking_copy"), std::string::npos) << e.what();
  }
}

TEST_F(StagerCudaFake, PinningWithoutDevicesIsDowngraded) {
  fake().reset(0);
  auto none = CudaRuntime::load(FASTDCP_FAKE_CUDART);
  ASSERT_FALSE(none->available());
  std::vector<std::string> warnings;
  WarningSink previous = set_warning_sink([&](const std::string& message) { warnings.push_back(message); });
  StagingOptions options = sync_options();
  options.use_pinned_memory = true;
  options.use_non_blocking_copy = false;
  {
    DefaultStager stager(options, none);
    EXPECT_TRUE(stager.pinning_downgraded());
    Tensor t = Tensor::empty_cpu(DType::kF32, {4096});
    for (int i = 0; i < 4096; ++i) static_cast<float*>(t.data_ptr())[i] = static_cast<float>(i);
    Value tree = Value::dict();
    tree.insert("t", Value(t));
    Value staged = stager.stage_now(tree);
    const Tensor& s = staged.at("t").as_tensor();
    EXPECT_FALSE(s.storage().host_info().pinned);
    EXPECT_EQ(std::memcmp(s.data_ptr(), t.data_ptr(), 4096 * sizeof(float)), 0);
    EXPECT_EQ(fake().registration_count(), 0u);
  }
  set_warning_sink(std::move(previous));
  EXPECT_FALSE(warnings.empty()) << "the downgrade must be reported";
}

TEST_F(StagerCudaFake, PinningWithDevicesIsNotDowngraded) {
  DefaultStager stager(sync_options(), cuda_);
  EXPECT_FALSE(stager.pinning_downgraded());
}

}  // namespace
}  // namespace fastdcp
