"""Staging: a training-safe host copy of a state dict, as in
torch.distributed.checkpoint._experimental.staging, by fastdcp's native DefaultStager."""

import abc
import warnings
from concurrent.futures import Future
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
    def stage(self, state_dict: STATE_DICT, **kwargs: Any) -> STATE_DICT | Future[STATE_DICT]: ...

    @abc.abstractmethod
    def close(self) -> None: ...


@dataclass
class CheckpointStagerConfig:
    """Upstream's flags and defaults; ``use_copy_on_write``: Note [Copy-on-write staging] (fastdcp/staging/
    stager.h). Turn it off if host tensors are written by DMA into memory pinned outside torch."""

    use_pinned_memory: bool = True
    use_shared_memory: bool = True
    use_async_staging: bool = True
    use_non_blocking_copy: bool = True
    use_copy_on_write: bool = True


class DefaultStager(CheckpointStager):
    """The C++ DefaultStager: views of one storage stay views of one buffer, and the same live storages
    are staged into the same cached buffers every call (an earlier result shows the newer values)."""

    def __init__(self, config: CheckpointStagerConfig = CheckpointStagerConfig()):
        accelerator = torch.cuda.is_available()
        if config.use_non_blocking_copy and not accelerator:
            raise AssertionError(
                "Non-blocking copy requires that the current accelerator is available. "
                "Set CheckpointStagerConfig(use_non_blocking_copy=False) to stage on a CPU-only host.")
        options = _C.StagingOptions()
        for name in ("use_pinned_memory", "use_shared_memory", "use_async_staging", "use_non_blocking_copy"):
            setattr(options, name, getattr(config, name))
        options.copy_on_write = config.use_copy_on_write
        self._native = _C.Stager(options, accelerator, TorchAdapter())
        self._staging = _C.Staging(self._native.native, TorchAdapter())
        # fastdcp's extras: stats() -> _C.StagerStats; copy_on_write_available() -> (available, why not).
        self.stats, self.copy_on_write_available = self._native.stats, self._native.copy_on_write_available

    def stage(self, state_dict: STATE_DICT, **kwargs: Any) -> STATE_DICT | Future[STATE_DICT]:
        if kwargs:
            raise TypeError(f"DefaultStager.stage() got unexpected keyword arguments: {sorted(kwargs)}")
        return self._staging.stage(state_dict)

    def close(self) -> None:
        self._staging.close()

    def __enter__(self) -> "DefaultStager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
