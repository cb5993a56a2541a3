from collections.abc import Callable, Sequence
import concurrent.futures
import enum

from fastdcp.errors import (
    AlreadyExistsError as AlreadyExistsError,
    CancelledError as CancelledError,
    ChecksumError as ChecksumError,
    CudaError as CudaError,
    DataLossError as DataLossError,
    DeadlineExceededError as DeadlineExceededError,
    Error as Error,
    FailedPreconditionError as FailedPreconditionError,
    InternalError as InternalError,
    InvalidArgumentError as InvalidArgumentError,
    IoBlockingIOError as IoBlockingIOError,
    IoBrokenPipeError as IoBrokenPipeError,
    IoChildProcessError as IoChildProcessError,
    IoConnectionAbortedError as IoConnectionAbortedError,
    IoConnectionRefusedError as IoConnectionRefusedError,
    IoConnectionResetError as IoConnectionResetError,
    IoError as IoError,
    IoFileExistsError as IoFileExistsError,
    IoFileNotFoundError as IoFileNotFoundError,
    IoInterruptedError as IoInterruptedError,
    IoIsADirectoryError as IoIsADirectoryError,
    IoNotADirectoryError as IoNotADirectoryError,
    IoPermissionError as IoPermissionError,
    IoProcessLookupError as IoProcessLookupError,
    IoTimeoutError as IoTimeoutError,
    NotFoundError as NotFoundError,
    ResourceExhaustedError as ResourceExhaustedError,
    UnavailableError as UnavailableError
)


class ErrorCode(enum.Enum):
    """
    What went wrong, as fastdcp's C++ core classifies it (Note [Error policy]).
    """

    INVALID_ARGUMENT = 0

    FAILED_PRECONDITION = 1

    RESOURCE_EXHAUSTED = 2

    UNAVAILABLE = 3

    CUDA_ERROR = 4

    IO_ERROR = 5

    NOT_FOUND = 6

    ALREADY_EXISTS = 7

    DATA_LOSS = 8

    CANCELLED = 9

    DEADLINE_EXCEEDED = 10

    INTERNAL = 11

class StagingOptions:
    def __init__(self) -> None: ...

    @property
    def use_pinned_memory(self) -> bool: ...

    @use_pinned_memory.setter
    def use_pinned_memory(self, arg: bool, /) -> None: ...

    @property
    def use_shared_memory(self) -> bool: ...

    @use_shared_memory.setter
    def use_shared_memory(self, arg: bool, /) -> None: ...

    @property
    def use_async_staging(self) -> bool: ...

    @use_async_staging.setter
    def use_async_staging(self, arg: bool, /) -> None: ...

    @property
    def use_non_blocking_copy(self) -> bool: ...

    @use_non_blocking_copy.setter
    def use_non_blocking_copy(self, arg: bool, /) -> None: ...

    @property
    def pin_memory_min_bytes(self) -> int: ...

    @pin_memory_min_bytes.setter
    def pin_memory_min_bytes(self, arg: int, /) -> None: ...

    @property
    def copy_threads(self) -> int: ...

    @copy_threads.setter
    def copy_threads(self, arg: int, /) -> None: ...

    @property
    def memory_budget_bytes(self) -> int: ...

    @memory_budget_bytes.setter
    def memory_budget_bytes(self, arg: int, /) -> None: ...

    @property
    def copy_on_write(self) -> bool: ...

    @copy_on_write.setter
    def copy_on_write(self, arg: bool, /) -> None: ...

class StagingLease:
    def __init__(self) -> None: ...

    def release(self) -> None: ...

    @property
    def held(self) -> bool: ...

class StagerStats:
    """What a Stager has done, over all its stage() calls."""

    @property
    def stage_calls(self) -> int: ...

    @property
    def cache_hits(self) -> int:
        """storages staged into an existing cached buffer"""

    @property
    def cache_misses(self) -> int:
        """storages that needed a new buffer"""

    @property
    def cache_entries(self) -> int: ...

    @property
    def bytes_copied(self) -> int: ...

    @property
    def leased_skips(self) -> int:
        """
        storages staged into a fresh buffer because their cached one was leased
        """

    @property
    def bytes_copied_after_release(self) -> int:
        """
        copied once the sources were released (copy-on-write), counted per 2 MiB chunk
        """

    @property
    def write_faults(self) -> int:
        """chunks copied early because the sources were written meanwhile"""

    @property
    def reserved_bytes(self) -> int:
        """host memory held, of every kind"""

    @property
    def pinned_bytes(self) -> int: ...

    @property
    def shared_bytes(self) -> int: ...

    @property
    def last_from_python_s(self) -> float:
        """the last stage(): reading the Python tree (GIL held)"""

    @property
    def last_native_s(self) -> float:
        """the last stage(): staging (GIL released)"""

    @property
    def last_to_python_s(self) -> float:
        """the last stage(): building the staged Python tree (GIL held)"""

class Stager:
    def __init__(self, options: StagingOptions, use_cuda: bool, adapter: object) -> None: ...

    def stage(self, state_dict: object, lease: StagingLease | None = None, on_released: object | None = None, producer_streams: Sequence[tuple[int, int]] = [], autograd_traits: bool = False) -> object: ...

    def copy_on_write_available(self) -> tuple[bool, str]: ...

    def close(self) -> None: ...

    @property
    def pinning_downgraded(self) -> bool: ...

    @property
    def native(self) -> NativeStager: ...

    def stats(self) -> StagerStats: ...

class WriteOptions:
    """How CheckpointIO.write saves (WriterOptions in checkpoint.h)."""

    def __init__(self, *, overwrite: bool = False, overwrite_option: str = 'WriterOptions{.overwrite = true}', io_threads: int = 0, direct_io: bool = False, io_engine: str = 'threads', barrier_timeout_s: float = 600.0) -> None: ...

    @property
    def overwrite(self) -> bool:
        """replace a committed checkpoint"""

    @overwrite.setter
    def overwrite(self, arg: bool, /) -> None: ...

    @property
    def overwrite_option(self) -> str:
        """
        how the caller's API spells overwriting, for the error that asks for it
        """

    @overwrite_option.setter
    def overwrite_option(self, arg: str, /) -> None: ...

    @property
    def io_threads(self) -> int:
        """0: one per core, at least 4"""

    @io_threads.setter
    def io_threads(self, arg: int, /) -> None: ...

    @property
    def direct_io(self) -> bool: ...

    @direct_io.setter
    def direct_io(self, arg: bool, /) -> None: ...

    @property
    def io_engine(self) -> str:
        """'threads', 'io_uring' or 'auto'"""

    @io_engine.setter
    def io_engine(self, arg: str, /) -> None: ...

    @property
    def barrier_timeout_s(self) -> float:
        """how long the barrier and rank 0's wait for every rank may take"""

    @barrier_timeout_s.setter
    def barrier_timeout_s(self, arg: float, /) -> None: ...

class ReadOptions:
    """How CheckpointIO reads (ReadOptions in checkpoint.h)."""

    def __init__(self, *, verify_checksums: bool = True, io_threads: int = 0, use_mmap: bool = False, direct_io: bool = True, io_engine: str = 'threads', assemble_sharded: bool = True, device: str = 'cpu') -> None: ...

    @property
    def verify_checksums(self) -> bool: ...

    @verify_checksums.setter
    def verify_checksums(self, arg: bool, /) -> None: ...

    @property
    def io_threads(self) -> int:
        """0: one per core, at least 4"""

    @io_threads.setter
    def io_threads(self, arg: int, /) -> None: ...

    @property
    def use_mmap(self) -> bool:
        """whole reads: map the file instead of reading it"""

    @use_mmap.setter
    def use_mmap(self, arg: bool, /) -> None: ...

    @property
    def direct_io(self) -> bool:
        """whole reads: O_DIRECT where the file system allows it"""

    @direct_io.setter
    def direct_io(self, arg: bool, /) -> None: ...

    @property
    def io_engine(self) -> str:
        """'threads', 'io_uring' or 'auto'"""

    @io_engine.setter
    def io_engine(self, arg: str, /) -> None: ...

    @property
    def assemble_sharded(self) -> bool: ...

    @assemble_sharded.setter
    def assemble_sharded(self, arg: bool, /) -> None: ...

    @property
    def device(self) -> str:
        """
        whole reads: 'cpu' or 'cuda:<index>', where the loaded tensors go (map_location)
        """

    @device.setter
    def device(self, arg: str, /) -> None: ...

class WriteStats:
    """What one rank's write did."""

    @property
    def file(self) -> str:
        """this rank's data file"""

    @property
    def bytes_written(self) -> int: ...

    @property
    def seconds_data(self) -> float:
        """writing and syncing the data file"""

    @property
    def seconds_total(self) -> float:
        """including the commit"""

class LoadResult:
    """A template filled in place, and the keys that did not match."""

    @property
    def state_dict(self) -> object:
        """the template (rebuilt where it held tuples)"""

    @property
    def missing_keys(self) -> list[str]:
        """in the template, not in the checkpoint"""

    @property
    def unexpected_keys(self) -> list[str]:
        """in the checkpoint, not in the template"""

class CheckpointIO:
    def __init__(self, adapter: object, rank: int, world_size: int) -> None: ...

    def write(self, path: str, state_dict: object, options: WriteOptions, *, barrier: Callable[[float], None] | None = None, pre_commit: Callable[[str], None] | None = None, post_commit: Callable[[str], None] | None = None) -> WriteStats: ...

    def abandon(self, path: str, error: str, options: WriteOptions, *, barrier: Callable[[float], None] | None = None) -> None: ...

    def read(self, path: str, options: ReadOptions) -> object: ...

    def read_into(self, path: str, target: object, options: ReadOptions, *, strict: bool = False) -> LoadResult: ...

    def load_into(self, source: object, target: object, *, strict: bool, source_name: str) -> LoadResult: ...

    def load_hugging_face(self, path: str, target: object, *, strict: bool, cast: bool, strip_prefix: str, add_prefix: str, io_threads: int) -> LoadResult: ...

    def read_hugging_face(self, path: str, *, dtype: str, strip_prefix: str, add_prefix: str, io_threads: int) -> object: ...

class SharedStateDict:
    @property
    def message(self) -> bytes: ...

    @property
    def fds(self) -> list[int]: ...

    @property
    def bytes_copied(self) -> int: ...

def verify(path: str) -> dict[str, int]: ...

def export_hugging_face(checkpoint: str, out: str, *, max_shard_size: str, dtype: str, prefix: str, strip_prefix: bool, overwrite: bool, rank: int, verify: bool, io_threads: int) -> dict[str, int | str | list[str] | list[tuple[str, str]]]: ...

class NativeStager:
    pass

class CheckpointProcess:
    def __init__(self, rank_info: object, config: object, writer_config: object, argv: Sequence[str], init_blob: bytes, adapter: object) -> None: ...

    def write(self, staged: object, path: str, call_args: bytes) -> concurrent.futures.Future[None]:
        """
        Writes the staged state dict, or what a concurrent.futures.Future of one yields, after earlier writes.
        """

    def started(self) -> concurrent.futures.Future[None]:
        """Done once the writer process serves."""

    def close(self) -> None: ...

    @property
    def pid(self) -> int: ...

    @property
    def restarts(self) -> int: ...

class AsyncCheckpointer:
    def __init__(self, staging: Staging | None, process: CheckpointProcess, max_pending_saves: int) -> None: ...

    def save(self, path: str, state_dict: object, call_args: bytes) -> tuple[concurrent.futures.Future[None], concurrent.futures.Future[None]]:
        """Stages and writes with fastdcp's stager: (staged, written)."""

    def save_staged_by(self, path: str, stage: Callable[[], object], call_args: bytes) -> concurrent.futures.Future[None]:
        """
        Writes what stage() returns (a state dict or a concurrent.futures.Future of one), called once every earlier write is done: the write's future.
        """

    def wait_for_path(self, path: str) -> None: ...

    def close(self) -> None: ...

class Staging:
    def __init__(self, stager: NativeStager, adapter: object) -> None: ...

    def stage(self, state_dict: object) -> object: ...

    def close(self) -> None: ...

def serve_writer(fd: int) -> int: ...

def cuda_available() -> bool: ...

def set_warning_handler(handler: Callable[[str], None]) -> None: ...
