"""Checkpointers, as torch.distributed.checkpoint._experimental.checkpointer: ``save``, ``load``
and ``close`` over a writer (synchronous) or a stager and a writer process (asynchronous)."""

import abc
import os
import threading
from concurrent.futures import Future, wait
from typing import Any

from fastdcp.torch.checkpoint_process import CheckpointProcess
from fastdcp.torch.checkpoint_reader import CheckpointReader
from fastdcp.torch.checkpoint_writer import CheckpointWriter
from fastdcp.torch.staging import CheckpointStager
from fastdcp.torch.types import STATE_DICT
from fastdcp.torch.utils import wrap_future

__all__ = ["AsyncCheckpointer", "Checkpointer", "SyncCheckpointer"]


class Checkpointer(abc.ABC):
    """Saves and loads state dicts."""

    @abc.abstractmethod
    def save(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> tuple[Future, Future] | None:
        ...

    @abc.abstractmethod
    def load(self, path: str, state_dict: STATE_DICT | None = None, *, default_map_location: Any = None,
             strict: bool = False, **kwargs: Any) -> STATE_DICT:
        ...

    @abc.abstractmethod
    def close(self) -> None:
        ...


def _load(reader: CheckpointReader, path: str, state_dict: STATE_DICT | None, default_map_location: Any,
          strict: bool, kwargs: dict) -> STATE_DICT:
    # fastdcp's reader checks strictness before it changes anything in the template, and reports
    # unexpected keys too (upstream raises on missing keys after filling the template).
    loaded, missing = reader.read(path, state_dict, map_location=default_map_location, strict=strict, **kwargs)
    if strict and missing:
        raise RuntimeError(f"Checkpoint at {path} is missing keys: {missing}")
    return loaded


class SyncCheckpointer(Checkpointer):
    """Writes on the caller's thread: file, ``pre_commit``, barrier, commit, ``post_commit``."""

    def __init__(self, writer: CheckpointWriter, reader: CheckpointReader):
        self._writer = writer
        self._reader = reader

    def save(self, path: str, state_dict: STATE_DICT, **kwargs: Any) -> None:
        self._writer.write(path, state_dict, **kwargs)

    def load(self, path: str, state_dict: STATE_DICT | None = None, *, default_map_location: Any = None,
             strict: bool = False, **kwargs: Any) -> STATE_DICT:
        return _load(self._reader, path, state_dict, default_map_location, strict, kwargs)

    def close(self) -> None:
        self._writer.close()


class AsyncCheckpointer(Checkpointer):
    """Stages on a background thread and writes in the writer process.

    ``save`` returns ``(staging_future, write_future)``: training may change its tensors once the
    first is done; the second completes when the checkpoint is committed, or fails with that save's
    own error (later saves are unaffected, unlike upstream).

    Note [Saves in flight]
    With fastdcp's DefaultStager, every save's staged buffers are leased until its write is done
    (Note [Staging leases]), so up to ``max_pending_saves`` saves may be staged or writing at once
    without one overwriting another's buffers; a further save first waits for the oldest. A stager
    that cannot lease reuses its buffers on every call, so with it each save waits, as upstream, for
    the previous write before staging.

    Keyword arguments of ``save`` go to the writer and its hooks only; ``stage_options`` (a dict)
    goes to the stager. (Upstream sends the same kwargs to both, which DefaultStager refuses.)
    ``load`` waits for pending saves to the same path first.
    """

    def __init__(self, checkpoint_stager: CheckpointStager, checkpoint_process: CheckpointProcess,
                 reader: CheckpointReader, *, max_pending_saves: int = 2):
        if max_pending_saves < 1:
            raise ValueError(f"max_pending_saves must be at least 1, not {max_pending_saves}")
        self._stager = checkpoint_stager
        self._process = checkpoint_process
        self._reader = reader
        self._max_pending = max_pending_saves
        self._pending: list[tuple[str, Future]] = []  # (absolute path, write future), oldest first
        self._lock = threading.Lock()

    def _wait_for_room(self, room_for: int) -> None:
        while True:
            with self._lock:
                self._pending = [(p, f) for p, f in self._pending if not f.done()]
                if len(self._pending) < room_for:
                    return
                oldest = self._pending[0][1]
            wait([oldest])  # its error, if any, belongs to its own future

    def save(self, path: str, state_dict: STATE_DICT, *, stage_options: dict | None = None,
             **kwargs: Any) -> tuple[Future[None], Future[None]]:
        leases = hasattr(self._stager, "_stage_leased") and not stage_options
        self._wait_for_room(self._max_pending if leases else 1)
        if leases:
            # Training may go on once the tensors are released, which with copy-on-write staging
            # comes before the staged bytes are complete; the writer gets them when they are.
            # Both callbacks run on the staging thread, one after the other.
            released: Future = Future()
            staged_dict: Future = Future()

            def on_released() -> None:
                if not released.done():
                    released.set_result(None)

            def on_staged(done: Future) -> None:
                try:
                    staged_dict.set_result(done.result()[0])
                except BaseException as error:
                    staged_dict.set_exception(error)
                    if not released.done():
                        released.set_exception(error)
                on_released()

            staged = self._stager._stage_leased(state_dict, on_released)
            staged.add_done_callback(on_staged)
            staging_future, write_input = released, staged_dict
        else:
            staging_future = write_input = self._stager.stage(state_dict, **(stage_options or {}))
            staged = None
        write_future = self._process.write(write_input, path, **kwargs)
        if staged is not None:

            def release_lease(_: Future) -> None:
                if not staged.cancelled() and staged.exception() is None:
                    staged.result()[1].release()

            write_future.add_done_callback(release_lease)
        with self._lock:
            self._pending.append((os.path.abspath(path), write_future))
        return wrap_future(staging_future), write_future

    def load(self, path: str, state_dict: STATE_DICT | None = None, *, default_map_location: Any = None,
             strict: bool = False, **kwargs: Any) -> STATE_DICT:
        target = os.path.abspath(path)
        with self._lock:
            same_path = [f for p, f in self._pending if p == target]
        wait(same_path)
        return _load(self._reader, path, state_dict, default_map_location, strict, kwargs)

    def close(self) -> None:
        self._stager.close()
        self._process.close()
