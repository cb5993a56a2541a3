#pragma once
// Internal to the staging engine: copy-on-write staging of host memory through userfaultfd.
// See Note [Copy-on-write staging] in fastdcp/staging/stager.h.

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "staging/copy_engine.h"

namespace fastdcp::detail {

class WriteProtectCopier {
 public:
  // The process's copier, or nullptr when this host or process cannot write-protect memory;
  // `why_not` then says why. There is one per process because a page range can be registered with
  // one userfaultfd only. FASTDCP_COPY_ON_WRITE=0 in the environment disables it.
  static WriteProtectCopier* instance(std::string* why_not = nullptr);

  struct Result {
    uint64_t protected_bytes = 0;  // source bytes copied after `released` ran
    uint64_t write_faults = 0;     // chunks copied early because something wrote to them
  };

  // Copies every op. Sources it can write-protect are protected, the others are handed to
  // `copy_unprotected` (which must copy them before returning); then `released` runs (the sources
  // may change from then on) and the protected bytes are copied on this thread, a chunk that is
  // written first being copied by the fault handler before the write goes on. Returns once every
  // byte is copied and nothing is protected any more. One call at a time (later calls wait).
  Result copy(std::vector<CopyOp> ops, const std::function<void(const std::vector<CopyOp>&)>& copy_unprotected,
              const std::function<void()>& released);

  // Waits until every range queued for collapsing into huge pages has been collapsed (tests).
  void wait_for_collapses();

  // Use instance(); public for in-place construction in static storage (see the .cpp).
  WriteProtectCopier(int uffd, int stop_fd);
  ~WriteProtectCopier();
  WriteProtectCopier(const WriteProtectCopier&) = delete;
  WriteProtectCopier& operator=(const WriteProtectCopier&) = delete;

  struct Snapshot;

 private:
  void handler_loop();
  void serve_fault(uintptr_t address);
  void copy_chunk_and_release(Snapshot& snapshot, size_t chunk, bool by_fault);
  void collapse_later(const std::vector<CopyOp>& ops);
  void collapser_loop();

  const int uffd_;
  const int stop_fd_;  // an eventfd that ends handler_loop (which runs during copy() only)
  std::mutex run_mutex_;             // one copy() at a time
  std::mutex snapshot_mutex_;        // guards current_ against the handler
  Snapshot* current_ = nullptr;

  // Note [Huge pages for protected sources]
  std::mutex collapse_mutex_;
  std::condition_variable collapse_cv_;
  std::deque<std::pair<uintptr_t, uintptr_t>> collapse_queue_;
  bool stopping_ = false;
  bool collapser_running_ = false;  // collapser_ is in its loop; it leaves once the queue is empty
  std::thread collapser_;
};

}  // namespace fastdcp::detail
