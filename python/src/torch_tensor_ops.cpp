// fastdcp._torch_C: native describe/make_view for torch tensors. See Note [Native tensor ops] in
// native_tensor_ops.h. Built against the torch found at build time; the Python adapter uses it only
// with that exact torch version.

#include <ATen/ops/from_blob.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>

#include "fastdcp/tensor/dtype.h"
#include "native_tensor_ops.h"

namespace {

using fastdcp::DType;
using fastdcp::python::NativeTensorDescription;
using fastdcp::python::NativeTensorOps;

// torch dtypes without a fastdcp name are described by the adapter, which records the torch dtype.
std::optional<DType> fastdcp_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBool: return DType::kBool;
    case at::kByte: return DType::kU8;
    case at::kChar: return DType::kI8;
    case at::kShort: return DType::kI16;
    case at::kUInt16: return DType::kU16;
    case at::kInt: return DType::kI32;
    case at::kUInt32: return DType::kU32;
    case at::kLong: return DType::kI64;
    case at::kUInt64: return DType::kU64;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    case at::kFloat: return DType::kF32;
    case at::kDouble: return DType::kF64;
    case at::kComplexFloat: return DType::kC64;
    case at::kComplexDouble: return DType::kC128;
    case at::kFloat8_e4m3fn: return DType::kF8_E4M3;
    case at::kFloat8_e5m2: return DType::kF8_E5M2;
    case at::kFloat8_e4m3fnuz: return DType::kF8_E4M3FNUZ;
    case at::kFloat8_e5m2fnuz: return DType::kF8_E5M2FNUZ;
    case at::kFloat8_e8m0fnu: return DType::kF8_E8M0;
    default: return std::nullopt;
  }
}

PyTypeObject* parameter_type = nullptr;  // torch.nn.Parameter, set when the module loads

int describe(PyObject* obj, NativeTensorDescription* out) {
  try {
    if (!THPVariable_Check(obj)) return 0;
    const at::Tensor& t = THPVariable_Unpack(obj);
    // Anything but a plain strided tensor with its own storage goes through the adapter, which
    // gives these cases the same treatment as before this module existed.
    if (!t.defined() || t.layout() != at::kStrided || !t.has_storage() || t.is_quantized() ||
        t.key_set().has(c10::DispatchKey::Python)) {
      return 0;
    }
    if (t.is_cpu()) {
      out->device_type = 0;
      out->device_index = 0;
    } else if (t.is_cuda()) {
      out->device_type = 1;
      out->device_index = t.get_device();
    } else {
      return 0;
    }
    const std::optional<DType> dtype = fastdcp_dtype(t);
    if (!dtype) return 0;
    const c10::Storage& storage = t.storage();
    out->storage_data = reinterpret_cast<uintptr_t>(storage.data());
    out->storage_nbytes = storage.nbytes();
    out->dtype = static_cast<int32_t>(*dtype);
    out->ndim = static_cast<int32_t>(t.dim());
    out->shape = t.sizes().data();
    out->strides = t.strides().data();
    out->storage_offset = t.storage_offset();
    out->trait_flags = (t.is_conj() ? fastdcp::python::kTraitConj : 0) | (t.is_neg() ? fastdcp::python::kTraitNeg : 0) |
                       (t.requires_grad() ? fastdcp::python::kTraitRequiresGrad : 0) |
                       (PyObject_TypeCheck(obj, parameter_type) ? fastdcp::python::kTraitParameter : 0);
    return 1;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return -1;
  }
}

std::optional<at::ScalarType> torch_dtype(DType dtype) {
  switch (dtype) {
    case DType::kBool: return at::kBool;
    case DType::kU8: return at::kByte;
    case DType::kI8: return at::kChar;
    case DType::kI16: return at::kShort;
    case DType::kU16: return at::kUInt16;
    case DType::kI32: return at::kInt;
    case DType::kU32: return at::kUInt32;
    case DType::kI64: return at::kLong;
    case DType::kU64: return at::kUInt64;
    case DType::kF16: return at::kHalf;
    case DType::kBF16: return at::kBFloat16;
    case DType::kF32: return at::kFloat;
    case DType::kF64: return at::kDouble;
    case DType::kC64: return at::kComplexFloat;
    case DType::kC128: return at::kComplexDouble;
    case DType::kF8_E4M3: return at::kFloat8_e4m3fn;
    case DType::kF8_E5M2: return at::kFloat8_e5m2;
    case DType::kF8_E4M3FNUZ: return at::kFloat8_e4m3fnuz;
    case DType::kF8_E5M2FNUZ: return at::kFloat8_e5m2fnuz;
    case DType::kF8_E8M0: return at::kFloat8_e8m0fnu;
    default: return std::nullopt;
  }
}

// A tensor of `dtype` over the storage of `bytes`, on its device (CUDA for a load onto a device:
// Note [Loading onto a device]). As at::empty does: a TensorImpl over an existing storage, without
// a dispatch.
at::Tensor view_of(const at::Tensor& bytes, caffe2::TypeMeta dtype, int32_t ndim, const int64_t* shape,
                   const int64_t* strides, int64_t storage_offset) {
  c10::Storage storage = bytes.storage();
  const c10::DispatchKey backend = bytes.is_cuda() ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU;
  auto impl = c10::make_intrusive<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(backend), dtype);
  impl->set_sizes_and_strides(c10::IntArrayRef(shape, static_cast<size_t>(ndim)),
                              c10::IntArrayRef(strides, static_cast<size_t>(ndim)), storage_offset);
  return at::Tensor(std::move(impl));
}

PyObject* make_view(PyObject* byte_tensor, PyObject* source, int32_t ndim, const int64_t* shape,
                    const int64_t* strides, int64_t storage_offset) {
  try {
    if (!THPVariable_Check(byte_tensor) || !THPVariable_Check(source)) {
      PyErr_SetString(PyExc_TypeError, "fastdcp._torch_C.make_view expects torch tensors");
      return nullptr;
    }
    const at::Tensor& src = THPVariable_Unpack(source);
    at::Tensor out = view_of(THPVariable_Unpack(byte_tensor), src.dtype(), ndim, shape, strides, storage_offset);
    // A lazily conjugated or negated view stays one (torch's own stager drops these bits).
    out.unsafeGetTensorImpl()->_set_conj(src.is_conj());
    out.unsafeGetTensorImpl()->_set_neg(src.is_neg());
    return THPVariable_Wrap(std::move(out));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* make_typed_view(PyObject* byte_tensor, int32_t dtype, int32_t ndim, const int64_t* shape,
                          const int64_t* strides, int64_t storage_offset) {
  try {
    const std::optional<at::ScalarType> type = torch_dtype(static_cast<DType>(dtype));
    if (!THPVariable_Check(byte_tensor) || !type) {
      PyErr_Format(PyExc_ValueError, "torch has no dtype for fastdcp dtype %s",
                   std::string(fastdcp::dtype_name(static_cast<DType>(dtype))).c_str());
      return nullptr;
    }
    return THPVariable_Wrap(view_of(THPVariable_Unpack(byte_tensor), caffe2::TypeMeta::fromScalarType(*type), ndim,
                                    shape, strides, storage_offset));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* wrap_memory(void* data, uint64_t nbytes, void* context, void (*release)(void*)) {
  try {
    at::Tensor bytes = at::from_blob(
        data, {static_cast<int64_t>(nbytes)}, [context, release](void*) { release(context); },
        at::TensorOptions().dtype(at::kByte).device(at::kCPU));
    return THPVariable_Wrap(std::move(bytes));
  } catch (const std::exception& e) {
    release(context);
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

constexpr NativeTensorOps kOps{&describe, &make_view, &make_typed_view, &wrap_memory};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_torch_C", "Native torch tensor access for fastdcp's stager.",
                          -1, nullptr, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__torch_C() {
  PyObject* parameter_module = PyImport_ImportModule("torch.nn.parameter");
  if (!parameter_module) return nullptr;
  PyObject* parameter = PyObject_GetAttrString(parameter_module, "Parameter");
  Py_DECREF(parameter_module);
  if (!parameter) return nullptr;
  if (!PyType_Check(parameter)) {
    Py_DECREF(parameter);
    PyErr_SetString(PyExc_ImportError, "torch.nn.parameter.Parameter is not a type");
    return nullptr;
  }
  parameter_type = reinterpret_cast<PyTypeObject*>(parameter);  // kept for the process's life
  PyObject* module = PyModule_Create(&module_def);
  if (!module) return nullptr;
  PyObject* ops = PyCapsule_New(const_cast<NativeTensorOps*>(&kOps), fastdcp::python::kNativeTensorOpsCapsule, nullptr);
  if (!ops || PyModule_AddObject(module, "ops", ops) != 0 ||
      PyModule_AddStringConstant(module, "torch_version", FASTDCP_TORCH_VERSION) != 0) {
    Py_XDECREF(ops);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
