#pragma once
// Positioned reads and writes with many requests in flight from one thread, through io_uring.
//
// Note [I/O engines]
// A checkpoint moves its bytes in large windows (8-16 MiB) and the disk wants many of them in
// flight at once. Two engines do that: a few threads each issuing blocking pread/pwrite, and one
// io_uring whose single submitting thread keeps the queue full and prepares the next window
// (filling an O_DIRECT bounce buffer) or checks the last one (checksums) in between.
//
// Threads are the default, because they measured faster on this project's machines (ext4, 1 GiB,
// median of 4 interleaved rounds: saves 2.6 s against 3.5 s, loads 1.1 s against 1.5 s), for two
// reasons that hold on any ext4: (1) an O_DIRECT write into blocks not yet written (a new or
// fallocated file: every checkpoint) cannot be issued without blocking, so io_uring hands it to
// its io-wq workers, which run writes to one regular file one at a time (they are hashed by
// inode); (2) an O_DIRECT read faults its destination's fresh pages in, and with io_uring all of
// them fault in the one submitting thread. io_uring is the engine for file systems that take
// non-blocking direct writes (XFS overwrites, block devices) and for pre-faulted destinations.
//
// io_uring is probed at run time: kernels without it, seccomp filters (default Docker profiles)
// and kernel.io_uring_disabled refuse io_uring_setup, and builds without liburing have none; kAuto
// then falls back to threads. No registered buffers or SQPOLL: both need privileges or
// locked-memory limits that training jobs do not have (dependencies.md).

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

#include "fastdcp/io/file.h"

namespace fastdcp {

enum class IoEngine {
  kThreads,  // blocking calls on a few threads (the default)
  kAuto,     // io_uring where the kernel allows it, else threads
  kIoUring,  // io_uring, or Error(kUnavailable)
};

const char* to_string(IoEngine engine) noexcept;
// "auto", "threads" or "io_uring"; anything else is Error(kInvalidArgument) naming the option.
IoEngine io_engine_from_string(const std::string& name);

class IoRing {
 public:
  // Whether io_uring works in this process (probed once, by setting up and closing a small ring).
  static bool available();
  // A ring of `depth` entries, or Error(kUnavailable) saying why there is none.
  static IoRing create(unsigned depth);

  IoRing(IoRing&&) noexcept;
  IoRing& operator=(IoRing&&) noexcept;
  IoRing(const IoRing&) = delete;
  IoRing& operator=(const IoRing&) = delete;
  ~IoRing();

  unsigned depth() const { return depth_; }

  struct Request {
    bool write = false;
    void* data = nullptr;
    uint64_t size = 0;
    uint64_t offset = 0;
    // Reads only: the bytes that must arrive; the rest of `size` may lie past the end of the file
    // (an O_DIRECT read rounded up to the alignment). Fewer is Error(kDataLoss), "truncated".
    uint64_t required = 0;
  };

  // Runs requests 0..count-1 on `file` with up to depth() in flight. prepare(i) gives request i
  // just before it is submitted (in increasing i); complete(i) runs once all of its bytes moved
  // (short writes are resubmitted for the rest). On the first failure (an I/O error, a short read,
  // or an exception from prepare or complete) no further request is submitted, the ones in flight
  // are waited for, and the failure is thrown, as File's errors name the path.
  void run(const File& file, size_t count, const std::function<Request(size_t)>& prepare,
           const std::function<void(size_t)>& complete);

 private:
  struct Ring;
  explicit IoRing(std::unique_ptr<Ring> ring, unsigned depth);
  std::unique_ptr<Ring> ring_;
  unsigned depth_ = 0;
};

// Whether `engine` means io_uring here: kIoUring always (create() then reports a missing one),
// kAuto when available().
bool use_io_uring(IoEngine engine);

}  // namespace fastdcp
