#pragma once
// A small value-or-error future shared between one producer (Promise) and any number of readers.
// Unlike std::future it supports callbacks, many readers, moving the value out once, Future<void>,
// and the combinators then() and when_all().
//
// Note [Throwing future callbacks]
// A callback runs on whichever thread completes the future (a staging worker, a writer's comms
// loop) or, when the future is already ready, inside on_ready(). Neither caller can do anything
// useful with the callback's exception, and letting it escape a thread's loop ends the process
// (std::terminate). So an exception thrown by a callback is caught and reported through warn()
// (fastdcp/common/logging.h), naming it; the future keeps its value or error, and its other
// callbacks still run. A callback that must report a failure does so itself (e.g. by failing a
// promise of its own).

// Note [Completing futures outside locks]
// A future's callbacks run on the thread that completes it (set_value, set_exception, or dropping
// the promise), inside that call, and on_ready() runs one at once when the future is ready. So a
// thread completes a promise, and registers a callback, only while it holds no lock that a
// callback might take: a callback may call back into the object that completed it (stats, another
// save) or complete a promise in turn. (It still must not wait for work that only its own thread
// would do.) Code holding a lock moves the promise
// out of the guarded state and completes it after the lock's scope (CheckpointProcess::close());
// code that learns of a completion inside someone else's locked region (a stager's
// on_sources_released runs under the stager's locks) hands the completion to a SerialExecutor,
// whose thread holds none (AsyncCheckpointer::save()). Nothing here can check the rule; the places
// that complete promises today keep it: the stager's worker after run_stage() has let go of its
// locks, the writer's comms loop outside its queue lock, CheckpointProcess::close() after moving
// the queued jobs out, then() and when_all() on the thread completing their source.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "fastdcp/common/error.h"

namespace fastdcp {

template <class T>
class Future;
template <class T>
class Promise;

namespace detail {
// Runs a future callback under Note [Throwing future callbacks]: never throws.
void run_future_callback(const std::function<void()>& callback) noexcept;

// What a FutureState<T> holds: T, or nothing for Future<void>.
template <class T>
using StoredValue = std::conditional_t<std::is_void_v<T>, std::monostate, T>;

template <class T>
struct FutureState {
  std::mutex mutex;
  std::condition_variable ready_cv;
  bool ready = false;
  std::optional<StoredValue<T>> value;
  std::exception_ptr error;
  std::vector<std::function<void()>> callbacks;

  // Callbacks run after the state's own lock is released (Note [Completing futures outside locks]).
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
  using value_type = T;

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

  // Waits, then returns the value (nothing for Future<void>) or rethrows the stored exception.
  std::conditional_t<std::is_void_v<T>, void, const detail::StoredValue<T>&> get() const {
    wait();
    if (state_->error) std::rethrow_exception(state_->error);
    if (!state_->value) throw Error(ErrorCode::kFailedPrecondition, "future value was already taken");
    if constexpr (!std::is_void_v<T>) return *state_->value;
  }
  // Waits, then moves the value out; later get()/take() calls fail. Future<void>: as get().
  T take() {
    get();
    if constexpr (!std::is_void_v<T>) {
      std::lock_guard lock(state_->mutex);
      T out = std::move(*state_->value);
      state_->value.reset();
      return out;
    }
  }
  std::exception_ptr error() const {
    wait();
    return state_->error;
  }

  // Runs `callback(future)` once the future is ready: at once on this thread if it already is,
  // otherwise on the thread that completes it. What it throws is reported, never passed on:
  // Note [Throwing future callbacks]. Call it holding no lock the callback may take: Note
  // [Completing futures outside locks].
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

  // A future of fn(value) (fn() for Future<void>), ready once this one is and fn has run, on the
  // thread that completed this one (as on_ready). This future's error passes through without
  // calling fn; what fn throws fails the result and never reaches the completing thread. The value
  // is read, not taken: other readers still see it. fn returning a Future gives a Future<Future<U>>.
  template <class Fn>
  auto then(Fn fn) const {
    using R = std::remove_cvref_t<typename std::conditional_t<
        std::is_void_v<T>, std::invoke_result<Fn&>, std::invoke_result<Fn&, const detail::StoredValue<T>&>>::type>;
    auto promise = std::make_shared<Promise<R>>();
    Future<R> out = promise->get_future();
    on_ready([promise, fn = std::move(fn)](const Future& source) mutable {
      std::exception_ptr error;
      std::optional<detail::StoredValue<R>> result;
      try {
        if constexpr (std::is_void_v<T>) {
          source.get();  // rethrows the source's error: fn is not called
          if constexpr (std::is_void_v<R>) {
            fn();
            result.emplace();
          } else {
            result.emplace(fn());
          }
        } else if constexpr (std::is_void_v<R>) {
          fn(source.get());
          result.emplace();
        } else {
          result.emplace(fn(source.get()));
        }
      } catch (...) {
        error = std::current_exception();
      }
      // Outside the try: the result's own callbacks never throw (run_future_callback).
      if (error) {
        promise->set_exception(std::move(error));
      } else if constexpr (std::is_void_v<R>) {
        promise->set_value();
      } else {
        promise->set_value(std::move(*result));
      }
    });
    return out;
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
  Promise& operator=(Promise&& other) noexcept {
    if (this != &other) {
      abandon();
      state_ = std::move(other.state_);
      satisfied_ = other.satisfied_;
    }
    return *this;
  }
  Promise(const Promise&) = delete;
  Promise& operator=(const Promise&) = delete;
  // A promise dropped unfulfilled fails its future instead of leaving readers waiting forever;
  // its callbacks run here (Note [Completing futures outside locks]).
  ~Promise() { abandon(); }

  Future<T> get_future() const { return Future<T>(state_); }
  void set_value()
    requires std::is_void_v<T>
  {
    satisfied_ = true;
    state_->complete([&] { state_->value.emplace(); });
  }
  void set_value(detail::StoredValue<T> value)
    requires(!std::is_void_v<T>)
  {
    satisfied_ = true;
    state_->complete([&] { state_->value.emplace(std::move(value)); });
  }
  void set_exception(std::exception_ptr error) {
    satisfied_ = true;
    state_->complete([&] { state_->error = std::move(error); });
  }

 private:
  void abandon() noexcept {
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

inline Future<void> make_ready_future() {
  Promise<void> promise;
  auto future = promise.get_future();
  promise.set_value();
  return future;
}

// Ready once every future in `futures` is (at once for none). Error rule: it waits for all of
// them, then fails with the error of the first failed one in argument order, not the first to
// fail in time, so that the same failures always give the same error. It is completed by the
// thread that completes the last of them.
template <class T>
Future<void> when_all(std::vector<Future<T>> futures) {
  struct Join {
    std::vector<Future<T>> futures;
    std::atomic<size_t> remaining;
    Promise<void> promise;
  };
  if (futures.empty()) return make_ready_future();
  for (const auto& f : futures) {
    if (!f.valid()) throw Error(ErrorCode::kInvalidArgument, "when_all: an empty (invalid) Future among its arguments");
  }
  auto join = std::make_shared<Join>();
  join->remaining.store(futures.size());
  join->futures = std::move(futures);
  Future<void> out = join->promise.get_future();
  for (const auto& f : join->futures) {
    // Holds `join` until the last callback has run: a cycle through the futures' callbacks, broken
    // as each one completes (and each is completed by its promise, or by dropping it).
    f.on_ready([join](const Future<T>&) {
      if (join->remaining.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
      for (const auto& g : join->futures) {
        if (auto error = g.error()) return join->promise.set_exception(std::move(error));
      }
      join->promise.set_value();
    });
  }
  return out;
}

// The same over futures of different types, in argument order.
template <class... Ts>
  requires(sizeof...(Ts) > 0)
Future<void> when_all(const Future<Ts>&... futures) {
  if ((!futures.valid() || ...)) {
    throw Error(ErrorCode::kInvalidArgument, "when_all: an empty (invalid) Future among its arguments");
  }
  return when_all(std::vector<Future<void>>{futures.then([](const auto&...) {})...});
}

// Runs posted work in order on a thread of its own, which holds no lock of its poster's: for code
// that learns of a completion inside someone else's locked region (Note [Completing futures
// outside locks]). What the work throws is reported as a callback's would be.
class SerialExecutor {
 public:
  explicit SerialExecutor(const char* name);
  ~SerialExecutor();  // close()
  SerialExecutor(const SerialExecutor&) = delete;
  SerialExecutor& operator=(const SerialExecutor&) = delete;

  // After close(), runs `work` on the caller's thread instead: late work is never lost.
  void post(std::function<void()> work);
  // Runs what was posted, then ends the thread. Idempotent; not from a posted task.
  void close();

 private:
  void loop();

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool closing_ = false;
  std::thread thread_;
};

}  // namespace fastdcp
