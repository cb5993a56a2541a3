#include "fastdcp/checkpoint/device_targets.h"

#include <algorithm>
#include <unordered_map>

#include "fastdcp/common/error.h"
#include "fastdcp/staging/stager.h"

namespace fastdcp {
namespace {

// Ranges start on this boundary, so that a view's offset into its host copy stays a whole number
// of elements of any dtype.
constexpr uint64_t kSpanAlignment = 64;

// Calls visit(tensor) for every tensor of `tree` (a Value or const Value): plain ones and the
// chunks of sharded ones.
template <class Tree, class Visit>
void for_each_tensor_of(Tree& tree, Visit&& visit) {
  for_each_leaf(tree, [&](auto& v) {
    if (v.is_tensor()) {
      visit(v.as_tensor());
    } else if (v.is_sharded()) {
      for (auto& chunk : v.as_sharded().chunks) visit(chunk.data);
    }
  });
}

// Plain cudaMalloc on the current device, freed when the last tensor viewing it goes.
Storage cuda_malloc_storage(const std::shared_ptr<CudaRuntime>& cuda, Device device, uint64_t nbytes) {
  if (nbytes == 0) return Storage::wrap(nullptr, 0, device);
  void* data = cuda->device_malloc(nbytes);
  std::shared_ptr<const void> owner(data, [cuda](const void* p) { cuda->device_free(const_cast<void*>(p)); });
  return Storage::wrap(data, nbytes, device, std::move(owner));
}

}  // namespace

void check_device(Device device, const std::shared_ptr<CudaRuntime>& cuda, const std::string& option) {
  if (device.is_cpu()) return;
  const std::shared_ptr<CudaRuntime> runtime = cuda ? cuda : CudaRuntime::instance();
  if (!runtime->available()) {
    throw Error(ErrorCode::kFailedPrecondition, "cannot load onto " + device.str() + " (" + option +
                                                    "): no CUDA device (" + runtime->unavailable_reason() +
                                                    "); load onto the CPU instead");
  }
  if (device.index < 0 || device.index >= runtime->device_count()) {
    throw Error(ErrorCode::kInvalidArgument, "cannot load onto " + device.str() + " (" + option + "): this process sees " +
                                                 std::to_string(runtime->device_count()) + " CUDA device(s), cuda:0 to cuda:" +
                                                 std::to_string(runtime->device_count() - 1));
  }
}

void move_to_device(Value& tree, Device device, DeviceAllocator* allocator, std::shared_ptr<CudaRuntime> cuda) {
  std::vector<Tensor*> moving;
  for_each_tensor_of(tree, [&](Tensor& t) {
    if (t.device() != device) moving.push_back(&t);
  });
  if (moving.empty()) return;
  if (device.is_cpu()) throw Error(ErrorCode::kInvalidArgument, "move_to_device: only host tensors move, onto a CUDA device");
  if (!cuda) cuda = CudaRuntime::instance();
  check_device(device, cuda, "the target device");
  // Every storage is allocated and filled before any tensor changes: a failure leaves the tree as it was.
  std::unordered_map<const StorageImpl*, Storage> moved;
  CudaDeviceGuard guard(*cuda, device.index);
  for (const Tensor* t : moving) {
    const Storage& host = t->storage();
    if (!host.device().is_cpu()) {
      throw Error(ErrorCode::kInvalidArgument, "move_to_device: a tensor on " + host.device().str() + " cannot move to " +
                                                   device.str() + "; only host tensors move");
    }
    auto [it, fresh] = moved.try_emplace(host.identity());
    if (!fresh) continue;
    it->second = allocator ? allocator->allocate(device, host.nbytes()) : cuda_malloc_storage(cuda, device, host.nbytes());
    if (it->second.nbytes() < host.nbytes() || it->second.device() != device) {
      throw Error(ErrorCode::kInternal, "the device allocator returned " + std::to_string(it->second.nbytes()) +
                                            " bytes on " + it->second.device().str() + " for " +
                                            std::to_string(host.nbytes()) + " bytes on " + device.str());
    }
    if (host.nbytes() > 0) cuda->memcpy_host_to_device(it->second.data(), host.data(), host.nbytes());
  }
  for (Tensor* t : moving) {
    Tensor on_device(moved.at(t->storage().identity()), t->dtype(), t->shape(), t->strides(), t->storage_offset());
    on_device.share_traits(*t);
    *t = std::move(on_device);
  }
}

std::optional<Value> with_device_tensors_on_host(const Value& state_dict, std::shared_ptr<CudaRuntime> cuda) {
  bool any = false;
  for_each_tensor_of(state_dict, [&](const Tensor& t) { any = any || !t.device().is_cpu(); });
  if (!any) return std::nullopt;  // the tree is cloned only when something in it moves
  Value tree = state_dict.clone();
  std::vector<Tensor*> places;
  for_each_tensor_of(tree, [&](Tensor& t) {
    if (!t.device().is_cpu()) places.push_back(&t);
  });
  Value device_tensors = Value::list();
  for (const Tensor* t : places) device_tensors.append(Value(*t));
  StagingOptions options;
  options.use_pinned_memory = false;
  options.use_shared_memory = false;
  options.use_async_staging = false;
  options.copy_on_write = false;
  DefaultStager stager(options, cuda ? std::move(cuda) : CudaRuntime::instance());
  const Value staged = stager.stage_now(device_tensors);  // stays valid when the stager goes
  for (size_t i = 0; i < places.size(); ++i) *places[i] = staged[i].as_tensor();
  return tree;
}

DeviceTargets::DeviceTargets(Value& target, std::shared_ptr<CudaRuntime> cuda) : cuda_(std::move(cuda)) {
  std::unordered_map<const StorageImpl*, size_t> span_of;
  auto visit = [&](Tensor& t) {
    // Packed sub-byte views have no element offset to carry over; loaders refuse them on a device.
    if (!t.device().is_cuda() || t.numel() == 0 || dtype_is_sub_byte(t.dtype())) return;
    const auto [begin, end] = t.byte_extent();
    auto [it, fresh] = span_of.try_emplace(t.storage().identity(), spans_.size());
    if (fresh) spans_.push_back({t.storage(), {}, begin / kSpanAlignment * kSpanAlignment, end, false});
    Span& span = spans_[it->second];
    span.begin = std::min(span.begin, begin / kSpanAlignment * kSpanAlignment);
    span.end = std::max(span.end, end);
    slots_.push_back({&t, t, it->second});
  };
  for_each_tensor_of(target, visit);
  if (slots_.empty()) return;
  if (!cuda_) cuda_ = CudaRuntime::instance();
  for (const Slot& slot : slots_) {
    Span& span = spans_[slot.span];
    const auto [begin, end] = slot.device.byte_extent();
    span.covered = span.covered || (slot.device.is_contiguous() && begin == span.begin && end == span.end);
  }
  for (Span& span : spans_) {
    span.host = Storage::allocate_cpu(span.end - span.begin);
    if (!span.covered) {
      CudaDeviceGuard guard(*cuda_, span.device.device().index);
      cuda_->memcpy_device_to_host(span.host.data(), static_cast<const char*>(span.device.data()) + span.begin,
                                   span.end - span.begin);
    }
  }
  for (const Slot& slot : slots_) {
    const Tensor& d = slot.device;
    const Span& span = spans_[slot.span];
    const uint64_t element_bytes = static_cast<uint64_t>(dtype_bits(d.dtype())) / 8;
    const uint64_t offset_bytes = static_cast<uint64_t>(d.storage_offset()) * element_bytes - span.begin;
    Tensor host(span.host, d.dtype(), d.shape(), d.strides(), static_cast<int64_t>(offset_bytes / element_bytes));
    host.share_traits(d);
    *slot.place = std::move(host);
  }
}

void DeviceTargets::copy_back() {
  for (const Span& span : spans_) {
    CudaDeviceGuard guard(*cuda_, span.device.device().index);
    cuda_->memcpy_host_to_device(static_cast<char*>(span.device.data()) + span.begin, span.host.data(),
                                 span.end - span.begin);
  }
}

DeviceTargets::~DeviceTargets() {
  for (const Slot& slot : slots_) {
    // A stand-in the load did not replace goes; anything else the load put there stays.
    if (slot.place->storage() == spans_[slot.span].host) *slot.place = slot.device;
  }
}

}  // namespace fastdcp
