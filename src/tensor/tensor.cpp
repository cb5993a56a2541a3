#include "fastdcp/tensor/tensor.h"

#include <cstring>
#include <vector>

#include <sstream>

#include "fastdcp/common/error.h"

namespace fastdcp {
namespace {
std::string dims_str(const Dims& dims) {
  std::string out = "[";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  return out + "]";
}
}  // namespace

Dims contiguous_strides(const Dims& shape) {
  Dims strides;
  strides.resize(shape.size());
  int64_t stride = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= std::max<int64_t>(shape[i], 1);
  }
  return strides;
}

Tensor::Tensor(Storage storage, DType dtype, Dims shape, Dims strides, int64_t storage_offset)
    : storage_(std::move(storage)), dtype_(dtype), shape_(std::move(shape)), strides_(std::move(strides)),
      storage_offset_(storage_offset) {
  auto fail = [&](const std::string& why) {
    throw Error(ErrorCode::kInvalidArgument, "invalid tensor view " + describe() + ": " + why);
  };
  if (!storage_.defined()) fail("no storage");
  if (shape_.size() != strides_.size()) fail("shape and strides differ in rank");
  if (storage_offset_ < 0) fail("negative storage offset");
  for (size_t i = 0; i < shape_.size(); ++i) {
    if (shape_[i] < 0) fail("negative size in dimension " + std::to_string(i));
    if (strides_[i] < 0) fail("negative stride in dimension " + std::to_string(i));
  }
  if (dtype_is_sub_byte(dtype_)) {
    if (!is_contiguous()) fail("sub-byte dtypes must be contiguous");
    if ((storage_offset_ * dtype_bits(dtype_)) % 8 != 0) fail("sub-byte view must start on a byte boundary");
  }
  // An empty view touches no bytes, so any offset is valid (frameworks allow offsets past the end).
  auto [begin, end] = byte_extent();
  if (begin != end && end > storage_.nbytes()) {
    fail("needs bytes [" + std::to_string(begin) + ", " + std::to_string(end) + ") but the storage has " +
         std::to_string(storage_.nbytes()));
  }
}

Tensor Tensor::contiguous(Storage storage, DType dtype, Dims shape, int64_t storage_offset) {
  Dims strides = contiguous_strides(shape);
  return Tensor(std::move(storage), dtype, std::move(shape), std::move(strides), storage_offset);
}

Tensor Tensor::empty_cpu(DType dtype, Dims shape) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  return contiguous(Storage::allocate_cpu(dtype_storage_bytes(dtype, static_cast<uint64_t>(numel))), dtype,
                    std::move(shape));
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

uint64_t Tensor::nbytes() const { return dtype_storage_bytes(dtype_, static_cast<uint64_t>(numel())); }

bool Tensor::is_contiguous() const {
  int64_t expected = 1;
  for (size_t i = shape_.size(); i-- > 0;) {
    if (shape_[i] == 1) continue;
    if (strides_[i] != expected) return false;
    expected *= shape_[i];
  }
  return true;
}

void* Tensor::data_ptr() const {
  return static_cast<char*>(storage_.data()) + storage_offset_ * dtype_bits(dtype_) / 8;
}

std::pair<uint64_t, uint64_t> view_byte_extent(DType dtype, const Dims& shape, const Dims& strides,
                                               int64_t storage_offset) {
  const uint64_t bits = static_cast<uint64_t>(dtype_bits(dtype));
  const uint64_t begin = static_cast<uint64_t>(storage_offset) * bits / 8;
  uint64_t numel = 1;
  for (int64_t d : shape) numel *= static_cast<uint64_t>(d);
  if (numel == 0) return {begin, begin};
  if (dtype_is_sub_byte(dtype)) return {begin, begin + dtype_storage_bytes(dtype, numel)};
  uint64_t last = static_cast<uint64_t>(storage_offset);
  for (size_t i = 0; i < shape.size(); ++i) last += static_cast<uint64_t>((shape[i] - 1) * strides[i]);
  return {begin, (last + 1) * bits / 8};
}

std::pair<uint64_t, uint64_t> Tensor::byte_extent() const {
  return view_byte_extent(dtype_, shape_, strides_, storage_offset_);
}

const TensorTraits& Tensor::traits() const {
  static const TensorTraits kDefault;
  return traits_ ? *traits_ : kDefault;
}

void Tensor::set_traits(TensorTraits traits) {
  traits_ = traits.is_default() ? nullptr : std::make_shared<const TensorTraits>(std::move(traits));
}

Tensor Tensor::view_as(Dims shape, Dims strides, int64_t storage_offset) const {
  Tensor out(storage_, dtype_, std::move(shape), std::move(strides), storage_offset);
  out.traits_ = traits_;
  return out;
}

std::string Tensor::describe() const {
  std::ostringstream out;
  out << dtype_name(dtype_) << dims_str(shape_) << " strides " << dims_str(strides_) << " offset "
      << storage_offset_ << " on " << storage_.device().str();
  const TensorTraits& traits = this->traits();
  if (!traits.framework_dtype.empty()) out << " (" << traits.framework_dtype << ")";
  if (traits.conj) out << " conjugated";
  if (traits.neg) out << " negated";
  return out.str();
}

void copy_tensor(const Tensor& dst, const Tensor& src) {
  if (dst.dtype() != src.dtype() || dst.shape() != src.shape() || !dst.device().is_cpu() || !src.device().is_cpu()) {
    throw Error(ErrorCode::kInvalidArgument, "copy_tensor: cannot copy " + src.describe() + " into " + dst.describe());
  }
  if (src.numel() == 0) return;
  if (dst.is_contiguous() && src.is_contiguous()) {
    std::memmove(dst.data_ptr(), src.data_ptr(), src.nbytes());
    return;
  }
  if (dtype_is_sub_byte(src.dtype())) throw Error(ErrorCode::kInvalidArgument, "copy_tensor: sub-byte dtypes must be contiguous");
  // An odometer over all dimensions but the last; the last is a strided run of elements.
  const size_t item = static_cast<size_t>(dtype_bits(src.dtype()) / 8);
  const size_t rank = src.dim();
  const int64_t inner = src.shape()[rank - 1];
  const int64_t src_step = src.strides()[rank - 1] * static_cast<int64_t>(item);
  const int64_t dst_step = dst.strides()[rank - 1] * static_cast<int64_t>(item);
  std::vector<int64_t> index(rank, 0);
  auto* s0 = static_cast<const char*>(src.data_ptr());
  auto* d0 = static_cast<char*>(dst.data_ptr());
  while (true) {
    int64_t s_off = 0, d_off = 0;
    for (size_t k = 0; k + 1 < rank; ++k) {
      s_off += index[k] * src.strides()[k] * static_cast<int64_t>(item);
      d_off += index[k] * dst.strides()[k] * static_cast<int64_t>(item);
    }
    const char* s = s0 + s_off;
    char* d = d0 + d_off;
    if (src_step == static_cast<int64_t>(item) && dst_step == static_cast<int64_t>(item)) {
      std::memcpy(d, s, static_cast<size_t>(inner) * item);
    } else {
      for (int64_t i = 0; i < inner; ++i) std::memcpy(d + i * dst_step, s + i * src_step, item);
    }
    size_t k = rank - 1;
    while (k > 0) {
      --k;
      if (++index[k] < src.shape()[k]) break;
      index[k] = 0;
      if (k == 0) return;
    }
    if (rank == 1) return;
  }
}

}  // namespace fastdcp
