"""Framework glue for the native stager: how to recognise, describe and rebuild tensors.

See Note [Python conversion] in python/src/bindings.cpp for the protocol.
"""

import copy
import dataclasses

import numpy as np

_CPU, _CUDA = 0, 1


def _rebuild_container(source, items):
    """A container of ``source``'s type holding ``items`` (a list, or a dict of staged values)."""
    if isinstance(source, tuple):
        if type(source) is tuple:
            return tuple(items)
        if hasattr(source, "_fields"):  # namedtuple
            return type(source)(*items)
        return type(source)(items)
    # A dict subclass such as OrderedDict: same type, same instance attributes (a module state
    # dict's ``_metadata``), deep-copied as upstream's deepcopy does.
    out = type(source)()
    out.update(items)
    for name, value in vars(source).items():
        setattr(out, name, copy.deepcopy(value))
    return out


def _object_state(obj):
    """The attributes through which an object is staged (so that tensors inside it are staged
    too), or None to deep-copy it whole. Dataclass instances with a ``__dict__`` qualify."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and hasattr(obj, "__dict__"):
        return vars(obj)
    return None


def _rebuild_object(source, attributes):
    """A new instance of ``source``'s class with ``attributes``, bypassing ``__init__`` and frozen
    ``__setattr__``, as deepcopy's reduce path does."""
    out = object.__new__(type(source))
    vars(out).update(attributes)
    return out


class _DLPackBytes:
    """Hands a DLPack capsule to a consumer that wants the ``__dlpack__`` protocol."""

    def __init__(self, capsule):
        self._capsule = capsule

    def __dlpack__(self, stream=None, **kwargs):
        return self._capsule

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU


_NUMPY_NAMES = {
    np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8",
    np.dtype(np.int16): "I16", np.dtype(np.uint16): "U16", np.dtype(np.float16): "F16",
    np.dtype(np.int32): "I32", np.dtype(np.uint32): "U32", np.dtype(np.float32): "F32",
    np.dtype(np.complex64): "C64", np.dtype(np.float64): "F64", np.dtype(np.int64): "I64",
    np.dtype(np.uint64): "U64", np.dtype(np.complex128): "C128",
}


_NUMPY_DTYPES = {name: dtype for dtype, name in _NUMPY_NAMES.items()}


def _as_numpy(obj):
    """A numpy view of a DLPack producer's host memory; a clear error for anything else."""
    if isinstance(obj, np.ndarray):
        return obj
    device_type, device_id = obj.__dlpack_device__()
    if device_type not in (1, 3):  # kDLCPU, kDLCUDAHost
        raise ValueError(f"cannot stage a {type(obj).__name__} on DLPack device ({device_type}, {device_id}): "
                         "fastdcp.Stager stages host memory; stage CUDA tensors with fastdcp.torch")
    try:
        return np.from_dlpack(obj)
    except (TypeError, BufferError, RuntimeError) as e:
        raise ValueError(f"cannot stage a {type(obj).__name__} through DLPack: {e}") from e


def _extent(array):
    """Bytes from an array's first element to one past its last (non-negative strides)."""
    if array.size == 0:
        return 0
    return sum((n - 1) * s for n, s in zip(array.shape, array.strides)) + array.itemsize


class NumpyAdapter:
    """numpy arrays, and any other DLPack producer of host memory (staged as numpy arrays).

    Views of one numpy array stay views of one staged buffer; another producer's arrays are staged
    each on its own, since DLPack does not say which ones share memory."""

    deepcopy = staticmethod(copy.deepcopy)
    rebuild_container = staticmethod(_rebuild_container)
    object_state = staticmethod(_object_state)
    rebuild_object = staticmethod(_rebuild_object)

    @staticmethod
    def is_tensor(obj):
        kind = type(obj)
        return isinstance(obj, np.ndarray) or (hasattr(kind, "__dlpack__") and hasattr(kind, "__dlpack_device__"))

    @staticmethod
    def describe(obj):
        array = _as_numpy(obj)
        name = _NUMPY_NAMES.get(array.dtype)
        if name is None:
            raise ValueError(f"unsupported numpy dtype {array.dtype}")
        root = array
        while isinstance(root.base, np.ndarray):
            root = root.base
        itemsize = array.itemsize
        if any(s < 0 or s % itemsize for s in (*array.strides, *root.strides)):
            raise ValueError("array with negative or unaligned strides; stage np.ascontiguousarray(a)")
        base_ptr = root.__array_interface__["data"][0]
        ptr = array.__array_interface__["data"][0]
        if (ptr - base_ptr) % itemsize:
            raise ValueError("array not aligned to its element size in its base; stage np.ascontiguousarray(a)")
        strides = tuple(s // itemsize for s in array.strides)
        return (base_ptr, _extent(root), _CPU, 0, name, array.shape, strides, (ptr - base_ptr) // itemsize)

    @staticmethod
    def wrap_storage(capsule, shared, pinned):
        return np.from_dlpack(_DLPackBytes(capsule))

    @staticmethod
    def typed_view(storage, dtype_name, shape, strides, offset):
        dtype = _NUMPY_DTYPES.get(dtype_name)
        if dtype is None:
            raise ValueError(f"numpy has no dtype for fastdcp dtype {dtype_name}; load it with fastdcp.torch")
        return np.ndarray(shape, dtype=dtype, buffer=storage, offset=offset * dtype.itemsize,
                          strides=tuple(s * dtype.itemsize for s in strides))

    @staticmethod
    def make_view(storage, source, shape, strides, offset):
        source = _as_numpy(source)
        itemsize = source.itemsize
        return np.ndarray(shape, dtype=source.dtype, buffer=storage, offset=offset * itemsize,
                          strides=tuple(s * itemsize for s in strides))
