#include "fastdcp/io/file.h"

#include <gtest/gtest.h>

#include <string>

#include "fastdcp/common/error.h"
#include "support/test_support.h"

namespace fastdcp {
namespace {

class FileTest : public ::testing::Test {
 protected:
  testing::TempDir temp_{"fastdcp_io"};
  const std::string& dir_ = temp_.path();
};

TEST_F(FileTest, WritesAndReadsAtOffsets) {
  const std::string path = join_path(dir_, "a");
  {
    File f = File::open(path, File::Mode::kCreate);
    f.write_at("world", 5, 6);
    f.write_at("hello ", 6, 0);
    f.sync();
    f.close();
  }
  File f = File::open(path, File::Mode::kRead);
  EXPECT_EQ(f.size(), 11u);
  char text[12] = {};
  f.read_at(text, 11, 0);
  EXPECT_STREQ(text, "hello world");
}

TEST_F(FileTest, ReadingPastTheEndIsDataLossNamingTheFile) {
  const std::string path = join_path(dir_, "short");
  File::open(path, File::Mode::kCreate).write_at("abc", 3, 0);
  char buffer[8];
  try {
    File::open(path, File::Mode::kRead).read_at(buffer, 8, 0);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

TEST_F(FileTest, MissingFilesAreNotFoundAndCreateNewRefusesExisting) {
  try {
    File::open(join_path(dir_, "nope"), File::Mode::kRead);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kNotFound);
  }
  File::open(join_path(dir_, "x"), File::Mode::kCreate);
  EXPECT_THROW(File::open(join_path(dir_, "x"), File::Mode::kCreateNew), Error);
}

TEST_F(FileTest, DirectoryOperations) {
  create_directories(join_path(dir_, "a/b/c"));
  File::open(join_path(dir_, "a/f.tmp"), File::Mode::kCreate);
  rename_path(join_path(dir_, "a/f.tmp"), join_path(dir_, "a/f"));
  sync_directory(join_path(dir_, "a"));
  auto names = list_directory(join_path(dir_, "a"));
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"b", "f"}));
  remove_file(join_path(dir_, "a/f"));
  remove_file(join_path(dir_, "a/f"));  // already gone: fine
  EXPECT_FALSE(path_exists(join_path(dir_, "a/f")));
  EXPECT_GE(direct_io_alignment(dir_), 512u);
}

TEST_F(FileTest, TheFileSizeLimitIsAClearError) {
  const std::string path = join_path(dir_, "big");
  EXPECT_TRUE(testing::fails_with_file_size_limit(4096, [&] {
    const std::string data(8192, 'x');
    File::open(path, File::Mode::kCreate).write_at(data.data(), data.size(), 0);
  }));
}

}  // namespace
}  // namespace fastdcp
