// The `file` backend: the conformance suite, and what only files have: other processes, links,
// temporaries, and failing system calls (Note [Fault injection]).

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>

#include "fastdcp/common/error.h"
#include "fastdcp/common/fault.h"
#include "fastdcp/storage/store.h"
#include "storage/store_conformance.h"
#include "support/test_support.h"

namespace fastdcp::testing {
namespace {

using storage::open_store;
using storage::WriteOptions;

struct FileHome : StoreHome {
  TempDir dir{"fastdcp_store"};
  FileHome() { spec = "file://" + dir.path(); }
};

INSTANTIATE_TEST_SUITE_P(File, StoreConformance,
                         ::testing::Values(StoreBackend{"file", [] { return std::make_unique<FileHome>(); }}),
                         [](const auto& info) { return info.param.name; });

// Everything in the directory, temporaries included.
std::vector<std::string> entries(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir)) names.push_back(e.path().filename());
  std::sort(names.begin(), names.end());
  return names;
}

std::string contents(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(FileStore, APlainPathAndAFileUrlAreOneStore) {
  TempDir dir;
  open_store(dir.path())->put_if_absent("a", "abc", 3);
  EXPECT_EQ(open_store("file://" + dir.path())->list(), std::vector<std::string>{"a"});
  EXPECT_EQ(contents(dir.path() + "/a"), "abc");
  // A path with "://" further on is a path still.
  std::filesystem::create_directories(dir.path() + "/x:");
  open_store(dir.path() + "/x://")->put_if_absent("b", "b", 1);
  EXPECT_EQ(contents(dir.path() + "/x:/b"), "b");
  // A relative plain path is the working directory's.
  const auto cwd = std::filesystem::current_path();
  std::filesystem::current_path(dir.path());
  EXPECT_EQ(open_store(".")->list(), std::vector<std::string>{"a"});  // not the directory
  std::filesystem::current_path(cwd);
}

TEST(FileStore, AMissingDirectoryIsNotFoundSayingToCreateIt) {
  TempDir dir;
  for (const std::string& spec : {dir.path() + "/none", "file://" + dir.path() + "/none"}) {
    const Error e = expect_error([&] { open_store(spec); });
    EXPECT_EQ(e.code(), ErrorCode::kNotFound);
    EXPECT_NE(std::string(e.what()).find(spec), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("create it"), std::string::npos) << e.what();
  }
}

TEST(FileStore, TemporariesAndDirectoriesAreWrittenAsideAndNeverListed) {
  TempDir dir;
  auto store = open_store(dir.path());
  auto writer = store->open_writer("blob");
  writer->append("abc", 3);
  const auto during = entries(dir.path());
  ASSERT_EQ(during.size(), 1u);
  EXPECT_EQ(during[0].front(), '.');  // not the blob's name until the commit
  EXPECT_TRUE(store->list().empty());
  writer->commit();
  EXPECT_EQ(entries(dir.path()), std::vector<std::string>{"blob"});
  std::ofstream(dir.path() + "/.left_by_a_crash.tmp") << "x";
  EXPECT_EQ(store->list(), std::vector<std::string>{"blob"});
}

// What crashed writers left goes for the blobs the caller owns, by name only: others' temporaries,
// blobs, directories and link targets stay.
TEST(FileStore, LeftoversOfOwnedBlobsAreRemovedByNameOnly) {
  TempDir dir;
  TempDir outside;
  const std::string target = outside.path() + "/victim";
  std::ofstream(target) << "keep";
  auto store = open_store(dir.path());
  store->put_if_absent("mine", "x", 1);
  auto writer = store->open_writer("mine");  // a temporary, as a crashed writer leaves it
  writer->append("y", 1);
  std::ofstream(dir.path() + "/.mine.tmp") << "x";                 // an older writer's name
  std::ofstream(dir.path() + "/.theirs.17.3.tmp") << "x";          // someone else's blob
  ASSERT_EQ(::symlink(target.c_str(), (dir.path() + "/.mine.9.9.tmp").c_str()), 0);
  std::filesystem::create_directory(dir.path() + "/.mine.1.1.tmp");
  store->remove_leftovers([](const std::string& blob) { return blob == "mine"; });
  EXPECT_EQ(entries(dir.path()), (std::vector<std::string>{".mine.1.1.tmp", ".theirs.17.3.tmp", "mine"}));
  EXPECT_EQ(contents(target), "keep");
  EXPECT_THROW(writer->commit(), Error);  // its temporary is gone: nothing half-written appears
  EXPECT_EQ(store->list(), std::vector<std::string>{"mine"});
}

TEST(FileStore, ACommitReplacesALinkAndNeverWritesThroughIt) {
  TempDir dir;
  TempDir outside;
  const std::string target = outside.path() + "/victim";
  std::ofstream(target) << "keep";
  ASSERT_EQ(::symlink(target.c_str(), (dir.path() + "/blob").c_str()), 0);
  auto store = open_store(dir.path());
  // If absent: the link has the name, so the put fails and the target is untouched.
  EXPECT_EQ(expect_error([&] { store->put_if_absent("blob", "new", 3); }).code(), ErrorCode::kAlreadyExists);
  EXPECT_EQ(contents(target), "keep");
  // A plain commit replaces the link itself.
  auto writer = store->open_writer("blob");
  writer->append("new", 3);
  writer->commit();
  EXPECT_EQ(contents(target), "keep");
  struct stat st{};
  ASSERT_EQ(::lstat((dir.path() + "/blob").c_str(), &st), 0);
  EXPECT_TRUE(S_ISREG(st.st_mode));
  EXPECT_EQ(contents(dir.path() + "/blob"), "new");
  // Removal removes a link, not its target.
  ASSERT_EQ(::symlink(target.c_str(), (dir.path() + "/link").c_str()), 0);
  store->remove("link");
  EXPECT_EQ(contents(target), "keep");
  EXPECT_EQ(store->list(), std::vector<std::string>{"blob"});
}

TEST(FileStore, RacingPutsIfAbsentFromProcessesHaveExactlyOneWinner) {
  TempDir dir;
  constexpr int kProcesses = 6;
  for (int round = 0; round < 5; ++round) {
    const std::string name = "manifest_" + std::to_string(round);
    int go[2];
    ASSERT_EQ(::pipe(go), 0);
    std::vector<pid_t> children;
    for (int p = 0; p < kProcesses; ++p) {
      const pid_t pid = ::fork();
      ASSERT_GE(pid, 0);
      if (pid == 0) {
        ::close(go[1]);
        int code = 3;
        try {
          auto store = open_store(dir.path());
          const std::string bytes(1000 + p, static_cast<char>('a' + p));
          auto writer = store->open_writer(name, WriteOptions{.if_absent = true});
          writer->append(bytes.data(), bytes.size());
          char c;
          (void)::read(go[0], &c, 1);  // returns when the parent closes its end: all start together
          writer->commit();
          code = 0;
        } catch (const Error& e) {
          code = e.code() == ErrorCode::kAlreadyExists ? 1 : 2;
        }
        ::_exit(code);
      }
      children.push_back(pid);
    }
    ::close(go[0]);
    ::close(go[1]);
    int wins = 0;
    int losses = 0;
    for (const pid_t pid : children) {
      int status = 0;
      ASSERT_EQ(::waitpid(pid, &status, 0), pid);
      ASSERT_TRUE(WIFEXITED(status));
      wins += WEXITSTATUS(status) == 0;
      losses += WEXITSTATUS(status) == 1;
    }
    EXPECT_EQ(wins, 1) << name;
    EXPECT_EQ(losses, kProcesses - 1) << name;
    const std::string got = contents(dir.path() + "/" + name);
    ASSERT_GE(got.size(), 1000u);
    EXPECT_EQ(got, std::string(got.size(), got[0]));  // one writer's bytes, whole
  }
  EXPECT_EQ(entries(dir.path()).size(), 5u);  // no temporaries left by the losers
}

// A system call that fails during a write or commit leaves no blob and no temporary.
struct FailingCall {
  const char* call;
  bool if_absent;
};

void PrintTo(const FailingCall& failing, std::ostream* os) {
  *os << failing.call << (failing.if_absent ? " (if absent)" : "");
}

class FileStoreFaults : public ::testing::TestWithParam<FailingCall> {};

TEST_P(FileStoreFaults, LeaveNothingVisible) {
  TempDir dir;
  auto store = open_store(dir.path());
  const std::string bytes(100000, 'x');
  fault::Scope faults;
  auto writer = store->open_writer("blob", WriteOptions{.if_absent = GetParam().if_absent});
  fault::inject(GetParam().call, 1, EIO);
  const Error e = expect_error([&] {
    writer->append(bytes.data(), bytes.size());
    writer->commit();
  });
  EXPECT_EQ(e.code(), ErrorCode::kIoError) << e.what();
  EXPECT_EQ(e.errnum(), EIO);
  writer.reset();
  fault::clear();
  EXPECT_TRUE(entries(dir.path()).empty()) << GetParam().call;
  EXPECT_EQ(expect_error([&] { store->open_reader("blob"); }).code(), ErrorCode::kNotFound);
  store->put_if_absent("blob", "ok", 2);  // and the name is free
}

INSTANTIATE_TEST_SUITE_P(Calls, FileStoreFaults,
                         ::testing::Values(FailingCall{"pwritev", false}, FailingCall{"fdatasync", false},
                                           FailingCall{"close", false}, FailingCall{"renameat", false},
                                           FailingCall{"pwritev", true}, FailingCall{"fdatasync", true},
                                           FailingCall{"linkat", true}),
                         [](const auto& info) {
                           return std::string(info.param.call) + (info.param.if_absent ? "_if_absent" : "");
                         });

TEST(FileStore, AFailingDirectorySyncIsReportedAndLeavesTheBlobWhole) {
  // The rename or link happened: the blob is whole, but not known to be durable, so the commit
  // fails (and a caller writes it again).
  TempDir dir;
  auto store = open_store(dir.path());
  const std::string bytes(5000, 'y');
  fault::Scope faults;
  fault::inject("fsync", 1, EIO);
  const Error e = expect_error([&] { store->put_if_absent("blob", bytes.data(), bytes.size()); });
  EXPECT_EQ(e.code(), ErrorCode::kIoError);
  EXPECT_NE(std::string(e.what()).find("sync directory"), std::string::npos) << e.what();
  for (const auto& name : entries(dir.path())) EXPECT_EQ(name, "blob");
  if (std::filesystem::exists(dir.path() + "/blob")) {
    EXPECT_EQ(contents(dir.path() + "/blob"), bytes);
  }
}

TEST(FileStore, HasRandomWritesMmapAndDirectIo) {
  TempDir dir;
  auto store = open_store(dir.path());
  const auto caps = store->capabilities();
  EXPECT_TRUE(caps.random_writes);
  EXPECT_TRUE(caps.mmap);
  EXPECT_TRUE(caps.direct_io);
  EXPECT_GE(caps.direct_io_alignment, 512u);
}

TEST(FileStore, DirectIoWritesAlignedBlocksAndRefusesUnalignedOnes) {
  TempDir dir;
  auto store = open_store(dir.path());
  const size_t alignment = store->capabilities().direct_io_alignment;
  std::unique_ptr<char, decltype(&std::free)> memory(static_cast<char*>(std::aligned_alloc(alignment, 4 * alignment)),
                                                      &std::free);
  for (size_t i = 0; i < 4 * alignment; ++i) memory.get()[i] = static_cast<char>(i * 7);
  auto writer = store->open_writer("direct", WriteOptions{.direct_io = true});
  writer->write_at(memory.get() + 2 * alignment, 2 * alignment, 2 * alignment);
  writer->write_at(memory.get(), 2 * alignment, 0);
  writer->commit();
  auto reader = store->open_reader("direct");
  ASSERT_EQ(reader->size(), 4 * alignment);
  std::string got(4 * alignment, '\0');
  reader->read_at(got.data(), got.size(), 0);
  EXPECT_EQ(got, std::string(memory.get(), 4 * alignment));
  // O_DIRECT is on: a write off the alignment fails (EINVAL) instead of going through the cache,
  // and the writer is spent.
  auto unaligned = store->open_writer("unaligned", WriteOptions{.direct_io = true});
  const Error e = expect_error([&] { unaligned->append(memory.get() + 1, 1); });
  EXPECT_EQ(e.errnum(), EINVAL) << e.what();
  EXPECT_EQ(expect_error([&] { unaligned->commit(); }).code(), ErrorCode::kFailedPrecondition);
  EXPECT_EQ(entries(dir.path()), std::vector<std::string>{"direct"});
}

}  // namespace
}  // namespace fastdcp::testing
