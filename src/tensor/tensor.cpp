#include "fastdcp/tensor/tensor.h"

#include <climits>
#include <cstring>
#include <vector>

#include <sstream>

#include "fastdcp/common/error.h"

namespace fastdcp {

std::string dims_text(const Dims& dims) {
  std::string out = "[";
  for (size_t d = 0; d < dims.size(); ++d) out += (d ? ", " : "") + std::to_string(dims[d]);
  return out + "]";
}

bool contiguous_layout(const Dims& shape, const Dims& strides) {
  int64_t expected = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    if (shape[i] == 1) continue;
    if (strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

namespace {

// Note [Checked view arithmetic]
// Shapes, strides and offsets come from files and from other libraries, so every size is computed
// with overflow checks: a view whose extent wraps around 2^64 would pass a bounds check and address
// bytes outside its storage. Frameworks compute sizes in int64 (torch's set_sizes_and_strides does
// not check them), so the element count (zero sizes counted as one), the offset in bits and the
// extent in bits must also fit int64; other views are refused.
constexpr uint64_t kMaxSize = static_cast<uint64_t>(INT64_MAX);

bool mul_fits(uint64_t a, uint64_t b, uint64_t& out) { return !__builtin_mul_overflow(a, b, &out) && out <= kMaxSize; }
bool add_fits(uint64_t a, uint64_t b, uint64_t& out) { return !__builtin_add_overflow(a, b, &out) && out <= kMaxSize; }

// What is wrong with a view, as a code (and the dimension it concerns): the checks run for every
// tensor staged or loaded, so the message is built only for a view that fails them.
struct ViewFault {
  enum Code : uint8_t {
    kNone, kRanksDiffer, kNegativeOffset, kNegativeSize, kSizesOverflow, kNegativeStride, kExtentOverflow,
    kSubByteLayout, kSubByteOffset, kOutsideStorage
  };
  Code code = kNone;
  size_t dim = 0;
  std::pair<uint64_t, uint64_t> extent{};  // kOutsideStorage: the bytes the view needs
  uint64_t storage_nbytes = 0;             // and those its storage has

  explicit operator bool() const { return code != kNone; }
  std::string message() const {
    switch (code) {
      case kNone: break;
      case kRanksDiffer: return "shape and strides differ in rank";
      case kNegativeOffset: return "negative storage offset";
      case kNegativeSize: return "negative size in dimension " + std::to_string(dim);
      case kSizesOverflow: return "its sizes multiply beyond 2^63";
      case kNegativeStride: return "negative stride in dimension " + std::to_string(dim);
      case kExtentOverflow: return "its extent in bits is beyond 2^63";
      case kSubByteLayout: return "sub-byte dtypes must be contiguous";
      case kSubByteOffset: return "sub-byte view must start on a byte boundary";
      case kOutsideStorage:
        return "needs bytes [" + std::to_string(extent.first) + ", " + std::to_string(extent.second) +
               ") but the storage has " + std::to_string(storage_nbytes);
    }
    return {};
  }
};

// The product of the sizes, zero sizes counted as one (what contiguous strides reach).
ViewFault shape_span(const Dims& shape, uint64_t& span) {
  span = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) return {ViewFault::kNegativeSize, i};
    if (!mul_fits(span, static_cast<uint64_t>(std::max<int64_t>(shape[i], 1)), span)) return {ViewFault::kSizesOverflow};
  }
  return {};
}

// The [begin, end) bytes the view touches.
ViewFault view_extent(DType dtype, const Dims& shape, const Dims& strides, int64_t storage_offset,
                      std::pair<uint64_t, uint64_t>& extent) {
  if (shape.size() != strides.size()) return {ViewFault::kRanksDiffer};
  if (storage_offset < 0) return {ViewFault::kNegativeOffset};
  uint64_t span = 1;
  if (ViewFault fault = shape_span(shape, span)) return fault;
  bool empty = false;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (strides[i] < 0) return {ViewFault::kNegativeStride, i};
    empty = empty || shape[i] == 0;
  }
  const auto bits = static_cast<uint64_t>(dtype_bits(dtype));
  uint64_t begin_bits = 0;
  if (!mul_fits(static_cast<uint64_t>(storage_offset), bits, begin_bits)) return {ViewFault::kExtentOverflow};
  // An empty view touches no bytes, so any offset is valid (frameworks allow offsets past the end).
  if (empty) {
    extent = {begin_bits / 8, begin_bits / 8};
    return {};
  }
  uint64_t end_bits = 0;
  if (dtype_is_sub_byte(dtype)) {  // contiguous (the constructor checks): span elements
    uint64_t data_bits = 0;
    if (!mul_fits(span, bits, data_bits) || !add_fits(begin_bits, data_bits, end_bits)) return {ViewFault::kExtentOverflow};
  } else {
    uint64_t last = static_cast<uint64_t>(storage_offset);  // the last element's index
    for (size_t i = 0; i < shape.size(); ++i) {
      uint64_t step = 0;
      if (!mul_fits(static_cast<uint64_t>(shape[i] - 1), static_cast<uint64_t>(strides[i]), step) ||
          !add_fits(last, step, last)) {
        return {ViewFault::kExtentOverflow};
      }
    }
    if (!add_fits(last, 1, last) || !mul_fits(last, bits, end_bits)) return {ViewFault::kExtentOverflow};
  }
  extent = {begin_bits / 8, (end_bits + 7) / 8};
  return {};
}

}  // namespace

std::optional<uint64_t> contiguous_nbytes(DType dtype, const Dims& shape) {
  uint64_t span = 1, bits = 0;
  if (shape_span(shape, span)) return std::nullopt;
  for (const int64_t d : shape) {
    if (d == 0) return 0;
  }
  if (!mul_fits(span, static_cast<uint64_t>(dtype_bits(dtype)), bits)) return std::nullopt;
  return (bits + 7) / 8;
}

namespace {
ViewFault check_view(DType dtype, const Dims& shape, const Dims& strides, int64_t storage_offset,
                     uint64_t storage_nbytes) {
  std::pair<uint64_t, uint64_t> extent;
  if (ViewFault fault = view_extent(dtype, shape, strides, storage_offset, extent)) return fault;
  if (dtype_is_sub_byte(dtype)) {  // the sizes and the offset in bits fit int64 (checked above)
    if (!contiguous_layout(shape, strides)) return {ViewFault::kSubByteLayout};
    if ((storage_offset * dtype_bits(dtype)) % 8 != 0) return {ViewFault::kSubByteOffset};
  }
  if (extent.first != extent.second && extent.second > storage_nbytes) {
    return {ViewFault::kOutsideStorage, 0, extent, storage_nbytes};
  }
  return {};
}
}  // namespace

std::string view_problem(DType dtype, const Dims& shape, const Dims& strides, int64_t storage_offset,
                         uint64_t storage_nbytes) {
  return check_view(dtype, shape, strides, storage_offset, storage_nbytes).message();
}

Dims contiguous_strides(const Dims& shape) {
  uint64_t span = 1;
  if (ViewFault fault = shape_span(shape, span)) {
    throw Error(ErrorCode::kInvalidArgument, "no contiguous strides for the shape " + dims_text(shape) + ": " + fault.message());
  }
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
  if (ViewFault fault = check_view(dtype_, shape_, strides_, storage_offset_, storage_.nbytes())) fail(fault.message());
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

bool Tensor::is_contiguous() const { return contiguous_layout(shape_, strides_); }

void* Tensor::data_ptr() const {
  return static_cast<char*>(storage_.data()) + storage_offset_ * dtype_bits(dtype_) / 8;
}

std::pair<uint64_t, uint64_t> view_byte_extent(DType dtype, const Dims& shape, const Dims& strides,
                                               int64_t storage_offset) {
  std::pair<uint64_t, uint64_t> extent;
  if (ViewFault fault = view_extent(dtype, shape, strides, storage_offset, extent)) {
    throw Error(ErrorCode::kInvalidArgument, "invalid view " + std::string(dtype_name(dtype)) + dims_text(shape) +
                                                 " strides " + dims_text(strides) + " offset " +
                                                 std::to_string(storage_offset) + ": " + fault.message());
  }
  return extent;
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
  out << dtype_name(dtype_) << dims_text(shape_) << " strides " << dims_text(strides_) << " offset "
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
