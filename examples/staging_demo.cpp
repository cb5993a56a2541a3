// staging_demo: a fake training job that checkpoints its state through DefaultStager.
//
// The state is shaped like a Llama model trained with Adam: ~290 weights (bf16 matrices, fp32
// norms), with q/k/v as views of one fused buffer per layer and lm_head tied to the embedding, plus
// the optimizer's state (two fp32 moments and a step per parameter, keyed by parameter index),
// param_groups and the global step. Every step reads all weights ("forward/backward") and then
// rewrites them ("optimizer step"); every --every steps the state is staged asynchronously.
//
// As upstream requires, the optimizer step waits for a pending staging future before it mutates,
// so staging overlaps the next forward/backward. At the end the last staged copy is compared byte
// by byte with a snapshot of the state taken at that save, after training moved the source on;
// then that copy is written as a committed checkpoint, loaded back and verified again.
//
//   staging_demo [--gb 1.5] [--steps 20] [--every 5]

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
#include <stdexcept>
#include <future>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "fastdcp/checkpoint/checkpoint.h"
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
  double gb = 1.5;
  int steps = 20;
  int every = 5;
};

[[noreturn]] void usage(const char* message) {
  std::fprintf(stderr, "%s\nusage: staging_demo [--gb <size, GB, default 1.5>] [--steps <n, default 20>] "
                       "[--every <n, default 5>]\n", message);
  std::exit(2);
}

Args parse_args(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") usage("staging_demo: a fake training loop that stages checkpoints");
    if (i + 1 >= argc) usage(("missing value for " + flag).c_str());
    const char* value = argv[++i];
    char* end = nullptr;
    if (flag == "--gb") {
      args.gb = std::strtod(value, &end);
    } else if (flag == "--steps") {
      args.steps = static_cast<int>(std::strtol(value, &end, 10));
    } else if (flag == "--every") {
      args.every = static_cast<int>(std::strtol(value, &end, 10));
    } else {
      usage(("unknown flag " + flag).c_str());
    }
    if (end == value || *end != '\0') usage(("bad value for " + flag + ": " + value).c_str());
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
// Saves

struct Save {
  int number = 0;
  int step = 0;
  Clock::time_point submitted;
  double submit_ms = 0;   // how long stage() blocked the training thread
  double staged_ms = 0;   // from stage() until the staged copy was complete
  double waited_ms = 0;   // how long the optimizer step waited for it
  double step_ms = -1;    // the step that staging overlapped (-1: none, it was the last)
  Future<Value> future;
  std::shared_ptr<std::promise<Clock::time_point>> done;  // set by the completing thread
};

// A byte copy of every storage, keyed by storage identity, plus the tree (scalars by value).
struct Snapshot {
  Value tree;
  std::unordered_map<const StorageImpl*, std::vector<unsigned char>> bytes;
};

// A fresh directory for the demo's checkpoint: under $FASTDCP_DEMO_DIR, else the temp directory.
std::string make_checkpoint_dir() {
  const char* base = std::getenv("FASTDCP_DEMO_DIR");
  std::string pattern = std::string(base ? base : "/tmp") + "/fastdcp_demo_XXXXXX";
  if (!::mkdtemp(pattern.data())) throw std::runtime_error("cannot create a directory from " + pattern);
  return pattern;
}

Snapshot take_snapshot(const TrainState& state) {
  Snapshot snap;
  snap.tree = state.root->clone();
  for (const Storage& storage : state.storages) {
    const auto* data = static_cast<const unsigned char*>(storage.data());
    snap.bytes.emplace(storage.identity(), std::vector<unsigned char>(data, data + storage.nbytes()));
  }
  return snap;
}

// Compares the staged tree with the snapshot: structure, scalars, tensor metadata and bytes, and
// that staged buffers are shared exactly where the source's storages are.
class Verifier {
 public:
  explicit Verifier(const Snapshot& snapshot) : snapshot_(snapshot) {}

  size_t run(const Value& staged) {
    walk(snapshot_.tree, staged, "");
    if (staged_to_source_.size() != snapshot_.bytes.size())
      fail("", std::to_string(staged_to_source_.size()) + " staged buffers for " +
                   std::to_string(snapshot_.bytes.size()) + " source storages");
    return failures_;
  }
  size_t tensors() const { return tensors_; }
  size_t shared_views() const { return tensors_ - staged_to_source_.size(); }

 private:
  void fail(const std::string& path, const std::string& what) {
    if (++failures_ <= 10) std::fprintf(stderr, "MISMATCH at '%s': %s\n", path.c_str(), what.c_str());
  }

  void walk(const Value& source, const Value& staged, const std::string& path) {
    if (source.kind() != staged.kind())
      return fail(path, std::string("kind ") + Value::kind_name(staged.kind()) + " != " + Value::kind_name(source.kind()));
    switch (source.kind()) {
      case Value::Kind::kNone: return;
      case Value::Kind::kBool: if (source.as_bool() != staged.as_bool()) fail(path, "bool differs"); return;
      case Value::Kind::kInt: if (source.as_int() != staged.as_int()) fail(path, "int differs"); return;
      case Value::Kind::kDouble: if (source.as_double() != staged.as_double()) fail(path, "double differs"); return;
      case Value::Kind::kString: if (source.as_string() != staged.as_string()) fail(path, "string differs"); return;
      case Value::Kind::kBytes: if (!(source.as_bytes() == staged.as_bytes())) fail(path, "bytes differ"); return;
      case Value::Kind::kTensor: return tensor(source.as_tensor(), staged.as_tensor(), path);
      case Value::Kind::kList:
      case Value::Kind::kTuple:
        if (source.size() != staged.size()) return fail(path, "length differs");
        for (size_t i = 0; i < source.size(); ++i) {
          std::string child = path;
          append_index_path(child, i);
          walk(source.items()[i], staged.items()[i], child);
        }
        return;
      case Value::Kind::kDict:
        if (source.size() != staged.size()) return fail(path, "entry count differs");
        for (size_t i = 0; i < source.size(); ++i) {
          const auto& [key, value] = source.entries()[i];
          std::string child = path;
          append_key_path(child, key);
          if (!(staged.entries()[i].first == key)) return fail(child, "key differs or is out of order");
          walk(value, staged.entries()[i].second, child);
        }
        return;
    }
  }

  void tensor(const Tensor& source, const Tensor& staged, const std::string& path) {
    ++tensors_;
    if (!staged.device().is_cpu()) return fail(path, "staged tensor is not on the CPU");
    if (staged.dtype() != source.dtype() || !(staged.shape() == source.shape()) ||
        !(staged.strides() == source.strides()) || staged.storage_offset() != source.storage_offset())
      return fail(path, "metadata differs: " + staged.describe() + " vs " + source.describe());
    const StorageImpl* src = source.storage().identity();
    const StorageImpl* dst = staged.storage().identity();
    if (src == dst) return fail(path, "staged tensor shares the source's storage (not a copy)");
    // Views of one source storage must share one staged buffer, and only those.
    auto [to, inserted_to] = source_to_staged_.emplace(src, dst);
    auto [from, inserted_from] = staged_to_source_.emplace(dst, src);
    if (to->second != dst) fail(path, "views of one source storage landed in different staged buffers");
    if (from->second != src) fail(path, "distinct source storages share one staged buffer");
    const auto [begin, end] = source.byte_extent();
    if (end > staged.storage().nbytes()) return fail(path, "staged storage is too small");
    const std::vector<unsigned char>& expected = snapshot_.bytes.at(src);
    if (std::memcmp(static_cast<const unsigned char*>(staged.storage().data()) + begin, expected.data() + begin,
                    end - begin) != 0)
      fail(path, "bytes differ from the snapshot taken at the save");
  }

  const Snapshot& snapshot_;
  std::unordered_map<const StorageImpl*, const StorageImpl*> source_to_staged_;
  std::unordered_map<const StorageImpl*, const StorageImpl*> staged_to_source_;
  size_t tensors_ = 0;
  size_t failures_ = 0;
};

void print_save(const Save& save, uint64_t bytes) {
  char step_time[32] = "-";
  if (save.step_ms >= 0) std::snprintf(step_time, sizeof step_time, "%.1f ms", save.step_ms);
  std::printf("save %d @ step %3d: stage() blocked %8.3f ms | staged in %8.1f ms (%5.2f GB/s) | "
              "optimizer waited %7.1f ms | overlapped step %s\n",
              save.number, save.step, save.submit_ms, save.staged_ms, bytes / 1e9 / (save.staged_ms / 1e3),
              save.waited_ms, step_time);
}

std::string median_ms(std::vector<double> v) {
  if (v.empty()) return "-";
  std::sort(v.begin(), v.end());
  const double m = v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
  char text[32];
  std::snprintf(text, sizeof text, "%.1f ms", m);
  return text;
}

int run(const Args& args) {
  const ModelShape shape = ModelShape::for_bytes(args.gb * 1e9);
  TrainState state = build_state(shape);
  initialise(state);

  auto cuda = CudaRuntime::instance();
  const bool gpu = cuda->available();
  StagingOptions options;
  options.use_async_staging = true;
  options.use_shared_memory = true;
  options.use_pinned_memory = gpu;  // pinning and non-blocking copies need CUDA
  options.use_non_blocking_copy = gpu;
  DefaultStager stager(options, cuda);

  std::printf("state: %.3f GB in %zu tensors (%zu storages): hidden %lld, ffn %lld, %lld layers, vocab %lld\n",
              state.bytes / 1e9, state.tensors, state.storages.size(), static_cast<long long>(shape.hidden),
              static_cast<long long>(shape.ffn), static_cast<long long>(shape.layers),
              static_cast<long long>(shape.vocab));
  std::printf("stager: async, shared memory, pinned %s, non-blocking %s (%s)\n", gpu ? "on" : "off",
              gpu ? "on" : "off", gpu ? "CUDA available" : cuda->unavailable_reason().c_str());
  std::printf("training: %d steps, staging every %d\n\n", args.steps, args.every);

  const int last_save_step = args.steps / args.every * args.every;
  std::vector<Save> saves;
  Save* pending = nullptr;  // the save whose staging may still be running
  Save* overlapped = nullptr;  // the save whose staging ran during the current step
  Value staged;             // the latest staged tree
  Snapshot snapshot;        // the source at the last save
  std::vector<double> quiet_steps;  // step times with no staging in flight
  saves.reserve(static_cast<size_t>(args.steps / args.every));
  volatile uint64_t sink = 0;

  // Waits for the pending save (upstream's contract before mutating the state again); returns the
  // time spent in bookkeeping that is not training (the snapshot), to leave out of step times.
  auto finish_pending = [&]() -> double {
    if (!pending) return 0;
    const auto wait_start = Clock::now();
    const Clock::time_point done = pending->done->get_future().get();
    staged = pending->future.take();  // rethrows a staging failure
    pending->waited_ms = ms_between(wait_start, Clock::now());
    pending->staged_ms = ms_between(pending->submitted, done);
    double excluded = 0;
    if (pending->step == last_save_step) {
      const auto t = Clock::now();
      snapshot = take_snapshot(state);
      excluded = ms_between(t, Clock::now());
    }
    pending = nullptr;
    return excluded;
  };

  for (int step = 1; step <= args.steps; ++step) {
    const auto start = Clock::now();
    sink = sink + forward_backward(state);
    const double excluded = finish_pending();
    optimizer_step(state, step);
    *state.root->find("step") = Value(int64_t{step});
    if (step % args.every == 0) {
      Save& save = saves.emplace_back();
      save.number = static_cast<int>(saves.size());
      save.step = step;
      save.done = std::make_shared<std::promise<Clock::time_point>>();
      save.submitted = Clock::now();
      save.future = stager.stage(state.root);
      save.submit_ms = ms_between(save.submitted, Clock::now());
      // The completing thread stamps the time; Future::wait may return a moment before it runs.
      save.future.on_ready([done = save.done](const Future<Value>&) { done->set_value(Clock::now()); });
      pending = &save;
    }
    const double step_ms = ms_between(start, Clock::now()) - excluded;
    if (overlapped) {
      overlapped->step_ms = step_ms;
      print_save(*overlapped, state.bytes);
      overlapped = nullptr;
    } else if (pending == nullptr || pending->step != step) {
      quiet_steps.push_back(step_ms);
    }
    if (pending) overlapped = pending;
  }
  finish_pending();
  if (overlapped) print_save(*overlapped, state.bytes);

  // Training moves on; the staged copy must not.
  optimizer_step(state, args.steps + 1);

  double blocked_max = 0, blocked_sum = 0, staged_sum = 0, waited_sum = 0;
  std::vector<double> save_steps;
  for (const Save& save : saves) {
    blocked_max = std::max(blocked_max, save.submit_ms);
    blocked_sum += save.submit_ms;
    staged_sum += save.staged_ms;
    waited_sum += save.waited_ms;
    if (save.step_ms >= 0) save_steps.push_back(save.step_ms);
  }
  const double n = static_cast<double>(saves.size());
  const StagerStats stats = stager.stats();
  std::printf("\nsummary: %zu saves of %.3f GB: stage() blocked %.3f ms avg (%.3f max), staged in %.1f ms avg "
              "(%.2f GB/s), optimizer waited %.1f ms in total; median step %s quiet, %s with staging in flight; "
              "cache %llu hits / %llu misses\n",
              saves.size(), state.bytes / 1e9, blocked_sum / n, blocked_max, staged_sum / n,
              state.bytes / 1e9 / (staged_sum / n / 1e3), waited_sum, median_ms(quiet_steps).c_str(),
              median_ms(save_steps).c_str(),
              static_cast<unsigned long long>(stats.cache_hits), static_cast<unsigned long long>(stats.cache_misses));

  Verifier verifier(snapshot);
  const size_t failures = verifier.run(staged);
  if (failures != 0) {
    std::printf("verification FAILED: %zu mismatches\n", failures);
    return 1;
  }
  std::printf("verified OK: save %d (step %d) matches its snapshot byte for byte in %zu tensors; "
              "%zu views/aliases share staged buffers as in the source\n",
              saves.back().number, saves.back().step, verifier.tensors(), verifier.shared_views());

  // The staged copy goes to disk as a committed checkpoint, is loaded back and verified again:
  // the round trip a restart takes.
  const std::string dir = make_checkpoint_dir();
  const std::string path = join_path(dir, "step_" + std::to_string(saves.back().step));
  auto t = Clock::now();
  const WriteStats written = CheckpointWriter().write(path, staged);
  const double write_ms = ms_between(t, Clock::now());
  t = Clock::now();
  const Value loaded = CheckpointReader().read(path);
  const double read_ms = ms_between(t, Clock::now());
  Verifier loaded_verifier(snapshot);
  const size_t load_failures = loaded_verifier.run(loaded);
  std::filesystem::remove_all(dir);
  std::printf("checkpoint: written and committed in %.1f ms (%.2f GB/s, %s), loaded back in %.1f ms (%.2f GB/s), "
              "checksums verified\n",
              write_ms, static_cast<double>(written.bytes_written) / 1e9 / (write_ms / 1e3), written.file.c_str(),
              read_ms, static_cast<double>(written.bytes_written) / 1e9 / (read_ms / 1e3));
  if (load_failures != 0) {
    std::printf("verification of the loaded checkpoint FAILED: %zu mismatches\n", load_failures);
    return 1;
  }
  std::printf("verified OK: the loaded checkpoint matches the snapshot byte for byte, views and aliases included\n");
  stager.close();
  return 0;
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
