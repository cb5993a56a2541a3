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

// Opens a userfaultfd with write-protect faults, including for pages never touched yet (without
// that, a write to an unpopulated page would go unnoticed), or returns -1 with the reason.
int open_write_protect_fd(std::string& why_not);

class WriteProtectCopier {
 public:
  // The process's copier, or nullptr when this host or process cannot write-protect memory;
  // `why_not` then says why. There is one per process because a page range can be registered with
  // one userfaultfd only. FASTDCP_COPY_ON_WRITE=0 in the environment disables it.
  static WriteProtectCopier* instance(std::string* why_not = nullptr);

  struct Result {
    uint64_t bytes_copied_after_release = 0;  // source bytes copied after `released` ran, exactly
    uint64_t write_faults = 0;     // chunks copied early because something wrote to them
  };

  // Copies every op. Sources it can write-protect are protected, the others are handed to
  // `copy_unprotected` (which must copy them before returning); then `released` runs (the sources
  // may change from then on) and the protected bytes are copied on this thread, a chunk that is
  // written first being copied by the fault handler before the write goes on. Returns once every
  // byte is copied and nothing is protected any more. One call at a time (later calls wait).
  // Throws Error(kIoError) naming the call when a userfaultfd call failed, before `released` or
  // after it, with nothing left protected (Note [Copy-on-write failures]).
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
  // Copies the chunk and unprotects it unless someone else has (then returns false).
  bool copy_chunk_and_release(Snapshot& snapshot, size_t chunk);
  // Makes [begin, end) writable and wakes its writers, however it can (Note [Copy-on-write failures]).
  void release(uintptr_t begin, uintptr_t end) noexcept;
  void record_failure(const char* call, int errnum) noexcept;  // `call`: one of `calls::` (static)
  void throw_if_failed();
  void retire() noexcept;
  void collapse_later(const std::vector<CopyOp>& ops);
  void collapser_loop();

  int uffd_;           // -1 once retired
  const int stop_fd_;  // an eventfd that ends handler_loop (which runs during copy() only)
  std::atomic<bool> stop_handler_{false};  // also ends it, where polling fails
  // The first failure of the running copy(): the call's name (nullptr: none) and its errno.
  std::atomic<const char*> failed_call_{nullptr};
  std::atomic<int> failed_errno_{0};
  std::atomic<bool> must_close_{false};  // something stayed registered: close the userfaultfd
  std::atomic<bool> retired_{false};     // it was closed; retired_why_ (written before) says why
  std::string retired_why_;
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
