// staging_demo: a fake training job that checkpoints asynchronously with fastdcp's C++ API.
//
// The state is shaped like a Llama model trained with Adam: ~290 weights (bf16 matrices, fp32
// norms), with q/k/v as views of one fused buffer per layer and lm_head tied to the embedding, plus
// the optimizer's state (two fp32 moments and a step per parameter, keyed by parameter index),
// param_groups and the global step. Every step reads all weights ("forward/backward") and then
// rewrites them ("optimizer step").
//
// Every --every steps the state is saved with make_async_checkpointer() into <dir>/step_<NNNNN>:
// save() returns (staged, written). Training waits for `staged` only (the save's blocking time,
// printed beside the step time) before it changes its tensors again; the fastdcp-writer process
// writes and commits the checkpoint in the background, fed the staged buffers through shared
// memory (Note [Native writer process]), with up to two saves in flight (Note [Saves in flight]).
// Each commit is reported when it lands, with its commit time and write throughput.
//
// At the end the demo waits for the writes, restores the latest committed checkpoint (the newest
// step_* whose manifest reads back) and compares it byte for byte with a snapshot of the state
// taken when that checkpoint was staged, views and aliases included; PASS/FAIL, exit status 1 on
// any failure. The checkpoints go to a fresh directory under $FASTDCP_DEMO_DIR (else /tmp),
// removed at the end.
//
//   staging_demo [--gb 1.0] [--steps 20] [--every 5]

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <future>
#include <memory>
#include <numeric>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "fastdcp/checkpoint/checkpoint.h"
#include "fastdcp/checkpoint/checkpointer.h"
#include "fastdcp/common/future.h"
#include "fastdcp/io/file.h"
#include "fastdcp/memory/cuda_runtime.h"
#include "fastdcp/staging/stager.h"
#include "fastdcp/tensor/tensor.h"
#include "fastdcp/tensor/value.h"

namespace {

using namespace fastdcp;
using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// ---------------------------------------------------------------------------------------------
// Command line

struct Args {
  double gb = 1.0;
  int steps = 20;
  int every = 5;
};

constexpr const char* kUsageLine = "usage: staging_demo [--gb <GB>] [--steps <n>] [--every <n>] [--help]\n";
constexpr const char* kUsage =
    "\n"
    "A fake training loop over a Llama-shaped model + Adam state that checkpoints asynchronously\n"
    "(make_async_checkpointer: background staging, writes in the fastdcp-writer process) every few\n"
    "steps, prints each save's blocking time beside the step time and each commit's time and\n"
    "throughput, then restores the latest committed checkpoint and verifies it byte for byte.\n"
    "\n"
    "  --gb <GB>      size of the training state (weights + optimizer), default 1.0\n"
    "  --steps <n>    training steps, default 20\n"
    "  --every <n>    save a checkpoint every n steps (1 <= n <= steps), default 5\n"
    "  -h, --help     this text\n"
    "\n"
    "Checkpoints go to a fresh directory under $FASTDCP_DEMO_DIR (default /tmp), one step_<NNNNN>\n"
    "per save, removed at the end. $FASTDCP_WRITER names another writer program. Exit status: 0\n"
    "when every check passed, 1 on a failed check or error, 2 on bad arguments.\n";

[[noreturn]] void usage(const std::string& message) {
  std::fprintf(stderr, "staging_demo: %s\n%s", message.c_str(), kUsageLine);
  std::exit(2);
}

Args parse_args(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsageLine, stdout);
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (flag != "--gb" && flag != "--steps" && flag != "--every") usage("unknown flag " + flag);
    if (i + 1 >= argc) usage("missing value for " + flag);
    const char* value = argv[++i];
    char* end = nullptr;
    if (flag == "--gb") {
      args.gb = std::strtod(value, &end);
    } else if (flag == "--steps") {
      args.steps = static_cast<int>(std::strtol(value, &end, 10));
    } else {
      args.every = static_cast<int>(std::strtol(value, &end, 10));
    }
    if (end == value || *end != '\0') usage("bad value for " + flag + ": " + value);
  }
  if (!(args.gb > 0) || args.steps < 1 || args.every < 1 || args.every > args.steps)
    usage("need --gb > 0, --steps >= 1 and 1 <= --every <= --steps");
  return args;
}

// ---------------------------------------------------------------------------------------------
// The training state

struct ModelShape {
  int64_t layers = 32;
  int64_t vocab = 32000;
  int64_t hidden = 0;
  int64_t kv = 0;   // k/v projection rows (grouped-query attention, 4 query heads per kv head)
  int64_t ffn = 0;

  static ModelShape with_hidden(int64_t hidden) {
    ModelShape s;
    s.hidden = hidden;
    s.kv = hidden / 4;
    s.ffn = (hidden * 8 / 3 + 63) / 64 * 64;
    return s;
  }
  // Bytes of weights + Adam state: bf16 matrices (2 + 4 + 4 bytes per parameter), fp32 norms (12).
  uint64_t state_bytes() const {
    const int64_t d = hidden;
    const int64_t matrices = vocab * d + layers * (d * d + 2 * kv * d + d * d + 3 * ffn * d);
    const int64_t norms = (2 * layers + 1) * d;
    return static_cast<uint64_t>(matrices * 10 + norms * 12);
  }
  // The hidden size (a multiple of 32) whose state comes closest to `bytes`.
  static ModelShape for_bytes(double bytes) {
    ModelShape best = with_hidden(32);
    for (int64_t d = 64; d <= 32768; d += 32) {
      ModelShape s = with_hidden(d);
      if (std::abs(static_cast<double>(s.state_bytes()) - bytes) < std::abs(static_cast<double>(best.state_bytes()) - bytes))
        best = s;
    }
    return best;
  }
};

struct TrainState {
  std::shared_ptr<Value> root;
  std::vector<Storage> storages;  // each distinct storage once: what training reads and writes
  uint64_t bytes = 0;
  size_t tensors = 0;              // tensor leaves in the tree (views and aliases included)
};

Tensor new_tensor(TrainState& state, DType dtype, Dims shape) {
  Tensor tensor = Tensor::empty_cpu(dtype, std::move(shape));
  state.storages.push_back(tensor.storage());
  state.bytes += tensor.storage().nbytes();
  return tensor;
}

TrainState build_state(const ModelShape& m) {
  TrainState state;
  const int64_t d = m.hidden;
  std::vector<std::pair<std::string, Tensor>> params;  // trainable parameters, in optimizer order
  std::vector<int64_t> decay, no_decay;                 // their indices, by param group

  auto add_param = [&](std::string name, Tensor tensor) {
    (tensor.dim() == 1 ? no_decay : decay).push_back(static_cast<int64_t>(params.size()));
    params.emplace_back(std::move(name), std::move(tensor));
  };

  DictEntries model;
  Tensor embed = new_tensor(state, DType::kBF16, {m.vocab, d});
  add_param("model.embed_tokens.weight", embed);
  for (int64_t i = 0; i < m.layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    // q, k and v are views of one fused projection buffer.
    Tensor qkv = new_tensor(state, DType::kBF16, {d + 2 * m.kv, d});
    add_param(p + "self_attn.q_proj.weight", Tensor::contiguous(qkv.storage(), DType::kBF16, {d, d}, 0));
    add_param(p + "self_attn.k_proj.weight", Tensor::contiguous(qkv.storage(), DType::kBF16, {m.kv, d}, d * d));
    add_param(p + "self_attn.v_proj.weight",
              Tensor::contiguous(qkv.storage(), DType::kBF16, {m.kv, d}, d * d + m.kv * d));
    add_param(p + "self_attn.o_proj.weight", new_tensor(state, DType::kBF16, {d, d}));
    add_param(p + "mlp.gate_proj.weight", new_tensor(state, DType::kBF16, {m.ffn, d}));
    add_param(p + "mlp.up_proj.weight", new_tensor(state, DType::kBF16, {m.ffn, d}));
    add_param(p + "mlp.down_proj.weight", new_tensor(state, DType::kBF16, {d, m.ffn}));
    add_param(p + "input_layernorm.weight", new_tensor(state, DType::kF32, {d}));
    add_param(p + "post_attention_layernorm.weight", new_tensor(state, DType::kF32, {d}));
  }
  add_param("model.norm.weight", new_tensor(state, DType::kF32, {d}));
  for (auto& [name, tensor] : params) model.emplace_back(DictKey(name), Value(tensor));
  model.emplace_back(DictKey("lm_head.weight"), Value(embed));  // tied to the embedding

  DictEntries adam_state;
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor& param = params[i].second;
    DictEntries entry;
    entry.emplace_back(DictKey("step"), Value(new_tensor(state, DType::kF32, {})));
    entry.emplace_back(DictKey("exp_avg"), Value(new_tensor(state, DType::kF32, param.shape())));
    entry.emplace_back(DictKey("exp_avg_sq"), Value(new_tensor(state, DType::kF32, param.shape())));
    adam_state.emplace_back(DictKey(static_cast<int64_t>(i)), Value::dict(std::move(entry)));
  }

  auto group = [](const std::vector<int64_t>& indices, double weight_decay) {
    ValueList ids;
    for (int64_t i : indices) ids.emplace_back(i);
    DictEntries g;
    g.emplace_back(DictKey("lr"), Value(3e-4));
    g.emplace_back(DictKey("betas"), Value::tuple([] {
                     ValueList b;
                     b.emplace_back(0.9);
                     b.emplace_back(0.95);
                     return b;
                   }()));
    g.emplace_back(DictKey("eps"), Value(1e-8));
    g.emplace_back(DictKey("weight_decay"), Value(weight_decay));
    g.emplace_back(DictKey("params"), Value::list(std::move(ids)));
    return Value::dict(std::move(g));
  };
  ValueList groups;
  groups.push_back(group(decay, 0.1));
  groups.push_back(group(no_decay, 0.0));

  DictEntries optimizer;
  optimizer.emplace_back(DictKey("state"), Value::dict(std::move(adam_state)));
  optimizer.emplace_back(DictKey("param_groups"), Value::list(std::move(groups)));

  state.tensors = params.size() + 1 + 3 * params.size();
  DictEntries root;
  root.emplace_back(DictKey("model"), Value::dict(std::move(model)));
  root.emplace_back(DictKey("optimizer"), Value::dict(std::move(optimizer)));
  root.emplace_back(DictKey("step"), Value(int64_t{0}));
  state.root = std::make_shared<Value>(Value::dict(std::move(root)));
  return state;
}

// ---------------------------------------------------------------------------------------------
// Fake training: cheap passes over every byte, so a step costs about as much as staging it.

// Non-zero, distinct initial contents.
void initialise(TrainState& state) {
  uint64_t x = 0x9E3779B97F4A7C15ull;
  for (const Storage& storage : state.storages) {
    auto* bytes = static_cast<unsigned char*>(storage.data());
    const size_t n = storage.nbytes();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      const uint64_t word = (x ^ (x >> 29)) | 0x0101010101010101ull;  // no zero byte
      std::memcpy(bytes + i, &word, 8);
    }
    for (; i < n; ++i) bytes[i] = 1;
  }
}

// "Forward/backward": reads every weight (allowed while staging runs).
uint64_t forward_backward(const TrainState& state) {
  uint64_t sum = 0;
  for (const Storage& storage : state.storages) {
    const auto* bytes = static_cast<const unsigned char*>(storage.data());
    const size_t n = storage.nbytes();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t word;
      std::memcpy(&word, bytes + i, 8);
      sum += word;
    }
    for (; i < n; ++i) sum += bytes[i];
  }
  return sum;
}

// "Optimizer step": rewrites every byte of every tensor.
void optimizer_step(TrainState& state, int step) {
  const uint64_t add = 0x0101010101010101ull * static_cast<uint64_t>(step % 254 + 1);
  for (const Storage& storage : state.storages) {
    auto* bytes = static_cast<unsigned char*>(storage.data());
    const size_t n = storage.nbytes();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t word;
      std::memcpy(&word, bytes + i, 8);
      word += add;
      std::memcpy(bytes + i, &word, 8);
    }
    for (; i < n; ++i) bytes[i] = static_cast<unsigned char>(bytes[i] + 1);
  }
}

// ---------------------------------------------------------------------------------------------
// Verification

// A byte copy of every storage, keyed by storage identity, plus the tree (scalars by value).
struct Snapshot {
  int step = 0;
  Value tree;
  std::unordered_map<const StorageImpl*, std::vector<unsigned char>> bytes;
};

Snapshot take_snapshot(const TrainState& state, int step) {
  Snapshot snap;
  snap.step = step;
  snap.tree = state.root->clone();
  for (const Storage& storage : state.storages) {
    const auto* data = static_cast<const unsigned char*>(storage.data());
    snap.bytes.emplace(storage.identity(), std::vector<unsigned char>(data, data + storage.nbytes()));
  }
  return snap;
}

// Compares a copy of the state (the loaded checkpoint) with the snapshot: structure, scalars,
// tensor metadata and bytes, and that the copy's storages are shared exactly where the trainer's
// are (q/k/v views of one fused buffer, lm_head tied to the embedding).
class Verifier {
 public:
  explicit Verifier(const Snapshot& snapshot) : snapshot_(snapshot) {}

  size_t run(const Value& copy) {
    walk(snapshot_.tree, copy, "");
    if (copy_to_source_.size() != snapshot_.bytes.size())
      fail("", std::to_string(copy_to_source_.size()) + " storages in the copy for " +
                   std::to_string(snapshot_.bytes.size()) + " in the trainer's state");
    return failures_;
  }
  size_t tensors() const { return tensors_; }
  size_t shared_views() const { return tensors_ - copy_to_source_.size(); }

 private:
  void fail(const std::string& path, const std::string& what) {
    if (++failures_ <= 10) std::printf("      MISMATCH at '%s': %s\n", path.c_str(), what.c_str());
  }

  void walk(const Value& source, const Value& copy, const std::string& path) {
    if (source.kind() != copy.kind())
      return fail(path, std::string("kind ") + Value::kind_name(copy.kind()) + " != " + Value::kind_name(source.kind()));
    switch (source.kind()) {
      case Value::Kind::kNone: return;
      case Value::Kind::kBool: if (source.as_bool() != copy.as_bool()) fail(path, "bool differs"); return;
      case Value::Kind::kInt: if (source.as_int() != copy.as_int()) fail(path, "int differs"); return;
      case Value::Kind::kDouble: if (source.as_double() != copy.as_double()) fail(path, "double differs"); return;
      case Value::Kind::kString: if (source.as_string() != copy.as_string()) fail(path, "string differs"); return;
      case Value::Kind::kBytes: if (!(source.as_bytes() == copy.as_bytes())) fail(path, "bytes differ"); return;
      case Value::Kind::kTensor: return tensor(source.as_tensor(), copy.as_tensor(), path);
      case Value::Kind::kList:
      case Value::Kind::kTuple:
        if (source.size() != copy.size()) return fail(path, "length differs");
        for (size_t i = 0; i < source.size(); ++i) {
          std::string child = path;
          append_index_path(child, i);
          walk(source.items()[i], copy.items()[i], child);
        }
        return;
      case Value::Kind::kDict:
        if (source.size() != copy.size()) return fail(path, "entry count differs");
        for (size_t i = 0; i < source.size(); ++i) {
          const auto& [key, value] = source.entries()[i];
          std::string child = path;
          append_key_path(child, key);
          if (!(copy.entries()[i].first == key)) return fail(child, "key differs or is out of order");
          walk(value, copy.entries()[i].second, child);
        }
        return;
      case Value::Kind::kSharded: {  // the demo's state has none; compare the chunks if one appears
        const auto& a = source.as_sharded().chunks;
        const auto& b = copy.as_sharded().chunks;
        if (a.size() != b.size()) return fail(path, "chunk count differs");
        for (size_t i = 0; i < a.size(); ++i) tensor(a[i].data, b[i].data, path + " chunk " + std::to_string(i));
        return;
      }
    }
  }

  void tensor(const Tensor& source, const Tensor& copy, const std::string& path) {
    ++tensors_;
    if (!copy.device().is_cpu()) return fail(path, "the tensor is not on the CPU");
    if (copy.dtype() != source.dtype() || !(copy.shape() == source.shape()) ||
        !(copy.strides() == source.strides()) || copy.storage_offset() != source.storage_offset())
      return fail(path, "metadata differs: " + copy.describe() + " vs " + source.describe());
    const StorageImpl* src = source.storage().identity();
    const StorageImpl* dst = copy.storage().identity();
    if (src == dst) return fail(path, "the tensor shares the trainer's storage (not a copy)");
    // Views of one source storage must share one storage in the copy, and only those.
    auto [to, inserted_to] = source_to_copy_.emplace(src, dst);
    auto [from, inserted_from] = copy_to_source_.emplace(dst, src);
    if (to->second != dst) fail(path, "views of one trainer storage landed in different storages");
    if (from->second != src) fail(path, "distinct trainer storages share one storage");
    const auto [begin, end] = source.byte_extent();
    if (end > copy.storage().nbytes()) return fail(path, "the storage is too small");
    const std::vector<unsigned char>& expected = snapshot_.bytes.at(src);
    if (std::memcmp(static_cast<const unsigned char*>(copy.storage().data()) + begin, expected.data() + begin,
                    end - begin) != 0)
      fail(path, "bytes differ from the snapshot taken at the save");
  }

  const Snapshot& snapshot_;
  std::unordered_map<const StorageImpl*, const StorageImpl*> source_to_copy_;
  std::unordered_map<const StorageImpl*, const StorageImpl*> copy_to_source_;
  size_t tensors_ = 0;
  size_t failures_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Saves

struct Save {
  int step = 0;
  std::string path;
  Clock::time_point submitted;         // save() called
  double blocked_ms = 0;               // from save() until the staged future was ready
  Future<WriteStats> written;
  std::shared_future<Clock::time_point> done_at;  // stamped by the thread that completes the write
  bool reported = false;
  bool committed = false;
  double commit_ms = 0;                // from save() until the write future was ready
  double writer_ms = 0;                // the writer's own time for it (WriteStats::seconds_total)
  uint64_t bytes_written = 0;
};

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

double gb_per_s(uint64_t bytes, double ms) { return ms > 0 ? static_cast<double>(bytes) / 1e9 / (ms / 1e3) : 0; }

// A fresh directory for the demo's checkpoints: under $FASTDCP_DEMO_DIR, else /tmp.
std::string make_checkpoint_dir() {
  const char* base = std::getenv("FASTDCP_DEMO_DIR");
  std::string pattern = std::string(base && *base ? base : "/tmp") + "/fastdcp_demo_XXXXXX";
  std::filesystem::create_directories(std::filesystem::path(pattern).parent_path());
  if (!::mkdtemp(pattern.data())) throw std::runtime_error("cannot create a directory from " + pattern);
  return pattern;
}

// Removes the demo's directory however run() ends.
struct RemoveDir {
  std::string dir;
  ~RemoveDir() {
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);
  }
};

// The newest step_* directory under `dir` whose manifest reads back: the latest committed one.
std::optional<std::pair<int, std::string>> latest_committed(const std::string& dir) {
  std::vector<std::pair<int, std::string>> found;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_directory() || name.rfind("step_", 0) != 0) continue;
    char* end = nullptr;
    const long step = std::strtol(name.c_str() + 5, &end, 10);
    if (end != name.c_str() + 5 && *end == '\0') found.emplace_back(static_cast<int>(step), entry.path().string());
  }
  std::sort(found.rbegin(), found.rend());
  for (const auto& candidate : found) {
    try {
      read_manifest(candidate.second);
      return candidate;
    } catch (const std::exception&) {
      // not committed (or damaged): try the one before
    }
  }
  return std::nullopt;
}

int run(const Args& args) {
  const ModelShape shape = ModelShape::for_bytes(args.gb * 1e9);
  TrainState state = build_state(shape);
  initialise(state);

  const std::string dir = make_checkpoint_dir();
  const RemoveDir remove_dir{dir};

  // Staging left to make_async_checkpointer: async, into shared memory (which the writer process
  // maps), pinned with non-blocking device-to-host copies only where CUDA is available.
  auto cuda = CudaRuntime::instance();
  const bool gpu = cuda->available();
  CheckpointerOptions options;
  options.writer.overwrite = false;  // every save is a new step_<NNNNN> directory
  std::unique_ptr<AsyncCheckpointer> ckpt = make_async_checkpointer(options);

  std::printf("state: %.3f GB in %zu tensors (%zu storages): hidden %lld, ffn %lld, %lld layers, vocab %lld\n",
              state.bytes / 1e9, state.tensors, state.storages.size(), static_cast<long long>(shape.hidden),
              static_cast<long long>(shape.ffn), static_cast<long long>(shape.layers),
              static_cast<long long>(shape.vocab));
  std::printf("checkpointer: make_async_checkpointer, writes in the fastdcp-writer process, up to %d saves in "
              "flight; staging async into shared memory, pinned %s, non-blocking copies %s (%s)\n",
              options.max_pending_saves, gpu ? "on" : "off", gpu ? "on" : "off",
              gpu ? "CUDA available" : cuda->unavailable_reason().c_str());
  std::printf("checkpoints: every %d of %d steps into %s/step_<NNNNN>\n", args.every, args.steps, dir.c_str());

  std::vector<Save> saves;
  saves.reserve(static_cast<size_t>(args.steps / args.every));
  const int last_save_step = args.steps / args.every * args.every;
  std::optional<Snapshot> snapshot;  // the state as staged by the last save
  int buffer_sets = 0;               // sets of staging buffers allocated so far (estimated)
  std::vector<double> step_ms;
  std::vector<bool> busy;            // whether a checkpoint write was in flight during the step
  int failures = 0;
  volatile uint64_t sink = 0;

  auto writing = [&] {
    return std::any_of(saves.begin(), saves.end(), [](const Save& s) { return !s.written.ready(); });
  };
  // Prints a line for each write that finished since the last call, in save order.
  auto report_commits = [&] {
    for (Save& save : saves) {
      if (save.reported || !save.written.ready()) continue;
      save.reported = true;
      const Clock::time_point done = save.done_at.get();  // the stamp follows ready() closely
      save.commit_ms = ms_between(save.submitted, done);
      if (auto error = save.written.error()) {
        ++failures;
        try {
          std::rethrow_exception(error);
        } catch (const std::exception& e) {
          std::printf("  save @ step %4d: write FAILED: %s\n", save.step, e.what());
        }
        continue;
      }
      const WriteStats& stats = save.written.get();
      save.committed = true;
      save.writer_ms = stats.seconds_total * 1e3;
      save.bytes_written = stats.bytes_written;
      std::printf("  save @ step %4d: committed %8.1f ms after save(), %.2f GB/s (in the writer: %.1f ms to write, "
                  "sync and commit, %.2f GB/s)\n",
                  save.step, save.commit_ms, gb_per_s(save.bytes_written, save.commit_ms), save.writer_ms,
                  gb_per_s(save.bytes_written, save.writer_ms));
    }
  };

  std::printf("\n%5s %9s   (w: a checkpoint write was in flight)\n", "step", "step ms");
  for (int step = 1; step <= args.steps; ++step) {
    const bool writing_before = writing();
    const auto start = Clock::now();
    sink = sink + forward_backward(state);
    optimizer_step(state, step);
    *state.root->find("step") = Value(int64_t{step});
    step_ms.push_back(ms_between(start, Clock::now()));
    busy.push_back(writing_before || writing());
    std::printf("%5d %9.1f %c", step, step_ms.back(), busy.back() ? 'w' : ' ');

    if (step % args.every == 0) {
      char name[32];
      std::snprintf(name, sizeof name, "step_%05d", step);
      // Note [Staging leases]: the buffers of saves still writing are held, so this save stages
      // into free ones; more sets in use than ever before means fresh memory, whose first touch
      // costs more than the copy. With max_pending_saves in flight, save() first waits for the
      // oldest write (Note [Saves in flight]).
      const int in_flight = static_cast<int>(
          std::count_if(saves.begin(), saves.end(), [](const Save& s) { return !s.written.ready(); }));
      const bool back_pressure = in_flight >= options.max_pending_saves;
      const int sets_needed = std::min(in_flight, options.max_pending_saves - 1) + 1;
      const bool fresh_buffers = sets_needed > buffer_sets;
      buffer_sets = std::max(buffer_sets, sets_needed);

      Save& save = saves.emplace_back();
      save.step = step;
      save.path = join_path(dir, name);
      save.submitted = Clock::now();
      auto [staged, written] = ckpt->save(save.path, state.root);
      const double call_ms = ms_between(save.submitted, Clock::now());
      auto done = std::make_shared<std::promise<Clock::time_point>>();
      save.done_at = done->get_future().share();
      written.on_ready([done](const Future<WriteStats>&) { done->set_value(Clock::now()); });
      save.written = std::move(written);
      staged.get();  // training may change its tensors once staging is done (rethrows its failure)
      save.blocked_ms = ms_between(save.submitted, Clock::now());
      std::printf("   save: blocked %7.1f ms (median step %.1f ms so far, %.3f GB staged", save.blocked_ms,
                  median(step_ms), state.bytes / 1e9);
      if (fresh_buffers) std::printf("; into new staging buffers");
      if (back_pressure) std::printf("; %.1f ms waiting for an earlier write", call_ms);
      std::printf(")");
      // The reference for the verification at the end: the state as this save staged it (not
      // part of any timed step).
      if (step == last_save_step) snapshot = take_snapshot(state, step);
    }
    std::printf("\n");
    std::fflush(stdout);
    report_commits();
    std::fflush(stdout);
  }

  const auto drain_start = Clock::now();
  for (const Save& save : saves) save.written.wait();
  const double drain_ms = ms_between(drain_start, Clock::now());
  report_commits();
  std::printf("  (waited %.1f ms after the last step for the writes in flight)\n", drain_ms);

  // Training moves on; the checkpoint must not.
  optimizer_step(state, args.steps + 1);

  // ---- restore from the latest committed checkpoint ---------------------------------------------
  const auto latest = latest_committed(dir);
  std::optional<double> load_ms;
  if (!latest) {
    ++failures;
    std::printf("FAIL: no committed checkpoint under %s\n", dir.c_str());
  } else {
    const auto& [step, path] = *latest;
    std::printf("\nrestoring from %s (latest committed, step %d)\n", path.c_str(), step);
    try {
      const auto t = Clock::now();
      const Value loaded = ckpt->load(path);
      load_ms = ms_between(t, Clock::now());
      std::printf("loaded %.3f GB in %.1f ms (%.2f GB/s), checksums verified\n", state.bytes / 1e9, *load_ms,
                  gb_per_s(state.bytes, *load_ms));
      if (!snapshot || snapshot->step != step) {
        ++failures;
        std::printf("FAIL: the latest committed checkpoint is of step %d, not of the last save (step %d), whose "
                    "snapshot is the only one kept\n",
                    step, last_save_step);
      } else {
        Verifier verifier(*snapshot);
        const size_t mismatches = verifier.run(loaded);
        if (mismatches != 0) {
          ++failures;
          std::printf("FAIL: the loaded state dict differs from the trainer's state at step %d (%zu mismatches)\n",
                      step, mismatches);
        } else {
          std::printf("PASS: the loaded state dict equals the trainer's state at step %d, byte for byte in %zu "
                      "tensors; %zu views/aliases share storages as in the trainer\n",
                      step, verifier.tensors(), verifier.shared_views());
        }
      }
    } catch (const std::exception& e) {
      ++failures;
      std::printf("FAIL: loading %s: %s\n", path.c_str(), e.what());
    }
  }
  ckpt->close();

  // ---- summary ------------------------------------------------------------------------------------
  std::vector<double> blocked, commit, writer, quiet, loaded_steps;
  uint64_t bytes_written = 0;
  double blocked_max = 0;
  int committed = 0;
  for (const Save& save : saves) {
    blocked.push_back(save.blocked_ms);
    blocked_max = std::max(blocked_max, save.blocked_ms);
    if (save.committed) {
      ++committed;
      commit.push_back(save.commit_ms);
      writer.push_back(save.writer_ms);
      bytes_written = save.bytes_written;
    }
  }
  for (size_t i = 0; i < step_ms.size(); ++i) (busy[i] ? loaded_steps : quiet).push_back(step_ms[i]);
  const double step_median = median(step_ms);
  std::printf("\nsummary: %zu saves of %.3f GB (%d committed)\n", saves.size(), state.bytes / 1e9, committed);
  auto median_of = [](const std::vector<double>& v) {
    char text[32] = "-";
    if (!v.empty()) std::snprintf(text, sizeof text, "%.1f ms", median(v));
    return std::string(text);
  };
  std::printf("  step time:       median %.1f ms (%s without a write in flight (%zu steps), %s with one (%zu steps))\n",
              step_median, median_of(quiet).c_str(), quiet.size(), median_of(loaded_steps).c_str(),
              loaded_steps.size());
  std::printf("  save blocking:   median %.1f ms, max %.1f ms (%.1f%% of a median step; in all, %.1f%% on top "
              "of the time spent in steps, one save every %d steps)\n",
              median(blocked), blocked_max, median(blocked) / step_median * 100,
              std::accumulate(blocked.begin(), blocked.end(), 0.0) /
                  std::accumulate(step_ms.begin(), step_ms.end(), 0.0) * 100,
              args.every);
  if (!commit.empty()) {
    std::printf("  commit:          median %.1f ms after save(), write throughput %.2f GB/s (in the writer: "
                "median %.1f ms, %.2f GB/s)\n",
                median(commit), gb_per_s(bytes_written, median(commit)), median(writer),
                gb_per_s(bytes_written, median(writer)));
  }
  if (load_ms) std::printf("  load:            %.1f ms (%.2f GB/s)\n", *load_ms, gb_per_s(state.bytes, *load_ms));
  if (failures == 0) {
    std::printf("staging_demo: PASS\n");
  } else {
    std::printf("staging_demo: FAIL (%d checks)\n", failures);
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  try {
    return run(args);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "staging_demo: %s\n", e.what());
    return 1;
  }
}
