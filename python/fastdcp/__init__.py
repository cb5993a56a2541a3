"""fastdcp: fast, asynchronous, distributed checkpointing.

The framework-neutral API stages trees of numpy arrays; ``fastdcp.torch`` is the drop-in
replacement for ``torch.distributed.checkpoint._experimental``.
"""

from fastdcp import _C, errors
from fastdcp._adapters import NumpyAdapter
from fastdcp._C import StagingOptions, WriteStats, cuda_available
from fastdcp._C import Stager as _NativeStager
from fastdcp.errors import *  # noqa: F403 (one name per error code: fastdcp.errors)

__all__ = ["Stager", "StagingOptions", "WriteStats", "cuda_available", "errors", "load", "save", "verify",
           *errors.__all__]


class Stager:
    """Stages trees (dict/list/tuple, scalars, numpy arrays) into reusable host buffers.

    Views of one array stay views of one staged buffer; buffers are cached and reused across
    calls, so a second ``stage`` of the same arrays copies into the same memory.
    """

    def __init__(self, *, use_pinned_memory=False, use_shared_memory=False, copy_threads=0,
                 memory_budget_bytes=0):
        options = StagingOptions()
        options.use_pinned_memory = use_pinned_memory
        options.use_shared_memory = use_shared_memory
        options.use_async_staging = False
        options.use_non_blocking_copy = False
        options.copy_threads = copy_threads
        options.memory_budget_bytes = memory_budget_bytes
        self._native = _NativeStager(options, use_pinned_memory and cuda_available(), NumpyAdapter())

    def stage(self, tree):
        return self._native.stage(tree)

    def stats(self):
        return self._native.stats()

    def close(self):
        self._native.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save(path, tree, *, overwrite=False, io_threads=0, direct_io=False, io_engine="threads") -> WriteStats:
    """Writes a tree of numpy arrays (or other host DLPack producers) and plain values as a
    one-rank fastdcp checkpoint (docs/format.md); a committed checkpoint at ``path`` is replaced
    only with ``overwrite``."""
    options = _C.WriteOptions(overwrite=overwrite, overwrite_option="overwrite=True", io_threads=io_threads,
                              direct_io=direct_io, io_engine=io_engine)
    return _C.CheckpointIO(NumpyAdapter(), 0, 1).write(str(path), tree, options)


def load(path, template=None, *, strict=False, verify=True, mmap=False, io_threads=0, direct_io=True,
         io_engine="threads"):
    """Loads a one-rank checkpoint as numpy arrays; with a ``template``, fills its arrays in place
    and returns ``(template, missing_keys, unexpected_keys)``."""
    options = _C.ReadOptions(verify_checksums=verify, use_mmap=mmap, io_threads=io_threads, direct_io=direct_io,
                             io_engine=io_engine)
    io = _C.CheckpointIO(NumpyAdapter(), 0, 1)
    if template is None:
        return io.read(str(path), options)
    result = io.read_into(str(path), template, options, strict=strict)
    return result.state_dict, result.missing_keys, result.unexpected_keys


def verify(path):
    """Checks every file of a checkpoint against its manifest, its header and tree as a load does,
    and every chunk's checksum. Returns counts; ``files_without_checksums`` counts plain
    safetensors files, whose data has no checksums to check."""
    return _C.verify(str(path))
