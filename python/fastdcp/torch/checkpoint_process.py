"""The background writer process, as torch.distributed.checkpoint._experimental.checkpoint_process:
one spawned worker per rank that owns a CheckpointWriter and writes what the trainer staged.

Note [Writer process]
Tensor bytes never travel through the pipe: a staged state dict is described by a message (the
tree as a rank-file header, and where each storage lives) and the memfds of the staged buffers,
passed with SCM_RIGHTS; the worker maps them and writes from the very pages the stager filled
(Note [Shared state dicts] in include/fastdcp/checkpoint/shared_state_dict.h). Only small control
records (request type, path, the writer's keyword arguments) are pickled, between this process and
the child it spawned.

Note [Errors across the writer process]
A write that fails in the writer process fails the trainer's future with the very exception the
writer raised, pickled with its class: the OSError of a full disk keeps its errno,
fastdcp.DataLossError stays itself, a bad value stays a ValueError (the types bindings.cpp gives
fastdcp's error codes, in its one mapping). The worker's traceback rides along as a note. Only an
exception that cannot be pickled becomes a RuntimeError with that traceback.

Where upstream falls short, this one differs (upstream-behaviour.md 5.2):
 - a failed write fails its own future and the worker keeps serving;
 - a worker that dies (or hangs past ``subprocess_write_timeout_secs``) fails the write in progress
   with a clear error and is started again by the next write;
 - ``write()`` never blocks its caller on the worker's start-up: a start-up failure is reported on
   the write's future;
 - ``close()`` ends the worker within ``subprocess_shutdown_timeout_secs``, reads its reply, and
   closes every handle; no environment variable of the parent is changed.
"""

import logging
import multiprocessing
import os
import pickle
import signal
import socket
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from multiprocessing.reduction import recvfds, sendfds
from typing import Any, Callable

from fastdcp.torch.checkpoint_writer import CheckpointWriter, CheckpointWriterConfig, _native_io, _native_options
from fastdcp.torch.types import STATE_DICT, RankInfo

__all__ = ["CheckpointProcess", "CheckpointProcessConfig", "RequestType", "WorkerRequest", "WorkerResponse"]

logger = logging.getLogger(__name__)

# The kernel passes at most 253 descriptors per message (SCM_MAX_FD).
_FDS_PER_MESSAGE = 200


@dataclass
class CheckpointProcessConfig:
    """Timeouts of the writer process, in seconds. ``subprocess_write_timeout_secs`` (fastdcp;
    None for no limit) bounds one write: past it the worker is killed and the write fails."""

    subprocess_init_timeout_secs: int = 30
    subprocess_shutdown_timeout_secs: int = 60
    subprocess_write_timeout_secs: float | None = 3600


class RequestType(Enum):
    PING = "ping"
    WRITE_CHECKPOINT = "write_checkpoint"
    TERMINATE_PROCESS = "exit"


@dataclass
class WorkerRequest:
    request_type: RequestType
    payload: dict[str, Any]


@dataclass
class WorkerResponse:
    request_type: RequestType
    success: bool
    error_msg: str | None = None
    payload: dict[str, Any] | None = None


def _failure(request_type: RequestType, error: BaseException) -> WorkerResponse:
    """A failed request's reply: the exception, pickled, and its traceback as text (Note [Errors
    across the writer process])."""
    try:
        carried = pickle.dumps(error)
    except Exception:  # noqa: BLE001 - then the text is all the trainer gets
        carried = None
    return WorkerResponse(request_type, False, "".join(traceback.format_exception(error)), {"exception": carried})


def _raised(response: WorkerResponse) -> Exception:
    """The exception a failed reply carries, as the writer process raised it."""
    carried = (response.payload or {}).get("exception")
    try:
        error = pickle.loads(carried) if carried is not None else None
    except Exception:  # noqa: BLE001 - a class the trainer cannot import: the text below
        error = None
    if not isinstance(error, Exception):
        return RuntimeError(f"the checkpoint writer process failed: {response.error_msg}")
    error.add_note(f"raised in the checkpoint writer process:\n{response.error_msg}")
    return error


def _fd_socket(connection) -> socket.socket:
    """A socket object over the connection's own Unix socket, for passing descriptors."""
    return socket.socket(fileno=os.dup(connection.fileno()))


def _worker_main(rank_info: RankInfo, connection, subprocess_init_fn, subprocess_init_args,
                 checkpoint_writer_init_fn, checkpoint_writer_init_args) -> None:
    from fastdcp import _C
    from fastdcp.torch._adapter import TorchAdapter

    # Ctrl-C reaches the whole process group; the trainer decides what happens to its writer.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd_socket = _fd_socket(connection)
    channel = _C.StateDictChannel(TorchAdapter())

    def reply(request_type: RequestType, error: BaseException | None = None, payload: dict | None = None) -> None:
        connection.send(WorkerResponse(request_type, True, None, payload) if error is None
                        else _failure(request_type, error))

    try:
        subprocess_init_fn(*subprocess_init_args)
        writer_kwargs = dict(checkpoint_writer_init_args)
        writer_kwargs.setdefault("rank_info", rank_info)
        writer = checkpoint_writer_init_fn(**writer_kwargs)
    except BaseException as error:
        reply(RequestType.PING, error)
        connection.close()
        return
    while True:
        try:
            request: WorkerRequest = connection.recv()
        except (EOFError, OSError):
            break  # the trainer is gone
        kind = request.request_type
        if kind == RequestType.PING:
            reply(kind, payload={"pid": os.getpid()})
        elif kind == RequestType.WRITE_CHECKPOINT and "abandon" in request.payload:
            # The trainer could not hand this save over: vote against it from here, where the
            # writer's barrier lives (only fastdcp's own writer knows how).
            try:
                if type(writer) is not CheckpointWriter:
                    raise TypeError(f"{type(writer).__name__} cannot vote against a save")
                writer._abandon(request.payload["path"], request.payload["abandon"])
                reply(kind)
            except Exception as error:
                reply(kind, error)
        elif kind == RequestType.WRITE_CHECKPOINT:
            payload = request.payload
            fds: list[int] = []
            try:
                while len(fds) < payload["num_fds"]:
                    fds += recvfds(fd_socket, min(_FDS_PER_MESSAGE, payload["num_fds"] - len(fds)))
                started = time.monotonic()
                # Both take the descriptors over (and close them, also on error). fastdcp's own
                # writer writes the shared tree as it is; any other gets torch tensors over it.
                if type(writer) is CheckpointWriter:
                    owned, fds = fds, []
                    writer._write_shared(payload["path"], payload["message"], owned, **payload["kwargs"])
                else:
                    state_dict = channel.attach(payload["message"], fds)
                    fds = []
                    writer.write(path=payload["path"], state_dict=state_dict, **payload["kwargs"])
                    del state_dict
                reply(kind, payload={"seconds": time.monotonic() - started})
            except Exception as error:
                for fd in fds:
                    os.close(fd)
                reply(kind, error)  # this write failed; the worker goes on
        elif kind == RequestType.TERMINATE_PROCESS:
            close = getattr(writer, "close", None)
            try:
                if close is not None:
                    close()
                reply(kind)
            except Exception as error:
                reply(kind, error)
            break
        else:
            reply(kind, ValueError(f"Unknown request type: {kind}"))
    fd_socket.close()
    connection.close()


class _WorkerGone(Exception):
    """The worker process ended or stopped answering; it is started again by the next request.
    Private: callers get it as the RuntimeError of public()."""

    def public(self) -> RuntimeError:
        return RuntimeError(f"{self}; the next write starts a new writer process")


class CheckpointProcess:
    """Owns the writer process of this rank and talks to it from one background thread, so that
    writes are carried out in the order they were submitted."""

    def __init__(self, rank_info: RankInfo, config: CheckpointProcessConfig,
                 subprocess_init_fn: Callable[..., None], subprocess_init_args: tuple,
                 checkpoint_writer_init_fn: Callable[..., Any], checkpoint_writer_init_args: dict):
        from fastdcp import _C
        from fastdcp.torch._adapter import TorchAdapter

        self._rank_info = rank_info
        self._config = config
        self._init = (subprocess_init_fn, tuple(subprocess_init_args))
        self._writer_init = (checkpoint_writer_init_fn, dict(checkpoint_writer_init_args or {}))
        self._channel = _C.StateDictChannel(TorchAdapter())
        self._connection = None
        self._fd_socket: socket.socket | None = None
        self.process: multiprocessing.process.BaseProcess | None = None
        self.restarts = 0  # workers started again after one died or hung
        self._started = False
        self._closed = False
        self._comms = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastdcp-checkpoint-comms")
        self.process_creation_future: Future[None] = self._comms.submit(self._start)

    # --- the worker's life ----------------------------------------------------------------------
    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe(duplex=True)
        process = context.Process(
            target=_worker_main, name=f"fastdcp-writer-{self._rank_info.global_rank}", daemon=True,
            args=(self._rank_info, child_end, *self._init, *self._writer_init))
        process.start()
        child_end.close()  # so that a dead worker reads as EOF at once
        self.process, self._connection, self._fd_socket = process, parent_end, _fd_socket(parent_end)
        try:
            self._send(WorkerRequest(RequestType.PING, {}))
            self._receive(self._config.subprocess_init_timeout_secs, "initializing",
                          timeout_message="Timed out after {timeout}s waiting for checkpoint subprocess to initialize")
        except _WorkerGone as gone:
            self._stop_worker(kill=True)
            raise gone.public() from None
        except BaseException:
            self._stop_worker(kill=True)
            raise
        self._started = True

    def _ensure_worker(self) -> None:
        if self.process is not None and self.process.is_alive() and self._connection is not None:
            return
        if self.process is not None:
            self._stop_worker(kill=True)
        if self._started:
            self.restarts += 1
            logger.warning("restarting the checkpoint writer process of rank %d", self._rank_info.global_rank)
        self._start()

    def _stop_worker(self, kill: bool) -> None:
        process, connection, fd_socket = self.process, self._connection, self._fd_socket
        self.process, self._connection, self._fd_socket = None, None, None
        if process is not None and kill and process.is_alive():
            process.kill()
        if process is not None:
            process.join(self._config.subprocess_shutdown_timeout_secs)
            if process.is_alive():
                process.kill()
                process.join()
        for handle in (fd_socket, connection):
            if handle is not None:
                handle.close()

    def _describe_exit(self) -> str:
        process = self.process
        if process is None:
            return "it is not running"
        process.join(1)
        code = process.exitcode
        if code is None:
            return "it stopped answering"
        if code < 0:
            try:
                return f"it was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"it was killed by signal {-code}"
        return f"it exited with status {code}"

    # --- messages --------------------------------------------------------------------------------
    def _send(self, request: WorkerRequest, fds: list[int] = ()) -> None:
        try:
            self._connection.send(request)
            for start in range(0, len(fds), _FDS_PER_MESSAGE):
                sendfds(self._fd_socket, fds[start:start + _FDS_PER_MESSAGE])
        except OSError as error:
            raise _WorkerGone(f"the checkpoint writer process terminated unexpectedly ({error})") from error

    def _receive(self, timeout: float | None, what: str, timeout_message: str | None = None) -> dict | None:
        try:
            ready = self._connection.poll(timeout)
        except OSError:
            ready = True  # recv() below names the problem
        if not ready:
            message = (timeout_message or "the checkpoint writer process did not finish {what} within {timeout}s")
            raise TimeoutError(message.format(what=what, timeout=timeout))
        try:
            response: WorkerResponse = self._connection.recv()
        except (EOFError, OSError) as error:
            raise _WorkerGone(f"the checkpoint writer process terminated unexpectedly while {what}: "
                              f"{self._describe_exit()}") from error
        if not response.success:
            raise _raised(response)
        return response.payload

    # --- writing ---------------------------------------------------------------------------------
    def write(self, state_dict: STATE_DICT | Future[STATE_DICT], path: str, **kwargs: Any) -> Future[None]:
        """Queues a write of ``state_dict`` (or of what the staging future yields) to ``path``.
        The future fails with the write's own error; later writes are unaffected."""
        if self._closed:
            raise RuntimeError("CheckpointProcess.write() called after close()")
        return self._comms.submit(self._write, state_dict, str(path), kwargs)

    def _write(self, state_dict, path: str, kwargs: dict) -> None:
        try:
            if isinstance(state_dict, Future):
                state_dict = state_dict.result()
            shared = self._channel.share(state_dict)  # the staged buffers' memfds; no bytes copied
            self._ensure_worker()
        except Exception as error:
            self._vote_against(path, error)
            raise
        try:
            self._send(WorkerRequest(RequestType.WRITE_CHECKPOINT, {
                "path": path, "kwargs": kwargs, "message": shared.message, "num_fds": len(shared.fds)}),
                list(shared.fds))
            self._receive(self._config.subprocess_write_timeout_secs, f"writing '{path}'")
        except TimeoutError:
            self._stop_worker(kill=True)
            raise TimeoutError(
                f"writing checkpoint '{path}' took longer than subprocess_write_timeout_secs="
                f"{self._config.subprocess_write_timeout_secs}; the writer process was killed and the next "
                "write starts a new one") from None
        except _WorkerGone as gone:
            self._stop_worker(kill=True)
            raise gone.public() from None

    def _vote_against(self, path: str, error: Exception) -> None:
        """The writer never got this save: vote against it (CheckpointWriter::abandon), so that no
        rank waits for this one. (Not once the request is sent: the writer may have voted.)

        The writer process votes when it can: it also joins the save's barrier, which may live in
        the writer processes (a TCPStoreBarrier made there), where the other ranks wait for it.
        Otherwise the trainer votes, and such a barrier waits out its timeout."""
        message = f"{type(error).__name__}: {error}"
        try:
            self._ensure_worker()
            self._send(WorkerRequest(RequestType.WRITE_CHECKPOINT, {"path": path, "abandon": message}))
            self._receive(self._config.subprocess_write_timeout_secs, f"voting against '{path}'")
            return
        except Exception as writer_error:  # noqa: BLE001 - fall back to voting from here
            if isinstance(writer_error, (TimeoutError, _WorkerGone)):
                self._stop_worker(kill=True)
            logger.info("the writer process could not vote against the save to %s (%s); voting from the trainer",
                        path, writer_error)

        config = self._writer_init[1].get("config")
        if not isinstance(config, CheckpointWriterConfig):
            config = CheckpointWriterConfig()
        try:
            _native_io(self._rank_info).abandon(path, message, _native_options(config))
        except Exception as vote_error:  # noqa: BLE001 - the save's own error is what the caller gets
            logger.warning("could not vote against the save to %s: %s", path, vote_error)

    # --- shutting down ---------------------------------------------------------------------------
    def close(self) -> None:
        """Finishes the write in progress (queued ones are cancelled), then ends the worker within
        ``subprocess_shutdown_timeout_secs`` (killing it past that). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._comms.shutdown(wait=True, cancel_futures=True)
        if self.process is None:
            return
        try:
            if self.process.is_alive():
                self._send(WorkerRequest(RequestType.TERMINATE_PROCESS, {}))
                self._receive(self._config.subprocess_shutdown_timeout_secs, "shutting down")
        except Exception as error:  # noqa: BLE001 - the worker goes anyway
            logger.warning("checkpoint writer process did not shut down cleanly: %s", error)
        finally:
            self._stop_worker(kill=False)

    def __del__(self):
        if not getattr(self, "_closed", True) and getattr(self, "process", None) is not None:
            # Best effort at interpreter exit; close() is the way.
            try:
                self.process.kill()
            except Exception:
                pass
