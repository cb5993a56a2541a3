#pragma once
// A small value-or-error future shared between one producer (Promise) and any number of readers.
// Unlike std::future it supports callbacks, many readers, and moving the value out once.
//
// Note [Throwing future callbacks]
// A callback runs on whichever thread completes the future (a staging worker, a writer's comms
// loop) or, when the future is already ready, inside on_ready(). Neither caller can do anything
// useful with the callback's exception, and letting it escape a thread's loop ends the process
// (std::terminate). So an exception thrown by a callback is caught and reported through warn()
// (fastdcp/common/logging.h), naming it; the future keeps its value or error, and its other
// callbacks still run. A callback that must report a failure does so itself (e.g. by failing a
// promise of its own).

#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "fastdcp/common/error.h"

namespace fastdcp {

template <class T>
class Future;

namespace detail {
// Runs a future callback under Note [Throwing future callbacks]: never throws.
void run_future_callback(const std::function<void()>& callback) noexcept;

template <class T>
struct FutureState {
  std::mutex mutex;
  std::condition_variable ready_cv;
  bool ready = false;
  std::optional<T> value;
  std::exception_ptr error;
  std::vector<std::function<void()>> callbacks;

  template <class Fn>
  void complete(Fn&& fill) {
    std::vector<std::function<void()>> to_run;
    {
      std::lock_guard lock(mutex);
      if (ready) throw Error(ErrorCode::kFailedPrecondition, "promise already satisfied");
      fill();
      ready = true;
      to_run.swap(callbacks);
    }
    ready_cv.notify_all();
    for (auto& callback : to_run) run_future_callback(callback);
  }

  void wait() {
    std::unique_lock lock(mutex);
    ready_cv.wait(lock, [&] { return ready; });
  }
};
}  // namespace detail

template <class T>
class Future {
 public:
  Future() = default;

  bool valid() const noexcept { return state_ != nullptr; }
  bool ready() const {
    std::lock_guard lock(checked().mutex);
    return state_->ready;
  }
  void wait() const { checked().wait(); }
  template <class Rep, class Period>
  bool wait_for(std::chrono::duration<Rep, Period> timeout) const {
    std::unique_lock lock(checked().mutex);
    return state_->ready_cv.wait_for(lock, timeout, [&] { return state_->ready; });
  }

  // Waits, then returns the value or rethrows the stored exception.
  const T& get() const {
    wait();
    if (state_->error) std::rethrow_exception(state_->error);
    if (!state_->value) throw Error(ErrorCode::kFailedPrecondition, "future value was already taken");
    return *state_->value;
  }
  // Waits, then moves the value out; later get()/take() calls fail.
  T take() {
    get();
    std::lock_guard lock(state_->mutex);
    T out = std::move(*state_->value);
    state_->value.reset();
    return out;
  }
  std::exception_ptr error() const {
    wait();
    return state_->error;
  }

  // Runs `callback(future)` once the future is ready: at once on this thread if it already is,
  // otherwise on the thread that completes it. What it throws is reported, never passed on:
  // Note [Throwing future callbacks].
  void on_ready(std::function<void(const Future&)> callback) const {
    auto& state = checked();
    {
      std::lock_guard lock(state.mutex);
      if (!state.ready) {
        state.callbacks.push_back([self = *this, callback = std::move(callback)] { callback(self); });
        return;
      }
    }
    detail::run_future_callback([&] { callback(*this); });
  }

 private:
  template <class U>
  friend class Promise;
  explicit Future(std::shared_ptr<detail::FutureState<T>> state) : state_(std::move(state)) {}
  detail::FutureState<T>& checked() const {
    if (!state_) throw Error(ErrorCode::kFailedPrecondition, "operation on an empty (invalid) Future");
    return *state_;
  }
  std::shared_ptr<detail::FutureState<T>> state_;
};

template <class T>
class Promise {
 public:
  Promise() : state_(std::make_shared<detail::FutureState<T>>()) {}
  Promise(Promise&&) noexcept = default;
  Promise& operator=(Promise&&) noexcept = default;
  Promise(const Promise&) = delete;
  Promise& operator=(const Promise&) = delete;
  // A promise dropped unfulfilled fails its future instead of leaving readers waiting forever.
  ~Promise() {
    if (state_ && !satisfied_) {
      try {
        state_->complete([&] {
          state_->error = std::make_exception_ptr(
              Error(ErrorCode::kCancelled, "the work behind this future was abandoned before completing"));
        });
      } catch (...) {
      }
    }
  }

  Future<T> get_future() const { return Future<T>(state_); }
  void set_value(T value) {
    satisfied_ = true;
    state_->complete([&] { state_->value.emplace(std::move(value)); });
  }
  void set_exception(std::exception_ptr error) {
    satisfied_ = true;
    state_->complete([&] { state_->error = std::move(error); });
  }

 private:
  std::shared_ptr<detail::FutureState<T>> state_;
  bool satisfied_ = false;
};

template <class T>
Future<T> make_ready_future(T value) {
  Promise<T> promise;
  auto future = promise.get_future();
  promise.set_value(std::move(value));
  return future;
}

}  // namespace fastdcp
