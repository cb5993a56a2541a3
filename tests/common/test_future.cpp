#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "fastdcp/common/future.h"
#include "fastdcp/common/logging.h"

namespace fastdcp {
namespace {

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

TEST(Future, AbandonedPromiseFailsItsFuture) {
  Future<int> future;
  {
    Promise<int> promise;
    future = promise.get_future();
  }
  try {
    future.get();
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCancelled);
  }
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

TEST(Logging, WarningSinkReceivesMessages) {
  std::string got;
  auto previous = set_warning_sink([&](const std::string& m) { got = m; });
  warn("hello");
  set_warning_sink(previous);
  EXPECT_EQ(got, "hello");
}

}  // namespace
}  // namespace fastdcp
