// Opening stores from specs: the built-in schemes, registered ones, and malformed specs.

#include "fastdcp/common/error.h"
#include "fastdcp/storage/store.h"
#include "support/test_support.h"

namespace fastdcp::testing {
namespace {

using storage::open_store;

TEST(StoreRegistry, MalformedSpecsAreInvalidArgumentsNamingTheSpecAndTheFix) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", "give a path or a URL"},
      {"s3://bucket/key", "known: file://, mem://, shm://"},
      {"://x", "unknown scheme ''"},
      {"file://relative/dir", "file:///abs/dir"},
      {"file://", "file:///abs/dir"},
      {"mem://", "mem://name"},
      {"shm://", "shm://name"},
      {"shm:///abs", "shm://name"},
      {"shm://../escape", "without '..'"},
      {"shm://a/../../escape", "without '..'"},
  };
  for (const auto& [spec, fix] : cases) {
    const Error e = expect_error([&] { open_store(spec); });
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << spec;
    EXPECT_NE(std::string(e.what()).find("'" + spec + "'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(fix), std::string::npos) << e.what();
  }
}

TEST(StoreRegistry, ARegisteredSchemeGetsTheRestOfTheSpec) {
  static std::string seen_rest;  // the registry keeps the factory beyond this test
  storage::register_store_scheme("alias", [](const std::string& rest, const std::string&, const storage::OpenOptions&) {
    seen_rest = rest;
    return open_store("mem://" + rest);
  });
  open_store("alias://registered")->put_if_absent("blob", "x", 1);
  EXPECT_EQ(seen_rest, "registered");
  EXPECT_EQ(open_store("mem://registered")->list(), std::vector<std::string>{"blob"});
}

// A checkpoint path names its store: "mem://job/step10" is one in-process store, whose blob names
// stay flat.
TEST(StoreRegistry, MemoryStoreNamesMayHaveSlashes) {
  open_store("mem://job/step10")->put_if_absent("blob", "x", 1);
  EXPECT_EQ(open_store("mem://job/step10")->list(), std::vector<std::string>{"blob"});
  EXPECT_TRUE(open_store("mem://job/step11")->list().empty());
}

}  // namespace
}  // namespace fastdcp::testing
