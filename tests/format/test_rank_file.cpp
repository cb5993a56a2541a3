#include "fastdcp/format/rank_file.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "fastdcp/common/error.h"
#include "support/crafted_checkpoint.h"
#include "support/test_support.h"

namespace fastdcp {
namespace {

Tensor iota(DType dtype, Dims shape) {
  Tensor t = Tensor::empty_cpu(dtype, std::move(shape));
  auto* bytes = static_cast<unsigned char*>(t.data_ptr());
  for (uint64_t i = 0; i < t.nbytes(); ++i) bytes[i] = static_cast<unsigned char>(i * 7 + 1);
  return t;
}

Tensor with_traits(Tensor t, TensorTraits traits) {
  t.set_traits(std::move(traits));
  return t;
}

// A state dict with every kind of value, views and aliasing.
Value sample() {
  Tensor base = iota(DType::kF32, {10, 10});
  Value model = Value::dict();
  model.insert("weight", Value(iota(DType::kF32, {4, 8})));
  model.insert("bias", Value(iota(DType::kBF16, {3})));
  model.insert("base", Value(base));
  model.insert("inner", Value(base.view_as({6, 6}, {10, 1}, 22)));
  model.insert("transposed", Value(base.view_as({10, 10}, {1, 10}, 0)));
  model.insert("scalar", Value(iota(DType::kF64, {})));
  model.insert("empty", Value(iota(DType::kF32, {0, 4})));
  model.insert("complex", Value(iota(DType::kC128, {2})));
  Value optim = Value::dict();
  Value state = Value::dict();
  state.insert(0, Value(iota(DType::kI64, {5})));
  state.insert(7, Value(iota(DType::kU8, {9})));
  optim.insert("state", std::move(state));
  Value groups = Value::list();
  Value group = Value::dict();
  group.insert("lr", Value(1e-3));
  Value betas = Value::tuple();
  betas.append(Value(0.9));
  betas.append(Value(0.999));
  group.insert("betas", std::move(betas));
  group.insert("nan", Value(std::nan("")));
  group.insert("inf", Value(-HUGE_VAL));
  group.insert("whole", Value(2.0));
  group.insert("name", Value(std::string("adam \"quoted\"\n\x01 ünïcode")));
  group.insert("blob", Value(Bytes{std::string("\x00\xff\x10", 3)}));
  group.insert("none", Value());
  group.insert("flag", Value(true));
  group.insert("big", Value(int64_t{-9007199254740993}));
  group.insert("empty_list", Value::list());
  groups.append(std::move(group));
  optim.insert("param_groups", std::move(groups));
  Value root = Value::dict();
  root.insert("model", std::move(model));
  root.insert("optim", std::move(optim));
  root.insert("step", Value(int64_t{11}));
  return root;
}

RankFileHeader parse(const RankFilePlan& plan) {
  return RankFileHeader::parse(std::string_view(plan.header()).substr(8), plan.file_size(), "test.safetensors");
}

Value parse_and_build(const std::string& header, const RankFilePlan& plan) {
  return RankFileHeader::parse(header, plan.file_size(), "test.safetensors").build_tree(plan.storages());
}

TEST(RankFilePlan, PlainTensorsKeepTheirNamesAndAliasedStoragesAreRaw) {
  const RankFilePlan plan = RankFilePlan::make(sample());
  std::vector<std::string> names;
  for (const auto& e : plan.entries()) names.push_back(e.name);
  const auto has = [&](const std::string& n) { return std::find(names.begin(), names.end(), n) != names.end(); };
  EXPECT_TRUE(has("model.weight"));
  EXPECT_TRUE(has("model.bias"));
  EXPECT_TRUE(has("optim.state.0"));
  EXPECT_FALSE(has("model.base"));     // three views of one storage: raw
  EXPECT_FALSE(has("model.complex"));  // C128 is not a safetensors dtype: raw
  // 100 F32 base storage + complex + ... : the raw ones are named by storage id.
  EXPECT_EQ(std::count_if(names.begin(), names.end(), [](auto& n) { return n.starts_with("__fastdcp__"); }), 2);
}

TEST(RankFilePlan, DataIsPageAlignedAndEveryEntryIsAlignedToItsElementSize) {
  const RankFilePlan plan = RankFilePlan::make(sample());
  EXPECT_EQ(plan.data_offset() % kDataAlignment, 0u);
  uint64_t covered = 0;
  for (const auto& e : plan.entries()) {
    const uint64_t item = std::max(1, dtype_bits(e.dtype) / 8);
    EXPECT_EQ(e.begin % item, 0u) << e.name;
    covered += e.end - e.begin;
  }
  EXPECT_EQ(plan.data_offset() + covered, plan.file_size());
}

TEST(RankFileHeader, RoundTripsEveryKindOfValueAndTheViews) {
  const Value source = sample();
  RankFilePlan plan = RankFilePlan::make(source);
  for (size_t i = 0; i < plan.entries().size(); ++i) {
    std::vector<uint32_t> crcs(plan.entries()[i].num_chunks(), 0xdeadbeefu + static_cast<uint32_t>(i));
    plan.set_checksums(i, crcs);
  }
  const RankFileHeader header = parse(plan);
  EXPECT_EQ(header.format_version(), 1);  // no traits: readers of version 1 can read it
  ASSERT_EQ(header.entries().size(), plan.entries().size());
  for (size_t i = 0; i < plan.entries().size(); ++i) {
    EXPECT_EQ(header.entries()[i].name, plan.entries()[i].name);
    EXPECT_EQ(header.entries()[i].nbytes, plan.entries()[i].nbytes);
    EXPECT_EQ(header.entries()[i].chunk_crc32c, plan.entries()[i].chunk_crc32c);
  }
  // The tensors, described without loading: key paths in tree order, views sharing an entry.
  const auto tensors = header.tensors();
  std::vector<std::string> paths;
  for (const auto& t : tensors) paths.push_back(t.path);
  EXPECT_EQ(paths, (std::vector<std::string>{"model.weight", "model.bias", "model.base", "model.inner",
                                             "model.transposed", "model.scalar", "model.empty", "model.complex",
                                             "optim.state.0", "optim.state.7"}));
  EXPECT_EQ(tensors[3].entry, tensors[2].entry);
  EXPECT_EQ(tensors[3].offset, 22);
  EXPECT_EQ(tensors[4].strides, (Dims{1, 10}));
  EXPECT_EQ(tensors[7].dtype, DType::kC128);
  // Rebuild over the same storages: the tree is the source tree.
  const Value rebuilt = header.build_tree(plan.storages());
  const Value& m = rebuilt.at("model");
  EXPECT_EQ(m.at("inner").as_tensor().storage(), m.at("base").as_tensor().storage());
  EXPECT_EQ(m.at("inner").as_tensor().storage_offset(), 22);
  EXPECT_EQ(m.at("transposed").as_tensor().strides(), (Dims{1, 10}));
  EXPECT_EQ(m.at("scalar").as_tensor().dim(), 0u);
  EXPECT_EQ(m.at("complex").as_tensor().dtype(), DType::kC128);
  const Value& g = rebuilt.at("optim").at("param_groups")[0];
  EXPECT_EQ(g.at("lr").as_double(), 1e-3);
  EXPECT_TRUE(std::isnan(g.at("nan").as_double()));
  EXPECT_EQ(g.at("inf").as_double(), -HUGE_VAL);
  EXPECT_EQ(g.at("whole").kind(), Value::Kind::kDouble);
  EXPECT_EQ(g.at("name").as_string(), "adam \"quoted\"\n\x01 ünïcode");
  EXPECT_EQ(g.at("blob").as_bytes().data, std::string("\x00\xff\x10", 3));
  EXPECT_TRUE(g.at("none").is_none());
  EXPECT_EQ(g.at("big").as_int(), int64_t{-9007199254740993});
  EXPECT_EQ(g.at("betas").kind(), Value::Kind::kTuple);
  EXPECT_EQ(g.at("empty_list").size(), 0u);
  EXPECT_TRUE(rebuilt.at("optim").at("state").find(DictKey(7)) != nullptr);
  EXPECT_EQ(rebuilt.at("step").as_int(), 11);
}

// Lists nested `levels` deep, the innermost holding a tensor.
Value nested_lists(size_t levels) {
  Value root = Value::list();
  Value* leaf = &root;
  for (size_t i = 1; i < levels; ++i) leaf = &leaf->append(Value::list());
  leaf->append(Value(iota(DType::kF32, {2})));
  return root;
}

TEST(RankFileHeader, TreesAsDeepAsTheLimitRoundTripWithoutRecursion) {
  RankFilePlan plan = RankFilePlan::make(nested_lists(kMaxTreeDepth));
  const Value rebuilt = parse(plan).build_tree(plan.storages());
  const Value* v = &rebuilt;
  for (size_t i = 1; i < kMaxTreeDepth; ++i) v = &(*v)[0];
  EXPECT_TRUE((*v)[0].is_tensor());
}

using fastdcp::testing::expect_error;

const std::string kTooDeep =
    "containers nest more than " + std::to_string(kMaxTreeDepth) + " levels deep, the format's limit";

TEST(RankFilePlan, TreesDeeperThanTheFormatTakesAreRefused) {
  static_assert(kMaxTreeDepth == 10000);
  const Error e = expect_error([] { RankFilePlan::make(nested_lists(kMaxTreeDepth + 1)); });
  EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(std::string(e.what()).find(kTooDeep), std::string::npos) << e.what();
}

// A header the writer would not make, parsed as a file of `data_bytes` bytes of data.
RankFileHeader parse_crafted(const std::string& json, uint64_t data_bytes = 0) {
  return RankFileHeader::parse(json, 8 + json.size() + data_bytes, "crafted.safetensors");
}

// Every way a reader takes a tree (loads build it, inspect and verify list its tensors) refuses it
// with Error(kDataLoss) saying `what`.
void expect_tree_refused(const std::string& json, uint64_t data_bytes, const std::string& what) {
  Error e = expect_error([&] {
    const RankFileHeader header = parse_crafted(json, data_bytes);
    std::vector<Storage> storages;
    for (const auto& entry : header.entries()) storages.push_back(Storage::allocate_cpu(entry.nbytes));
    (void)header.build_tree(storages);
  });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
  e = expect_error([&] { (void)parse_crafted(json, data_bytes).tensors(); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
}

std::string nested_list_json(size_t levels) {
  std::string tree;
  for (size_t i = 0; i < levels; ++i) tree += R"({"l":[)";
  for (size_t i = 0; i < levels; ++i) tree += "]}";
  return tree;
}

TEST(RankFileHeader, TreesDeeperThanTheLimitAreRefusedWithTheSaveMessage) {
  const std::string ok = testing::fastdcp_header(nested_list_json(kMaxTreeDepth), "", "[]", "");
  EXPECT_NO_THROW(parse_crafted(ok).tensors());
  expect_tree_refused(testing::fastdcp_header(nested_list_json(kMaxTreeDepth + 1), "", "[]", ""), 0, kTooDeep);
  // Deeper than the JSON parser goes: the same message, not a parser's.
  expect_tree_refused(testing::fastdcp_header(nested_list_json(3 * kMaxTreeDepth), "", "[]", ""), 0, kTooDeep);
}

TEST(RankFileHeader, RepeatedDictKeysInTheTreeAreRefused) {
  Value root = Value::dict();
  Value model = Value::dict();
  model.insert("wa", Value(iota(DType::kF32, {2})));
  model.insert("wb", Value(iota(DType::kF32, {3})));
  root.insert("model", std::move(model));
  const RankFilePlan plan = RankFilePlan::make(root);
  std::string json = plan.header().substr(8);
  const size_t at = json.find(R"(\"wb\")");
  ASSERT_NE(at, std::string::npos);
  json[at + 3] = 'a';  // the tree's key "wb" becomes a second "wa"; entry names stay as they are
  const uint64_t data = plan.file_size() - plan.data_offset();
  expect_tree_refused(json, data, "the value at 'model' has the key 'wa' twice");
  // Integer keys too.
  expect_tree_refused(testing::fastdcp_header(R"({"d":[[1,null],[2,null],[1,true]]})", "", "[]", ""), 0,
                      "has the key '1' twice");
  // And in a dict big enough to be indexed.
  std::string big = R"({"d":[)";
  for (int i = 0; i < 40; ++i) big += "[\"k" + std::to_string(i) + "\",null],";
  big += R"(["k17",null]]})";
  expect_tree_refused(testing::fastdcp_header(big, "", "[]", ""), 0, "has the key 'k17' twice");
}

// The refusal of a header that does not even parse.
void expect_header_refused(const std::string& json, uint64_t data_bytes, const std::string& what) {
  const Error e = expect_error([&] { (void)parse_crafted(json, data_bytes); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
}

const std::string kRawEntry(testing::kOneStorageEntry);

TEST(RankFileHeader, RepeatedKeysInTheHeaderAreRefused) {
  // An entry name twice (a plain safetensors header too).
  expect_header_refused(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                        R"("a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
                        8, "entry 'a' appears twice");
  // A key of an entry's record twice.
  expect_header_refused(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"dtype":"F32"}})", 4,
                        "entry 'a' is not an object of distinct keys");
  // __metadata__ twice, or a key in it twice.
  expect_header_refused(R"({"__metadata__":{},"__metadata__":{"fastdcp.version":"1"}})", 0,
                        "__metadata__ is not one object of distinct keys");
  const std::string tree = R"({"T":[0,"U8",[64],[1],0]})";
  std::string twice = testing::one_storage_header(tree);
  twice.insert(twice.find(R"("fastdcp.tree")"), R"("fastdcp.tree":"null",)");
  expect_header_refused(twice, 64, "__metadata__ is not one object of distinct keys");
  // Two storages naming one entry (the list has as many records as there are entries).
  const std::string two_entries = kRawEntry + R"(,"b":{"dtype":"U8","shape":[0],"data_offsets":[64,64]})";
  expect_header_refused(testing::fastdcp_header("null", two_entries,
                                                R"([["__fastdcp__.storage.0",64],["__fastdcp__.storage.0",64]])",
                                                "0000000000000000"),
                        64, "two storages name the entry '__fastdcp__.storage.0'");
}

// Views whose extent wraps around 2^64 look small; each must be refused, not built.
TEST(RankFileHeader, ViewsWhoseSizesOverflowAreRefused) {
  const auto refused = [](const std::string& tensor, const std::string& what) {
    SCOPED_TRACE(tensor);
    expect_tree_refused(testing::one_storage_header(R"({"d":[["x",{"T":)" + tensor + "}]]}"), 64,
                        "the tensor at 'x' does not fit its storage: " + what);
  };
  const std::string beyond = "its extent in bits is beyond 2^63";
  refused(R"([0,"F32",[2,2],[576460752303423488,1],0])", beyond);  // strides [2^59, 1]
  refused(R"([0,"F32",[576460752303423488],[1],0])", beyond);       // shape [2^59]
  refused(R"([0,"U8",[2],[9223372036854775807],0])", beyond);
  refused(R"([0,"C128",[1],[1],9223372036854775807])", beyond);     // the offset in bits
  refused(R"([0,"F32",[4294967296,4294967296],[1,1],0])", "its sizes multiply beyond 2^63");
  refused(R"([0,"F32",[0,4294967296,4294967296],[1,1,1],0])", "its sizes multiply beyond 2^63");
  refused(R"([0,"F32",[2],[-1],1])", "negative stride in dimension 0");
  refused(R"([0,"F32",[-2],[1],0])", "negative size in dimension 0");
  refused(R"([0,"F32",[2],[1],-1])", "negative storage offset");
  refused(R"([0,"F32",[4,5],[4,1],0])", "needs bytes [0, 68) but the storage has 64");
  // What fits is fine, empty views anywhere included.
  for (const std::string ok : {R"([0,"F32",[4,4],[4,1],0])", R"([0,"F32",[0,3],[1,1],1000000])",
                               R"([0,"F32",[2,2],[8,1],6])"}) {
    const RankFileHeader header = parse_crafted(testing::one_storage_header(R"({"d":[["x",{"T":)" + ok + "}]]}"), 64);
    EXPECT_NO_THROW((void)header.build_tree({Storage::allocate_cpu(64)})) << ok;
  }
}

TEST(RankFileHeader, EntriesWhoseSizesOverflowAreRefused) {
  // A plain safetensors entry of 2^59 F32 elements "in" 0 bytes: 2^59 * 32 bits wraps to 0.
  expect_header_refused(R"({"x":{"dtype":"F32","shape":[576460752303423488],"data_offsets":[0,0]}})", 0,
                        "entry 'x' has an invalid shape");
  expect_header_refused(R"({"x":{"dtype":"C128","shape":[1152921504606846976],"data_offsets":[0,0]}})", 0,
                        "entry 'x' has an invalid shape");
  expect_header_refused(R"({"x":{"dtype":"U8","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}})", 0,
                        "entry 'x' has an invalid shape");
}

TEST(RankFileHeader, AForeignFilesLengthPrefixIsNotEchoed) {
  // A zip file's first 8 bytes read as a length: the message must not disclose them.
  const unsigned char prefix[8] = {'P', 'K', 3, 4, 20, 0, 8, 0};
  uint64_t as_number = 0;
  for (int k = 7; k >= 0; --k) as_number = (as_number << 8) | prefix[k];
  const Error e = expect_error([&] { parse_header_length(prefix, 1000, "secret.zip"); });
  EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
  const std::string message = e.what();
  EXPECT_EQ(message.find(std::to_string(as_number)), std::string::npos) << message;
  EXPECT_NE(message.find("'secret.zip' is not a fastdcp or safetensors rank file"), std::string::npos) << message;
}

TEST(RankFilePlan, ValuesTheFormatCannotHoldAreNamed) {
  Value root = Value::dict();
  Value inner = Value::dict();
  inner.insert("name", Value(std::string("\xff\xfe")));
  root.insert("cfg", std::move(inner));
  try {
    RankFilePlan::make(root);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("'cfg.name'"), std::string::npos) << e.what();
  }
}

TEST(RankFileHeader, TensorTraitsRoundTripInVersion2Only) {
  const TensorTraits t1{.conj = true, .neg = true, .requires_grad = true, .parameter = true};
  const TensorTraits t2{.framework_dtype = "complex32"};
  Value root = Value::dict();
  root.insert("z", Value(with_traits(iota(DType::kC64, {3}), t1)));
  root.insert("h", Value(with_traits(iota(DType::kU32, {2}), t2)));
  root.insert("plain", Value(iota(DType::kF32, {2})));
  root.insert("param", Value(with_traits(iota(DType::kF32, {2}), {.requires_grad = true, .parameter = true})));
  RankFilePlan plan = RankFilePlan::make(root);
  // Safetensors readers see plain entries as dtype and bytes: only where those are the values.
  std::vector<std::string> names;
  for (const StoredEntry& e : plan.entries()) names.push_back(e.name);
  EXPECT_EQ(names, (std::vector<std::string>{"__fastdcp__.storage.0", "__fastdcp__.storage.1", "plain", "param"}));
  EXPECT_NE(plan.header().find(R"(0,{\"conj\":true,\"neg\":true,\"param\":true,\"grad\":true}]})"), std::string::npos)
      << plan.header();
  const RankFileHeader header = parse(plan);
  EXPECT_EQ(header.format_version(), 2);
  const Value rebuilt = header.build_tree(plan.storages());
  EXPECT_EQ(rebuilt.at("z").as_tensor().traits(), t1);
  EXPECT_EQ(rebuilt.at("h").as_tensor().traits(), t2);
  EXPECT_TRUE(rebuilt.at("plain").as_tensor().traits().is_default());
  EXPECT_EQ(header.tensors()[1].traits.framework_dtype, "complex32");
}

TEST(RankFileHeader, TraitsInAVersion1FileOrUnknownTraitsAreCorrupt) {
  Value root = Value::dict();
  root.insert("z", Value(with_traits(iota(DType::kC64, {3}), {.conj = true})));
  RankFilePlan plan = RankFilePlan::make(root);
  const std::string header = plan.header().substr(8);
  for (const auto& [from, to] : std::vector<std::pair<std::string, std::string>>{
           {"\"fastdcp.version\":\"2\"", "\"fastdcp.version\":\"1\""},
           {"{\\\"conj\\\":true}", "{\\\"conj\\\":1234}"},
           {"{\\\"conj\\\":true}", "{\\\"sign\\\":true}"},
           {"{\\\"conj\\\":true}", "[\\\"conj\\\",true]"}}) {
    std::string damaged = header;
    const size_t at = damaged.find(from);
    ASSERT_NE(at, std::string::npos) << from << " in " << header;
    damaged.replace(at, from.size(), to);
    damaged.resize(header.size(), ' ');
    try {
      parse_and_build(damaged, plan);
      FAIL() << to;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kDataLoss) << e.what();
      EXPECT_NE(std::string(e.what()).find("'z'"), std::string::npos) << e.what();
    }
  }
}

TEST(RankFilePlan, QuantizedTensorsAreRefusedByKeyPath) {
  Value inner = Value::dict();
  inner.insert("qweight", Value(with_traits(iota(DType::kI8, {4}), {.quantized = true})));
  Value root = Value::dict();
  root.insert("layer", std::move(inner));
  try {
    RankFilePlan::make(root);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("'layer.qweight'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("quantized"), std::string::npos) << e.what();
  }
}

TEST(RankFileHeader, ANewerFormatVersionIsRefusedWithAdvice) {
  RankFilePlan plan = RankFilePlan::make(sample());
  std::string header = plan.header().substr(8);
  const size_t at = header.find("\"fastdcp.version\":\"1\"");
  ASSERT_NE(at, std::string::npos);
  header[at + std::strlen("\"fastdcp.version\":\"")] = '9';
  try {
    RankFileHeader::parse(header, plan.file_size(), "f.safetensors");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kFailedPrecondition);
    EXPECT_NE(std::string(e.what()).find("version 9"), std::string::npos) << e.what();
  }
}

// fastdcp lists the storages in the order of their entries, which the parser takes without a lookup;
// another order (another writer's) reads the same way, and a storage list naming an entry twice is
// refused either way.
TEST(RankFileHeader, StoragesInAnotherOrderThanTheirEntriesParse) {
  Value root = Value::dict();
  root.insert("a", testing::patterned_tensor(DType::kF32, {4}, 1));
  root.insert("b", testing::patterned_tensor(DType::kF32, {4}, 2));
  const RankFilePlan plan = RankFilePlan::make(root);
  const std::string good = plan.header().substr(8);
  const std::string in_order = R"([[\"a\",16],[\"b\",16]])";
  const size_t at = good.find(in_order);
  ASSERT_NE(at, std::string::npos);
  std::string swapped = good;
  swapped.replace(at, in_order.size(), R"([[\"b\",16],[\"a\",16]])");
  const RankFileHeader header = RankFileHeader::parse(swapped, plan.file_size(), "f.safetensors");
  ASSERT_EQ(header.entries().size(), 2u);
  EXPECT_EQ(header.entries()[0].name, "b");
  EXPECT_EQ(header.entries()[1].name, "a");
  const Value tree = header.build_tree({plan.storages()[1], plan.storages()[0]});  // storage 0 is b's now
  EXPECT_EQ(std::memcmp(tree.at("a").as_tensor().data_ptr(), plan.storages()[1].data(), 16), 0);  // tree: storage 0
  std::string twice = good;
  twice.replace(at, in_order.size(), R"([[\"a\",16],[\"a\",16]])");
  try {
    RankFileHeader::parse(twice, plan.file_size(), "f.safetensors");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
    EXPECT_NE(std::string(e.what()).find("two storages name the entry 'a'"), std::string::npos) << e.what();
  }
}

TEST(RankFileHeader, ATruncatedFileIsNamed) {
  RankFilePlan plan = RankFilePlan::make(sample());
  try {
    RankFileHeader::parse(std::string_view(plan.header()).substr(8), plan.file_size() - 1, "f.safetensors");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDataLoss);
    EXPECT_NE(std::string(e.what()).find("'f.safetensors' is truncated"), std::string::npos) << e.what();
  }
}

// Random damage to the header: every outcome is a parsed header or an Error, never a crash
// (the libFuzzer target explores this much further; this keeps a quick check in every build).
TEST(RankFileHeader, DamagedHeadersGiveErrorsNotCrashes) {
  RankFilePlan plan = RankFilePlan::make(sample());
  const std::string good = plan.header().substr(8);
  std::mt19937 rng(3);
  int errors = 0;
  for (int round = 0; round < 2000; ++round) {
    std::string bad = good;
    for (int k = 0; k < 1 + round % 4; ++k) bad[rng() % bad.size()] = static_cast<char>(rng());
    try {
      const RankFileHeader header = RankFileHeader::parse(bad, plan.file_size(), "f");
      std::vector<Storage> storages;
      for (const auto& e : header.entries()) storages.push_back(Storage::allocate_cpu(e.nbytes));
      (void)header.build_tree(storages);
      (void)header.tensors();
    } catch (const Error&) {
      ++errors;
    }
  }
  EXPECT_GT(errors, 500);
}

TEST(RankFileHeader, APlainSafetensorsFileReadsAsAFlatDict) {
  const std::string json =
      R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})";
  const RankFileHeader header = RankFileHeader::parse(json, 8 + json.size() + 12, "plain.safetensors");
  EXPECT_EQ(header.format_version(), 0);
  ASSERT_EQ(header.entries().size(), 2u);
  std::vector<Storage> storages{Storage::allocate_cpu(4), Storage::allocate_cpu(8)};
  const Value tree = header.build_tree(storages);
  EXPECT_EQ(tree.entries()[0].first.as_string(), "a");  // file order
  EXPECT_EQ(tree.at("b").as_tensor().shape(), (Dims{2}));
}

}  // namespace
}  // namespace fastdcp

namespace fastdcp {
namespace {

// A sharded leaf of two row blocks of a [4, 4] U8 tensor, both views of one local storage.
Value sharded_sample(int replica_index = 0, int replica_count = 1) {
  Tensor local = iota(DType::kU8, {16});
  ShardedTensor s;
  s.global_shape = {4, 4};
  s.dtype = DType::kU8;
  s.chunks.push_back({{0, 0}, local.view_as({2, 4}, {4, 1}, 0)});
  s.chunks.push_back({{2, 0}, local.view_as({2, 4}, {4, 1}, 8)});
  s.replica_index = replica_index;
  s.replica_count = replica_count;
  Value root = Value::dict();
  root.insert("w", Value(std::move(s)));
  return root;
}

RankFileHeader parse_plan_header(const RankFilePlan& plan, const std::string& header) {
  return RankFileHeader::parse(std::string_view(header).substr(8), plan.file_size(), "r.safetensors");
}

TEST(ShardedRecord, RoundTripsAsVersionThreeWithItsChunksAndReplica) {
  const RankFilePlan plan = RankFilePlan::make(sharded_sample(1, 2), RankFilePlan::Replicas::kAll);
  ASSERT_EQ(plan.entries().size(), 1u);  // one local storage
  const RankFileHeader header = parse_plan_header(plan, plan.header());
  EXPECT_EQ(header.format_version(), 3);
  const Value tree = header.build_tree(plan.storages());
  const ShardedTensor& s = tree.at("w").as_sharded();
  EXPECT_EQ(s.global_shape, (Dims{4, 4}));
  EXPECT_EQ(s.replica_index, 1);
  EXPECT_EQ(s.replica_count, 2);
  ASSERT_EQ(s.chunks.size(), 2u);
  EXPECT_EQ(s.chunks[1].offset, (Dims{2, 0}));
  EXPECT_EQ(s.chunks[1].data.storage_offset(), 8);
  EXPECT_EQ(s.chunks[0].data.storage(), s.chunks[1].data.storage());
  // Replica 1 of 2 with one leaf: replica 0 writes it, so this file records it without chunks.
  const RankFilePlan own = RankFilePlan::make(sharded_sample(1, 2));
  EXPECT_TRUE(own.entries().empty());
  ASSERT_EQ(own.sharded().size(), 1u);
  EXPECT_TRUE(own.sharded()[0].chunks.empty());
  EXPECT_TRUE(parse_plan_header(own, own.header()).build_tree({}).at("w").as_sharded().chunks.empty());
}

TEST(ShardedRecord, MalformedRecordsAreCorruptNamingTheKey) {
  const RankFilePlan plan = RankFilePlan::make(sharded_sample());
  const std::string good = plan.header();
  const auto mutated = [&](const std::string& from, const std::string& to) {
    std::string h = good;
    const size_t at = h.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    h.replace(at, from.size(), to);
    return h;
  };
  const std::vector<std::pair<std::string, std::string>> cases = {
      {mutated(R"("fastdcp.version":"3")", R"("fastdcp.version":"2")"), "before version 3"},
      {mutated("[[2,0],[0", "[[1,0],[0"), "overlapping chunks"},
      {mutated("[[2,0],[0", "[[3,0],[0"), "outside its global shape"},
      {mutated(R"([[4,4],\"U8\")", R"([[4,4],\"I8\")"), "has a chunk of dtype U8"},
      {mutated("[[2,0],[0", "[[2,0],5,[0"), "malformed chunk"},
  };
  for (const auto& [header, needle] : cases) {
    // The version edit changes no length; the others keep the header's padded length too.
    std::string h = header;
    h.resize(good.size(), ' ');
    try {
      parse_plan_header(plan, h).build_tree(plan.storages());
      ADD_FAILURE() << needle;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kDataLoss) << e.what();
      EXPECT_NE(std::string(e.what()).find("r.safetensors"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("'w'"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace fastdcp
