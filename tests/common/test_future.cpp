#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "fastdcp/common/future.h"
#include "fastdcp/common/logging.h"

namespace fastdcp {
namespace {

ErrorCode code_of(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const Error& e) {
    return e.code();
  } catch (...) {
    return ErrorCode::kInternal;  // not a fastdcp::Error: no test expects it
  }
}

TEST(Future, ValueArrivesFromAnotherThread) {
  Promise<int> promise;
  Future<int> future = promise.get_future();
  EXPECT_FALSE(future.ready());
  std::thread producer([p = std::move(promise)]() mutable { p.set_value(42); });
  EXPECT_EQ(future.get(), 42);
  EXPECT_TRUE(future.ready());
  producer.join();
}

TEST(Future, ExceptionIsRethrownToEveryReader) {
  Promise<int> promise;
  Future<int> a = promise.get_future();
  Future<int> b = a;
  promise.set_exception(std::make_exception_ptr(Error(ErrorCode::kIoError, "disk on fire")));
  for (const auto& f : {a, b}) {
    try {
      f.get();
      FAIL() << "expected an exception";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kIoError);
      EXPECT_STREQ(e.what(), "disk on fire");
    }
  }
}

TEST(Future, CallbacksRunOnCompletionOrAtOnceWhenReady) {
  Promise<int> promise;
  Future<int> future = promise.get_future();
  std::atomic<int> seen{0};
  future.on_ready([&](const Future<int>& f) { seen += f.get(); });
  EXPECT_EQ(seen.load(), 0);
  promise.set_value(5);
  EXPECT_EQ(seen.load(), 5);
  future.on_ready([&](const Future<int>& f) { seen += f.get(); });  // already ready: runs now
  EXPECT_EQ(seen.load(), 10);
}

TEST(Future, TakeMovesTheValueOutOnce) {
  auto future = make_ready_future(std::make_unique<int>(7));
  EXPECT_EQ(*future.take(), 7);
  EXPECT_THROW(future.get(), Error);
}

template <class T>
ErrorCode code_of_abandoned() {
  Future<T> future;
  {
    Promise<T> promise;
    future = promise.get_future();
  }
  return code_of(future.error());
}

TEST(Future, AbandonedPromiseFailsItsFuture) {
  EXPECT_EQ(code_of_abandoned<int>(), ErrorCode::kCancelled);
  EXPECT_EQ(code_of_abandoned<void>(), ErrorCode::kCancelled);
}

TEST(Future, WaitForTimesOut) {
  Promise<int> promise;
  auto future = promise.get_future();
  EXPECT_FALSE(future.wait_for(std::chrono::milliseconds(10)));
  promise.set_value(1);
  EXPECT_TRUE(future.wait_for(std::chrono::milliseconds(10)));
}

TEST(Future, SecondCompletionIsAnError) {
  Promise<int> promise;
  promise.set_value(1);
  EXPECT_THROW(promise.set_value(2), Error);
}

TEST(Future, InvalidFutureIsAClearError) {
  Future<int> future;
  EXPECT_FALSE(future.valid());
  EXPECT_THROW(future.get(), Error);
}

// Collects warnings for the lifetime of the object (Note [Throwing future callbacks]).
class CapturedWarnings {
 public:
  CapturedWarnings()
      : previous_(set_warning_sink([this](const std::string& m) {
          std::lock_guard lock(mutex_);
          messages_.push_back(m);
        })) {}
  ~CapturedWarnings() { set_warning_sink(previous_); }
  std::vector<std::string> messages() {
    std::lock_guard lock(mutex_);
    return messages_;
  }

 private:
  std::mutex mutex_;
  std::vector<std::string> messages_;
  WarningSink previous_;
};

TEST(Future, ThrowingCallbackOnTheCompletingThreadIsReportedAndTheOthersStillRun) {
  CapturedWarnings warnings;
  Promise<int> promise;
  Future<int> future = promise.get_future();
  std::atomic<int> ran{0};
  future.on_ready([&](const Future<int>&) {
    ++ran;
    throw std::runtime_error("callback one failed");
  });
  future.on_ready([&](const Future<int>& f) { ran += f.get(); });
  future.on_ready([&](const Future<int>&) {
    ++ran;
    throw 17;  // not even a std::exception
  });
  // Completed from another thread, as a writer's comms loop does: an escaping exception would
  // call std::terminate there.
  std::thread producer([p = std::move(promise)]() mutable { p.set_value(40); });
  producer.join();
  EXPECT_EQ(ran.load(), 42);
  EXPECT_EQ(future.get(), 40);  // the value is untouched
  const auto messages = warnings.messages();
  ASSERT_EQ(messages.size(), 2u);
  EXPECT_NE(messages[0].find("callback one failed"), std::string::npos) << messages[0];
  EXPECT_NE(messages[1].find("not derived from std::exception"), std::string::npos) << messages[1];
}

TEST(Future, ThrowingCallbackOnAReadyFutureIsReportedNotPassedOn) {
  CapturedWarnings warnings;
  Promise<int> promise;
  Future<int> future = promise.get_future();
  promise.set_exception(std::make_exception_ptr(Error(ErrorCode::kIoError, "disk full")));
  std::atomic<bool> later{false};
  std::thread reader([&] {
    EXPECT_NO_THROW(future.on_ready([](const Future<int>& f) { f.get(); }));  // rethrows "disk full"
    future.on_ready([&](const Future<int>&) { later = true; });
  });
  reader.join();
  EXPECT_TRUE(later.load());
  const auto messages = warnings.messages();
  ASSERT_EQ(messages.size(), 1u);
  EXPECT_NE(messages[0].find("disk full"), std::string::npos) << messages[0];
  EXPECT_THROW(future.get(), Error);  // the future keeps its own error
}

TEST(Future, ThrowingWarningSinkDoesNotEscapeEither) {
  auto previous = set_warning_sink([](const std::string&) { throw std::runtime_error("sink failed"); });
  Promise<int> promise;
  Future<int> future = promise.get_future();
  future.on_ready([](const Future<int>&) { throw std::runtime_error("callback failed"); });
  EXPECT_NO_THROW(promise.set_value(1));
  set_warning_sink(previous);
  EXPECT_EQ(future.get(), 1);
}

// ---- Future<void> ------------------------------------------------------------------------------

TEST(FutureVoid, CompletesReadersCallbacksAndCarriesErrors) {
  Promise<void> promise;
  Future<void> future = promise.get_future();
  std::atomic<int> ran{0};
  future.on_ready([&](const Future<void>& f) {
    f.get();
    ++ran;
  });
  EXPECT_FALSE(future.ready());
  std::thread producer([p = std::move(promise)]() mutable { p.set_value(); });
  future.get();
  producer.join();
  future.take();  // nothing to move out: as get(), and again
  future.get();
  EXPECT_EQ(ran.load(), 1);
  future.on_ready([&](const Future<void>&) { ++ran; });
  EXPECT_EQ(ran.load(), 2);

  Promise<void> failing;
  failing.set_exception(std::make_exception_ptr(Error(ErrorCode::kIoError, "no disk")));
  EXPECT_THROW(failing.get_future().get(), Error);
  EXPECT_THROW(failing.set_value(), Error);  // a second completion
  make_ready_future().get();
}

TEST(Future, PromiseOverwrittenByAssignmentFailsItsFuture) {
  Promise<int> promise;
  Future<int> first = promise.get_future();
  promise = Promise<int>();  // the first future would otherwise never be ready
  ASSERT_TRUE(first.wait_for(std::chrono::seconds(5)));
  EXPECT_THROW(first.get(), Error);
  promise.set_value(3);
}

// ---- then -----------------------------------------------------------------------------------

TEST(FutureThen, MapsValuesAcrossTypesAndVoid) {
  Promise<int> promise;
  Future<int> source = promise.get_future();
  Future<std::string> text = source.then([](const int& v) { return std::to_string(v * 2); });
  Future<void> done = text.then([](const std::string&) {});
  Future<size_t> length = done.then([&] { return text.get().size(); });
  EXPECT_FALSE(length.ready());
  promise.set_value(21);
  EXPECT_EQ(text.get(), "42");
  EXPECT_EQ(length.get(), 2u);
  EXPECT_EQ(source.get(), 21);  // read, not taken
  // Registered after completion: runs at once.
  EXPECT_EQ(source.then([](int v) { return v + 1; }).get(), 22);
  // A function returning a reference gives a future of a copy.
  const std::string kept = "kept";
  Future<std::string> copied = source.then([&](int) -> const std::string& { return kept; });
  EXPECT_EQ(copied.get(), "kept");
}

TEST(FutureThen, ErrorPassesThroughAChainWithoutCallingTheFunctions) {
  Promise<int> promise;
  std::atomic<int> calls{0};
  Future<void> end = promise.get_future()
                         .then([&](int v) {
                           ++calls;
                           return v;
                         })
                         .then([&](int) { ++calls; })
                         .then([&] { ++calls; });
  promise.set_exception(std::make_exception_ptr(Error(ErrorCode::kDataLoss, "bad checksum")));
  EXPECT_EQ(code_of(end.error()), ErrorCode::kDataLoss);
  EXPECT_EQ(calls.load(), 0);
}

TEST(FutureThen, ThrowingFunctionFailsTheResultNotTheCompletingThread) {
  CapturedWarnings warnings;
  Promise<int> promise;
  Future<int> mapped = promise.get_future().then([](int) -> int {
    throw Error(ErrorCode::kInvalidArgument, "mapping failed");
  });
  Future<void> after = mapped.then([](int) { ADD_FAILURE() << "called after a failed step"; });
  std::thread producer([p = std::move(promise)]() mutable { p.set_value(1); });  // would terminate
  producer.join();
  EXPECT_EQ(code_of(mapped.error()), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of(after.error()), ErrorCode::kInvalidArgument);
  EXPECT_TRUE(warnings.messages().empty());  // an error of the result, not a dropped exception
}

TEST(FutureThen, DroppedPromiseReachesTheEndOfTheChain) {
  Future<void> end;
  {
    Promise<std::string> promise;
    end = promise.get_future().then([](const std::string& s) { return s.size(); }).then([](size_t) {});
  }
  EXPECT_EQ(code_of(end.error()), ErrorCode::kCancelled);
}

TEST(FutureThen, OnATakenValueFailsInsteadOfCallingTheFunction) {
  auto source = make_ready_future(std::make_unique<int>(1));
  source.take();
  auto mapped = source.then([](const std::unique_ptr<int>& p) { return *p; });
  EXPECT_EQ(code_of(mapped.error()), ErrorCode::kFailedPrecondition);
}

// ---- when_all -------------------------------------------------------------------------------

TEST(WhenAll, ReadyOnlyWhenAllAre) {
  std::vector<Promise<int>> promises(3);
  std::vector<Future<int>> futures;
  for (auto& p : promises) futures.push_back(p.get_future());
  Future<void> all = when_all(futures);
  promises[2].set_value(2);
  promises[0].set_value(0);
  EXPECT_FALSE(all.ready());
  promises[1].set_value(1);
  EXPECT_TRUE(all.ready());
  all.get();
  when_all(std::vector<Future<int>>{}).get();  // none: ready at once
  EXPECT_THROW(when_all(std::vector<Future<int>>{Future<int>()}), Error);
}

TEST(WhenAll, FailsWithTheFirstErrorInArgumentOrderNotInTime) {
  std::vector<Promise<void>> promises(4);
  std::vector<Future<void>> futures;
  for (auto& p : promises) futures.push_back(p.get_future());
  Future<void> all = when_all(futures);
  promises[3].set_exception(std::make_exception_ptr(Error(ErrorCode::kIoError, "late in order, first in time")));
  promises[0].set_value();
  promises[1].set_exception(std::make_exception_ptr(Error(ErrorCode::kDataLoss, "first in order")));
  EXPECT_FALSE(all.ready());  // waits for the rest even once one failed
  promises[2].set_value();
  EXPECT_EQ(code_of(all.error()), ErrorCode::kDataLoss);
}

TEST(WhenAll, DroppedPromiseInsideFailsWithCancelled) {
  Promise<int> kept;
  Future<void> all;
  {
    Promise<std::string> dropped;
    all = when_all(kept.get_future(), dropped.get_future(), make_ready_future());
  }
  EXPECT_FALSE(all.ready());
  kept.set_value(1);
  EXPECT_EQ(code_of(all.error()), ErrorCode::kCancelled);
}

TEST(WhenAll, VariadicMixesTypesAndThenContinues) {
  Promise<int> a;
  Promise<void> b;
  std::atomic<bool> continued{false};
  Future<int> sum = when_all(a.get_future(), b.get_future()).then([&] {
    continued = true;
    return 7;
  });
  b.set_value();
  EXPECT_FALSE(continued.load());
  a.set_value(1);
  EXPECT_EQ(sum.get(), 7);
}

// ---- races (run under ThreadSanitizer too) ----------------------------------------------------

TEST(FutureRaces, ManyThreadsCompletingReadingAndRegisteringAtOnce) {
  constexpr int kRounds = 200;
  constexpr int kThreads = 8;
  for (int round = 0; round < kRounds; ++round) {
    std::vector<Promise<int>> promises(kThreads);
    std::vector<Future<int>> futures;
    for (auto& p : promises) futures.push_back(p.get_future());
    Future<void> all = when_all(futures);
    std::atomic<int> callbacks{0};
    std::atomic<int> mapped_sum{0};
    std::atomic<bool> go{false};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      // One completes future t while the others register on and read every future, before and
      // after their completion.
      threads.emplace_back([&, t] {
        while (!go.load()) std::this_thread::yield();
        for (int k = 0; k < kThreads; ++k) {
          futures[(t + k) % kThreads].on_ready([&](const Future<int>&) { ++callbacks; });
        }
        if (t % 2 == 0) {
          promises[t].set_value(t);
        } else {
          promises[t] = Promise<int>();  // dropped: kCancelled
        }
        all.on_ready([&](const Future<void>&) { ++callbacks; });
        futures[(t + 1) % kThreads].then([&](int v) { mapped_sum += v; });
        futures[(t + 3) % kThreads].wait();
      });
    }
    go = true;
    for (auto& th : threads) th.join();
    EXPECT_EQ(code_of(all.error()), ErrorCode::kCancelled);
    EXPECT_EQ(callbacks.load(), kThreads * kThreads + kThreads);
    EXPECT_EQ(mapped_sum.load(), 0 + 2 + 4 + 6);
  }
}

// ---- Note [Completing futures outside locks] ---------------------------------------------------

// An object that learns of a completion while its own lock is held, as a stager's
// on_sources_released is called: the signal goes through a SerialExecutor. Completed right there
// instead, the callback below would take mutex_ again on the same thread.
class Guarded {
 public:
  Future<void> start() {
    auto promise = std::make_shared<Promise<void>>();
    Future<void> out = promise->get_future();
    std::lock_guard lock(mutex_);
    ++work_;
    executor_.post([promise] { promise->set_value(); });
    return out;
  }
  int work() {
    std::lock_guard lock(mutex_);
    return work_;
  }

 private:
  std::mutex mutex_;
  int work_ = 0;
  SerialExecutor executor_{"test executor"};
};

TEST(CompletingOutsideLocks, CallbackCallingBackIntoTheObjectDoesNotDeadlock) {
  Guarded guarded;
  // A callback that calls back into the object, starts more of its work and waits for it.
  std::atomic<int> seen{0};
  Future<void> first = guarded.start();
  Promise<void> nested_done;
  Future<void> nested = nested_done.get_future();
  auto nested_promise = std::make_shared<Promise<void>>(std::move(nested_done));
  first.on_ready([&, nested_promise](const Future<void>&) {
    seen = guarded.work();
    guarded.start().on_ready([nested_promise](const Future<void>&) { nested_promise->set_value(); });
  });
  ASSERT_TRUE(nested.wait_for(std::chrono::seconds(10))) << "deadlocked";
  EXPECT_GE(seen.load(), 1);
  EXPECT_EQ(guarded.work(), 2);
}

TEST(CompletingOutsideLocks, SerialExecutorRunsInOrderAndDrainsOnClose) {
  CapturedWarnings warnings;
  std::vector<int> order;
  {
    SerialExecutor executor("test executor");
    for (int i = 0; i < 100; ++i) executor.post([&, i] { order.push_back(i); });
    executor.post([] { throw std::runtime_error("posted work failed"); });
    executor.close();
    executor.post([&] { order.push_back(100); });  // after close: on this thread
  }
  ASSERT_EQ(order.size(), 101u);
  for (int i = 0; i <= 100; ++i) EXPECT_EQ(order[i], i);
  ASSERT_EQ(warnings.messages().size(), 1u);
  EXPECT_NE(warnings.messages()[0].find("posted work failed"), std::string::npos);
}

TEST(Logging, WarningSinkReceivesMessages) {
  std::string got;
  auto previous = set_warning_sink([&](const std::string& m) { got = m; });
  warn("hello");
  set_warning_sink(previous);
  EXPECT_EQ(got, "hello");
}

}  // namespace
}  // namespace fastdcp
