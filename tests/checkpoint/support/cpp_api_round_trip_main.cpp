// The C++ leg of the differential test (tests/python/test_differential.py): reads a checkpoint
// through the C++ API and writes what it read as a new checkpoint, so that a load of the copy can
// be compared with what torch.load gives for the state dict the first one was saved from.
//
//   test_cpp_api_round_trip SRC DST MODE
//
// MODE says how SRC is read:
//   full  CheckpointReader::read
//   mmap  the same with ReadOptions::use_mmap: tensors view a mapping of the file
//   into  CheckpointReader::read_into, strict, into a target whose bytes were zeroed first: a
//         second full read of SRC, so that its tensors have the saved views, strides and aliasing
// Exit status: 0 written; 1 an error (its message on stderr); 2 bad usage.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "fastdcp/checkpoint/checkpoint.h"
#include "fastdcp/common/error.h"

namespace {

using namespace fastdcp;

// Every tensor's storage in `tree` filled with zeros, so that only what read_into writes survives.
void zero_storages(Value& tree) {
  std::vector<Value*> stack{&tree};
  while (!stack.empty()) {
    Value* v = stack.back();
    stack.pop_back();
    if (v->is_tensor()) {
      const Storage& storage = v->as_tensor().storage();
      if (storage.nbytes()) std::memset(storage.data(), 0, storage.nbytes());
    } else if (v->kind() == Value::Kind::kDict) {
      for (auto& [key, item] : v->entries()) stack.push_back(&item);
    } else if (v->is_container()) {
      for (auto& item : v->items()) stack.push_back(&item);
    }
  }
}

Value read(const std::string& src, const std::string& mode) {
  if (mode == "full") return CheckpointReader().read(src);
  if (mode == "mmap") {
    ReadOptions options;
    options.use_mmap = true;
    return CheckpointReader(RankInfo{}, options).read(src);
  }
  Value target = CheckpointReader().read(src);
  zero_storages(target);
  const LoadResult result = CheckpointReader().read_into(src, target, /*strict=*/true);
  if (!result.missing_keys.empty() || !result.unexpected_keys.empty()) {
    throw Error(ErrorCode::kInternal, "a strict load reported missing or unexpected keys");
  }
  return target;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 || (std::strcmp(argv[3], "full") && std::strcmp(argv[3], "mmap") && std::strcmp(argv[3], "into"))) {
    std::fprintf(stderr, "usage: %s SRC DST full|mmap|into\n", argv[0]);
    return 2;
  }
  try {
    const Value state_dict = read(argv[1], argv[3]);
    CheckpointWriter().write(argv[2], state_dict);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
