#include "staging/copy_engine.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "fastdcp/common/error.h"
#include "fastdcp/common/logging.h"
#include "fastdcp/common/parallel.h"

namespace fastdcp::detail {

HostCopyEngine::HostCopyEngine(unsigned threads) {
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  for (unsigned i = 1; i < threads; ++i) {
    try {
      workers_.push_back(start_thread("staging copy", [this] { worker_loop(); }));
    } catch (const Error& e) {  // the caller's thread copies too: fewer threads are slower, not wrong
      warn(std::string(e.what()) + "; staging goes on with " + std::to_string(i) + " copy threads");
      break;
    }
  }
}

HostCopyEngine::~HostCopyEngine() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  for (auto& worker : workers_) worker.join();
}

void HostCopyEngine::begin() {
  std::lock_guard lock(mutex_);
  used_ = sealed_ = next_ = in_flight_ = 0;
}

void HostCopyEngine::add(void* dst, const void* src, size_t nbytes) {
  // A large copy is cut into one piece per thread (but not below kPieceBytes): memcpy streams
  // past the cache only for large calls, which is what makes big copies fast.
  const size_t piece_limit = std::max(kPieceBytes, (nbytes + threads() - 1) / threads());
  while (nbytes > 0) {
    if (used_ == sealed_) {  // open a batch, reusing one from an earlier run when possible
      std::lock_guard lock(mutex_);
      if (used_ == batches_.size()) batches_.emplace_back();
      batches_[used_].ops.clear();
      batches_[used_].bytes = 0;
      ++used_;
    }
    Batch& batch = batches_[used_ - 1];  // open: only this thread touches it
    const size_t piece = std::min(nbytes, piece_limit);
    batch.ops.push_back({dst, src, piece});
    batch.bytes += piece;
    dst = static_cast<char*>(dst) + piece;
    src = static_cast<const char*>(src) + piece;
    nbytes -= piece;
    if (batch.bytes >= kBatchBytes || batch.ops.size() >= kBatchOps) seal_current();
  }
}

void HostCopyEngine::seal_current() {
  {
    std::lock_guard lock(mutex_);
    sealed_ = used_;
  }
  if (!workers_.empty()) work_cv_.notify_one();
}

void HostCopyEngine::finish() {
  std::unique_lock lock(mutex_);
  sealed_ = used_;
  const size_t waiting = sealed_ - next_;
  lock.unlock();
  // Small remainders are not worth waking anyone for.
  if (waiting > 1) work_cv_.notify_all();
  lock.lock();
  drain(lock);
  done_cv_.wait(lock, [&] { return in_flight_ == 0; });
}

void HostCopyEngine::drain(std::unique_lock<std::mutex>& lock) {
  while (next_ < sealed_) {
    Batch& batch = batches_[next_++];
    ++in_flight_;
    lock.unlock();
    for (const CopyOp& op : batch.ops) std::memcpy(op.dst, op.src, op.nbytes);
    lock.lock();
    if (--in_flight_ == 0 && next_ == sealed_) done_cv_.notify_all();
  }
}

void HostCopyEngine::worker_loop() {
  std::unique_lock lock(mutex_);
  for (;;) {
    work_cv_.wait(lock, [&] { return stopping_ || next_ < sealed_; });
    if (stopping_) return;
    drain(lock);
  }
}

}  // namespace fastdcp::detail
