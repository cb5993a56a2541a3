#pragma once
// MPI coordination for CheckpointWriter: a Barrier over an MPI communicator, and the rank of this
// process in one. Part of the separate library fastdcp_mpi (CMake target fastdcp::fastdcp_mpi),
// built only where MPI is found (FASTDCP_WITH_MPI); the core library and its headers do not need
// MPI. This header includes <mpi.h>.
//
//   MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
//   CheckpointWriter writer(mpi_rank_info(MPI_COMM_WORLD), options,
//                           std::make_shared<MpiBarrier>(MPI_COMM_WORLD));
//   writer.write(path, state_dict);  // on every rank of the communicator
//
// Note [MPI barrier threads]
// CheckpointWriter::write calls Barrier::execute on its caller's thread, which with asynchronous
// checkpointing is not the thread that initialized MPI. MPI allows that only when initialized with
// MPI_Init_thread(..., MPI_THREAD_SERIALIZED or MPI_THREAD_MULTIPLE, ...); with SERIALIZED the
// application must also make sure that no other thread is inside an MPI call at the same time
// (with MULTIPLE it need not). execute() checks the level it can check: called from a thread other
// than the main one while MPI provides less than MPI_THREAD_SERIALIZED, it throws
// Error(kFailedPrecondition) instead of calling MPI. The calls of one MpiBarrier are serialized
// among themselves (a mutex), and its communicator is its own, so its barriers never match, or
// get in the way of, the application's collectives.
//
// Note [MPI barrier timeout]
// execute(timeout) posts this rank's arrival with MPI_Ibarrier and polls MPI_Test, sleeping
// briefly (50 us, growing to 1 ms) between polls, until every rank has arrived or the timeout has
// passed; then it throws Error(kUnavailable, "MPI barrier: ... not all N ranks arrived within X
// ms"). The posted arrival cannot be taken back. MPI_Cancel and MPI_Request_free are erroneous on
// the request of a nonblocking collective (MPI 3.1 section 5.12; 6.12 in MPI 4), and
// dropping the handle would leave a request that no one can ever complete. Whatever this rank does
// with it, MPI has registered the arrival, and matches every rank's k-th barrier on the
// communicator with the others' k-th. So the arrival stays posted and counts: a timed-out
// execute() still was this rank's call of that barrier, the other ranks complete it with their
// own (late) call, and every later execute() posts its own arrival and waits (within its own
// timeout) for it and for every arrival still outstanding, completing their requests. Every call
// of execute() is thus exactly one barrier on every rank, whatever timed out. (Resuming the old
// request instead of posting a new one would leave this rank one barrier behind the others from
// then on.) CheckpointWriter calls execute() once per save on every rank, so a save's barrier
// still matches the same save's barrier on the other ranks after a slow rank made one time out.
// Consequences:
//  - A late rank's execute() may not complete before the ranks that timed out call into MPI
//    again (MPI makes progress on a nonblocking operation only inside MPI calls): their next
//    execute(), or any blocking MPI call of theirs.
//  - pending() counts the arrivals still outstanding (0 after every execute() that returned).
//  - If the ranks that did not arrive never will, the outstanding requests cannot be completed:
//    the destructor then leaves them and the communicator unfreed (it does not block), and MPI
//    must not be finalized while the other ranks still might arrive (MPI_Finalize with a pending
//    collective is erroneous). A timeout that means "a rank is gone" is, in practice, a job to
//    abort (MPI_Abort), as MPI cannot recover a lost rank anyway.
// Errors from MPI itself (the communicator's error handler is MPI_ERRORS_RETURN) are thrown as
// Error(kUnavailable) naming the call and MPI's message.

#include <mpi.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <mutex>
#include <vector>

#include "fastdcp/checkpoint/checkpoint.h"

namespace fastdcp {

class MpiBarrier : public Barrier {
 public:
  // Duplicates `comm` (MPI_Comm_dup, collective and blocking over `comm`: every rank constructs
  // its MpiBarrier at the same point). Error(kFailedPrecondition) when MPI is not initialized or
  // already finalized; Error(kInvalidArgument) for MPI_COMM_NULL.
  explicit MpiBarrier(MPI_Comm comm);
  // Frees the duplicate (before MPI_Finalize; after it, does nothing). See Note [MPI barrier
  // timeout] for arrivals still outstanding.
  ~MpiBarrier() override;
  MpiBarrier(const MpiBarrier&) = delete;
  MpiBarrier& operator=(const MpiBarrier&) = delete;

  // Returns once every rank of the communicator has called execute() as many times as this rank
  // has; throws Error(kUnavailable) when that takes longer than `timeout`. See Note [MPI barrier
  // timeout] and Note [MPI barrier threads].
  void execute(std::chrono::milliseconds timeout) override;

  // This barrier's own communicator (the duplicate) and the number of its ranks.
  MPI_Comm communicator() const { return comm_; }
  int size() const { return size_; }
  // Arrivals of this rank whose barrier has not completed yet: 0 unless an execute() timed out.
  size_t pending() const { return pending_.load(std::memory_order_relaxed); }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 0;
  std::mutex mutex_;                      // serializes execute()
  std::vector<MPI_Request> outstanding_;  // this rank's arrivals not yet completed, oldest first
  std::atomic<size_t> pending_{0};        // outstanding_.size(), readable while execute() waits
};

// This process's rank in `comm` and the number of its ranks, for CheckpointWriter and
// CheckpointReader. Error(kFailedPrecondition) when MPI is not initialized.
RankInfo mpi_rank_info(MPI_Comm comm = MPI_COMM_WORLD);

}  // namespace fastdcp
