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


class NumpyAdapter:
    is_tensor = staticmethod(lambda obj: isinstance(obj, np.ndarray))
    deepcopy = staticmethod(copy.deepcopy)
    rebuild_container = staticmethod(_rebuild_container)
    object_state = staticmethod(_object_state)
    rebuild_object = staticmethod(_rebuild_object)

    @staticmethod
    def describe(array):
        name = _NUMPY_NAMES.get(array.dtype)
        if name is None:
            raise ValueError(f"unsupported numpy dtype {array.dtype}")
        root = array
        while isinstance(root.base, np.ndarray):
            root = root.base
        base_ptr = root.__array_interface__["data"][0]
        ptr = array.__array_interface__["data"][0]
        itemsize = array.itemsize
        if any(s < 0 or s % itemsize for s in array.strides) or (ptr - base_ptr) % itemsize:
            raise ValueError("numpy array with negative or unaligned strides; stage np.ascontiguousarray(a)")
        strides = tuple(s // itemsize for s in array.strides)
        return (base_ptr, root.nbytes, _CPU, 0, name, array.shape, strides, (ptr - base_ptr) // itemsize)

    @staticmethod
    def wrap_storage(capsule, shared, pinned):
        return np.from_dlpack(_DLPackBytes(capsule))

    @staticmethod
    def make_view(storage, source, shape, strides, offset):
        itemsize = source.itemsize
        return np.ndarray(shape, dtype=source.dtype, buffer=storage, offset=offset * itemsize,
                          strides=tuple(s * itemsize for s in strides))
