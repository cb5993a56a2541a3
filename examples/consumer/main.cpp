// consumer: a program built against fastdcp by a CMake project of its own
// (docs/getting-started-cpp.md). It builds a small state dict, saves it with the synchronous
// checkpointer into the directory given on the command line, loads it back and compares it with
// what was saved, byte for byte. Exit status 0 when they are equal, 1 otherwise or on an error.
//
//   consumer <checkpoint dir>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <utility>

#include "fastdcp/checkpoint/checkpointer.h"
#include "fastdcp/tensor/tensor.h"
#include "fastdcp/tensor/value.h"

namespace {

using namespace fastdcp;

// A new float32 CPU tensor holding start, start + 1, ...
Tensor arange(Dims shape, float start) {
  Tensor tensor = Tensor::empty_cpu(DType::kF32, std::move(shape));
  auto* data = static_cast<float*>(tensor.data_ptr());
  for (int64_t i = 0; i < tensor.numel(); ++i) data[i] = start + static_cast<float>(i);
  return tensor;
}

bool same_tensor(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && a.is_contiguous() && b.is_contiguous() &&
         std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: consumer <checkpoint dir>\n");
    return 2;
  }
  const std::string path = argv[1];
  try {
    Value model = Value::dict();
    model.insert("weight", arange({256, 128}, 0.0f));
    model.insert("bias", arange({128}, -64.0f));
    Value state = Value::dict();
    state.insert("model", std::move(model));
    state.insert("step", Value(int64_t{100}));

    CheckpointerOptions options;
    options.writer.overwrite = true;  // replace the checkpoint of an earlier run
    auto checkpointer = make_sync_checkpointer(options);
    const WriteStats stats = checkpointer->save(path, state);
    const Value loaded = checkpointer->load(path);
    checkpointer->close();

    bool equal = loaded.at("step").as_int() == 100;
    for (const char* name : {"weight", "bias"}) {
      equal = equal && same_tensor(loaded.at("model").at(name).as_tensor(), state.at("model").at(name).as_tensor());
    }
    if (!equal) {
      std::printf("consumer: FAIL: the checkpoint at %s differs from the state that was saved\n", path.c_str());
      return 1;
    }
    std::printf("consumer: PASS: saved %llu bytes into %s (%s) and loaded them back unchanged\n",
                static_cast<unsigned long long>(stats.bytes_written), path.c_str(), stats.file.c_str());
    return 0;
  } catch (const std::exception& e) {  // fastdcp::Error names what failed
    std::fprintf(stderr, "consumer: %s\n", e.what());
    return 1;
  }
}
