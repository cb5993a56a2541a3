#include "fastdcp/tensor/dlpack_interop.h"

#include "fastdcp/common/error.h"

namespace fastdcp {
namespace {

struct DLPackMapping {
  uint8_t code;
  uint8_t bits;
  DType dtype;
};

constexpr DLPackMapping kMappings[] = {
    {kDLBool, 8, DType::kBool},
    {kDLUInt, 8, DType::kU8},
    {kDLUInt, 16, DType::kU16},
    {kDLUInt, 32, DType::kU32},
    {kDLUInt, 64, DType::kU64},
    {kDLInt, 8, DType::kI8},
    {kDLInt, 16, DType::kI16},
    {kDLInt, 32, DType::kI32},
    {kDLInt, 64, DType::kI64},
    {kDLFloat, 16, DType::kF16},
    {kDLFloat, 32, DType::kF32},
    {kDLFloat, 64, DType::kF64},
    {kDLBfloat, 16, DType::kBF16},
    {kDLComplex, 64, DType::kC64},
    {kDLComplex, 128, DType::kC128},
    {kDLFloat8_e5m2, 8, DType::kF8_E5M2},
    {kDLFloat8_e4m3fn, 8, DType::kF8_E4M3},
    {kDLFloat8_e8m0fnu, 8, DType::kF8_E8M0},
    {kDLFloat8_e4m3fnuz, 8, DType::kF8_E4M3FNUZ},
    {kDLFloat8_e5m2fnuz, 8, DType::kF8_E5M2FNUZ},
    {kDLFloat6_e2m3fn, 6, DType::kF6_E2M3},
    {kDLFloat6_e3m2fn, 6, DType::kF6_E3M2},
    {kDLFloat4_e2m1fn, 4, DType::kF4},
};

std::string dl_dtype_str(DLDataType t) {
  return "code " + std::to_string(t.code) + ", bits " + std::to_string(t.bits) + ", lanes " + std::to_string(t.lanes);
}

Device device_from_dlpack(DLDevice device) {
  switch (device.device_type) {
    case kDLCPU:
    case kDLCUDAHost:
      return Device::cpu();
    case kDLCUDA:
    case kDLCUDAManaged:
      return Device::cuda(device.device_id);
    default:
      throw Error(ErrorCode::kInvalidArgument,
                  "DLPack device type " + std::to_string(device.device_type) + " is not supported (CPU and CUDA are)");
  }
}

// Keeps the exported tensor (and so its storage) and the shape/strides arrays alive.
struct ExportContext {
  Tensor tensor;
  Dims shape;
  Dims strides;
};

void fill_dltensor(DLTensor& out, ExportContext& ctx) {
  const Tensor& t = ctx.tensor;
  out.data = t.data_ptr();
  out.device = t.device().is_cpu() ? DLDevice{kDLCPU, 0} : DLDevice{kDLCUDA, t.device().index};
  out.ndim = static_cast<int32_t>(t.dim());
  out.dtype = dtype_to_dlpack(t.dtype());
  out.shape = ctx.shape.data();
  out.strides = ctx.strides.data();
  out.byte_offset = 0;
}

}  // namespace

std::optional<DType> dtype_from_dlpack(DLDataType dtype) noexcept {
  if (dtype.lanes != 1) return std::nullopt;
  for (const auto& m : kMappings) {
    if (m.code == dtype.code && m.bits == dtype.bits) return m.dtype;
  }
  return std::nullopt;
}

DLDataType dtype_to_dlpack(DType dtype) {
  for (const auto& m : kMappings) {
    if (m.dtype == dtype) return {m.code, m.bits, 1};
  }
  throw Error(ErrorCode::kInvalidArgument, "dtype " + std::string(dtype_name(dtype)) + " has no DLPack code");
}

Tensor DLPackImporter::import(DLManagedTensorVersioned* managed, std::optional<StorageHint> hint) {
  if (!managed) throw Error(ErrorCode::kInvalidArgument, "DLPack import of a null tensor");
  std::shared_ptr<const void> owner(managed, [](DLManagedTensorVersioned* m) {
    if (m->deleter) m->deleter(m);
  });
  if (managed->version.major != kDLPackMajorVersion) {
    throw Error(ErrorCode::kInvalidArgument, "DLPack major version " + std::to_string(managed->version.major) +
                                                 " is not supported (expected " +
                                                 std::to_string(kDLPackMajorVersion) + ")");
  }
  return import_view(managed->dl_tensor, std::move(owner), hint);
}

Tensor DLPackImporter::import(DLManagedTensor* managed, std::optional<StorageHint> hint) {
  if (!managed) throw Error(ErrorCode::kInvalidArgument, "DLPack import of a null tensor");
  std::shared_ptr<const void> owner(managed, [](DLManagedTensor* m) {
    if (m->deleter) m->deleter(m);
  });
  return import_view(managed->dl_tensor, std::move(owner), hint);
}

Tensor DLPackImporter::import_view(const DLTensor& dl, std::shared_ptr<const void> owner,
                                   std::optional<StorageHint> hint) {
  const auto dtype = dtype_from_dlpack(dl.dtype);
  if (!dtype) throw Error(ErrorCode::kInvalidArgument, "unsupported DLPack dtype (" + dl_dtype_str(dl.dtype) + ")");
  const Device device = device_from_dlpack(dl.device);
  if (dl.ndim < 0) throw Error(ErrorCode::kInvalidArgument, "DLPack tensor with negative ndim");

  Dims shape;
  shape.resize(static_cast<size_t>(dl.ndim));
  for (int i = 0; i < dl.ndim; ++i) shape[i] = dl.shape[i];
  Dims strides;
  if (dl.strides) {
    strides.resize(shape.size());
    for (int i = 0; i < dl.ndim; ++i) {
      if (dl.strides[i] < 0) {
        throw Error(ErrorCode::kInvalidArgument, "DLPack tensor has a negative stride in dimension " +
                                                     std::to_string(i) + "; make it contiguous first");
      }
      strides[i] = dl.strides[i];
    }
  } else {
    strides = contiguous_strides(shape);
  }

  // The view's own byte extent, relative to its first element.
  const uintptr_t address = reinterpret_cast<uintptr_t>(dl.data) + dl.byte_offset;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) throw Error(ErrorCode::kInvalidArgument, "DLPack tensor has a negative size");
  }
  const uint64_t extent = view_byte_extent(*dtype, shape, strides, 0).second;
  const uint64_t bits = static_cast<uint64_t>(dtype_bits(*dtype));

  uintptr_t base = address;
  uint64_t nbytes = extent;
  const uint64_t device_key = (static_cast<uint64_t>(device.type) << 32) | static_cast<uint32_t>(device.index);
  if (hint) {
    base = reinterpret_cast<uintptr_t>(hint->base);
    nbytes = hint->nbytes;
    if (address < base || address + extent > base + nbytes) {
      throw Error(ErrorCode::kInvalidArgument, "DLPack view lies outside the storage named by its hint");
    }
  } else if (auto it = storages_.upper_bound({device_key, address}); it != storages_.begin()) {
    --it;
    const auto& [key, known] = *it;
    const uintptr_t known_base = key.second;
    if (key.first == device_key && address + extent <= known_base + known.nbytes() &&
        ((address - known_base) * 8) % bits == 0) {
      base = known_base;
      nbytes = known.nbytes();
    }
  }
  if (((address - base) * 8) % bits != 0) {
    throw Error(ErrorCode::kInvalidArgument, "DLPack view does not start on an element boundary of its storage");
  }
  const int64_t offset = static_cast<int64_t>((address - base) * 8 / bits);

  auto [it, inserted] = storages_.try_emplace({device_key, base});
  if (inserted || it->second.nbytes() != nbytes) {
    // A storage seen before with another size was freed and reallocated: start afresh.
    it->second = Storage::wrap(reinterpret_cast<void*>(base), nbytes, device, std::move(owner));
  }
  // Otherwise the first importer's owner keeps this memory alive; `owner` is released here.
  return Tensor(it->second, *dtype, std::move(shape), std::move(strides), offset);
}

namespace {
// Both capsule kinds own an ExportContext and free it, and themselves, in their deleter.
template <class Managed>
Managed* make_capsule(const Tensor& tensor) {
  auto ctx = std::make_unique<ExportContext>(ExportContext{tensor, tensor.shape(), tensor.strides()});
  auto out = std::make_unique<Managed>();
  fill_dltensor(out->dl_tensor, *ctx);
  out->manager_ctx = ctx.release();
  out->deleter = [](Managed* self) {
    delete static_cast<ExportContext*>(self->manager_ctx);
    delete self;
  };
  return out.release();
}
}  // namespace

DLManagedTensorVersioned* to_dlpack_versioned(const Tensor& tensor, bool read_only) {
  DLManagedTensorVersioned* out = make_capsule<DLManagedTensorVersioned>(tensor);
  out->version = {kDLPackMajorVersion, kDLPackMinorVersion};
  out->flags = read_only ? kDLPackFlagReadOnly : 0;
  return out;
}

DLManagedTensor* to_dlpack_legacy(const Tensor& tensor) { return make_capsule<DLManagedTensor>(tensor); }

}  // namespace fastdcp
