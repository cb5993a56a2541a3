"""
fastdcp's exception types: one per error code of the C++ core (Note [Error policy] in
include/fastdcp/common/error.h), each a subclass of the built-in a caller already catches and of
``Error``, with the code as ``code``:

======================== ============================== ==============================
code                     type                           also a
======================== ============================== ==============================
INVALID_ARGUMENT         InvalidArgumentError           ValueError
FAILED_PRECONDITION      FailedPreconditionError        RuntimeError
RESOURCE_EXHAUSTED       ResourceExhaustedError         MemoryError
UNAVAILABLE              UnavailableError               RuntimeError
CUDA_ERROR               CudaError                      RuntimeError
IO_ERROR                 IoError                        OSError (errno set)
NOT_FOUND                NotFoundError                  FileNotFoundError
ALREADY_EXISTS           AlreadyExistsError             FileExistsError
DATA_LOSS                DataLossError, ChecksumError   RuntimeError
CANCELLED                CancelledError                 concurrent.futures.CancelledError
DEADLINE_EXCEEDED        DeadlineExceededError          TimeoutError
INTERNAL                 InternalError                  RuntimeError
======================== ============================== ==============================

An ``IoError`` whose errno has its own OSError subclass is an ``Io<Subclass>`` of both
(``IoPermissionError`` for EACCES, ``IoNotADirectoryError`` for ENOTDIR, ...).
"""

import concurrent.futures._base

import fastdcp._C
from fastdcp._C import ErrorCode as ErrorCode


class AlreadyExistsError(FileExistsError, RuntimeError, Error):
    """A name that must be new is taken."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.ALREADY_EXISTS

class CancelledError(concurrent.futures._base.CancelledError, RuntimeError, Error):
    """
    The work was abandoned before it completed (a save another rank voted against).
    """

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.CANCELLED

class ChecksumError(DataLossError):
    """
    Stored bytes do not match their recorded CRC32C; the message names the chunk.
    """

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.DATA_LOSS

class CudaError(RuntimeError, Error):
    """A CUDA runtime call failed; the message names the call and its error."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.CUDA_ERROR

class DataLossError(RuntimeError, Error):
    """
    A checkpoint's stored bytes are truncated or corrupt; the message names the file.
    """

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.DATA_LOSS

class DeadlineExceededError(TimeoutError, Error):
    """
    A wait ran past its timeout (a write, the writer's start); the message names the timeout option.
    """

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.DEADLINE_EXCEEDED

class Error(Exception):
    """Any error fastdcp reports; `code` says which (fastdcp.ErrorCode)."""

class FailedPreconditionError(RuntimeError, Error):
    """An object or checkpoint in the wrong state (closed, not committed)."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.FAILED_PRECONDITION

class InternalError(RuntimeError, Error):
    """A broken invariant inside fastdcp."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.INTERNAL

class InvalidArgumentError(ValueError, Error):
    """
    A value or option fastdcp cannot use; the message names the key or option.
    """

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.INVALID_ARGUMENT

class IoError(OSError, Error):
    """An operating-system call failed; errno and strerror are set."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.IO_ERROR

class NotFoundError(FileNotFoundError, Error):
    """A checkpoint, rank file or key that should exist does not."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.NOT_FOUND

class ResourceExhaustedError(MemoryError, Error):
    """A memory budget, shared memory or address space is exhausted."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.RESOURCE_EXHAUSTED

class UnavailableError(RuntimeError, Error):
    """
    An optional facility (CUDA, io_uring, a peer within its timeout) is absent.
    """

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.UNAVAILABLE

class IoPermissionError(IoError, PermissionError):
    """fastdcp.IoError with the errno of this OSError subclass."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.IO_ERROR

class IoFileNotFoundError(IoError, FileNotFoundError):
    """fastdcp.IoError with the errno of this OSError subclass."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.IO_ERROR

class IoProcessLookupError(IoError, ProcessLookupError):
    """fastdcp.IoError with the errno of this OSError subclass."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.IO_ERROR

class IoInterruptedError(IoError, InterruptedError):
    """fastdcp.IoError with the errno of this OSError subclass."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.IO_ERROR

class IoChildProcessError(IoError, ChildProcessError):
    """fastdcp.IoError with the errno of this OSError subclass."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.IO_ERROR

class IoBlockingIOError(IoError, BlockingIOError):
    """fastdcp.IoError with the errno of this OSError subclass."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.IO_ERROR

class IoFileExistsError(IoError, FileExistsError):
    """fastdcp.IoError with the errno of this OSError subclass."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.IO_ERROR

class IoNotADirectoryError(IoError, NotADirectoryError):
    """fastdcp.IoError with the errno of this OSError subclass."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.IO_ERROR

class IoIsADirectoryError(IoError, IsADirectoryError):
    """fastdcp.IoError with the errno of this OSError subclass."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.IO_ERROR

class IoBrokenPipeError(IoError, BrokenPipeError):
    """fastdcp.IoError with the errno of this OSError subclass."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.IO_ERROR

class IoConnectionAbortedError(IoError, ConnectionAbortedError):
    """fastdcp.IoError with the errno of this OSError subclass."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.IO_ERROR

class IoConnectionResetError(IoError, ConnectionResetError):
    """fastdcp.IoError with the errno of this OSError subclass."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.IO_ERROR

class IoTimeoutError(IoError, TimeoutError):
    """fastdcp.IoError with the errno of this OSError subclass."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.IO_ERROR

class IoConnectionRefusedError(IoError, ConnectionRefusedError):
    """fastdcp.IoError with the errno of this OSError subclass."""

    code: fastdcp._C.ErrorCode = fastdcp._C.ErrorCode.IO_ERROR

__all__: list = ['AlreadyExistsError', 'CancelledError', 'ChecksumError', 'CudaError', 'DataLossError', 'DeadlineExceededError', 'Error', 'ErrorCode', 'FailedPreconditionError', 'InternalError', 'InvalidArgumentError', 'IoError', 'NotFoundError', 'ResourceExhaustedError', 'UnavailableError']
