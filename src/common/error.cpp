#include "fastdcp/common/error.h"

#include <sys/resource.h>

#include <cstring>

namespace fastdcp {

const char* to_string(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "invalid argument";
    case ErrorCode::kFailedPrecondition: return "failed precondition";
    case ErrorCode::kResourceExhausted: return "resource exhausted";
    case ErrorCode::kUnavailable: return "unavailable";
    case ErrorCode::kCudaError: return "CUDA error";
    case ErrorCode::kIoError: return "I/O error";
    case ErrorCode::kNotFound: return "not found";
    case ErrorCode::kAlreadyExists: return "already exists";
    case ErrorCode::kDataLoss: return "data loss";
    case ErrorCode::kCancelled: return "cancelled";
    case ErrorCode::kInternal: return "internal error";
    case ErrorCode::kDeadlineExceeded: return "deadline exceeded";
  }
  return "unknown error";
}

Error::Error(ErrorCode code, const std::string& message, int errnum)
    : std::runtime_error(message), code_(code), errnum_(errnum) {}

std::string address_space_limit_note() {
  rlimit limit{};
  if (::getrlimit(RLIMIT_AS, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) return "";
  return "the address-space limit (ulimit -v) is " + std::to_string(limit.rlim_cur >> 20) +
         " MiB; raise it (ulimit -v unlimited)";
}

void throw_system_error(const std::string& what, int errnum) {
  char buffer[256];
  // GNU strerror_r may return a static string instead of filling the buffer.
  const char* text = strerror_r(errnum, buffer, sizeof buffer);
  throw Error(ErrorCode::kIoError, what + ": " + text + " (errno " + std::to_string(errnum) + ")", errnum);
}

}  // namespace fastdcp
