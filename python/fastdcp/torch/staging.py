"""Staging: a training-safe host copy of a state dict, as in
torch.distributed.checkpoint._experimental.staging, backed by fastdcp's native stager."""

import abc
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from fastdcp import _C
from fastdcp.torch._adapter import TorchAdapter
from fastdcp.torch.types import STATE_DICT

__all__ = ["CheckpointStager", "CheckpointStagerConfig", "DefaultStager"]

_C.set_warning_handler(lambda message: warnings.warn(message, UserWarning, stacklevel=3))


class CheckpointStager(abc.ABC):
    """Stages a state dict for checkpointing."""

    @abc.abstractmethod
    def stage(self, state_dict: STATE_DICT, **kwargs: Any) -> STATE_DICT | Future[STATE_DICT]:
        ...

    @abc.abstractmethod
    def close(self) -> None:
        ...


@dataclass
class CheckpointStagerConfig:
    """Upstream's four staging flags, with upstream's defaults, and fastdcp's copy-on-write staging.

    ``use_copy_on_write``: when an AsyncCheckpointer saves, CPU tensors are write-protected rather
    than copied before training may go on, and copied in the background; a tensor written before
    its copy is copied first (Note [Copy-on-write staging] in fastdcp/staging/stager.h). Turn it
    off if host tensors are written by DMA into memory pinned outside torch (cudaHostRegister, RDMA).
    """

    use_pinned_memory: bool = True
    use_shared_memory: bool = True
    use_async_staging: bool = True
    use_non_blocking_copy: bool = True
    use_copy_on_write: bool = True


class DefaultStager(CheckpointStager):
    """Copies a state dict into cached host buffers, synchronously or on a background thread.

    Views of one storage stay views of one buffer; the same live storages are staged into the same
    buffers on every call (so an earlier staged result shows the newer values); staged tensors are
    CPU tensors backed by fastdcp's buffers. Usable as a context manager.
    """

    def __init__(self, config: CheckpointStagerConfig = CheckpointStagerConfig()):
        self._config = config
        accelerator = torch.cuda.is_available()
        if config.use_non_blocking_copy and not accelerator:
            raise AssertionError(
                "Non-blocking copy requires that the current accelerator is available. "
                "Set CheckpointStagerConfig(use_non_blocking_copy=False) to stage on a CPU-only host."
            )
        options = _C.StagingOptions()
        options.use_pinned_memory = config.use_pinned_memory
        options.use_shared_memory = config.use_shared_memory
        options.use_async_staging = False  # the executor below provides the asynchrony
        options.use_non_blocking_copy = config.use_non_blocking_copy
        options.copy_on_write = config.use_copy_on_write
        self._native = _C.Stager(options, accelerator, TorchAdapter())
        self._accelerator = accelerator
        self._lock = threading.Lock()
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastdcp-staging") \
            if config.use_async_staging else None

    def stage(self, state_dict: STATE_DICT, **kwargs: Any) -> STATE_DICT | Future[STATE_DICT]:
        if kwargs:
            raise TypeError(f"DefaultStager.stage() got unexpected keyword arguments: {sorted(kwargs)}")
        if self._closed:
            raise RuntimeError("DefaultStager.stage() called after close()")
        producers = self._producer_streams()
        if self._executor is not None:
            return self._executor.submit(self._stage, state_dict, producers=producers)
        return self._stage(state_dict, producers=producers)

    def _producer_streams(self) -> list[tuple[int, int]]:
        """The caller's current CUDA stream, read in the calling thread: torch keeps the current
        device and stream per thread, and the staging thread's are cuda:0 and its default stream,
        which under torchrun are not the rank's. The device-to-host copies wait for the work queued
        on it before they start; tensors on other devices wait for their device's default stream."""
        if not self._accelerator or not torch.cuda.is_initialized():
            return []
        stream = torch.cuda.current_stream()
        return [(stream.device.index, stream.cuda_stream)]

    def _stage(self, state_dict: STATE_DICT, lease=None, on_released=None, producers=(),
               autograd_traits=False) -> STATE_DICT:
        with self._lock, torch.no_grad():
            return self._native.stage(state_dict, lease, on_released, list(producers), autograd_traits)

    def _stage_leased(self, state_dict: STATE_DICT, on_released=None) -> Future:
        """A future of ``(staged, lease)``: no later stage() writes into the staged buffers until
        ``lease.release()`` (Note [Staging leases]); the AsyncCheckpointer releases it when the
        write that reads them is done. ``on_released()`` is called, on the staging thread, as soon
        as the tensors may change again: with copy-on-write staging, before they are all copied."""
        if self._closed:
            raise RuntimeError("DefaultStager.stage() called after close()")
        lease = _C.StagingLease()
        producers = self._producer_streams()

        def stage_and_hold():
            # The task holds `state_dict`, so its tensors stay allocated until the copy is done.
            # Only the writer reads this copy: it keeps parameters and requires_grad for the file.
            return self._stage(state_dict, lease, on_released, producers, autograd_traits=True), lease

        if self._executor is not None:
            return self._executor.submit(stage_and_hold)
        done: Future = Future()
        try:
            done.set_result(stage_and_hold())
        except Exception as error:
            done.set_exception(error)
        return done

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._native.close()

    def stats(self) -> dict:
        """Cache hits and misses, bytes copied (after release too), and host memory by kind."""
        return self._native.stats()

    def copy_on_write_available(self) -> tuple[bool, str]:
        """Whether saves stage copy-on-write here, and why not when they do not."""
        return self._native.copy_on_write_available()

    def __enter__(self) -> "DefaultStager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
