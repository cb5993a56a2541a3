#pragma once
// Note [Error policy]
// fastdcp reports every failure by throwing fastdcp::Error (derived from std::runtime_error).
// The message names what went wrong and what to change: the key path, the option, the file or
// the CUDA call. ErrorCode classifies the failure so that bindings can map it onto their own
// exception types. Python has one type per code, made in one place (translate_errors in
// python/src/bindings.cpp, re-exported by fastdcp.errors), each a subclass of the built-in a caller
// already catches: kInvalidArgument -> ValueError, kIoError -> OSError (with errno, so a
// PermissionError or NotADirectoryError where the errno says so), kNotFound -> FileNotFoundError,
// kAlreadyExists -> FileExistsError, kResourceExhausted -> MemoryError, kCancelled ->
// concurrent.futures.CancelledError, kDeadlineExceeded -> TimeoutError, kDataLoss -> fastdcp.DataLossError (a RuntimeError; a
// ChecksumError below is its fastdcp.ChecksumError subclass), every other code a RuntimeError.
// Asynchronous work delivers the same exceptions through fastdcp::Future.
// Destructors never throw; they release what they own and report nothing.

#include <stdexcept>
#include <string>

namespace fastdcp {

enum class ErrorCode {
  kInvalidArgument,     // the caller passed something we cannot use (names the key/option)
  kFailedPrecondition,  // the object is in the wrong state (closed, not ready)
  kResourceExhausted,   // memory budget, shared memory or address space exhausted
  kUnavailable,         // an optional facility (CUDA, a device) is absent
  kCudaError,           // a CUDA runtime call failed (names the call and the code)
  kIoError,             // an operating-system call failed (names the call and errno)
  kNotFound,            // a checkpoint, rank file or key that should exist does not (names it)
  kAlreadyExists,       // a create-if-absent found the name taken (names it)
  kDataLoss,            // stored data is truncated or corrupt (names the file, tensor and chunk)
  kCancelled,           // the work was abandoned before it ran
  kDeadlineExceeded,    // a wait ran past its timeout (names the timeout option)
  kInternal,            // a broken invariant inside fastdcp (the last code: bindings size tables by it)
};

const char* to_string(ErrorCode code) noexcept;

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message, int errnum = 0);
  ErrorCode code() const noexcept { return code_; }
  // The operating system's errno behind a kIoError (ENOSPC, EACCES, ...), 0 when there is none;
  // Python raises OSError with it.
  int errnum() const noexcept { return errnum_; }

 private:
  ErrorCode code_;
  int errnum_;
};

// kDataLoss found by a checksum: stored bytes that do not match the CRC32C recorded for them (a
// chunk's, or a header's in the manifest), as opposed to a file that is truncated or unparsable.
class ChecksumError : public Error {
 public:
  explicit ChecksumError(const std::string& message) : Error(ErrorCode::kDataLoss, message) {}
};

// For errors of memory that could not be reserved: "the address-space limit (ulimit -v) is N MiB;
// raise it (ulimit -v unlimited)", or "" when there is no such limit.
std::string address_space_limit_note();

// Throws Error(kIoError, errnum) with "<what>: <strerror(errnum)>".
[[noreturn]] void throw_system_error(const std::string& what, int errnum);

}  // namespace fastdcp
