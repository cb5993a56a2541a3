#include "fastdcp/coordination/mpi_barrier.h"

#include <algorithm>
#include <string>
#include <thread>

#include "fastdcp/common/error.h"

namespace fastdcp {
namespace {

using Clock = std::chrono::steady_clock;

std::string mpi_message(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(text, static_cast<size_t>(length));
}

void check_mpi(int code, const char* call, const char* what = "MPI barrier") {
  if (code != MPI_SUCCESS) {
    throw Error(ErrorCode::kUnavailable, std::string(what) + ": " + call + " failed: " + mpi_message(code));
  }
}

// Error(kFailedPrecondition) naming `what` unless MPI is initialized and not finalized.
void require_mpi_running(const char* what) {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized) {
    throw Error(ErrorCode::kFailedPrecondition, std::string(what) +
                                                    ": MPI is not initialized; call MPI_Init_thread (or MPI_Init) first");
  }
  if (finalized) {
    throw Error(ErrorCode::kFailedPrecondition, std::string(what) + ": MPI is already finalized (MPI_Finalize)");
  }
}

const char* thread_level_name(int level) {
  switch (level) {
    case MPI_THREAD_SINGLE:
      return "MPI_THREAD_SINGLE";
    case MPI_THREAD_FUNNELED:
      return "MPI_THREAD_FUNNELED";
    case MPI_THREAD_SERIALIZED:
      return "MPI_THREAD_SERIALIZED";
    default:
      return "MPI_THREAD_MULTIPLE";
  }
}

// Whether this thread may call MPI (Note [MPI barrier threads]); `level` receives MPI's thread level.
bool may_call_mpi_here(int& level) {
  int is_main = 0;
  MPI_Query_thread(&level);
  MPI_Is_thread_main(&is_main);
  return is_main || level >= MPI_THREAD_SERIALIZED;
}

}  // namespace

MpiBarrier::MpiBarrier(MPI_Comm comm) {
  require_mpi_running("MpiBarrier");
  if (comm == MPI_COMM_NULL) throw Error(ErrorCode::kInvalidArgument, "MpiBarrier: the communicator is MPI_COMM_NULL");
  int level = 0;
  if (!may_call_mpi_here(level)) {
    throw Error(ErrorCode::kFailedPrecondition,
                std::string("MpiBarrier: constructed on a thread other than MPI's main thread, but MPI provides only ") +
                    thread_level_name(level) + "; initialize MPI with MPI_Init_thread(..., MPI_THREAD_SERIALIZED, ...)");
  }
  // Its own communicator: its barriers never match the application's collectives.
  check_mpi(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
  try {
    check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    MPI_Comm_set_name(comm_, "fastdcp barrier");
    check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  } catch (...) {
    MPI_Comm_free(&comm_);
    throw;
  }
}

MpiBarrier::~MpiBarrier() {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  int level = 0;
  if (comm_ == MPI_COMM_NULL || !initialized || finalized || !may_call_mpi_here(level)) return;
  std::lock_guard lock(mutex_);
  for (MPI_Request& request : outstanding_) {
    int done = 0;
    if (request != MPI_REQUEST_NULL) MPI_Test(&request, &done, MPI_STATUS_IGNORE);
  }
  if (std::any_of(outstanding_.begin(), outstanding_.end(), [](MPI_Request r) { return r != MPI_REQUEST_NULL; })) {
    // Arrivals no rank has matched yet can be neither freed nor cancelled (Note [MPI barrier
    // timeout]); they and their communicator are left to MPI.
    return;
  }
  MPI_Comm_free(&comm_);
}

void MpiBarrier::execute(std::chrono::milliseconds timeout) {
  // Clamped so that the deadline cannot overflow: "a century" waits as long as "forever".
  const auto deadline = Clock::now() + std::clamp<std::chrono::milliseconds>(timeout, std::chrono::milliseconds(0),
                                                                              std::chrono::hours(24 * 365 * 100));
  require_mpi_running("MPI barrier");
  int level = 0;
  if (!may_call_mpi_here(level)) {
    throw Error(ErrorCode::kFailedPrecondition,
                std::string("MPI barrier: execute() was called on a thread other than MPI's main thread, but MPI "
                            "provides only ") +
                    thread_level_name(level) +
                    "; initialize MPI with MPI_Init_thread(..., MPI_THREAD_SERIALIZED, ...) to save from another "
                    "thread (Note [MPI barrier threads])");
  }
  std::lock_guard lock(mutex_);
  const size_t earlier = outstanding_.size();
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Ibarrier(comm_, &request), "MPI_Ibarrier");
  outstanding_.push_back(request);
  pending_.store(outstanding_.size(), std::memory_order_relaxed);

  // Note [MPI barrier timeout]: every outstanding arrival, this one and those of calls that timed
  // out, must complete.
  auto pause = std::chrono::microseconds(50);
  for (;;) {
    for (MPI_Request& r : outstanding_) {
      int done = 0;
      if (r != MPI_REQUEST_NULL) check_mpi(MPI_Test(&r, &done, MPI_STATUS_IGNORE), "MPI_Test");
    }
    std::erase(outstanding_, MPI_REQUEST_NULL);
    pending_.store(outstanding_.size(), std::memory_order_relaxed);
    if (outstanding_.empty()) return;
    if (Clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::min<Clock::duration>(pause, deadline - Clock::now()));
    pause = std::min(pause * 2, std::chrono::microseconds(1000));
  }
  std::string message = "MPI barrier: rank " + std::to_string(rank_) + " waited, but not all " +
                        std::to_string(size_) + " ranks arrived within " + std::to_string(timeout.count()) + " ms";
  if (earlier > 0) {
    message += " (this call also waited for " + std::to_string(earlier) + " earlier barrier" +
               (earlier == 1 ? "" : "s") + " that timed out)";
  }
  message += "; this rank's arrival stays posted and the next execute() waits for it (Note [MPI barrier timeout])";
  throw Error(ErrorCode::kUnavailable, message);
}

RankInfo mpi_rank_info(MPI_Comm comm) {
  require_mpi_running("mpi_rank_info");
  if (comm == MPI_COMM_NULL) throw Error(ErrorCode::kInvalidArgument, "mpi_rank_info: the communicator is MPI_COMM_NULL");
  RankInfo info;
  check_mpi(MPI_Comm_rank(comm, &info.global_rank), "MPI_Comm_rank", "mpi_rank_info");
  check_mpi(MPI_Comm_size(comm, &info.global_world_size), "MPI_Comm_size", "mpi_rank_info");
  return info;
}

}  // namespace fastdcp
