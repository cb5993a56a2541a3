#include "fastdcp/common/future.h"

#include <string>

#include "fastdcp/common/logging.h"

namespace fastdcp::detail {

void run_future_callback(const std::function<void()>& callback) noexcept {
  std::exception_ptr error;
  try {
    callback();
    return;
  } catch (...) {
    error = std::current_exception();
  }
  try {
    std::string what = "an exception not derived from std::exception";
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    warn("a Future callback threw, and its exception was dropped (Note [Throwing future callbacks]): " + what);
  } catch (...) {  // a warning sink that throws, or no memory for the message: nothing left to tell
  }
}

}  // namespace fastdcp::detail
