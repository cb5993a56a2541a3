// The `shm` backend (Note [Shared memory stores]): the conformance suite, and what it is for,
// blobs shared by the processes of a node.

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>

#include "fastdcp/common/error.h"
#include "fastdcp/storage/store.h"
#include "storage/store_conformance.h"
#include "support/test_support.h"

namespace fastdcp::testing {
namespace {

using storage::open_store;

// A fresh shm:// store of this process, removed with its directory at the end of the test.
struct ShmHome : StoreHome {
  ShmHome() {
    static std::atomic<int> counter{0};
    name = "test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++);
    spec = "shm://" + name;
    open_store(spec, storage::OpenOptions{.create = true});
  }
  ~ShmHome() override { std::filesystem::remove_all("/dev/shm/fastdcp/" + name); }
  std::string name;
};

INSTANTIATE_TEST_SUITE_P(Shm, StoreConformance,
                         ::testing::Values(StoreBackend{"shm", [] { return std::make_unique<ShmHome>(); }}),
                         [](const auto& info) { return info.param.name; });

TEST(ShmStore, AnotherProcessesCommitIsSeenAndMemoryIsNot) {
  ShmHome home;
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    open_store(home.spec)->put_if_absent("from_child", "child", 5);
    open_store("mem://" + home.name)->put_if_absent("from_child", "child", 5);
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  auto store = open_store(home.spec);
  EXPECT_TRUE(store->capabilities().shared_between_processes);
  char bytes[5];
  store->open_reader("from_child")->read_at(bytes, 5, 0);
  EXPECT_EQ(std::string(bytes, 5), "child");
  auto memory = open_store("mem://" + home.name);
  EXPECT_FALSE(memory->capabilities().shared_between_processes);
  EXPECT_TRUE(memory->list().empty());
}

TEST(ShmStore, AMissingStoreIsNotFoundUnlessCreated) {
  const std::string spec = "shm://test_missing_" + std::to_string(::getpid());
  const Error e = expect_error([&] { open_store(spec); });
  EXPECT_EQ(e.code(), ErrorCode::kNotFound);
  EXPECT_NE(std::string(e.what()).find(spec), std::string::npos) << e.what();
  open_store(spec + "/nested", storage::OpenOptions{.create = true})->put_if_absent("blob", "x", 1);
  EXPECT_EQ(open_store(spec + "/nested")->list(), std::vector<std::string>{"blob"});
  std::filesystem::remove_all("/dev/shm/fastdcp/test_missing_" + std::to_string(::getpid()));
}

}  // namespace
}  // namespace fastdcp::testing
