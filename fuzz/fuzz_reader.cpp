// libFuzzer target for the whole reader. The input is one byte of options, then a rank file; the
// target commits it as a one-rank checkpoint whose manifest matches it (support/crafted_checkpoint.h),
// so that mutations reach past the manifest's checks, and reads it every way: a full load into one
// image, a mapped full load, an in-place load into a template, and verify_checkpoint. Findings:
// a crash or sanitizer report, any exception but fastdcp::Error, a loaded view reaching outside
// its storage (checked with 128-bit arithmetic, independent of the reader's), loads that disagree
// (the mapped load, the in-place load and verify must accept what the full load accepts, and give
// back the same values), a loaded tree nested beyond kMaxTreeDepth or with a dict key twice.
// Seeds: fuzz/corpus_reader (fuzz/make_reader_corpus.cpp writes them).
// Run by scripts/test.sh for a bounded time; fuzz/README.md says how to run it longer.

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "fastdcp/checkpoint/checkpoint.h"
#include "fastdcp/common/error.h"
#include "fastdcp/format/checksum.h"
#include "fastdcp/format/rank_file.h"
#include "support/crafted_checkpoint.h"

namespace fastdcp {
namespace {

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "fuzz_reader finding: %s\n", what.c_str());
  std::abort();
}

// One directory for the whole run, on tmpfs where there is one, removed at exit.
struct ScratchDir {
  std::string path = (std::filesystem::exists("/dev/shm") ? "/dev/shm" : "/tmp") + std::string("/fuzz_reader_XXXXXX");
  ScratchDir() {
    if (!::mkdtemp(path.data())) finding("cannot make a temporary directory");
  }
  ~ScratchDir() { std::filesystem::remove_all(path); }
};
const std::string& checkpoint_dir() {
  static const ScratchDir dir;
  return dir.path;
}

// Calls visit(value) on every node, without recursion (trees nest up to kMaxTreeDepth deep).
template <class V, class Visit>
void for_each_node(V& root, Visit&& visit) {
  std::vector<V*> stack{&root};
  while (!stack.empty()) {
    V* v = stack.back();
    stack.pop_back();
    visit(*v);
    if (v->kind() == Value::Kind::kList || v->kind() == Value::Kind::kTuple) {
      for (auto& item : v->items()) stack.push_back(&item);
    } else if (v->kind() == Value::Kind::kDict) {
      for (auto& [key, child] : v->entries()) stack.push_back(&child);
    }
  }
}

// Elements a view may have for its bytes to be copied out (stride-0 views can be huge and valid).
constexpr unsigned __int128 kMaxTouchedBytes = uint64_t{64} << 20;

// The view's bytes reach no further than its storage; returns its contiguous bytes if small enough.
std::string check_view(const Tensor& t) {
  using Wide = unsigned __int128;
  Wide numel = 1, last = static_cast<Wide>(t.storage_offset());
  if (t.storage_offset() < 0) finding("a loaded tensor has a negative offset");
  for (size_t i = 0; i < t.dim(); ++i) {
    if (t.shape()[i] < 0 || t.strides()[i] < 0) finding("a loaded tensor has a negative size or stride");
    numel *= static_cast<Wide>(t.shape()[i]);
    if (numel > (Wide{1} << 64)) numel = Wide{1} << 64;  // stays well above any real size
  }
  if (numel == 0) return "empty";
  for (size_t i = 0; i < t.dim(); ++i) last += static_cast<Wide>(t.shape()[i] - 1) * static_cast<Wide>(t.strides()[i]);
  const auto bits = static_cast<Wide>(dtype_bits(t.dtype()));
  const Wide end = ((last + 1) * bits + 7) / 8;
  if (end > t.storage().nbytes()) {
    finding("a loaded tensor " + t.describe() + " reaches beyond its storage of " +
            std::to_string(t.storage().nbytes()) + " bytes");
  }
  if (numel * bits / 8 > kMaxTouchedBytes) return "large";
  Tensor copy = Tensor::empty_cpu(t.dtype(), t.shape());
  copy_tensor(copy, t);  // reads every element: the sanitizers see any byte outside the memory
  return std::string(static_cast<const char*>(copy.data_ptr()), copy.nbytes());
}

// What the format promises of a loaded tree: nesting within kMaxTreeDepth, no dict key twice.
void check_tree(const Value& root) {
  std::vector<std::pair<const Value*, size_t>> stack{{&root, 0}};  // a node and the containers around it
  while (!stack.empty()) {
    const auto [v, depth] = stack.back();
    stack.pop_back();
    if (v->kind() == Value::Kind::kList || v->kind() == Value::Kind::kTuple) {
      if (depth + 1 > kMaxTreeDepth) finding("a loaded tree nests deeper than kMaxTreeDepth");
      for (const auto& item : v->items()) stack.push_back({&item, depth + 1});
    } else if (v->kind() == Value::Kind::kDict) {
      if (depth + 1 > kMaxTreeDepth) finding("a loaded tree nests deeper than kMaxTreeDepth");
      for (const auto& [key, child] : v->entries()) {
        if (v->find(key) != &child) finding("a loaded dict holds the key '" + key.str() + "' twice");
        stack.push_back({&child, depth + 1});
      }
    }
  }
}

// What a loaded tree holds, node by node, for comparing loads; checks every tensor on the way.
std::string digest(const Value& root) {
  check_tree(root);
  std::string out;
  for_each_node(root, [&](const Value& v) {
    out += Value::kind_name(v.kind());
    switch (v.kind()) {
      case Value::Kind::kTensor: {
        const Tensor& t = v.as_tensor();
        const std::string bytes = check_view(t);
        out += t.describe().substr(0, t.describe().find(" strides")) + std::to_string(crc32c(bytes.data(), bytes.size()));
        break;
      }
      case Value::Kind::kDict:
        for (const auto& [key, child] : v.entries()) out += key.str() + ",";
        break;
      case Value::Kind::kBool: out += v.as_bool() ? "1" : "0"; break;
      case Value::Kind::kInt: out += std::to_string(v.as_int()); break;
      case Value::Kind::kString: out += v.as_string(); break;
      case Value::Kind::kBytes: out += v.as_bytes().data; break;
      case Value::Kind::kDouble: {
        uint64_t bits = 0;
        const double d = v.as_double();
        std::memcpy(&bits, &d, sizeof bits);
        out += std::to_string(bits);
        break;
      }
      case Value::Kind::kList:
      case Value::Kind::kTuple: out += std::to_string(v.size()); break;
      case Value::Kind::kNone: break;
    }
    out += ';';
  });
  return out;
}

// Runs f; false if it threw fastdcp::Error (anything else escapes to libFuzzer, a finding).
bool succeeds(const std::function<void()>& f) {
  try {
    f();
    return true;
  } catch (const Error&) {
    return false;
  }
}

// The template for an in-place load of `loaded`: the same tree, with fresh zeroed tensors; none
// if a tensor is too large to copy (a valid stride-0 view may have 2^62 elements).
std::optional<Value> template_of(const Value& loaded) {
  Value out = loaded.clone();
  bool small = true;
  for_each_node(out, [&](Value& v) {
    if (!v.is_tensor() || !small) return;
    const Tensor& t = v.as_tensor();
    const auto nbytes = static_cast<unsigned __int128>(t.numel()) * static_cast<unsigned>(dtype_bits(t.dtype())) / 8;
    small = nbytes <= kMaxTouchedBytes;
    if (small) v = Value(Tensor::empty_cpu(t.dtype(), t.shape()));
  });
  return small ? std::optional<Value>(std::move(out)) : std::nullopt;
}

}  // namespace
}  // namespace fastdcp

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace fastdcp;
  if (size < 1) return 0;
  const bool verify = (data[0] & 1) == 0;
  const bool strict = (data[0] & 2) != 0;
  const std::string_view file(reinterpret_cast<const char*>(data) + 1, size - 1);
  const std::string& dir = checkpoint_dir();
  testing::commit_rank_file(dir, file);

  Value loaded;
  std::string full, mapped;
  const bool full_ok = succeeds([&] {
    loaded = CheckpointReader({}, ReadOptions{.verify_checksums = verify, .io_threads = 1, .direct_io = false}).read(dir);
    full = digest(loaded);
  });
  const bool mapped_ok = succeeds([&] {
    mapped = digest(CheckpointReader({}, ReadOptions{.verify_checksums = verify, .io_threads = 1, .use_mmap = true}).read(dir));
  });
  if (full_ok != mapped_ok || full != mapped) finding("the mapped load differs from the full load");
  if (verify && succeeds([&] { verify_checkpoint(dir); }) != full_ok) finding("verify disagrees with the full load");

  // In place: into a template of what the full load gave (it must give the same), or a fixed one.
  std::optional<Value> like = full_ok ? template_of(loaded) : std::nullopt;
  Value target = like ? std::move(*like) : Value::dict();
  if (!like) target.insert("x", Value(Tensor::empty_cpu(DType::kF32, {4})));
  const bool in_place_ok = succeeds([&] {
    CheckpointReader({}, ReadOptions{.verify_checksums = verify, .io_threads = 1}).read_into(dir, target, strict);
  });
  if (like && (!in_place_ok || digest(target) != full)) finding("the in-place load differs from the full load");
  return 0;
}
