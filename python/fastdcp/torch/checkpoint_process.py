"""The writer process, as torch.distributed.checkpoint._experimental.checkpoint_process: the C++
CheckpointProcess (Note [Native writer process]) over a Python child serving its frames (Notes
[Python writer process] and [Errors across the writer process] in python/src/engine_bindings.cpp)."""

import multiprocessing.spawn
import pickle
import sys
from concurrent.futures import Future
from dataclasses import dataclass, make_dataclass
from enum import Enum
from typing import Any, Callable

from fastdcp import _C
from fastdcp.torch._adapter import TorchAdapter
from fastdcp.torch.checkpoint_writer import CheckpointWriterConfig
from fastdcp.torch.types import STATE_DICT, RankInfo

__all__ = ["CheckpointProcess", "CheckpointProcessConfig", "RequestType", "WorkerRequest", "WorkerResponse"]


@dataclass
class CheckpointProcessConfig:
    """Timeouts of the writer process, in seconds. ``subprocess_write_timeout_secs`` (fastdcp;
    None for no limit) bounds one write: past it the worker is killed and the write fails."""

    subprocess_init_timeout_secs: int = 30
    subprocess_shutdown_timeout_secs: int = 60
    subprocess_write_timeout_secs: float | None = 3600


# Upstream's request and response types, for its names only: fastdcp's requests are C++ frames.
RequestType = Enum("RequestType", {"PING": "ping", "WRITE_CHECKPOINT": "write_checkpoint", "TERMINATE_PROCESS": "exit"})
WorkerRequest = make_dataclass("WorkerRequest", [("request_type", RequestType), ("payload", dict)])
WorkerResponse = make_dataclass("WorkerResponse", [("request_type", RequestType), ("success", bool),
                                                   ("error_msg", str | None, None), ("payload", dict | None, None)])


# The writer child (Note [Python writer process]); its argv ends with "--socket FD".
_CHILD = "import sys; from fastdcp import _C; sys.exit(_C.serve_writer(int(sys.argv[-1])))"


class CheckpointProcess:
    """This rank's writer process, started at once (``process_creation_future``); ``pid`` 0: none runs."""

    def __init__(self, rank_info: RankInfo, config: CheckpointProcessConfig,
                 subprocess_init_fn: Callable[..., None], subprocess_init_args: tuple,
                 checkpoint_writer_init_fn: Callable[..., Any], checkpoint_writer_init_args: dict):
        writer_args = {"rank_info": rank_info, **(checkpoint_writer_init_args or {})}
        functions = (subprocess_init_fn, tuple(subprocess_init_args), checkpoint_writer_init_fn, writer_args)
        writer_config = writer_args.get("config")  # for the votes the trainer casts itself
        preparation = multiprocessing.spawn.get_preparation_data(f"fastdcp-writer-{rank_info.global_rank}")
        preparation.pop("authkey")  # multiprocessing's secret, which it refuses to pickle
        self._native = _C.CheckpointProcess(
            rank_info, config, writer_config if isinstance(writer_config, CheckpointWriterConfig)
            else CheckpointWriterConfig(), [sys.executable, "-c", _CHILD],
            pickle.dumps((preparation, pickle.dumps(functions))), TorchAdapter())
        self.process_creation_future: Future[None] = self._native.started()

    pid = property(lambda self: self._native.pid)
    restarts = property(lambda self: self._native.restarts)

    def write(self, state_dict: STATE_DICT | Future[STATE_DICT], path: str, **kwargs: Any) -> Future[None]:
        """Writes ``state_dict`` (or what the future yields) after earlier writes; ``kwargs`` go to the writer."""
        return self._native.write(state_dict, str(path), pickle.dumps(kwargs))

    def close(self) -> None:
        """Finishes the write in progress (queued ones are cancelled), then ends the writer. Idempotent."""
        self._native.close()
