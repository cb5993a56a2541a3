#include "fastdcp/io/io_ring.h"

#include <cerrno>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "fastdcp/common/error.h"
#include "io/file_error.h"

#if defined(FASTDCP_HAVE_LIBURING)
#include <liburing.h>
#endif

namespace fastdcp {

const char* to_string(IoEngine engine) noexcept {
  switch (engine) {
    case IoEngine::kAuto: return "auto";
    case IoEngine::kThreads: return "threads";
    case IoEngine::kIoUring: return "io_uring";
  }
  return "?";
}

IoEngine io_engine_from_string(const std::string& name) {
  for (const IoEngine e : {IoEngine::kAuto, IoEngine::kThreads, IoEngine::kIoUring}) {
    if (name == to_string(e)) return e;
  }
  throw Error(ErrorCode::kInvalidArgument, "io_engine must be 'auto', 'threads' or 'io_uring', not '" + name + "'");
}

bool use_io_uring(IoEngine engine) {
  return engine == IoEngine::kIoUring || (engine == IoEngine::kAuto && IoRing::available());
}

#if defined(FASTDCP_HAVE_LIBURING)

struct IoRing::Ring {
  io_uring ring{};
  bool initialized = false;
  ~Ring() {
    if (initialized) io_uring_queue_exit(&ring);
  }
};

bool IoRing::available() {
  static const bool probed = [] {
    io_uring ring{};
    if (io_uring_queue_init(2, &ring, 0) != 0) return false;
    io_uring_queue_exit(&ring);
    return true;
  }();
  return probed;
}

IoRing IoRing::create(unsigned depth) {
  auto ring = std::make_unique<Ring>();
  if (const int ret = io_uring_queue_init(depth, &ring->ring, 0); ret < 0) {
    throw Error(ErrorCode::kUnavailable, std::string("io_uring is unavailable here (io_uring_setup: ") +
                                             std::strerror(-ret) + "); use the 'threads' I/O engine");
  }
  ring->initialized = true;
  return IoRing(std::move(ring), depth);
}

void IoRing::run(const File& file, size_t count, const std::function<Request(size_t)>& prepare,
                 const std::function<void(size_t)>& complete) {
  struct Slot {
    size_t index = 0;
    Request request;
    uint64_t done = 0;
  };
  io_uring* ring = &ring_->ring;
  std::vector<Slot> slots(depth_);
  std::vector<unsigned> free_slots;
  for (unsigned s = depth_; s-- > 0;) free_slots.push_back(s);
  size_t next = 0;
  unsigned queued = 0;    // prepared, not yet taken by the kernel
  unsigned in_flight = 0;  // taken by the kernel: their buffers are in use until they complete
  std::exception_ptr failure;
  const auto fail = [&](std::exception_ptr e) {
    if (!failure) failure = std::move(e);
  };
  // File's error for a failed request, recorded as the failure.
  const auto fail_on_file = [&](const char* operation, int error) {
    try {
      throw_file_error(operation, file.path(), error);
    } catch (...) {
      fail(std::current_exception());
    }
  };
  const auto enqueue = [&](unsigned s) {
    Slot& slot = slots[s];
    io_uring_sqe* sqe = io_uring_get_sqe(ring);  // never null: at most depth_ slots exist
    char* at = static_cast<char*>(slot.request.data) + slot.done;
    const auto length = static_cast<unsigned>(std::min<uint64_t>(slot.request.size - slot.done, 1u << 30));
    const auto offset = static_cast<off_t>(slot.request.offset + slot.done);
    if (slot.request.write) {
      io_uring_prep_write(sqe, file.fd(), at, length, offset);
    } else {
      io_uring_prep_read(sqe, file.fd(), at, length, offset);
    }
    io_uring_sqe_set_data(sqe, reinterpret_cast<void*>(static_cast<uintptr_t>(s)));
    ++queued;
  };
  while (true) {
    while (!failure && next < count && !free_slots.empty()) {
      try {
        const unsigned s = free_slots.back();
        slots[s] = Slot{next, prepare(next), 0};
        free_slots.pop_back();
        ++next;
        enqueue(s);
      } catch (...) {
        fail(std::current_exception());
      }
    }
    if (queued > 0 && !failure) {
      const int ret = io_uring_submit(ring);
      if (ret >= 0) {
        queued -= static_cast<unsigned>(ret);
        in_flight += static_cast<unsigned>(ret);
      } else if (ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
        // What was not taken is never submitted: the ring is torn down with it unsent.
        fail(std::make_exception_ptr(Error(ErrorCode::kIoError, std::string("io_uring_submit for '") + file.path() +
                                                                    "': " + std::strerror(-ret), -ret)));
      }
    }
    if (in_flight == 0) {
      if (failure || (next == count && queued == 0)) break;
      continue;
    }
    io_uring_cqe* cqe = nullptr;
    if (const int ret = io_uring_wait_cqe(ring, &cqe); ret < 0) {
      if (ret == -EINTR || ret == -EAGAIN) continue;
      // Buffers still in flight must outlive the kernel's use of them: nothing safe is left to do.
      std::fprintf(stderr, "fastdcp: io_uring_wait_cqe failed with requests in flight: %s\n", std::strerror(-ret));
      std::terminate();
    }
    const auto s = static_cast<unsigned>(reinterpret_cast<uintptr_t>(io_uring_cqe_get_data(cqe)));
    const int res = cqe->res;
    io_uring_cqe_seen(ring, cqe);
    --in_flight;
    Slot& slot = slots[s];
    bool finished = true;
    if (failure) {
      // Draining: the request's outcome no longer matters.
    } else if (res == -EINTR || res == -EAGAIN) {
      finished = false;
    } else if (res < 0) {
      fail_on_file(slot.request.write ? "cannot write" : "cannot read", -res);
    } else {
      const uint64_t asked = std::min<uint64_t>(slot.request.size - slot.done, 1u << 30);
      slot.done += static_cast<uint64_t>(res);
      if (slot.request.write) {
        if (res == 0) {
          fail_on_file("cannot write", ENOSPC);
        } else {
          finished = slot.done == slot.request.size;
        }
      } else if (slot.done < slot.request.required && static_cast<uint64_t>(res) < asked) {
        // Regular files read short only at their end.
        fail(std::make_exception_ptr(Error(ErrorCode::kDataLoss, "'" + file.path() + "' is truncated: it ends at byte " +
                                                                     std::to_string(slot.request.offset + slot.done))));
      } else {
        finished = slot.done >= slot.request.required || slot.done == slot.request.size;
      }
      if (finished && !failure) {
        try {
          complete(slot.index);
        } catch (...) {
          fail(std::current_exception());
        }
      }
    }
    if (finished || failure) {
      free_slots.push_back(s);
    } else {
      enqueue(s);
    }
  }
  if (failure) std::rethrow_exception(failure);
}

#else  // no liburing at build time

struct IoRing::Ring {};

bool IoRing::available() { return false; }

IoRing IoRing::create(unsigned) {
  throw Error(ErrorCode::kUnavailable, "this fastdcp was built without liburing; use the 'threads' I/O engine");
}

void IoRing::run(const File&, size_t, const std::function<Request(size_t)>&, const std::function<void(size_t)>&) {
  throw Error(ErrorCode::kInternal, "IoRing::run without liburing");
}

#endif

IoRing::IoRing(std::unique_ptr<Ring> ring, unsigned depth) : ring_(std::move(ring)), depth_(depth) {}
IoRing::IoRing(IoRing&&) noexcept = default;
IoRing& IoRing::operator=(IoRing&&) noexcept = default;
IoRing::~IoRing() = default;

}  // namespace fastdcp
