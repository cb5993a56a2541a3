#include "fastdcp/checkpoint/device_targets.h"

#include <algorithm>
#include <unordered_map>

#include "fastdcp/common/error.h"

namespace fastdcp {
namespace {

// Ranges start on this boundary, so that a view's offset into its host copy stays a whole number
// of elements of any dtype.
constexpr uint64_t kSpanAlignment = 64;

}  // namespace

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
  for_each_leaf(target, [&](Value& v) {
    if (v.is_tensor()) {
      visit(v.as_tensor());
    } else if (v.is_sharded()) {
      for (ShardChunk& chunk : v.as_sharded().chunks) visit(chunk.data);
    }
  });
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
