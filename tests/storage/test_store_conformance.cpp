// What every store backend must do (Note [Stores]); instantiated per backend in
// test_file_store.cpp, test_memory_store.cpp and test_shm_store.cpp.

#include <atomic>
#include <barrier>
#include <cstring>
#include <thread>
#include <vector>

#include "fastdcp/common/error.h"
#include "fastdcp/storage/store.h"
#include "storage/store_conformance.h"
#include "support/test_support.h"

namespace fastdcp::testing {
namespace {

using storage::open_store;
using storage::Store;
using storage::WriteOptions;

std::vector<std::byte> pattern(size_t size, int seed) {
  std::vector<std::byte> bytes(size);
  for (size_t i = 0; i < size; ++i) bytes[i] = static_cast<std::byte>((i * 131 + i / 251 + seed) & 0xff);
  return bytes;
}

std::vector<std::byte> read_all(Store& store, const std::string& name) {
  auto reader = store.open_reader(name);
  std::vector<std::byte> bytes(reader->size());
  reader->read_at(bytes.data(), bytes.size(), 0);
  return bytes;
}

void put(Store& store, const std::string& name, const std::vector<std::byte>& bytes) {
  auto writer = store.open_writer(name);
  writer->append(bytes.data(), bytes.size());
  writer->commit();
}

TEST_P(StoreConformance, EmptyBlobRoundTrips) {
  auto home = GetParam().make();
  auto store = open_store(home->spec);
  put(*store, "empty", {});
  auto reader = store->open_reader("empty");
  EXPECT_EQ(reader->size(), 0u);
  reader->read_at(nullptr, 0, 0);
  EXPECT_EQ(store->list(), std::vector<std::string>{"empty"});
  if (store->capabilities().mmap) {
    EXPECT_EQ(reader->map()->size, 0u);
  }
}

TEST_P(StoreConformance, LargeBlobWrittenInOddPiecesRoundTrips) {
  auto home = GetParam().make();
  auto store = open_store(home->spec);
  const auto bytes = pattern((9u << 20) + 12345, 7);
  auto writer = store->open_writer("large");
  for (size_t done = 0, piece = 1; done < bytes.size(); piece = piece * 3 + 17) {
    const size_t n = std::min(piece, bytes.size() - done);
    writer->append(bytes.data() + done, n);
    done += n;
  }
  EXPECT_EQ(writer->size(), bytes.size());
  writer->commit();
  EXPECT_EQ(read_all(*store, "large"), bytes);
  if (store->capabilities().mmap) {
    auto mapping = store->open_reader("large")->map();
    ASSERT_EQ(mapping->size, bytes.size());
    EXPECT_EQ(std::memcmp(mapping->data, bytes.data(), bytes.size()), 0);
  }
}

TEST_P(StoreConformance, PositionalWritesOutOfOrderFillTheBlob) {
  auto home = GetParam().make();
  auto store = open_store(home->spec);
  if (!store->capabilities().random_writes) GTEST_SKIP() << "the backend has no random writes";
  const auto bytes = pattern(100003, 3);
  auto writer = store->open_writer("positional");
  // Back to front, in pieces of a prime size, so that every write lands past or before the last.
  const size_t piece = 9973;
  for (size_t end = bytes.size(); end > 0;) {
    const size_t start = end > piece ? end - piece : 0;
    writer->write_at(bytes.data() + start, end - start, start);
    end = start;
  }
  EXPECT_EQ(writer->size(), bytes.size());
  writer->commit();
  EXPECT_EQ(read_all(*store, "positional"), bytes);
}

TEST_P(StoreConformance, AGapReadsAsZeros) {
  auto home = GetParam().make();
  auto store = open_store(home->spec);
  if (!store->capabilities().random_writes) GTEST_SKIP() << "the backend has no random writes";
  auto writer = store->open_writer("gap");
  const std::byte one{1};
  writer->write_at(&one, 1, 4096);
  writer->commit();
  std::vector<std::byte> expected(4097);
  expected[4096] = one;
  EXPECT_EQ(read_all(*store, "gap"), expected);
}

TEST_P(StoreConformance, PartialReadsAtOddOffsets) {
  auto home = GetParam().make();
  auto store = open_store(home->spec);
  const auto bytes = pattern(65537, 11);
  put(*store, "blob", bytes);
  auto reader = store->open_reader("blob");
  for (const uint64_t offset : {0ul, 1ul, 4095ul, 4097ul, 33333ul, 65536ul}) {
    for (const size_t size : {0ul, 1ul, 7ul, 4096ul}) {
      if (offset + size > bytes.size()) continue;
      std::vector<std::byte> got(size);
      reader->read_at(got.data(), size, offset);
      EXPECT_TRUE(std::equal(got.begin(), got.end(), bytes.begin() + offset)) << offset << "+" << size;
    }
  }
  std::vector<std::byte> tail(1);
  reader->read_at(tail.data(), 1, bytes.size() - 1);
  EXPECT_EQ(tail[0], bytes.back());
}

TEST_P(StoreConformance, ReadsPastTheEndAreDataLossNamingTheBlob) {
  auto home = GetParam().make();
  auto store = open_store(home->spec);
  put(*store, "short", pattern(100, 1));
  auto reader = store->open_reader("short");
  std::vector<std::byte> buffer(200);
  for (const auto& [offset, size] : std::vector<std::pair<uint64_t, size_t>>{
           {0, 101}, {99, 2}, {100, 1}, {101, 0}, {UINT64_MAX, 2}, {1, SIZE_MAX}}) {
    const Error e = expect_error([&] { reader->read_at(buffer.data(), size, offset); });
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss) << offset << "+" << size;
    EXPECT_NE(std::string(e.what()).find("'short'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(home->spec), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("100 bytes"), std::string::npos) << e.what();
  }
}

TEST_P(StoreConformance, ListsByPrefixSortedAndRemoves) {
  auto home = GetParam().make();
  auto store = open_store(home->spec);
  EXPECT_TRUE(store->list().empty());
  for (const char* name : {"rank_1", "rank_0", "manifest", "rank_10", "vote_0"}) put(*store, name, pattern(3, 0));
  EXPECT_EQ(store->list(), (std::vector<std::string>{"manifest", "rank_0", "rank_1", "rank_10", "vote_0"}));
  EXPECT_EQ(store->list("rank_1"), (std::vector<std::string>{"rank_1", "rank_10"}));
  EXPECT_TRUE(store->list("nothing").empty());
  store->remove("rank_1");
  store->remove("rank_1");  // a missing blob is not an error
  store->remove("never_written");
  EXPECT_EQ(store->list("rank"), (std::vector<std::string>{"rank_0", "rank_10"}));
  EXPECT_EQ(expect_error([&] { store->open_reader("rank_1"); }).code(), ErrorCode::kNotFound);
}

TEST_P(StoreConformance, ACommitReplacesAndOpenReadersKeepTheirBytes) {
  auto home = GetParam().make();
  auto store = open_store(home->spec);
  put(*store, "blob", pattern(1000, 1));
  auto before = store->open_reader("blob");
  put(*store, "blob", pattern(500, 2));
  EXPECT_EQ(read_all(*store, "blob"), pattern(500, 2));
  std::vector<std::byte> old(1000);
  before->read_at(old.data(), old.size(), 0);
  EXPECT_EQ(old, pattern(1000, 1));
}

TEST_P(StoreConformance, AnotherOpenOfTheSpecSeesTheBlobs) {
  auto home = GetParam().make();
  put(*open_store(home->spec), "kept", pattern(10, 4));
  EXPECT_EQ(read_all(*open_store(home->spec), "kept"), pattern(10, 4));
}

TEST_P(StoreConformance, AnAbortedOrDroppedWriterLeavesNothing) {
  auto home = GetParam().make();
  auto store = open_store(home->spec);
  const auto bytes = pattern(5000, 5);
  {
    auto dropped = store->open_writer("dropped");
    dropped->append(bytes.data(), bytes.size());
  }
  auto aborted = store->open_writer("aborted", WriteOptions{.if_absent = true});
  aborted->append(bytes.data(), bytes.size());
  aborted->abort();
  EXPECT_TRUE(store->list().empty());
  EXPECT_EQ(expect_error([&] { store->open_reader("dropped"); }).code(), ErrorCode::kNotFound);
  EXPECT_EQ(expect_error([&] { aborted->append(bytes.data(), 1); }).code(), ErrorCode::kFailedPrecondition);
  EXPECT_EQ(expect_error([&] { aborted->commit(); }).code(), ErrorCode::kFailedPrecondition);
  // The name is free for the next writer, and an abort does not undo a commit.
  store->put_if_absent("aborted", bytes.data(), bytes.size());
  EXPECT_EQ(read_all(*store, "aborted"), bytes);
}

TEST_P(StoreConformance, ACommittedWriterIsSpent) {
  auto home = GetParam().make();
  auto store = open_store(home->spec);
  auto writer = store->open_writer("once");
  writer->commit();
  writer->abort();
  const Error e = expect_error([&] { writer->append("x", 1); });
  EXPECT_EQ(e.code(), ErrorCode::kFailedPrecondition);
  EXPECT_NE(std::string(e.what()).find("'once'"), std::string::npos) << e.what();
  EXPECT_EQ(store->list(), std::vector<std::string>{"once"});
}

TEST_P(StoreConformance, PutIfAbsentRefusesATakenName) {
  auto home = GetParam().make();
  auto store = open_store(home->spec);
  put(*store, "manifest", pattern(10, 1));
  const Error e = expect_error([&] { store->put_if_absent("manifest", "new", 3); });
  EXPECT_EQ(e.code(), ErrorCode::kAlreadyExists);
  EXPECT_NE(std::string(e.what()).find("'manifest'"), std::string::npos) << e.what();
  EXPECT_NE(std::string(e.what()).find(home->spec), std::string::npos) << e.what();
  EXPECT_EQ(read_all(*store, "manifest"), pattern(10, 1));
  EXPECT_EQ(store->list(), std::vector<std::string>{"manifest"});
}

TEST_P(StoreConformance, RacingPutsIfAbsentHaveExactlyOneWinner) {
  auto home = GetParam().make();
  auto store = open_store(home->spec);
  constexpr int kThreads = 8;
  constexpr int kRounds = 20;
  for (int round = 0; round < kRounds; ++round) {
    const std::string name = "commit_" + std::to_string(round);
    std::atomic<int> wins{0};
    std::atomic<int> winner{-1};
    std::atomic<int> other_errors{0};
    std::barrier start(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        const auto bytes = pattern(4096 + t, t);
        auto writer = store->open_writer(name, WriteOptions{.if_absent = true});
        writer->append(bytes.data(), bytes.size());
        start.arrive_and_wait();
        try {
          writer->commit();
          ++wins;
          winner = t;
        } catch (const Error& e) {
          if (e.code() != ErrorCode::kAlreadyExists) ++other_errors;
        }
      });
    }
    for (auto& t : threads) t.join();
    ASSERT_EQ(wins.load(), 1) << name;
    EXPECT_EQ(other_errors.load(), 0);
    EXPECT_EQ(read_all(*store, name), pattern(4096 + winner, winner));
  }
  EXPECT_EQ(store->list().size(), size_t{kRounds});
}

TEST_P(StoreConformance, ConcurrentWritersOfDifferentBlobs) {
  auto home = GetParam().make();
  auto store = open_store(home->spec);
  constexpr int kThreads = 8;
  constexpr int kBlobs = 6;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int b = 0; b < kBlobs; ++b) {
        const auto bytes = pattern(10000 + 977 * b, t * kBlobs + b);
        auto writer = store->open_writer("t" + std::to_string(t) + "_b" + std::to_string(b));
        for (size_t done = 0; done < bytes.size(); done += 1000) {
          writer->append(bytes.data() + done, std::min<size_t>(1000, bytes.size() - done));
        }
        writer->commit();
        // Readers and listing run alongside the other threads' writers.
        EXPECT_FALSE(store->list("t" + std::to_string(t)).empty());
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(store->list().size(), size_t{kThreads * kBlobs});
  for (int t = 0; t < kThreads; ++t) {
    for (int b = 0; b < kBlobs; ++b) {
      EXPECT_EQ(read_all(*store, "t" + std::to_string(t) + "_b" + std::to_string(b)),
                pattern(10000 + 977 * b, t * kBlobs + b));
    }
  }
}

TEST_P(StoreConformance, ConcurrentReadsOfOneBlob) {
  auto home = GetParam().make();
  auto store = open_store(home->spec);
  const auto bytes = pattern(1 << 20, 9);
  put(*store, "shared", bytes);
  auto reader = store->open_reader("shared");
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (size_t offset = t * 4099; offset + 8191 <= bytes.size(); offset += 4 * 8191) {
        std::vector<std::byte> got(8191);
        reader->read_at(got.data(), got.size(), offset);
        EXPECT_TRUE(std::equal(got.begin(), got.end(), bytes.begin() + offset));
      }
    });
  }
  for (auto& t : threads) t.join();
}

TEST_P(StoreConformance, MissingBlobsAreNotFoundNamingStoreAndBlob) {
  auto home = GetParam().make();
  auto store = open_store(home->spec);
  const Error e = expect_error([&] { store->open_reader("absent"); });
  EXPECT_EQ(e.code(), ErrorCode::kNotFound);
  EXPECT_NE(std::string(e.what()).find("'absent'"), std::string::npos) << e.what();
  EXPECT_NE(std::string(e.what()).find(home->spec), std::string::npos) << e.what();
}

TEST_P(StoreConformance, BadNamesAreInvalidArguments) {
  auto home = GetParam().make();
  auto store = open_store(home->spec);
  for (const std::string& name : {std::string(""), std::string("a/b"), std::string(".."), std::string(".hidden"),
                                 std::string("/abs"), std::string("nul\0x", 5)}) {
    for (const auto& call : std::vector<std::function<void()>>{
             [&] { store->open_writer(name); }, [&] { store->open_reader(name); },
             [&] { store->put_if_absent(name, "x", 1); }, [&] { store->remove(name); }}) {
      const Error e = expect_error(call);
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << name;
      EXPECT_NE(std::string(e.what()).find("not a blob name"), std::string::npos) << e.what();
    }
  }
  // The message shows the whole name, a NUL included.
  const Error e = expect_error([&] { store->open_reader(std::string("nul\0x", 5)); });
  EXPECT_NE(std::string(e.what()).find("'nul\\x00x'"), std::string::npos) << e.what();
  EXPECT_TRUE(store->list().empty());
}

// The one-writer lock of a checkpoint (Note [One writer per checkpoint path]): one holder per
// name, among every open of the store, until the token is dropped.
TEST_P(StoreConformance, ALockHasOneHolderUntilItsTokenIsDropped) {
  auto home = GetParam().make();
  auto first = open_store(home->spec);
  auto second = open_store(home->spec);
  std::shared_ptr<void> held = first->try_lock("rank_0.lock");
  ASSERT_NE(held, nullptr);
  EXPECT_EQ(second->try_lock("rank_0.lock"), nullptr);
  EXPECT_EQ(first->try_lock("rank_0.lock"), nullptr);
  std::shared_ptr<void> other = second->try_lock("rank_1.lock");
  EXPECT_NE(other, nullptr);
  held.reset();
  EXPECT_NE(second->try_lock("rank_0.lock"), nullptr);
}

}  // namespace
}  // namespace fastdcp::testing
