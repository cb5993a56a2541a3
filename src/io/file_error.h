#pragma once
// The one place that turns a failed file operation into an Error: what File and IoRing throw.

#include <string>

namespace fastdcp {

// Error(kIoError) "<operation> '<path>': <OS error>", saying when the disk or the file-size limit is
// full; Error(kNotFound) for ENOENT.
[[noreturn]] void throw_file_error(const char* operation, const std::string& path, int error);
// The same, naming the system call that failed after the path: "<operation> '<path>': <call>: ...".
[[noreturn]] void throw_file_error(const char* operation, const std::string& path, const char* call, int error);

}  // namespace fastdcp
