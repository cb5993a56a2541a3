#pragma once
// Internal to the staging engine: a multi-threaded host copier.

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace fastdcp::detail {

struct CopyOp {
  void* dst;
  const void* src;
  size_t nbytes;
};

// Copies byte ranges with `threads` threads (the caller is one of them) while the caller is still
// producing them. Large copies are cut into one piece per thread (at least kPieceBytes each) and
// small ones grouped into batches of about kBatchBytes (or kBatchOps); each sealed batch is taken
// by the next free worker. So the copy of a tree overlaps with its walk, one huge tensor is shared
// evenly between threads, and 100,000 tiny tensors cost a few dozen hand-offs, not one each.
// Batches are reused across runs: a warm run allocates nothing.
class HostCopyEngine {
 public:
  static constexpr size_t kPieceBytes = size_t{8} << 20;
  static constexpr size_t kBatchBytes = size_t{16} << 20;
  static constexpr size_t kBatchOps = 4096;

  explicit HostCopyEngine(unsigned threads);
  ~HostCopyEngine();
  HostCopyEngine(const HostCopyEngine&) = delete;
  HostCopyEngine& operator=(const HostCopyEngine&) = delete;

  // One run at a time, from one thread: begin(), add()..., finish().
  void begin();
  void add(void* dst, const void* src, size_t nbytes);
  // Copies what is left together with the workers and returns once every copy is done.
  void finish();
  unsigned threads() const { return static_cast<unsigned>(workers_.size()) + 1; }

 private:
  struct Batch {
    std::vector<CopyOp> ops;
    size_t bytes = 0;
  };
  void seal_current();
  void worker_loop();
  // Takes and copies sealed batches until none is left; `lock` is held on entry and exit.
  void drain(std::unique_lock<std::mutex>& lock);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::deque<Batch> batches_;  // [0, used_) belong to this run; guarded by mutex_ when resized
  size_t used_ = 0;            // batches started in this run (the last may be open)
  size_t sealed_ = 0;          // batches ready to copy
  size_t next_ = 0;            // next sealed batch to take
  size_t in_flight_ = 0;       // taken, not yet copied
  bool stopping_ = false;
};

}  // namespace fastdcp::detail
