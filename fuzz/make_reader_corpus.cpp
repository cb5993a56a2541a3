// Writes the seed corpus of fuzz_reader into the directory given as argument (fuzz/corpus_reader
// is its output, checked in): rank files that fastdcp wrote, a plain safetensors file, and files
// crafted to break the rules a reader enforces (views that overflow, repeated keys, a tree beyond
// kMaxTreeDepth). Each seed is fuzz_reader's input: one byte of options (0: verify, not strict),
// then the rank file.

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "fastdcp/checkpoint/checkpoint.h"
#include "fastdcp/format/rank_file.h"
#include "support/crafted_checkpoint.h"
#include "support/test_support.h"

namespace fastdcp {
namespace {

Tensor patterned(DType dtype, Dims shape) { return testing::patterned_tensor(dtype, std::move(shape), 5); }

// Every kind of value, views, aliasing and raw dtypes, kept small.
Value everything() {
  Tensor base = patterned(DType::kF32, {4, 4});
  Value model = Value::dict();
  model.insert("w", Value(patterned(DType::kBF16, {3, 2})));
  model.insert("base", Value(base));
  model.insert("rows", Value(base.view_as({2, 4}, {4, 1}, 8)));
  model.insert("t", Value(base.view_as({4, 4}, {1, 4}, 0)));
  model.insert("scalar", Value(patterned(DType::kF64, {})));
  model.insert("empty", Value(patterned(DType::kI32, {0, 3})));
  model.insert("c", Value(patterned(DType::kC128, {1})));
  model.insert("f4", Value(patterned(DType::kF4, {6})));
  Value state = Value::dict();
  state.insert(0, Value(patterned(DType::kI64, {2})));
  Value betas = Value::tuple();
  betas.append(Value(0.9));
  betas.append(Value(std::nan("")));
  Value group = Value::dict();
  group.insert("betas", std::move(betas));
  group.insert("name", Value(std::string("adam \"q\"\n")));
  group.insert("blob", Value(Bytes{std::string("\x00\xff", 2)}));
  group.insert("none", Value());
  group.insert("flag", Value(true));
  Value groups = Value::list();
  groups.append(std::move(group));
  Value root = Value::dict();
  root.insert("model", std::move(model));
  root.insert("state", std::move(state));
  root.insert("groups", std::move(groups));
  root.insert("step", Value(int64_t{3}));
  return root;
}

// A sharded leaf of two row blocks over one local storage: a version-3 "S" record.
Value sharded() {
  Tensor local = patterned(DType::kF32, {4, 3});
  ShardedTensor s;
  s.global_shape = {4, 3};
  s.dtype = DType::kF32;
  s.chunks.push_back({{0, 0}, local.view_as({2, 3}, {3, 1}, 0)});
  s.chunks.push_back({{2, 0}, local.view_as({2, 3}, {3, 1}, 6)});
  Value root = Value::dict();
  root.insert("w", Value(std::move(s)));
  return root;
}

Value plain_only() {
  Value root = Value::dict();
  root.insert("w", Value(patterned(DType::kF32, {2, 2})));
  root.insert("b", Value(patterned(DType::kU8, {3})));
  return root;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The rank file that fastdcp writes for `state`.
std::string saved(const Value& state, const std::string& scratch) {
  const std::string path = join_path(scratch, "ck");
  CheckpointWriter({}, WriterOptions{.overwrite = true}).write(path, state);
  return read_all(join_path(path, read_manifest(path).ranks[0].file));
}

std::string crafted(const std::string& tree) { return testing::one_storage_file(tree); }

}  // namespace
}  // namespace fastdcp

int main(int argc, char** argv) {
  using namespace fastdcp;
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_reader_corpus DIR\n");
    return 2;
  }
  const std::string out = argv[1];
  std::filesystem::create_directories(out);
  std::string scratch = "/tmp/make_reader_corpus_XXXXXX";
  if (!::mkdtemp(scratch.data())) return 1;
  const auto seed = [&](const std::string& name, const std::string& file) {
    std::ofstream(join_path(out, name), std::ios::binary) << '\0' << file;
  };
  seed("saved_everything", saved(everything(), scratch));
  seed("saved_plain_only", saved(plain_only(), scratch));
  seed("saved_empty", saved(Value::dict(), scratch));
  seed("saved_sharded", saved(sharded(), scratch));
  seed("sharded_before_version_3", crafted(R"({"d":[["w",{"S":[[4,4],"U8",[[[0,0],[0,"U8",[2,4],[4,1],0]]]]}]]})"));
  std::string plain_data(16, '\0');
  for (size_t i = 0; i < plain_data.size(); ++i) plain_data[i] = static_cast<char>(i * 7);
  seed("plain_safetensors",
       fastdcp::testing::rank_file_bytes(R"({"__metadata__":{"format":"pt"},"b":{"dtype":"I32","shape":[2],"data_offsets":[8,16]},)"
                                R"("a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},)"
                                R"("e":{"dtype":"F32","shape":[0,3],"data_offsets":[16,16]}})",
                                plain_data));
  const std::string x = R"({"T":[0,"F32",[4],[1],0]})";
  seed("view_ok", crafted(R"({"d":[["x",{"T":[0,"F32",[2,2],[8,1],6]}],["y",{"T":[0,"U8",[0],[1],99]}]]})"));
  seed("view_strides_overflow", crafted(R"({"d":[["x",{"T":[0,"F32",[2,2],[576460752303423488,1],0]}]]})"));
  seed("view_shape_overflow", crafted(R"({"d":[["x",{"T":[0,"F32",[576460752303423488],[1],0]}]]})"));
  seed("view_numel_wraps", crafted(R"({"d":[["x",{"T":[0,"F32",[4294967296,4294967296],[1,1],0]}]]})"));
  seed("view_negative_stride", crafted(R"({"d":[["x",{"T":[0,"F32",[2],[-4],4]}]]})"));
  seed("entry_shape_overflow",
       fastdcp::testing::rank_file_bytes(R"({"x":{"dtype":"F32","shape":[576460752303423488],"data_offsets":[0,0]}})", ""));
  seed("duplicate_dict_key", crafted(R"({"d":[["x",)" + x + R"(],["x",)" + x + "]]}"));
  seed("duplicate_entry", fastdcp::testing::rank_file_bytes(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                                                   R"("a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
                                                   std::string(8, '\1')));
  std::string twice = fastdcp::testing::one_storage_header(x);
  twice.insert(twice.find(R"("fastdcp.tree")"), R"("fastdcp.tree":"null",)");
  seed("duplicate_metadata_key", fastdcp::testing::rank_file_bytes(twice, std::string(64, '\0')));
  std::string deep;
  for (size_t i = 0; i <= kMaxTreeDepth; ++i) deep += R"({"l":[)";
  for (size_t i = 0; i <= kMaxTreeDepth; ++i) deep += "]}";
  seed("tree_too_deep", crafted(deep));
  std::filesystem::remove_all(scratch);
  return 0;
}
