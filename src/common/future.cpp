#include "fastdcp/common/future.h"

#include <string>

#include "fastdcp/common/logging.h"
#include "fastdcp/common/parallel.h"

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

namespace fastdcp {

SerialExecutor::SerialExecutor(const char* name) : thread_(start_thread(name, [this] { loop(); })) {}

SerialExecutor::~SerialExecutor() { close(); }

void SerialExecutor::post(std::function<void()> work) {
  {
    std::lock_guard lock(mutex_);
    if (!closing_) {
      queue_.push_back(std::move(work));
      cv_.notify_one();
      return;
    }
  }
  detail::run_future_callback(work);
}

void SerialExecutor::close() {
  {
    std::lock_guard lock(mutex_);
    closing_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void SerialExecutor::loop() {
  for (;;) {
    std::function<void()> work;
    {
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [&] { return closing_ || !queue_.empty(); });
      if (queue_.empty()) return;  // closing, and everything posted has run
      work = std::move(queue_.front());
      queue_.pop_front();
    }
    detail::run_future_callback(work);  // outside the lock: the work may post more
  }
}

}  // namespace fastdcp
