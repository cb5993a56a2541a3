"""Glue between torch tensors and the native stager (see fastdcp/_adapters.py)."""

import copy

import torch

from fastdcp._adapters import _CPU, _CUDA, _object_state, _rebuild_container, _rebuild_object
from fastdcp.torch import _dtensor

# fastdcp dtype names; dtypes without one travel as raw bytes of the same width, with the torch
# dtype recorded beside them (Note [Tensor traits]) and restored on load.
_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
    torch.uint16: "U16", torch.int32: "I32", torch.uint32: "U32", torch.int64: "I64",
    torch.uint64: "U64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
    torch.float64: "F64", torch.complex64: "C64", torch.complex128: "C128",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.float8_e8m0fnu: "F8_E8M0",
}
_RAW_BY_WIDTH = {1: "U8", 2: "U16", 4: "U32", 8: "U64", 16: "C128"}
_DTYPES = {name: dtype for dtype, name in _NAMES.items()}
# Trait bits, as in python/src/native_tensor_ops.h.
_CONJ, _NEG, _REQUIRES_GRAD, _PARAMETER, _QUANTIZED = 1, 2, 4, 8, 16
# A staged copy of a quantized tensor has its dtype but not its quantizer: it is refused as well.
_QUANTIZED_DTYPES = {torch.quint8, torch.qint8, torch.qint32, torch.quint4x2, torch.quint2x4}


def _traits(t):
    """describe()'s trait flags and framework dtype of a tensor (Note [Tensor traits])."""
    flags = ((_CONJ if t.is_conj() else 0) | (_NEG if t.is_neg() else 0)
             | (_REQUIRES_GRAD if t.requires_grad else 0)
             | (_PARAMETER if isinstance(t, torch.nn.Parameter) else 0)
             | (_QUANTIZED if t.is_quantized or t.dtype in _QUANTIZED_DTYPES else 0))
    return flags, ("" if t.dtype in _NAMES else str(t.dtype).removeprefix("torch."))


def _native_ops():
    """The native tensor ops of fastdcp._torch_C, if it was built for this very torch (see Note
    [Native tensor ops] in python/src/native_tensor_ops.h); otherwise None, and tensors are read
    and built through torch's Python API."""
    try:
        from fastdcp import _torch_C
    except ImportError:
        return None
    return _torch_C.ops if _torch_C.torch_version == torch.__version__ else None


class TorchAdapter:
    rebuild_container = staticmethod(_rebuild_container)
    deepcopy = staticmethod(copy.deepcopy)
    object_state = staticmethod(_object_state)
    rebuild_object = staticmethod(_rebuild_object)
    # The native fast path: tensors of this type with these dtypes are described in C++, and
    # staged views are made with as_strided on one typed view of each staged buffer.
    tensor_type = torch.Tensor
    dtype_names = _NAMES
    as_strided = staticmethod(torch.as_strided)
    native_ops = _native_ops()
    copy_attributes = True  # a tensor's Python attributes are deep-copied onto its staged copy
    # DTensors are sharded tensors: the boxes of the global tensor their local tensor holds.
    sharded_type = _dtensor.DTensor
    local_tensor = staticmethod(_dtensor.local_tensor)
    rebuild_sharded = staticmethod(_dtensor.rebuild_sharded)

    @staticmethod
    def describe_sharded(dtensor):
        shape, dtype, chunks, replica_index, replica_count = _dtensor.describe_sharded(dtensor)
        name = _NAMES.get(dtype)
        if name is None:
            raise ValueError(f"DTensors of dtype {dtype} are not supported")
        return shape, name, chunks, replica_index, replica_count

    @staticmethod
    def finish_view(source, view):
        # A lazily conjugated or negated view stays one (torch's own stager drops these bits).
        if source.is_conj():
            torch._C._set_conj(view, True)
        if source.is_neg():
            torch._C._set_neg(view, True)

    @staticmethod
    def producer_streams():
        """The caller's current CUDA stream, which device-to-host copies wait for: read on the thread
        that stages or saves, as torch keeps it per thread (a staging thread's is cuda:0's default
        stream, not the rank's); none before CUDA is initialized, which reading would do."""
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return []
        stream = torch.cuda.current_stream()
        return [(stream.device.index, stream.cuda_stream)]

    @staticmethod
    def view_dtype(byte_tensor, dtype):
        return byte_tensor.view(dtype)

    @staticmethod
    def is_tensor(obj):
        return isinstance(obj, torch.Tensor)

    @staticmethod
    def describe(t):
        if t.is_meta:
            raise ValueError("meta tensors have no data to save; materialize it first "
                             "(e.g. module.to_empty(device='cpu'), then initialize or load its values)")
        if t.layout != torch.strided:
            raise ValueError(f"{t.layout} tensors are not supported, only dense ones; convert it with .to_dense()")
        storage = t.untyped_storage()
        device = t.device
        name = _NAMES.get(t.dtype) or _RAW_BY_WIDTH.get(t.element_size())
        if name is None:
            raise ValueError(f"unsupported tensor dtype {t.dtype}")
        if device.type == "cpu":
            kind, index = _CPU, 0
        elif device.type == "cuda":
            kind, index = _CUDA, device.index or 0
        else:
            raise ValueError(f"tensors on {device} cannot be staged (CPU and CUDA can)")
        return (storage.data_ptr(), storage.nbytes(), kind, index, name, tuple(t.shape), t.stride(),
                t.storage_offset(), *_traits(t))

    @staticmethod
    def is_parameter(t):
        return isinstance(t, torch.nn.Parameter)

    @staticmethod
    def apply_traits(t, flags, framework_dtype):
        # The loaded view as torch.load would give it: framework dtype, lazy bits, autograd flags.
        if framework_dtype:
            dtype = getattr(torch, framework_dtype, None)
            if not isinstance(dtype, torch.dtype) or dtype.itemsize != t.element_size():
                raise ValueError(f"this torch has no {t.element_size()}-byte dtype torch.{framework_dtype}")
            t = t.view(dtype)
        if flags & _CONJ:
            torch._C._set_conj(t, True)
        if flags & _NEG:
            torch._C._set_neg(t, True)
        if flags & _PARAMETER:
            return torch.nn.Parameter(t, requires_grad=bool(flags & _REQUIRES_GRAD))
        if flags & _REQUIRES_GRAD:
            t.requires_grad_(True)
        return t

    @staticmethod
    def wrap_storage(capsule, shared, pinned):
        # A uint8 tensor over the whole staged buffer; its storage is the staged tensors' storage.
        return torch.utils.dlpack.from_dlpack(capsule)

    @staticmethod
    def typed_view(byte_tensor, dtype_name, shape, strides, offset):
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise ValueError(f"torch has no dtype for fastdcp dtype {dtype_name}")
        return torch.empty(0, dtype=dtype, device=byte_tensor.device).set_(
            byte_tensor.untyped_storage(), offset, shape, strides)

    @staticmethod
    def empty_device(nbytes, device_index):
        """Device memory for one loaded storage, from torch's caching allocator (Note [Loading onto
        a device]): the byte tensor and its address."""
        t = torch.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", device_index))
        return t, t.data_ptr()

    @staticmethod
    def make_view(byte_tensor, source, shape, strides, offset):
        # The native side copies the source's Python attributes onto the result.
        return torch.empty(0, dtype=source.dtype).set_(byte_tensor.untyped_storage(), offset, shape, strides)
