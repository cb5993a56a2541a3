#include "fastdcp/common/logging.h"

#include <iostream>
#include <mutex>

namespace fastdcp {
namespace {
std::mutex& sink_mutex() {
  static std::mutex mutex;
  return mutex;
}
WarningSink& sink() {
  static WarningSink current = [](const std::string& message) { std::cerr << "fastdcp warning: " << message << '\n'; };
  return current;
}
}  // namespace

WarningSink set_warning_sink(WarningSink new_sink) {
  std::lock_guard lock(sink_mutex());
  std::swap(sink(), new_sink);
  return new_sink;
}

void warn(const std::string& message) {
  WarningSink current;
  {
    std::lock_guard lock(sink_mutex());
    current = sink();
  }
  if (current) current(message);
}

}  // namespace fastdcp
