"""Checkpointers, as torch.distributed.checkpoint._experimental.checkpointer: ``save``, ``load``
and ``close`` over a writer (synchronous) or a stager and a writer process (asynchronous)."""

import abc
import pickle
from concurrent.futures import Future
from typing import Any

from fastdcp import _C
from fastdcp.torch.checkpoint_process import CheckpointProcess
from fastdcp.torch.checkpoint_reader import CheckpointReader
from fastdcp.torch.checkpoint_writer import CheckpointWriter
from fastdcp.torch.staging import CheckpointStager, DefaultStager
from fastdcp.torch.types import STATE_DICT
from fastdcp.torch.utils import wrap_future

__all__ = ["AsyncCheckpointer", "Checkpointer", "SyncCheckpointer"]


class Checkpointer(abc.ABC):
    """Saves and loads state dicts."""

    @abc.abstractmethod
    def save(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> tuple[Future, Future] | None: ...

    @abc.abstractmethod
    def load(self, path: str, state_dict: STATE_DICT | None = None, *, default_map_location: Any = None,
             strict: bool = False, **kwargs: Any) -> STATE_DICT: ...

    @abc.abstractmethod
    def close(self) -> None: ...


def _load(reader: CheckpointReader, path: str, state_dict: STATE_DICT | None, default_map_location: Any,
          strict: bool, kwargs: dict) -> STATE_DICT:
    # fastdcp's reader checks strictness before filling the template (upstream: after), unexpected keys too.
    loaded, missing = reader.read(path, state_dict, map_location=default_map_location, strict=strict, **kwargs)
    if strict and missing:
        raise RuntimeError(f"Checkpoint at {path} is missing keys: {missing}")
    return loaded


class SyncCheckpointer(Checkpointer):
    """Writes on the caller's thread: file, ``pre_commit``, barrier, commit, ``post_commit``."""

    def __init__(self, writer: CheckpointWriter, reader: CheckpointReader):
        self._writer, self._reader = writer, reader

    def save(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> None:
        self._writer.write(path, state_dict, **kwargs)

    def load(self, path: str, state_dict: STATE_DICT | None = None, *, default_map_location: Any = None,
             strict: bool = False, **kwargs: Any) -> STATE_DICT:
        return _load(self._reader, path, state_dict, default_map_location, strict, kwargs)

    def close(self) -> None:
        self._writer.close()


class AsyncCheckpointer(Checkpointer):
    """The C++ AsyncCheckpointer: ``save`` returns ``(staging_future, write_future)``, up to
    ``max_pending_saves`` in flight with fastdcp's DefaultStager (Note [Saves in flight]); another
    stager, or ``stage_options`` (the stager's), first waits for the previous write. Other keyword
    arguments go to the writer and its hooks. ``load`` waits for pending saves to the same path."""

    def __init__(self, checkpoint_stager: CheckpointStager, checkpoint_process: CheckpointProcess,
                 reader: CheckpointReader, *, max_pending_saves: int = 2):
        self._stager, self._process, self._reader = checkpoint_stager, checkpoint_process, reader
        own = checkpoint_stager._staging if isinstance(checkpoint_stager, DefaultStager) else None
        self._native = _C.AsyncCheckpointer(own, checkpoint_process._native, max_pending_saves)

    def save(self, path: str, state_dict: STATE_DICT, *, stage_options: dict | None = None,
             **kwargs: Any) -> tuple[Future[None], Future[None]]:
        call_args = pickle.dumps(kwargs)
        if isinstance(self._stager, DefaultStager) and not stage_options:
            return self._native.save(str(path), state_dict, call_args)
        staged = []
        written = self._native.save_staged_by(
            str(path), lambda: staged.append(self._stager.stage(state_dict, **(stage_options or {}))) or staged[0],
            call_args)
        return wrap_future(staged[0]), written

    def load(self, path: str, state_dict: STATE_DICT | None = None, *, default_map_location: Any = None,
             strict: bool = False, **kwargs: Any) -> STATE_DICT:
        self._native.wait_for_path(str(path))
        return _load(self._reader, path, state_dict, default_map_location, strict, kwargs)

    def close(self) -> None:
        self._native.close()
        self._stager.close()
        self._process.close()
