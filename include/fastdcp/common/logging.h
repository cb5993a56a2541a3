#pragma once
// Warnings that a caller should see but that do not stop the work (e.g. pinned memory requested
// without CUDA). The default sink prints to stderr; bindings install their own (Python warnings).

#include <functional>
#include <string>

namespace fastdcp {

using WarningSink = std::function<void(const std::string& message)>;

// Installs `sink` for all later warnings and returns the previous one. Thread-safe.
WarningSink set_warning_sink(WarningSink sink);
void warn(const std::string& message);

}  // namespace fastdcp
