// The C interface through which a framework module hands the Python bindings a native way to read
// and build its tensors. See Note [Native tensor ops].
//
// Note [Native tensor ops]
// Describing a torch tensor through its Python API costs eight attribute calls (~4 µs), and making
// a staged view another ~3 µs: for 50,000 small tensors that is most of a stage. The optional
// module fastdcp._torch_C, compiled against the installed torch's C++ headers, does both on the
// at::Tensor itself in well under a microsecond. It is a separate module so that _C never depends
// on torch; it exports this table in a PyCapsule named kNativeTensorOpsCapsule, and the Python
// adapter hands it over only when the torch it runs with is the one the module was built for.
// Tensors it does not handle (wrapper subclasses, sparse, other devices) fall back to the adapter.
#pragma once

#include <Python.h>

#include <cstdint>

namespace fastdcp::python {

inline constexpr const char* kNativeTensorOpsCapsule = "fastdcp.native_tensor_ops.v4";

// A tensor's traits (Note [Tensor traits]) as bits, in NativeTensorDescription::trait_flags and in
// the adapters' describe() and apply_traits().
inline constexpr int kTraitConj = 1;
inline constexpr int kTraitNeg = 2;
inline constexpr int kTraitRequiresGrad = 4;
inline constexpr int kTraitParameter = 8;
inline constexpr int kTraitQuantized = 16;

struct NativeTensorDescription {
  uintptr_t storage_data;
  uint64_t storage_nbytes;
  int32_t device_type;   // 0 CPU, 1 CUDA
  int32_t device_index;
  int32_t dtype;         // a fastdcp::DType value
  int32_t ndim;
  const int64_t* shape;  // valid while the described object is alive and unchanged
  const int64_t* strides;
  int64_t storage_offset;
  int32_t trait_flags;   // kTrait* bits
};

struct NativeTensorOps {
  // 1: described; 0: not a tensor this module handles (ask the adapter); -1: Python error set.
  // Tensors whose dtype fastdcp lacks are the adapter's, which names the framework dtype.
  int (*describe)(PyObject* obj, NativeTensorDescription* out);
  // A new tensor of source's dtype over the storage of byte_tensor (a tensor made by the adapter's
  // wrap_storage); a new reference, or nullptr with a Python error set.
  PyObject* (*make_view)(PyObject* byte_tensor, PyObject* source, int32_t ndim, const int64_t* shape,
                         const int64_t* strides, int64_t storage_offset);
  // The same with the dtype given as a fastdcp::DType value (for loaded tensors, which have no
  // source); a dtype the framework lacks is a Python error.
  PyObject* (*make_typed_view)(PyObject* byte_tensor, int32_t dtype, int32_t ndim, const int64_t* shape,
                               const int64_t* strides, int64_t storage_offset);
  // A 1-D uint8 CPU tensor over [data, data + nbytes) that calls release(context) when torch frees
  // its storage: what the adapter's wrap_storage makes from a DLPack capsule, without the capsule
  // and the Python call (about 1 µs instead of 10, which matters when loading many tensors).
  PyObject* (*wrap_memory)(void* data, uint64_t nbytes, void* context, void (*release)(void*));
};

}  // namespace fastdcp::python
