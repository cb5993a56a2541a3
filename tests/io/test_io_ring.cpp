#include "fastdcp/io/io_ring.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "fastdcp/common/error.h"
#include "support/test_support.h"

namespace fastdcp {
namespace {

class IoRingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // io_uring is probed at run time (Note [I/O engines]); this project's machines have it.
    if (!IoRing::available()) GTEST_SKIP() << "io_uring is unavailable in this process";
  }
  testing::TempDir temp_{"fastdcp_ring"};
  const std::string& dir_ = temp_.path();
};

std::vector<char> random_bytes(size_t n, unsigned seed) {
  std::vector<char> bytes(n);
  std::mt19937 rng(seed);
  for (char& b : bytes) b = static_cast<char>(rng());
  return bytes;
}

TEST_F(IoRingTest, MoreRequestsThanItsDepthWriteAndReadBack) {
  const std::string path = join_path(dir_, "data");
  const std::vector<char> source = random_bytes(1 << 20, 1);
  constexpr size_t kPieces = 37;  // uneven pieces, many more than the depth
  std::vector<uint64_t> bounds{0};
  for (size_t i = 1; i < kPieces; ++i) bounds.push_back(source.size() * i / kPieces + (i % 3));
  bounds.push_back(source.size());
  IoRing ring = IoRing::create(4);
  std::vector<size_t> prepared, completed;
  {
    File file = File::open(path, File::Mode::kCreate);
    ring.run(
        file, kPieces,
        [&](size_t i) {
          prepared.push_back(i);
          return IoRing::Request{.write = true, .data = const_cast<char*>(source.data() + bounds[i]),
                                 .size = bounds[i + 1] - bounds[i], .offset = bounds[i]};
        },
        [&](size_t i) { completed.push_back(i); });
  }
  ASSERT_EQ(prepared.size(), kPieces);
  for (size_t i = 0; i < kPieces; ++i) EXPECT_EQ(prepared[i], i);
  std::sort(completed.begin(), completed.end());
  EXPECT_EQ(completed, prepared);

  std::vector<char> back(source.size());
  File file = File::open(path, File::Mode::kRead);
  ring.run(
      file, kPieces,
      [&](size_t i) {
        return IoRing::Request{.data = back.data() + bounds[i], .size = bounds[i + 1] - bounds[i],
                               .offset = bounds[i], .required = bounds[i + 1] - bounds[i]};
      },
      [](size_t) {});
  EXPECT_TRUE(back == source);
}

TEST_F(IoRingTest, ReadsMayRunPastTheEndOnlyBeyondWhatIsRequired) {
  const std::string path = join_path(dir_, "short");
  File::open(path, File::Mode::kCreate).write_at("0123456789", 10, 0);
  File file = File::open(path, File::Mode::kRead);
  IoRing ring = IoRing::create(2);
  char buffer[64] = {};
  // An aligned read rounded up past the end: the 10 bytes required are there.
  ring.run(
      file, 1, [&](size_t) { return IoRing::Request{.data = buffer, .size = 64, .offset = 0, .required = 10}; },
      [](size_t) {});
  EXPECT_EQ(std::string(buffer, 10), "0123456789");
  try {
    ring.run(
        file, 1, [&](size_t) { return IoRing::Request{.data = buffer, .size = 64, .offset = 4, .required = 8}; },
        [](size_t) { ADD_FAILURE() << "a truncated read completed"; });
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
    EXPECT_NE(std::string(e.what()).find("'" + path + "' is truncated: it ends at byte 10"), std::string::npos)
        << e.what();
  }
}

TEST_F(IoRingTest, AFailureStopsSubmittingWaitsForRequestsInFlightAndIsThrown) {
  const std::string path = join_path(dir_, "f");
  File file = File::open(path, File::Mode::kCreate);
  const std::vector<char> source = random_bytes(4096, 2);
  IoRing ring = IoRing::create(4);
  size_t prepared = 0;
  EXPECT_THROW(ring.run(
                   file, 100,
                   [&](size_t i) {
                     if (i == 10) throw Error(ErrorCode::kInvalidArgument, "stop at 10");
                     ++prepared;
                     return IoRing::Request{.write = true, .data = const_cast<char*>(source.data()), .size = 4096,
                                            .offset = i * 4096};
                   },
                   [](size_t) {}),
               Error);
  EXPECT_EQ(prepared, 10u);
  // The ring is usable again after a failure, and an OS error names the file and the operation.
  File read_only = File::open(path, File::Mode::kRead);
  try {
    ring.run(
        read_only, 3,
        [&](size_t i) {
          return IoRing::Request{.write = true, .data = const_cast<char*>(source.data()), .size = 4096,
                                 .offset = i * 4096};
        },
        [](size_t) { ADD_FAILURE() << "a failed write completed"; });
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kIoError);
    EXPECT_NE(std::string(e.what()).find("cannot write '" + path + "'"), std::string::npos) << e.what();
  }
}

TEST_F(IoRingTest, DirectIoWindowsFromAlignedMemory) {
  const std::string path = join_path(dir_, "direct");
  const size_t alignment = direct_io_alignment(dir_);
  constexpr size_t kWindow = 1 << 20;
  std::unique_ptr<char, decltype(&std::free)> memory(static_cast<char*>(std::aligned_alloc(alignment, 8 * kWindow)),
                                                      &std::free);
  const std::vector<char> source = random_bytes(8 * kWindow, 3);
  std::memcpy(memory.get(), source.data(), source.size());
  IoRing ring = IoRing::create(8);
  {
    File file = File::open(path, File::Mode::kCreate, File::Options{.direct_io = true});
    ring.run(
        file, 8,
        [&](size_t i) {
          return IoRing::Request{.write = true, .data = memory.get() + i * kWindow, .size = kWindow,
                                 .offset = i * kWindow};
        },
        [](size_t) {});
  }
  std::memset(memory.get(), 0, source.size());
  File file = File::open(path, File::Mode::kRead, File::Options{.direct_io = true});
  ring.run(
      file, 8,
      [&](size_t i) {
        return IoRing::Request{.data = memory.get() + i * kWindow, .size = kWindow, .offset = i * kWindow,
                               .required = kWindow};
      },
      [](size_t) {});
  EXPECT_EQ(std::memcmp(memory.get(), source.data(), source.size()), 0);
}

TEST(IoEngine, NamesRoundTripAndAnUnknownOneIsNamed) {
  for (const IoEngine e : {IoEngine::kAuto, IoEngine::kThreads, IoEngine::kIoUring}) {
    EXPECT_EQ(io_engine_from_string(to_string(e)), e);
  }
  try {
    io_engine_from_string("aio");
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("'aio'"), std::string::npos);
  }
  EXPECT_FALSE(use_io_uring(IoEngine::kThreads));
  EXPECT_TRUE(use_io_uring(IoEngine::kIoUring));
  EXPECT_EQ(use_io_uring(IoEngine::kAuto), IoRing::available());
}

}  // namespace
}  // namespace fastdcp
