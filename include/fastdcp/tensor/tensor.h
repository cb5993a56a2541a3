#pragma once
// A Tensor is a strided view on a Storage: dtype, shape, strides and storage offset, the latter
// two in elements, as in PyTorch. Tensors are cheap handles: copying one shares the storage.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "fastdcp/tensor/dims.h"
#include "fastdcp/tensor/dtype.h"
#include "fastdcp/tensor/storage.h"

namespace fastdcp {

// Note [Tensor traits]
// What a framework knows about a tensor beyond its bytes and layout, carried beside it through
// staging, the writer (the 6th element of a tensor record, docs/format.md) and the reader, so that
// a load gives back what torch.load would: lazy conjugate/negative bits, autograd flags, and the
// framework's own dtype where fastdcp stores the bytes under another one (torch.complex32 as U32).
// A Tensor holds non-default traits behind a shared immutable pointer and default ones as null,
// so that copying the common tensor costs two pointer copies (100,000 tensors stage with each).
struct TensorTraits {
  bool conj = false;           // lazily conjugated: the values are the conjugates of the bytes
  bool neg = false;            // lazily negated
  bool requires_grad = false;
  bool parameter = false;      // an nn.Parameter (or the framework's equivalent)
  bool quantized = false;      // the bytes lack scale and zero point: saving refuses it
  std::string framework_dtype;  // empty: the dtype says it all; else the framework's dtype name

  bool is_default() const {
    return !conj && !neg && !requires_grad && !parameter && !quantized && framework_dtype.empty();
  }
  bool operator==(const TensorTraits&) const = default;
};

class Tensor {
 public:
  Tensor() = default;
  // Validates that every element lies inside the storage; throws Error(kInvalidArgument).
  Tensor(Storage storage, DType dtype, Dims shape, Dims strides, int64_t storage_offset = 0);
  // A C-contiguous view.
  static Tensor contiguous(Storage storage, DType dtype, Dims shape, int64_t storage_offset = 0);
  // Allocates a new contiguous CPU tensor (zeroed).
  static Tensor empty_cpu(DType dtype, Dims shape);

  bool defined() const { return storage_.defined(); }
  const Storage& storage() const { return storage_; }
  DType dtype() const { return dtype_; }
  const Dims& shape() const { return shape_; }
  const Dims& strides() const { return strides_; }
  int64_t storage_offset() const { return storage_offset_; }
  const TensorTraits& traits() const;
  void set_traits(TensorTraits traits);
  void share_traits(const Tensor& other) { traits_ = other.traits_; }  // a pointer copy
  Device device() const { return storage_.device(); }
  size_t dim() const { return shape_.size(); }
  int64_t numel() const;
  // Bytes of the elements themselves (numel * element size).
  uint64_t nbytes() const;
  bool is_contiguous() const;
  // Address of element 0 (storage data + offset).
  void* data_ptr() const;
  // [begin, end) byte range of the storage that this view touches; empty views give begin == end.
  std::pair<uint64_t, uint64_t> byte_extent() const;

  // A new view of the same storage, with the same traits: what `view`, `narrow` and slicing
  // produce in frameworks.
  Tensor view_as(Dims shape, Dims strides, int64_t storage_offset) const;

  std::string describe() const;  // "F32[10, 10] strides [10, 1] offset 0 on cpu"

 private:
  Storage storage_;
  DType dtype_ = DType::kF32;
  Dims shape_;
  Dims strides_;
  int64_t storage_offset_ = 0;
  std::shared_ptr<const TensorTraits> traits_;  // null: all default
};

// Error(kInvalidArgument) for a shape without them (sizes beyond int64).
Dims contiguous_strides(const Dims& shape);
// Whether a view of this shape and strides is row-major without gaps (dims of size 1 ignored).
bool contiguous_layout(const Dims& shape, const Dims& strides);
// "[1, 2, 3]": dims as messages and the CLI show them.
std::string dims_text(const Dims& dims);
// Copies src's elements into dst (CPU tensors of one dtype and shape, any strides, not
// overlapping); Error(kInvalidArgument) naming both otherwise.
void copy_tensor(const Tensor& dst, const Tensor& src);
// [begin, end) bytes that a view touches, relative to the start of its storage; Error(kInvalidArgument)
// for negative sizes, strides or offset, or sizes beyond int64 (Note [Checked view arithmetic]).
std::pair<uint64_t, uint64_t> view_byte_extent(DType dtype, const Dims& shape, const Dims& strides,
                                               int64_t storage_offset);
// Why such a view of a storage of `storage_nbytes` bytes is invalid (a phrase), or "" if it is valid:
// what the Tensor constructor checks, for callers that describe views before they have storages.
std::string view_problem(DType dtype, const Dims& shape, const Dims& strides, int64_t storage_offset,
                         uint64_t storage_nbytes);
// The bytes of a contiguous tensor of this shape, or nullopt for a negative size or sizes beyond int64.
std::optional<uint64_t> contiguous_nbytes(DType dtype, const Dims& shape);

}  // namespace fastdcp
