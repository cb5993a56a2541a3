"""fastdcp's exception types: one per error code of the C++ core (Note [Error policy] in
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
(``IoPermissionError`` for EACCES, ``IoNotADirectoryError`` for ENOTDIR, ...)."""

from fastdcp import _C
from fastdcp._C import (AlreadyExistsError, CancelledError, ChecksumError, CudaError, DataLossError,
                        DeadlineExceededError, Error, ErrorCode, FailedPreconditionError, InternalError,
                        InvalidArgumentError, IoError, NotFoundError, ResourceExhaustedError, UnavailableError)

# The Io<Subclass> types live here too, so that a pickled one (an error of the writer process)
# unpickles as fastdcp.errors.<name>.
globals().update({name: value for name, value in vars(_C).items()
                  if isinstance(value, type) and issubclass(value, IoError)})

__all__ = ["AlreadyExistsError", "CancelledError", "ChecksumError", "CudaError", "DataLossError",
           "DeadlineExceededError", "Error", "ErrorCode", "FailedPreconditionError", "InternalError",
           "InvalidArgumentError", "IoError", "NotFoundError", "ResourceExhaustedError", "UnavailableError"]
