// Directory: files created new and never through a link, removal by name only, the lock; and the
// fault-injection seam (Note [Fault injection]).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <string>

#include "fastdcp/common/error.h"
#include "fastdcp/common/fault.h"
#include "fastdcp/io/file.h"
#include "support/test_support.h"

namespace fastdcp {
namespace {

std::string contents(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void put(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

class DirectoryTest : public ::testing::Test {
 protected:
  testing::TempDir temp_{"fastdcp_dir"};
  const std::string& dir_ = temp_.path();
};

TEST_F(DirectoryTest, CreateNeverWritesThroughALinkOrIntoAnExistingFile) {
  const std::string victim = join_path(dir_, "victim");
  put(victim, "precious");
  ASSERT_EQ(::symlink(victim.c_str(), join_path(dir_, "link").c_str()), 0);
  put(join_path(dir_, "old"), "old");
  const Directory dir = Directory::open(dir_);
  for (const char* name : {"link", "old"}) {
    try {
      dir.create(name);
      ADD_FAILURE() << name << " was opened";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kIoError);
      EXPECT_NE(std::string(e.what()).find("openat"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(join_path(dir_, name)), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(contents(victim), "precious");
  File f = dir.create("new");
  f.write_at("x", 1, 0);
  f.close();
  EXPECT_EQ(contents(join_path(dir_, "new")), "x");
}

TEST_F(DirectoryTest, RemoveTakesALinkNotItsTargetAndLeavesDirectories) {
  const std::string victim = join_path(dir_, "victim");
  put(victim, "precious");
  ASSERT_EQ(::symlink(victim.c_str(), join_path(dir_, "link").c_str()), 0);
  std::filesystem::create_directory(join_path(dir_, "sub"));
  put(join_path(dir_, "sub/inner"), "kept");
  const Directory dir = Directory::open(dir_);
  EXPECT_TRUE(dir.contains("link"));
  dir.remove("link");
  dir.remove("sub");
  dir.remove("missing");
  EXPECT_FALSE(dir.contains("link"));
  EXPECT_EQ(contents(victim), "precious");
  EXPECT_EQ(contents(join_path(dir_, "sub/inner")), "kept");
}

TEST_F(DirectoryTest, ADirectoryReachedThroughTheUsersLinkIsUsable) {
  std::filesystem::create_directory(join_path(dir_, "real"));
  std::filesystem::create_directory_symlink(join_path(dir_, "real"), join_path(dir_, "linked"));
  const Directory dir = Directory::open(join_path(dir_, "linked"));
  dir.create("a").close();
  dir.rename("a", "b");
  EXPECT_TRUE(path_exists(join_path(dir_, "real/b")));
  EXPECT_EQ(dir.list(), std::vector<std::string>{"b"});
}

TEST_F(DirectoryTest, ALockIsExclusiveAndItsFileGoesWithIt) {
  const Directory dir = Directory::open(dir_);
  {
    std::optional<DirectoryLock> first = dir.try_lock("x.lock");
    ASSERT_TRUE(first);
    EXPECT_FALSE(dir.try_lock("x.lock"));  // another open file description: refused
    EXPECT_TRUE(dir.contains("x.lock"));
  }
  EXPECT_FALSE(dir.contains("x.lock"));
  // A lock file left by a crashed holder is taken over; a link by that name is refused.
  put(join_path(dir_, "y.lock"), "");
  EXPECT_TRUE(dir.try_lock("y.lock"));
  const std::string victim = join_path(dir_, "victim");
  put(victim, "precious");
  ASSERT_EQ(::symlink(victim.c_str(), join_path(dir_, "z.lock").c_str()), 0);
  try {
    dir.try_lock("z.lock");
    ADD_FAILURE() << "locked through a link";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("symbolic link"), std::string::npos) << e.what();
  }
  EXPECT_EQ(contents(victim), "precious");
}

TEST_F(DirectoryTest, InjectedFailuresNameTheCallTheFileAndTheErrno) {
  const fault::Scope faults;
  const std::string path = join_path(dir_, "f");
  File f = File::open(path, File::Mode::kCreate);
  fault::inject("pwritev", 2, ENOSPC);
  f.write_at("a", 1, 0);  // the first call goes through
  try {
    f.write_at("b", 1, 1);
    ADD_FAILURE() << "no failure";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kIoError);
    const std::string what = e.what();
    for (const std::string& part :
         {path, std::string("pwritev"), std::string("errno 28"), std::string("disk is full")}) {
      EXPECT_NE(what.find(part), std::string::npos) << what;
    }
  }
  f.write_at("b", 1, 1);  // spent
  fault::inject("fdatasync", 1, EIO, /*times=*/2);
  EXPECT_THROW(f.sync(), Error);
  EXPECT_THROW(f.sync(), Error);
  EXPECT_NO_THROW(f.sync());
  fault::inject("fallocate", 1, EIO);
  fault::clear();
  EXPECT_NO_THROW(f.reserve(10));  // cleared
}

}  // namespace
}  // namespace fastdcp
