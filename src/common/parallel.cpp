#include "fastdcp/common/parallel.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "fastdcp/common/error.h"
#include "fastdcp/common/logging.h"

namespace fastdcp {

namespace {

std::string mib(uint64_t bytes) { return std::to_string((bytes + (1 << 20) - 1) >> 20) + " MiB"; }

}  // namespace

void throw_thread_start_error(const char* what, int errnum) {
  std::string message = std::string("cannot start a ") + what + " thread: " + std::strerror(errnum) + ". ";
  size_t stack = 0;
  pthread_attr_t attr;
  if (pthread_getattr_default_np(&attr) == 0) {
    pthread_attr_getstacksize(&attr, &stack);
    pthread_attr_destroy(&attr);
  }
  if (const std::string limit = address_space_limit_note(); !limit.empty()) {
    message += "Each thread reserves " + mib(stack) + " of address space for its stack, and " + limit +
               ", lower the stack size (ulimit -s), or use fewer threads";
  } else {
    message += "The process may have reached its limit of threads (ulimit -u) or of memory for their " + mib(stack) +
               " stacks: raise the limit or use fewer threads";
  }
  throw Error(ErrorCode::kResourceExhausted, message);
}

int resolve_thread_count(int requested) noexcept {
  if (requested > 0) return requested;
  return std::max(2, static_cast<int>(std::thread::hardware_concurrency()));
}

void parallel_for(size_t count, int threads, const std::function<void(size_t)>& work) {
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto run = [&] {
    while (!failed.load(std::memory_order_relaxed)) {
      const size_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= count) return;
      try {
        work(i);
      } catch (...) {
        std::lock_guard lock(error_mutex);
        if (!error) error = std::current_exception();
        failed = true;
      }
    }
  };
  const size_t helpers = std::min<size_t>(count, static_cast<size_t>(std::max(1, threads))) - (count > 0 ? 1 : 0);
  {
    std::vector<std::jthread> pool;
    pool.reserve(helpers);
    for (size_t t = 0; t < helpers; ++t) {
      try {
        pool.push_back(start_thread<std::jthread>("worker", run));
      } catch (const Error& e) {
        warn(std::string(e.what()) + "; going on with " + std::to_string(t + 1) + " threads");
        break;
      }
    }
    run();
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace fastdcp
