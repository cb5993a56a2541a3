// CudaRuntime, HostBuffer pinning and HostMemoryPool pinning against the fake libcudart.

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "fake_cuda/fake_cudart_control.h"
#include "fastdcp/common/error.h"
#include "fastdcp/memory/cuda_runtime.h"
#include "fastdcp/memory/host_buffer.h"
#include "fastdcp/memory/host_pool.h"

namespace fastdcp {
namespace {

FakeCudaControl& fake() {
  static FakeCudaControl control(FASTDCP_FAKE_CUDART);
  return control;
}

// Sets an environment variable for a scope and restores the previous value.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (old_) {
      setenv(name_.c_str(), old_->c_str(), 1);
    } else {
      unsetenv(name_.c_str());
    }
  }

 private:
  std::string name_;
  std::optional<std::string> old_;
};

// Runs `fn`, expecting an Error with `code`; returns its message.
template <class Fn>
std::string expect_error(ErrorCode code, Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected fastdcp::Error, got " << e.what();
    return {};
  }
  ADD_FAILURE() << "expected fastdcp::Error(" << to_string(code) << "), nothing was thrown";
  return {};
}

class CudaRuntimeFake : public ::testing::Test {
 protected:
  void SetUp() override { fake().reset(1); }
  void TearDown() override { fake().reset(1); }

  std::shared_ptr<CudaRuntime> load() { return CudaRuntime::load(FASTDCP_FAKE_CUDART); }
};

TEST_F(CudaRuntimeFake, LoadsWithDeviceCountFromControl) {
  fake().reset(3);
  auto rt = load();
  ASSERT_TRUE(rt->available()) << rt->unavailable_reason();
  EXPECT_EQ(rt->device_count(), 3);
  EXPECT_EQ(rt->library_path(), FASTDCP_FAKE_CUDART);
  EXPECT_TRUE(rt->unavailable_reason().empty()) << rt->unavailable_reason();
}

TEST_F(CudaRuntimeFake, LoadsWithDeviceCountFromEnvironment) {
  fake().reset(-1);  // back to FAKE_CUDA_DEVICE_COUNT
  {
    ScopedEnv env("FAKE_CUDA_DEVICE_COUNT", "2");
    auto rt = load();
    ASSERT_TRUE(rt->available()) << rt->unavailable_reason();
    EXPECT_EQ(rt->device_count(), 2);
  }
  {
    ScopedEnv env("FAKE_CUDA_DEVICE_COUNT", nullptr);
    auto rt = load();
    ASSERT_TRUE(rt->available()) << rt->unavailable_reason();
    EXPECT_EQ(rt->device_count(), 1);  // the fake's default
  }
}

TEST_F(CudaRuntimeFake, MissingLibraryIsUnavailableAndSaysWhy) {
  auto rt = CudaRuntime::load("/nonexistent.so");
  EXPECT_FALSE(rt->available());
  EXPECT_EQ(rt->device_count(), 0);
  EXPECT_NE(rt->unavailable_reason().find("/nonexistent.so"), std::string::npos) << rt->unavailable_reason();
  // Calls on an unavailable runtime fail cleanly rather than crash.
  std::vector<char> buffer(4096);
  expect_error(ErrorCode::kUnavailable, [&] { rt->host_register(buffer.data(), buffer.size()); });
  EXPECT_FALSE(rt->host_unregister(buffer.data()));
}

TEST_F(CudaRuntimeFake, ZeroDevicesIsUnavailable) {
  fake().reset(0);
  auto rt = load();
  EXPECT_FALSE(rt->available());
  EXPECT_EQ(rt->device_count(), 0);
  EXPECT_FALSE(rt->unavailable_reason().empty());

  fake().reset(-1);
  ScopedEnv env("FAKE_CUDA_DEVICE_COUNT", "0");
  auto from_env = load();
  EXPECT_FALSE(from_env->available());
  EXPECT_FALSE(from_env->unavailable_reason().empty());
}

TEST_F(CudaRuntimeFake, ExplicitlyUnavailableKeepsReason) {
  auto rt = CudaRuntime::unavailable("cpu-only test");
  EXPECT_FALSE(rt->available());
  EXPECT_EQ(rt->unavailable_reason(), "cpu-only test");
}

TEST_F(CudaRuntimeFake, HostRegisterRoundTrip) {
  auto rt = load();
  ASSERT_TRUE(rt->available());
  std::vector<char> buffer(3 * 4096);
  rt->host_register(buffer.data(), buffer.size());
  EXPECT_EQ(fake().is_registered(buffer.data()), buffer.size());
  EXPECT_EQ(fake().registration_count(), 1u);
  EXPECT_TRUE(rt->host_unregister(buffer.data()));
  EXPECT_EQ(fake().is_registered(buffer.data()), 0u);
  EXPECT_EQ(fake().registration_count(), 0u);
  // A second unregistration fails quietly (it runs in destructors).
  EXPECT_FALSE(rt->host_unregister(buffer.data()));
}

TEST_F(CudaRuntimeFake, DoubleRegistrationThrowsCudaError) {
  auto rt = load();
  std::vector<char> buffer(4096);
  rt->host_register(buffer.data(), buffer.size());
  std::string message = expect_error(ErrorCode::kCudaError, [&] { rt->host_register(buffer.data(), buffer.size()); });
  EXPECT_NE(message.find("cudaHostRegister"), std::string::npos) << message;
  EXPECT_NE(message.find("fake cuda error 712"), std::string::npos) << message;
  EXPECT_TRUE(rt->host_unregister(buffer.data()));
}

TEST_F(CudaRuntimeFake, InjectedErrorsThrowNamingTheCall) {
  auto rt = load();
  std::vector<char> buffer(4096);

  fake().fail("cudaHostRegister", 0, 2);
  std::string message = expect_error(ErrorCode::kCudaError, [&] { rt->host_register(buffer.data(), buffer.size()); });
  EXPECT_NE(message.find("cudaHostRegister"), std::string::npos) << message;
  EXPECT_NE(message.find("fake cuda error 2"), std::string::npos) << message;
  EXPECT_EQ(fake().is_registered(buffer.data()), 0u);
  // The failure is injected once.
  rt->host_register(buffer.data(), buffer.size());
  EXPECT_TRUE(rt->host_unregister(buffer.data()));

  // The second later call fails, not the first.
  void* device = rt->device_malloc(256);
  CudaStream stream = rt->create_stream(0);
  fake().fail("cudaMemcpyAsync", 1, 999);
  rt->memcpy_device_to_host_async(buffer.data(), device, 256, stream);
  message = expect_error(ErrorCode::kCudaError,
                         [&] { rt->memcpy_device_to_host_async(buffer.data(), device, 256, stream); });
  EXPECT_NE(message.find("cudaMemcpyAsync"), std::string::npos) << message;
  EXPECT_NE(message.find("fake cuda error 999"), std::string::npos) << message;

  CudaEvent event = rt->create_event(0);
  rt->record_event(event, stream);
  fake().fail("cudaEventSynchronize", 0, 700);
  message = expect_error(ErrorCode::kCudaError, [&] { rt->event_synchronize(event); });
  EXPECT_NE(message.find("cudaEventSynchronize"), std::string::npos) << message;
  EXPECT_NE(message.find("fake cuda error 700"), std::string::npos) << message;
  rt->event_synchronize(event);

  fake().fail("cudaStreamCreateWithFlags", 0, 2);
  message = expect_error(ErrorCode::kCudaError, [&] { rt->create_stream(0); });
  EXPECT_NE(message.find("cudaStreamCreateWithFlags"), std::string::npos) << message;

  rt->destroy_event(0, event);
  rt->destroy_stream(0, stream);
  rt->device_free(device);
}

TEST_F(CudaRuntimeFake, DeviceGuardSetsAndRestoresDevice) {
  fake().reset(2);
  auto rt = load();
  ASSERT_EQ(rt->device_count(), 2);
  EXPECT_EQ(rt->current_device(), 0);
  {
    CudaDeviceGuard guard(*rt, 1);
    EXPECT_EQ(rt->current_device(), 1);
  }
  EXPECT_EQ(rt->current_device(), 0);
  std::string message = expect_error(ErrorCode::kCudaError, [&] { rt->set_device(5); });
  EXPECT_NE(message.find("cudaSetDevice"), std::string::npos) << message;
}

TEST_F(CudaRuntimeFake, DeviceCopiesAndQueuedAsyncCopies) {
  auto rt = load();
  std::vector<uint8_t> pattern(1000);
  for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<uint8_t>(i * 7 + 3);
  void* device = rt->device_malloc(pattern.size());
  ASSERT_NE(device, nullptr);
  rt->memcpy_host_to_device(device, pattern.data(), pattern.size());
  std::vector<uint8_t> back(pattern.size());
  rt->memcpy_device_to_host(back.data(), device, back.size());
  EXPECT_EQ(back, pattern);

  // An async copy lands only once something waits for it.
  std::vector<uint8_t> async_dst(pattern.size(), 0);
  CudaStream stream = rt->create_stream(0);
  CudaEvent done = rt->create_event(0);
  rt->memcpy_device_to_host_async(async_dst.data(), device, async_dst.size(), stream);
  rt->record_event(done, stream);
  EXPECT_EQ(fake().pending_copies(), 1u);
  EXPECT_EQ(async_dst, std::vector<uint8_t>(pattern.size(), 0));
  rt->event_synchronize(done);
  EXPECT_EQ(fake().pending_copies(), 0u);
  EXPECT_EQ(async_dst, pattern);

  rt->destroy_event(0, done);
  rt->destroy_stream(0, stream);
  rt->device_free(device);
}

class PinnedHostBufferFake : public CudaRuntimeFake {};

TEST_F(PinnedHostBufferFake, PinnedAllocationRegistersAndDestructionUnregisters) {
  auto rt = load();
  void* data = nullptr;
  size_t size = 0;
  {
    HostBuffer buffer = HostBuffer::allocate(10000, {.pinned = true}, rt);
    EXPECT_TRUE(buffer.pinned());
    data = buffer.data();
    size = buffer.size();
    EXPECT_GE(size, 10000u);
    EXPECT_EQ(fake().is_registered(data), size);
    EXPECT_EQ(fake().registration_count(), 1u);
    // Moving keeps the one registration.
    HostBuffer moved = std::move(buffer);
    EXPECT_TRUE(moved.pinned());
    EXPECT_EQ(moved.data(), data);
    EXPECT_EQ(fake().registration_count(), 1u);
  }
  EXPECT_EQ(fake().is_registered(data), 0u);
  EXPECT_EQ(fake().registration_count(), 0u);
}

TEST_F(PinnedHostBufferFake, SharedPinnedBufferRegisters) {
  auto rt = load();
  {
    HostBuffer buffer = HostBuffer::allocate(1 << 20, {.pinned = true, .shared = true}, rt);
    EXPECT_TRUE(buffer.pinned());
    EXPECT_TRUE(buffer.shared());
    EXPECT_EQ(fake().is_registered(buffer.data()), buffer.size());
  }
  EXPECT_EQ(fake().registration_count(), 0u);
}

TEST_F(PinnedHostBufferFake, UnpinnedBufferDoesNotRegister) {
  auto rt = load();
  HostBuffer buffer = HostBuffer::allocate(10000, {}, rt);
  EXPECT_FALSE(buffer.pinned());
  EXPECT_EQ(fake().registration_count(), 0u);
}

TEST_F(PinnedHostBufferFake, PinningWithoutCudaFails) {
  fake().reset(0);
  auto rt = load();
  ASSERT_FALSE(rt->available());
  EXPECT_THROW(HostBuffer::allocate(4096, {.pinned = true}, rt), Error);
  EXPECT_THROW(HostBuffer::allocate(4096, {.pinned = true}), Error);
  EXPECT_EQ(fake().registration_count(), 0u);
}

TEST_F(PinnedHostBufferFake, FailedRegistrationThrowsAndLeavesNothing) {
  auto rt = load();
  fake().fail("cudaHostRegister", 0, 2);
  std::string message = expect_error(ErrorCode::kCudaError, [&] { HostBuffer::allocate(4096, {.pinned = true}, rt); });
  EXPECT_NE(message.find("cudaHostRegister"), std::string::npos) << message;
  EXPECT_EQ(fake().registration_count(), 0u);
}

class PinnedHostPoolFake : public CudaRuntimeFake {};

TEST_F(PinnedHostPoolFake, SmallPinnedAllocationsShareSlabRegistrations) {
  auto rt = load();
  HostPoolOptions options;
  options.slab_bytes = size_t{1} << 20;
  options.small_max_bytes = 64 << 10;
  HostMemoryPool pool(options, rt);

  std::vector<std::shared_ptr<HostAllocation>> allocations;
  for (int i = 0; i < 2000; ++i) {
    allocations.push_back(pool.allocate(256, {.pinned = true}));
    ASSERT_TRUE(allocations.back()->traits().pinned);
    std::memset(allocations.back()->data(), i & 0xff, 256);
  }
  // 2000 * 256 bytes (rounded up at most 25%) fit in one 1 MiB slab; allow a second.
  const size_t registrations = fake().registration_count();
  EXPECT_GE(registrations, 1u);
  EXPECT_LE(registrations, 2u);
  EXPECT_GT(pool.stats().pinned_bytes(), 0u);

  // Unpinned allocations never register.
  auto plain = pool.allocate(256, {});
  EXPECT_FALSE(plain->traits().pinned);
  EXPECT_EQ(fake().registration_count(), registrations);

  allocations.clear();
  plain.reset();
  EXPECT_GT(pool.trim(), 0u);
  EXPECT_EQ(fake().registration_count(), 0u);
  EXPECT_EQ(pool.stats().pinned_bytes(), 0u);
}

TEST_F(PinnedHostPoolFake, LargePinnedAllocationRegistersItsOwnBufferUntilTrim) {
  auto rt = load();
  HostPoolOptions options;
  options.small_max_bytes = 64 << 10;
  HostMemoryPool pool(options, rt);

  auto large = pool.allocate(size_t{3} << 20, {.pinned = true});
  EXPECT_TRUE(large->traits().pinned);
  EXPECT_GE(large->size(), size_t{3} << 20);
  EXPECT_EQ(fake().registration_count(), 1u);
  large.reset();
  // Freed memory stays cached (and registered) for reuse until trimmed.
  auto again = pool.allocate(size_t{3} << 20, {.pinned = true});
  EXPECT_EQ(fake().registration_count(), 1u);
  again.reset();
  pool.trim();
  EXPECT_EQ(fake().registration_count(), 0u);
}

// Runs `fn` on another thread; false if it has not finished after `timeout`. The thread is then
// abandoned with what it holds, so that a deadlock fails the test instead of hanging the binary.
bool finishes_within(std::chrono::seconds timeout, std::function<void()> fn) {
  auto done = std::make_shared<std::promise<void>>();
  auto future = done->get_future();
  std::thread([fn = std::move(fn), done] {
    fn();
    done->set_value();
  }).detach();
  return future.wait_for(timeout) == std::future_status::ready;
}

// Allocates on `pool` from another thread; returns the ErrorCode thrown ("none" if nothing was).
std::string failed_allocation(const std::shared_ptr<HostMemoryPool>& pool, size_t nbytes, HostMemoryTraits traits) {
  auto outcome = std::make_shared<std::string>("none");
  const bool finished = finishes_within(std::chrono::seconds(10), [pool, outcome, nbytes, traits] {
    try {
      pool->allocate(nbytes, traits);
    } catch (const Error& e) {
      *outcome = to_string(e.code());
    } catch (const std::exception& e) {
      *outcome = std::string("non-fastdcp exception: ") + e.what();
    }
  });
  if (!finished) return "deadlock";
  return *outcome;
}

TEST_F(PinnedHostPoolFake, PinnedAllocationWithoutCudaFailsAndPoolStaysUsable) {
  auto pool = std::make_shared<HostMemoryPool>(HostPoolOptions{}, nullptr);
  EXPECT_EQ(failed_allocation(pool, 256, {.pinned = true}), to_string(ErrorCode::kUnavailable));
  if (HasFailure()) return;  // a deadlocked pool cannot be used
  EXPECT_EQ(failed_allocation(pool, size_t{2} << 20, {.pinned = true}), to_string(ErrorCode::kUnavailable));
  EXPECT_EQ(fake().registration_count(), 0u);
  if (HasFailure()) return;  // a deadlocked pool cannot be used
  auto plain = pool->allocate(256, {});
  EXPECT_NE(plain->data(), nullptr);
  EXPECT_EQ(pool->stats().allocations, 1u);
}

TEST_F(PinnedHostPoolFake, FailedRegistrationFailsTheAllocationOnly) {
  auto rt = load();
  auto pool = std::make_shared<HostMemoryPool>(HostPoolOptions{}, rt);
  fake().fail("cudaHostRegister", 0, 2);
  EXPECT_EQ(failed_allocation(pool, 256, {.pinned = true}), to_string(ErrorCode::kCudaError));
  EXPECT_EQ(fake().registration_count(), 0u);
  if (HasFailure()) return;
  auto pinned = pool->allocate(256, {.pinned = true});
  EXPECT_TRUE(pinned->traits().pinned);
  EXPECT_GT(fake().is_registered(pinned->data()), 0u);
  EXPECT_EQ(pool->stats().allocations, 1u);
}

}  // namespace
}  // namespace fastdcp
