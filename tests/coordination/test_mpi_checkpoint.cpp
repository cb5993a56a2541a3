// MpiBarrier and CheckpointWriter on 4 MPI ranks; run by ctest (label mpi) as
//   mpirun -np 4 --oversubscribe test_mpi
// Its own main(): every rank runs the same scenarios, in the same order, making the same
// collective calls whatever a check finds, so that a failing check fails the test instead of
// hanging it. A check that fails is reported with its rank; an unexpected exception aborts the
// job (MPI_Abort), since the other ranks would wait for the failed one.

#include <mpi.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <sstream>
#include <string>
#include <thread>

#include "fastdcp/checkpoint/checkpoint.h"
#include "fastdcp/common/error.h"
#include "fastdcp/coordination/mpi_barrier.h"

namespace fastdcp {
namespace {

constexpr int kRanks = 4;
int g_rank = 0;
int g_failures = 0;

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "[rank %d] FAILED: %s\n", g_rank, what.c_str());
    std::fflush(stderr);
  }
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

void report(const std::string& line) {
  std::printf("[rank %d] %s\n", g_rank, line.c_str());
  std::fflush(stdout);
}

Tensor filled(DType dtype, Dims shape, int seed) {
  Tensor t = Tensor::empty_cpu(dtype, std::move(shape));
  auto* bytes = static_cast<unsigned char*>(t.data_ptr());
  for (uint64_t i = 0; i < t.nbytes(); ++i) bytes[i] = static_cast<unsigned char>(i * 7 + seed * 31);
  return t;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && a.nbytes() == b.nbytes() &&
         std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()) == 0;
}

// Rank `r`'s state dict: different shapes and contents on every rank.
Value state(int r) {
  Value model = Value::dict();
  model.insert("w", Value(filled(DType::kF32, {16, 8 + r}, r)));
  model.insert("b", Value(filled(DType::kBF16, {1000 + 100 * r}, r + 1)));
  model.insert("big", Value(filled(DType::kU8, {(1 << 20) + r}, r + 2)));
  Value moments = Value::dict();
  moments.insert("exp_avg", Value(filled(DType::kF32, {8, 8}, r + 3)));
  moments.insert("count", Value(int64_t{10 * r}));
  Value optim = Value::dict();
  optim.insert("state", std::move(moments));
  optim.insert("name", Value("adam on rank " + std::to_string(r)));
  Value root = Value::dict();
  root.insert("model", std::move(model));
  root.insert("optim", std::move(optim));
  root.insert("step", Value(int64_t{100 + r}));
  return root;
}

// Whether `loaded` is rank r's state dict; names the first difference in `why`.
bool is_state_of(const Value& loaded, int r, std::string& why) {
  const Value expected = state(r);
  for (const char* key : {"w", "b", "big"}) {
    if (!same_bytes(loaded.at("model").at(key).as_tensor(), expected.at("model").at(key).as_tensor())) {
      why = std::string("model.") + key + " differs";
      return false;
    }
  }
  const Value& moments = loaded.at("optim").at("state");
  if (!same_bytes(moments.at("exp_avg").as_tensor(), expected.at("optim").at("state").at("exp_avg").as_tensor())) {
    why = "optim.state.exp_avg differs";
    return false;
  }
  if (moments.at("count").as_int() != 10 * r) why = "optim.state.count is " + std::to_string(moments.at("count").as_int());
  if (loaded.at("optim").at("name").as_string() != "adam on rank " + std::to_string(r)) why = "optim.name differs";
  if (loaded.at("step").as_int() != 100 + r) why = "step is " + std::to_string(loaded.at("step").as_int());
  return why.empty();
}

template <class F>
std::string error_of(F&& f, ErrorCode* code = nullptr) {
  try {
    f();
  } catch (const Error& e) {
    if (code) *code = e.code();
    return e.what();
  }
  return "";
}

// Rank 0 makes a fresh directory; every rank gets its path.
std::string shared_temp_dir() {
  char path[4096] = {};
  if (g_rank == 0) {
    std::strcpy(path, "/tmp/fastdcp_mpi_XXXXXX");
    if (::mkdtemp(path) == nullptr) throw Error(ErrorCode::kIoError, "mkdtemp failed");
  }
  MPI_Bcast(path, sizeof(path), MPI_CHAR, 0, MPI_COMM_WORLD);
  return path;
}

// Before MPI_Init: both entry points say that MPI must be initialized first.
void before_init() {
  ErrorCode code{};
  const std::string e = error_of([] { MpiBarrier barrier(MPI_COMM_WORLD); }, &code);
  check(contains(e, "MPI is not initialized") && code == ErrorCode::kFailedPrecondition,
        "MpiBarrier before MPI_Init: '" + e + "'");
  check(contains(error_of([] { mpi_rank_info(MPI_COMM_WORLD); }), "MPI is not initialized"),
        "mpi_rank_info before MPI_Init");
}

// The barrier holds every rank until the last one arrives.
void barrier_waits_for_the_slowest_rank() {
  MpiBarrier barrier(MPI_COMM_WORLD);
  check(barrier.size() == kRanks, "size() is " + std::to_string(barrier.size()));
  check(barrier.communicator() != MPI_COMM_WORLD, "the barrier has its own communicator");
  MPI_Barrier(MPI_COMM_WORLD);
  const auto start = Clock::now();
  if (g_rank == 3) std::this_thread::sleep_for(std::chrono::milliseconds(400));
  barrier.execute(std::chrono::seconds(60));
  const double waited = seconds_since(start);
  check(waited >= 0.35, "execute returned after " + std::to_string(waited) + " s, before rank 3 arrived");
  check(barrier.pending() == 0, "nothing pending after a barrier");
  report("barrier: waited " + std::to_string(waited) + " s for rank 3 (which slept 0.4 s)");
}

// (a) Four ranks write one checkpoint, each its own contents, and read them back.
uint64_t four_ranks_write_one_checkpoint(const std::string& path) {
  const RankInfo rank = mpi_rank_info(MPI_COMM_WORLD);
  check(rank.global_rank == g_rank && rank.global_world_size == kRanks, "mpi_rank_info");
  auto barrier = std::make_shared<MpiBarrier>(MPI_COMM_WORLD);
  const WriterOptions options{.barrier_timeout = std::chrono::seconds(120)};
  const Value source = state(g_rank);
  const auto start = Clock::now();
  // On a thread of its own, as an asynchronous save would be (Note [MPI barrier threads]); the
  // main thread makes no MPI call meanwhile.
  std::string error;
  std::thread saver([&] {
    error = error_of([&] { CheckpointWriter(rank, options, barrier).write(path, source); });
  });
  saver.join();
  check(error.empty(), "write: " + error);
  const double seconds = seconds_since(start);
  MPI_Barrier(MPI_COMM_WORLD);

  const Manifest manifest = read_manifest(path);
  check(manifest.world_size == kRanks, "manifest world_size " + std::to_string(manifest.world_size));
  std::string why;
  check(is_state_of(CheckpointReader(rank).read(path), g_rank, why), "own state read back: " + why);
  // The directory is shared: the next rank's part is there too.
  const int next = (g_rank + 1) % kRanks;
  why.clear();
  check(is_state_of(CheckpointReader({next, kRanks}).read(path), next, why), "rank " + std::to_string(next) + ": " + why);
  report("(a) wrote and read back generation " + std::to_string(manifest.generation) + " in " +
         std::to_string(seconds) + " s");
  return manifest.generation;
}

// (b) Rank 2 fails in pre_commit: every rank's save fails at once, and (a)'s checkpoint stays.
void one_failing_rank_fails_every_save(const std::string& path, uint64_t committed) {
  struct FailingHook : WriterHook {
    void pre_commit(const std::string&) override {
      throw Error(ErrorCode::kIoError, "injected pre_commit failure");
    }
    void post_commit(const std::string&) override {}
  };
  auto barrier = std::make_shared<MpiBarrier>(MPI_COMM_WORLD);
  const WriterOptions options{.overwrite = true, .barrier_timeout = std::chrono::seconds(120)};
  std::shared_ptr<WriterHook> hook;
  if (g_rank == 2) hook = std::make_shared<FailingHook>();
  const Value source = state(10 + g_rank);
  MPI_Barrier(MPI_COMM_WORLD);
  const auto start = Clock::now();
  const std::string e =
      error_of([&] { CheckpointWriter({g_rank, kRanks}, options, barrier, hook).write(path, source); });
  const double seconds = seconds_since(start);
  check(!e.empty(), "the save did not fail");
  check(contains(e, g_rank == 2 ? "injected pre_commit failure" : "rank 2 failed"), "error: '" + e + "'");
  check(seconds < 30, "the failed save took " + std::to_string(seconds) + " s (barrier timeout 120 s)");
  report("(b) save failed after " + std::to_string(seconds) + " s: " + e);
  MPI_Barrier(MPI_COMM_WORLD);

  check(read_manifest(path).generation == committed, "the committed generation changed");
  std::string why;
  check(is_state_of(CheckpointReader({g_rank, kRanks}).read(path), g_rank, why), "(a)'s checkpoint after (b): " + why);
  MPI_Barrier(MPI_COMM_WORLD);
}

// (c) Ranks 1..3 skip a barrier: rank 0's execute times out. Its arrival stays posted (Note [MPI
// barrier timeout]): ranks 1..3 arrive at that barrier late, and from then on every rank's
// barriers match again.
void a_barrier_times_out_and_realigns() {
  MpiBarrier barrier(MPI_COMM_WORLD);
  if (g_rank == 0) {
    const auto start = Clock::now();
    ErrorCode code{};
    const std::string e = error_of([&] { barrier.execute(std::chrono::milliseconds(500)); }, &code);
    const double seconds = seconds_since(start);
    check(code == ErrorCode::kUnavailable && contains(e, "not all 4 ranks arrived within 500 ms"),
          "timeout error: '" + e + "'");
    check(seconds >= 0.5 && seconds < 3, "the timeout took " + std::to_string(seconds) + " s");
    check(barrier.pending() == 1, "pending() after the timeout is " + std::to_string(barrier.pending()));
    report("(c) timed out after " + std::to_string(seconds) + " s: " + e);
  }
  MPI_Barrier(MPI_COMM_WORLD);  // ranks 1..3 wait here, on another communicator, until rank 0 timed out

  // Ranks 1..3 arrive late at the barrier rank 0 timed out of; rank 0 goes on to the next one,
  // whose execute() completes both.
  if (g_rank != 0) barrier.execute(std::chrono::seconds(60));
  const auto start = Clock::now();
  if (g_rank == 2) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  barrier.execute(std::chrono::seconds(60));
  const double waited = seconds_since(start);
  check(barrier.pending() == 0, "pending() after realigning is " + std::to_string(barrier.pending()));
  check(waited >= 0.25, "a realigned barrier did not wait for rank 2 (" + std::to_string(waited) + " s)");

  // One more round, as usual.
  barrier.execute(std::chrono::seconds(60));
  check(barrier.pending() == 0, "pending() after one more round");
  MPI_Barrier(MPI_COMM_WORLD);
  report("(c) realigned; the next barriers waited " + std::to_string(waited) + " s for rank 2 (slept 0.3 s)");
}

int run_all() {
  const std::string dir = shared_temp_dir();
  const std::string path = dir + "/step";
  barrier_waits_for_the_slowest_rank();
  const uint64_t committed = four_ranks_write_one_checkpoint(path);
  one_failing_rank_fails_every_save(path, committed);
  a_barrier_times_out_and_realigns();
  // (d) Rank 0 removes the directory once every rank is done with it.
  MPI_Barrier(MPI_COMM_WORLD);
  if (g_rank == 0) {
    std::filesystem::remove_all(dir);
    check(!std::filesystem::exists(dir), "the temp dir is gone");
  }
  return g_failures;
}

}  // namespace
}  // namespace fastdcp

int main(int argc, char** argv) {
  using namespace fastdcp;
  before_init();
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size != kRanks) {
    if (g_rank == 0) std::fprintf(stderr, "test_mpi: run with %d ranks (mpirun -np %d), not %d\n", kRanks, kRanks, size);
    MPI_Finalize();
    return 2;
  }
  check(provided >= MPI_THREAD_SERIALIZED, "MPI provides thread level " + std::to_string(provided));
  const auto start = Clock::now();
  try {
    run_all();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[rank %d] unexpected exception: %s\n", g_rank, e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 3);
  }
  int failures = 0;
  MPI_Allreduce(&g_failures, &failures, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (g_rank == 0) {
    std::printf("test_mpi: %d ranks, %s (%.2f s)\n", kRanks,
                failures == 0 ? "all checks passed" : (std::to_string(failures) + " checks FAILED").c_str(),
                seconds_since(start));
  }
  MPI_Finalize();
  return failures == 0 ? 0 : 1;
}
