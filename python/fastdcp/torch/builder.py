"""Builders of checkpointers with defaults, as torch.distributed.checkpoint._experimental.builder."""

from typing import Any, Callable

import torch.distributed as dist

from fastdcp.torch.barriers import BarrierConfig, create_barrier_from_config
from fastdcp.torch.checkpoint_process import CheckpointProcess
from fastdcp.torch.checkpoint_reader import CheckpointReader
from fastdcp.torch.checkpoint_writer import CheckpointWriter, CheckpointWriterConfig, WriterHook
from fastdcp.torch.checkpointer import AsyncCheckpointer, SyncCheckpointer
from fastdcp.torch.config import CheckpointerConfig
from fastdcp.torch.staging import DefaultStager
from fastdcp.torch.types import RankInfo

__all__ = ["default_subprocess_init_fn", "default_writer_init_fn", "make_async_checkpointer", "make_sync_checkpointer"]


def _get_default_rank_info() -> RankInfo:
    if dist.is_available() and dist.is_initialized():
        return RankInfo(global_rank=dist.get_rank(), global_world_size=dist.get_world_size())
    return RankInfo(global_rank=0, global_world_size=1)


def default_subprocess_init_fn(*_: Any) -> None:
    """Runs first in the writer process; the default does nothing."""


def default_writer_init_fn(rank_info: RankInfo, config: CheckpointWriterConfig | None = None,
                           barrier_config: BarrierConfig | None = None,
                           commit_hook: WriterHook | None = None) -> CheckpointWriter:
    """Builds the writer in the writer process, with its barrier made there (a barrier cannot
    travel between processes)."""
    barrier = create_barrier_from_config(barrier_config) if barrier_config is not None else None
    return CheckpointWriter(config=config or CheckpointWriterConfig(), rank_info=rank_info, barrier=barrier,
                            commit_hook=commit_hook)


def make_sync_checkpointer(config: CheckpointerConfig | None = None, rank_info: RankInfo | None = None,
                           commit_hook: WriterHook | None = None) -> SyncCheckpointer:
    config = config if config is not None else CheckpointerConfig()  # a fresh default per call
    rank_info = rank_info or _get_default_rank_info()
    reader = CheckpointReader(rank_info=rank_info)
    barrier = create_barrier_from_config(config.barrier_config)
    writer = CheckpointWriter(config=config.writer_config, rank_info=rank_info, barrier=barrier,
                              commit_hook=commit_hook)
    return SyncCheckpointer(writer=writer, reader=reader)


def make_async_checkpointer(config: CheckpointerConfig | None = None, rank_info: RankInfo | None = None,
                            subprocess_init_fn: Callable[..., None] = default_subprocess_init_fn,
                            subprocess_init_args: tuple[Any, ...] = (),
                            checkpoint_writer_init_fn: Callable[..., CheckpointWriter] = default_writer_init_fn,
                            checkpoint_writer_init_args: dict[str, Any] | None = None) -> AsyncCheckpointer:
    """As upstream, with upstream's staging defaults (so ``use_non_blocking_copy=True`` fails on a
    host without an accelerator). Unlike upstream, the default writer gets ``config.writer_config``
    and ``config.barrier_config`` (the barrier is made in the writer process)."""
    config = config if config is not None else CheckpointerConfig()
    rank_info = rank_info or _get_default_rank_info()
    reader = CheckpointReader(rank_info=rank_info)
    stager = DefaultStager(config.staging_config)  # before the process: a failure here leaks nothing
    init_args = dict(checkpoint_writer_init_args or {})
    if checkpoint_writer_init_fn is default_writer_init_fn:
        init_args.setdefault("config", config.writer_config)
        init_args.setdefault("barrier_config", config.barrier_config)
    try:
        process = CheckpointProcess(rank_info=rank_info, config=config.process_config,
                                    subprocess_init_fn=subprocess_init_fn, subprocess_init_args=subprocess_init_args,
                                    checkpoint_writer_init_fn=checkpoint_writer_init_fn,
                                    checkpoint_writer_init_args=init_args)
    except BaseException:
        stager.close()
        raise
    return AsyncCheckpointer(checkpoint_stager=stager, checkpoint_process=process, reader=reader,
                             max_pending_saves=config.max_pending_saves)
