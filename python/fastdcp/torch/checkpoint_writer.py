"""Writing one rank's part of a checkpoint, as torch.distributed.checkpoint._experimental
.checkpoint_writer, in fastdcp's format (docs/format.md): safetensors-compatible data files with
checksums, committed by a manifest written last."""

import abc
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from fastdcp import _C
from fastdcp.torch._adapter import TorchAdapter
from fastdcp.torch.types import STATE_DICT, RankInfo

__all__ = ["CheckpointWriter", "CheckpointWriterConfig", "WriterHook"]


class WriterHook(abc.ABC):
    """Called on every rank around the commit: pre_commit after this rank's file is durable and
    before the barrier, post_commit after it (and, on rank 0, after the manifest is written)."""

    @abc.abstractmethod
    def pre_commit(self, path: str, **kwargs: Any) -> None:
        ...

    @abc.abstractmethod
    def post_commit(self, path: str, **kwargs: Any) -> None:
        ...


@dataclass
class CheckpointWriterConfig:
    """``write_barrier_timeout_secs`` bounds the barrier and rank 0's wait for every rank's file
    (upstream only logs it). ``overwrite`` allows replacing a committed checkpoint (fastdcp
    refuses by default, where upstream silently overwrites); ``io_threads`` 0 means one per core;
    ``direct_io`` writes with O_DIRECT (default: buffered writes, measured faster on ext4, whose
    pages are dropped from the page cache once durable: Note [Buffered writes]); ``io_engine``
    ("threads", "io_uring", or "auto": io_uring where the kernel allows it) says how O_DIRECT
    windows travel; threads measured faster on ext4 (Note [I/O engines])."""

    write_barrier_timeout_secs: int = 600
    overwrite: bool = False
    io_threads: int = 0
    direct_io: bool = False
    io_engine: str = "threads"


def _native_io(rank_info: RankInfo) -> _C.CheckpointIO:
    """The native writer of one rank."""
    return _C.CheckpointIO(TorchAdapter(), rank_info.global_rank, rank_info.global_world_size)


def _native_options(config: CheckpointWriterConfig) -> _C.WriteOptions:
    """The config as the native writer takes it; its errors spell the overwrite option as this API does."""
    return _C.WriteOptions(overwrite=config.overwrite, overwrite_option="CheckpointWriterConfig(overwrite=True)",
                           io_threads=config.io_threads, direct_io=config.direct_io, io_engine=config.io_engine,
                           barrier_timeout_s=float(config.write_barrier_timeout_secs))


class CheckpointWriter:
    """Writes ``<path>/checkpoint_<rank>.g<generation>.safetensors``, then runs
    ``pre_commit`` -> barrier -> commit (rank 0) -> ``post_commit``, in upstream's order."""

    def __init__(self, config: CheckpointWriterConfig, rank_info: RankInfo, barrier=None,
                 commit_hook: WriterHook | None = None):
        self._config = config
        self._rank_info = rank_info
        self._barrier = barrier
        self._commit_hook = commit_hook
        self._io = _native_io(rank_info)
        self._last_stats: _C.WriteStats | None = None

    def write(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> Future[None] | None:
        self._last_stats = self._io.write(str(path), state_dict, _native_options(self._config), **self._callbacks(kwargs))
        return None

    def _abandon(self, path: str, error: str) -> None:
        """This rank's save to ``path`` never reached the writer: votes against it and joins its
        barrier, as a failed write would (Note [Commit protocol]), so that no rank waits for this one
        and this writer's barrier stays in step with the others'."""
        self._io.abandon(str(path), error, _native_options(self._config), barrier=self._barrier_callback())

    def _barrier_callback(self):
        """The barrier as the native writer calls it (with its timeout), or None."""
        barrier = self._barrier
        return None if barrier is None else (lambda timeout: barrier.execute_barrier())

    def _callbacks(self, kwargs: dict) -> dict:
        """The barrier and the commit hook (given write's keyword arguments) as the native writer calls them."""
        hook = self._commit_hook
        return {
            "barrier": self._barrier_callback(),
            "pre_commit": None if hook is None else (lambda p: hook.pre_commit(p, **kwargs)),
            "post_commit": None if hook is None else (lambda p: hook.post_commit(p, **kwargs)),
        }

    def close(self) -> None:
        """Nothing to release: files are closed when each write returns."""
