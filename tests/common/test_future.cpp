#include <gtest/gtest.h>

#include <atomic>
#include <thread>

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

TEST(Logging, WarningSinkReceivesMessages) {
  std::string got;
  auto previous = set_warning_sink([&](const std::string& m) { got = m; });
  warn("hello");
  set_warning_sink(previous);
  EXPECT_EQ(got, "hello");
}

}  // namespace
}  // namespace fastdcp
