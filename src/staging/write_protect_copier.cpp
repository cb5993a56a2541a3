#include "staging/write_protect_copier.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <optional>
#include <utility>

#include "fastdcp/common/error.h"
#include "fastdcp/common/fault.h"
#include "fastdcp/common/parallel.h"

#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

namespace fastdcp::detail {
namespace {

// Copy and unprotect in 2 MiB chunks, aligned as transparent huge pages are: a fault costs one
// chunk copy (about 0.1 ms), and a huge page is split at most once.
constexpr uintptr_t kChunkBytes = uintptr_t{2} << 20;
// Sources closer than this are protected as one range: fewer VMAs and ioctls for many small
// tensors, at the price of a fault for a write into the gap between them.
constexpr uintptr_t kMergeGapBytes = uintptr_t{256} << 10;
// Below this many bytes in all, protecting costs more than copying.
constexpr uint64_t kMinProtectedBytes = uint64_t{1} << 20;

// The calls whose failures copy-on-write staging must survive (Note [Copy-on-write failures]),
// named as its errors name them. Most cannot be provoked from outside, so tests inject them by
// these names (Note [Fault injection]).
namespace calls {
constexpr char kUserfaultfd[] = "userfaultfd";  // userfaultfd(2) or /dev/userfaultfd
constexpr char kApi[] = "ioctl(UFFDIO_API)";
constexpr char kRegister[] = "ioctl(UFFDIO_REGISTER)";
constexpr char kUnregister[] = "ioctl(UFFDIO_UNREGISTER)";
constexpr char kWriteProtect[] = "ioctl(UFFDIO_WRITEPROTECT) protecting";
constexpr char kUnprotect[] = "ioctl(UFFDIO_WRITEPROTECT) unprotecting";
constexpr char kWake[] = "ioctl(UFFDIO_WAKE)";
constexpr char kMmap[] = "mmap";  // of the copy's private state
constexpr char kCollapse[] = "madvise(MADV_COLLAPSE)";
constexpr char kPoll[] = "poll on the userfaultfd";
constexpr char kRead[] = "read of the userfaultfd";
}  // namespace calls

enum ChunkState : uint8_t { kPending = 0, kCopying = 1, kCopied = 2 };

#if defined(__SANITIZE_THREAD__)
#define FASTDCP_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define FASTDCP_TSAN 1
#endif
#endif
#ifdef FASTDCP_TSAN
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif

// A chunk copy races, as ThreadSanitizer sees it, with the writes it is copied ahead of: the
// ordering is made by the write-protect fault, in the kernel. So ThreadSanitizer does not watch it.
void copy_ahead_of_writers(void* dst, const void* src, size_t n) {
#ifdef FASTDCP_TSAN
  __tsan_ignore_thread_begin();
  std::memcpy(dst, src, n);
  __tsan_ignore_thread_end();
#else
  std::memcpy(dst, src, n);
#endif
}

uintptr_t page_bytes() {
  static const uintptr_t bytes = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  return bytes;
}

struct Range {
  uintptr_t begin;
  uintptr_t end;
};

// The whole pages holding [begin, end).
Range page_cover(uintptr_t begin, uintptr_t end) {
  const uintptr_t page = page_bytes();
  return {begin & ~(page - 1), (end + page - 1) & ~(page - 1)};
}

// The userfaultfd calls below return 0 or the errno they failed with, which may have been
// injected by a test (Note [Fault injection]).
int uffd_ioctl(const char* call, int uffd, unsigned long request, void* arg) noexcept {
  if (const int injected = fault::injected(call)) return injected;
  return ioctl(uffd, request, arg) == 0 ? 0 : errno;
}

int set_protection(int uffd, Range range, bool protect) noexcept {
  uffdio_writeprotect wp{};
  wp.range.start = range.begin;
  wp.range.len = range.end - range.begin;
  wp.mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0;  // unprotecting also wakes the writers
  return uffd_ioctl(protect ? calls::kWriteProtect : calls::kUnprotect, uffd, UFFDIO_WRITEPROTECT, &wp);
}

void wake(int uffd, Range range) noexcept {
  uffdio_range r{range.begin, range.end - range.begin};
  uffd_ioctl(calls::kWake, uffd, UFFDIO_WAKE, &r);
}

int unregister_range(int uffd, Range range) noexcept {
  // Unregistering also clears the protection, but wakes only writers waiting on missing pages
  // (Linux 6.18 at least), not those waiting on protected ones: they are woken here.
  uffdio_range unreg{range.begin, range.end - range.begin};
  const int error = uffd_ioctl(calls::kUnregister, uffd, UFFDIO_UNREGISTER, &unreg);
  if (error == 0) wake(uffd, range);
  return error;
}

int register_range(int uffd, Range range) noexcept {
  uffdio_register reg{};
  reg.range.start = range.begin;
  reg.range.len = range.end - range.begin;
  reg.mode = UFFDIO_REGISTER_MODE_WP;
  if (const int error = uffd_ioctl(calls::kRegister, uffd, UFFDIO_REGISTER, &reg)) return error;
  if ((reg.ioctls & (uint64_t{1} << _UFFDIO_WRITEPROTECT)) == 0) {  // memory that cannot be protected
    unregister_range(uffd, range);
    return EINVAL;
  }
  return 0;
}

// Whether UFFDIO_REGISTER's `error` means memory that cannot be protected, which is copied before
// release: a mapping of a kind write-protection does not support (EINVAL), a shared mapping
// without write permission (EPERM), or memory registered with another userfaultfd (EBUSY).
bool cannot_be_protected(int error) { return error == EINVAL || error == EPERM || error == EBUSY; }

// The page covers of `ranges` (begin, length pairs), sorted, overlapping covers joined.
template <class Ranges, class Of>
std::vector<Range> sorted_covers(const Ranges& ranges, Of range_of) {
  std::vector<Range> covers;
  covers.reserve(ranges.size());
  for (const auto& r : ranges) {
    const auto [begin, nbytes] = range_of(r);
    if (nbytes != 0) covers.push_back(page_cover(begin, begin + nbytes));
  }
  std::sort(covers.begin(), covers.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  std::vector<Range> joined;
  for (const Range& cover : covers) {
    if (!joined.empty() && cover.begin < joined.back().end) {
      joined.back().end = std::max(joined.back().end, cover.end);
    } else {
      joined.push_back(cover);
    }
  }
  return joined;
}

// Whether [r.begin, r.end) meets one of `sorted` (sorted, disjoint).
bool meets(const std::vector<Range>& sorted, Range r) {
  auto it = std::upper_bound(sorted.begin(), sorted.end(), r.end - 1,
                             [](uintptr_t a, const Range& x) { return a < x.begin; });
  return r.begin < r.end && it != sorted.begin() && std::prev(it)->end > r.begin;
}

// An anonymous mapping of its own, for state the fault handler writes: memory from malloc may
// share a page with a protected source, and a handler that faults can never be served.
class PrivateMapping {
 public:
  explicit PrivateMapping(size_t bytes) : bytes_(std::max<size_t>(bytes, 1)) {
    const int injected = fault::injected(calls::kMmap);
    data_ = injected ? MAP_FAILED : mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data_ == MAP_FAILED) {
      throw Error(ErrorCode::kResourceExhausted, "copy-on-write staging: mmap of " + std::to_string(bytes_) +
                                                     " bytes for its state failed: " +
                                                     std::strerror(injected ? injected : errno));
    }
  }
  ~PrivateMapping() { munmap(data_, bytes_); }
  PrivateMapping(const PrivateMapping&) = delete;
  PrivateMapping& operator=(const PrivateMapping&) = delete;
  void* data() const { return data_; }

 private:
  size_t bytes_;
  void* data_;
};

int open_userfaultfd(std::string& why_not) {
  int syscall_errno = fault::injected(calls::kUserfaultfd);
  int fd = syscall_errno ? -1 : static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd >= 0) return fd;
  if (!syscall_errno) syscall_errno = errno;
  // Without CAP_SYS_PTRACE (and with vm.unprivileged_userfaultfd=0) the device may still be open to us.
  const int device = fault::injected(calls::kUserfaultfd) ? -1 : open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (device >= 0) {
    fd = ioctl(device, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    close(device);
    if (fd >= 0) return fd;
  }
  why_not = std::string("userfaultfd failed: ") + std::strerror(syscall_errno) +
            " (it needs CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd)";
  return -1;
}

}  // namespace

int open_write_protect_fd(std::string& why_not) {
  const int probe = open_userfaultfd(why_not);
  if (probe < 0) return -1;
  uffdio_api api{};
  api.api = UFFD_API;
  const int probe_error = uffd_ioctl(calls::kApi, probe, UFFDIO_API, &api);
  close(probe);
  const uint64_t needed = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED;
  if (probe_error) {
    why_not = std::string("ioctl(UFFDIO_API) failed: ") + std::strerror(probe_error);
    return -1;
  }
  if ((api.features & needed) != needed) {
    why_not = "the kernel's userfaultfd lacks write-protect faults for unpopulated pages (Linux 6.4 or newer)";
    return -1;
  }
  const int fd = open_userfaultfd(why_not);
  if (fd < 0) return -1;
  uffdio_api wanted{};
  wanted.api = UFFD_API;
  // Shared memory (fastdcp's own staged buffers, staged again) can be protected where supported.
  wanted.features = needed | (api.features & UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
  if (const int error = uffd_ioctl(calls::kApi, fd, UFFDIO_API, &wanted)) {
    why_not = std::string("ioctl(UFFDIO_API) failed: ") + std::strerror(error);
    close(fd);
    return -1;
  }
  return fd;
}

// The ranges of one copy() call, and per 2 MiB chunk of them, the ops it holds and its state.
// Built before anything is protected; afterwards the handler only reads it, except for the chunk
// states, which live in a mapping of their own.
struct WriteProtectCopier::Snapshot {
  struct Interval {
    Range range;
    size_t first_chunk;
  };
  std::vector<CopyOp> ops;            // sorted by source address
  std::vector<Interval> intervals;    // protected, sorted, disjoint
  std::vector<uint32_t> piece_begin;  // per chunk: its ops are pieces[piece_begin[c], piece_begin[c + 1])
  std::vector<uint32_t> pieces;       // op indices
  // Written by the fault handler too, so they live in the snapshot's own mapping (Note [Fault handler]).
  struct Counters {
    std::atomic<uint64_t> write_faults{0};
    std::atomic<uint64_t> bytes_after_release{0};  // Note [Counting copies after release]
    std::atomic<bool> released{false};
  };
  std::optional<PrivateMapping> state_memory;
  std::atomic<uint8_t>* states = nullptr;
  Counters* counters = nullptr;

  size_t chunk_count() const { return piece_begin.empty() ? 0 : piece_begin.size() - 1; }

  static size_t chunks_in(Range r) { return (r.end - 1) / kChunkBytes - r.begin / kChunkBytes + 1; }

  // The chunk holding `address`, or SIZE_MAX.
  size_t chunk_of(uintptr_t address) const {
    auto it = std::upper_bound(intervals.begin(), intervals.end(), address,
                               [](uintptr_t a, const Interval& i) { return a < i.range.begin; });
    if (it == intervals.begin()) return SIZE_MAX;
    --it;
    if (address >= it->range.end) return SIZE_MAX;
    return it->first_chunk + address / kChunkBytes - it->range.begin / kChunkBytes;
  }

  Range chunk_range(size_t chunk) const {
    auto it = std::upper_bound(intervals.begin(), intervals.end(), chunk,
                               [](size_t c, const Interval& i) { return c < i.first_chunk; });
    --it;
    const uintptr_t start = (it->range.begin / kChunkBytes + (chunk - it->first_chunk)) * kChunkBytes;
    return {std::max(start, it->range.begin), std::min(start + kChunkBytes, it->range.end)};
  }

  // Calls fn(op, part) for each op with source bytes in `chunk`; `part` is the part inside it.
  template <class Fn>
  void for_each_piece(size_t chunk, Fn&& fn) const {
    const Range r = chunk_range(chunk);
    for (uint32_t p = piece_begin[chunk]; p < piece_begin[chunk + 1]; ++p) {
      const CopyOp& op = ops[pieces[p]];
      const auto src = reinterpret_cast<uintptr_t>(op.src);
      const Range part{std::max(src, r.begin), std::min(src + op.nbytes, r.end)};
      if (part.begin < part.end) fn(op, part);
    }
  }

  // Whether a source has bytes in `page`, one of `chunk`'s pages.
  bool holds_source_bytes(size_t chunk, Range page) const {
    bool holds = false;
    for_each_piece(chunk, [&](const CopyOp&, Range part) { holds |= part.begin < page.end && part.end > page.begin; });
    return holds;
  }

  // Returns the source bytes copied.
  uint64_t copy_chunk(size_t chunk) const {
    uint64_t bytes = 0;
    for_each_piece(chunk, [&](const CopyOp& op, Range part) {
      const auto src = reinterpret_cast<uintptr_t>(op.src);
      copy_ahead_of_writers(static_cast<char*>(op.dst) + (part.begin - src), reinterpret_cast<const void*>(part.begin),
                            part.end - part.begin);
      bytes += part.end - part.begin;
    });
    return bytes;
  }

  // Builds the chunk tables of `intervals` (set by the caller) over `ops`.
  void index_chunks() {
    size_t total = 0;
    for (auto& interval : intervals) {
      interval.first_chunk = total;
      total += chunks_in(interval.range);
    }
    piece_begin.assign(total + 1, 0);
    auto op_chunks = [&](const CopyOp& op, size_t& first, size_t& last) {
      const auto src = reinterpret_cast<uintptr_t>(op.src);
      first = chunk_of(src);
      last = chunk_of(src + op.nbytes - 1);
    };
    for (const CopyOp& op : ops) {
      size_t first, last;
      op_chunks(op, first, last);
      for (size_t c = first; c <= last; ++c) ++piece_begin[c + 1];
    }
    for (size_t c = 0; c < total; ++c) piece_begin[c + 1] += piece_begin[c];
    pieces.resize(piece_begin[total]);
    std::vector<uint32_t> fill(piece_begin.begin(), piece_begin.end() - 1);
    for (uint32_t i = 0; i < ops.size(); ++i) {
      size_t first, last;
      op_chunks(ops[i], first, last);
      for (size_t c = first; c <= last; ++c) pieces[fill[c]++] = i;
    }
    state_memory.emplace(sizeof(Counters) + total);
    counters = new (state_memory->data()) Counters;
    states = reinterpret_cast<std::atomic<uint8_t>*>(static_cast<char*>(state_memory->data()) + sizeof(Counters));
    for (size_t c = 0; c < total; ++c) new (&states[c]) std::atomic<uint8_t>(kPending);
  }
};

WriteProtectCopier* WriteProtectCopier::instance(std::string* why_not) {
  // In static storage, not on the heap: the handler writes to this object (its mutex), and heap
  // memory may share a page with a protected source.
  struct Slot {
    std::optional<WriteProtectCopier> copier;
    std::string why_not;
    pid_t owner = getpid();
    Slot() {
      if (const char* env = std::getenv("FASTDCP_COPY_ON_WRITE"); env && std::string(env) == "0") {
        why_not = "disabled by FASTDCP_COPY_ON_WRITE=0";
        return;
      }
      const int uffd = open_write_protect_fd(why_not);
      if (uffd < 0) return;
      const int stop = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
      if (stop < 0) {
        close(uffd);
        why_not = "eventfd failed";
        return;
      }
      copier.emplace(uffd, stop);
    }
  };
  static Slot slot;
  if (slot.owner != getpid()) {  // a forked child: the userfaultfd belongs to the parent's memory
    if (why_not) *why_not = "the process was forked after copy-on-write staging was set up";
    return nullptr;
  }
  if (!slot.copier) {
    if (why_not) *why_not = slot.why_not;
    return nullptr;
  }
  if (slot.copier->retired_.load(std::memory_order_acquire)) {
    if (why_not) *why_not = slot.copier->retired_why_;
    return nullptr;
  }
  return &*slot.copier;
}

WriteProtectCopier::WriteProtectCopier(int uffd, int stop_fd) : uffd_(uffd), stop_fd_(stop_fd) {}

WriteProtectCopier::~WriteProtectCopier() {
  {
    std::lock_guard lock(collapse_mutex_);
    stopping_ = true;
    collapse_queue_.clear();
  }
  collapse_cv_.notify_all();
  if (collapser_.joinable()) collapser_.join();
  close(stop_fd_);
  if (uffd_ >= 0) close(uffd_);
}

// Note [Copy-on-write failures]
// A userfaultfd call that fails must neither leave a training thread waiting (or faulting again
// and again on a page that stays protected) nor go unreported. So:
//  - Every failure of a copy() is recorded (the first one: the call and its errno; the handler
//    records without allocating) and copy() then throws Error(kIoError) naming it, after it has
//    copied and unprotected whatever it protected: the save fails with the reason.
//  - Known, harmless refusals are not failures: UFFDIO_REGISTER's EINVAL, EPERM and EBUSY (memory
//    that cannot be protected, copied before release as documented) and ENOMEM for a group (a hole
//    between its sources: its sources are registered one by one); UFFDIO_WRITEPROTECT's ENOENT over a range
//    something in which was unmapped or mapped again since it was registered (the memory between
//    sources, not the sources: their own pages are protected or unprotected one by one).
//  - A failure before `released` (registering, protecting, the state's mmap) ends the copy at once:
//    nothing is released, and unregistering (below) makes everything writable again.
//  - A page is made writable by unprotecting it (which wakes its writers), else by unregistering
//    it (which clears the protection; then UFFDIO_WAKE wakes them), else, when copy() ends, by closing
//    the userfaultfd, which unregisters everything: copy-on-write is then off in this process
//    (instance() says why). A writer never faults on an unprotectable page in a loop: it waits,
//    asleep, for one of those, and the copy (which never waits for a writer) ends in bounded time.
//  - The fault handler keeps serving when poll() or read() fail (and records it); writers it
//    cannot serve are woken as copy() unprotects their chunks.
void WriteProtectCopier::record_failure(const char* call, int errnum) noexcept {
  const char* none = nullptr;
  if (failed_call_.compare_exchange_strong(none, call)) failed_errno_.store(errnum);
}

void WriteProtectCopier::throw_if_failed() {
  const char* call = failed_call_.load();
  if (call == nullptr) return;
  throw Error(ErrorCode::kIoError,
              std::string("copy-on-write staging failed: ") + call + " failed: " +
                  std::strerror(failed_errno_.load()) +
                  "; the sources were made writable again and this save is abandoned (set "
                  "StagingOptions::copy_on_write=false or FASTDCP_COPY_ON_WRITE=0 to stage by plain copies)");
}

void WriteProtectCopier::release(uintptr_t begin, uintptr_t end) noexcept {
  const Range range{begin, end};
  const int error = set_protection(uffd_, range, false);
  if (error == 0) return;
  if (error == ENOENT) {  // not registered (any more), so not protected: a writer may still wait
    wake(uffd_, range);
    return;
  }
  record_failure(calls::kUnprotect, error);
  if (const int unregister_error = unregister_range(uffd_, range)) {
    record_failure(calls::kUnregister, unregister_error);
    must_close_.store(true);
  }
}

// Note [Fault handler]
// The handler serves writes that training makes to protected pages. Those writers may hold any
// lock (malloc's included), so the handler takes none they could hold, allocates nothing, and
// writes only to memory that cannot be protected: its stack, this object (static storage) and the
// snapshot's own mapping. A write whose chunk is pending is served by copying the chunk first;
// one whose chunk is being copied by copy() waits for it; then the chunk is unprotected, which
// wakes the writer.
void WriteProtectCopier::handler_loop() {
  uffd_msg messages[64];
  // After a failed poll or read (Note [Copy-on-write failures]): try again shortly, until stopped.
  auto failed = [&](const char* call, int error) {
    record_failure(call, error);
    if (stop_handler_.load()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return false;
  };
  for (;;) {
    pollfd fds[2] = {{uffd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    int error = fault::injected(calls::kPoll);
    if (!error && poll(fds, 2, -1) < 0) error = errno;
    if (error == EINTR) continue;
    if (error) {
      if (failed(calls::kPoll, error)) return;
      continue;
    }
    if (fds[1].revents) return;
    error = fault::injected(calls::kRead);
    const ssize_t n = error ? -1 : read(uffd_, messages, sizeof(messages));
    if (n < 0) {
      if (!error) error = errno;
      if (error != EAGAIN && error != EINTR && failed(calls::kRead, error)) return;
      continue;  // EAGAIN: another wake-up raced us
    }
    for (ssize_t i = 0; i < n / static_cast<ssize_t>(sizeof(uffd_msg)); ++i) {
      if (messages[i].event == UFFD_EVENT_PAGEFAULT) serve_fault(messages[i].arg.pagefault.address);
    }
  }
}

// Note [Huge pages for protected sources]
// Write-protecting costs per page table entry: about 40 ms per GiB of 4 KiB pages on this VM,
// 0.1 ms per GiB of 2 MiB pages. So after a protected copy, the 2 MiB-aligned parts of each large
// source are collapsed into transparent huge pages (MADV_COLLAPSE, Linux 6.1+), and the next
// saves of those tensors protect them per huge page. Collapsing copies the memory once (about
// 2.5 s per GiB here), so it runs on a thread of its own, after the copy, never delaying a save;
// it is skipped for memory already in huge pages, cannot happen while a range is protected, and
// its failures (THP disabled, pinned pages) only leave the pages as they were. The memory must
// still be allocated when its turn comes; if it was freed meanwhile, madvise fails or applies to
// its next owner, which is harmless. FASTDCP_COLLAPSE_HUGE_PAGES=0 turns it off.
void WriteProtectCopier::collapse_later(const std::vector<CopyOp>& ops) {
  static const bool enabled = [] {
    const char* env = std::getenv("FASTDCP_COLLAPSE_HUGE_PAGES");
    return !(env && std::string(env) == "0");
  }();
  if (!enabled) return;
  std::lock_guard lock(collapse_mutex_);
  if (stopping_) return;
  for (const CopyOp& op : ops) {
    const auto src = reinterpret_cast<uintptr_t>(op.src);
    const uintptr_t begin = (src + kChunkBytes - 1) & ~(kChunkBytes - 1);
    const uintptr_t end = (src + op.nbytes) & ~(kChunkBytes - 1);
    if (begin < end) collapse_queue_.emplace_back(begin, end);
  }
  if (collapse_queue_.empty() || collapser_running_) return;
  // The previous collapser has left its loop (collapser_running_ was cleared under this lock).
  if (collapser_.joinable()) collapser_.join();
  try {
    collapser_ = start_thread("page-table collapse", [this] { collapser_loop(); });  // waits for this lock
    collapser_running_ = true;
  } catch (const Error&) {
    collapse_queue_.clear();  // huge pages only speed up later copies: none is needed
  }
}

// Runs until the queue is empty, so that no thread of ours outlives the work (a process that
// forks, or ThreadSanitizer, can then see itself single-threaded between saves).
void WriteProtectCopier::collapser_loop() {
  std::unique_lock lock(collapse_mutex_);
  while (!stopping_ && !collapse_queue_.empty()) {
    const auto [begin, end] = collapse_queue_.front();
    collapse_queue_.pop_front();
    lock.unlock();
    // One huge page per call, so that stopping (and the memory's other users) never wait long.
    for (uintptr_t at = begin; at < end; at += kChunkBytes) {
      int error = fault::injected(calls::kCollapse);
      if (!error && madvise(reinterpret_cast<void*>(at), kChunkBytes, MADV_COLLAPSE) != 0) error = errno;
      if (error && error != EAGAIN) break;
      std::lock_guard check(collapse_mutex_);
      if (stopping_) break;
    }
    lock.lock();
  }
  collapser_running_ = false;
  collapse_cv_.notify_all();
}

void WriteProtectCopier::wait_for_collapses() {
  std::unique_lock lock(collapse_mutex_);
  collapse_cv_.wait(lock, [&] { return !collapser_running_; });
}


void WriteProtectCopier::serve_fault(uintptr_t address) {
  const uintptr_t page = address & ~(page_bytes() - 1);
  std::lock_guard lock(snapshot_mutex_);
  if (current_) {
    const size_t chunk = current_->chunk_of(page);
    // A page between sources (protected with them) holds nothing to stage: it is only unprotected,
    // and the chunk's sources stay protected (a write there by another thread before release used
    // to have them copied before it, and left out of bytes_copied_after_release).
    if (chunk != SIZE_MAX && current_->holds_source_bytes(chunk, {page, page + page_bytes()})) {
      if (copy_chunk_and_release(*current_, chunk)) {
        current_->counters->write_faults.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      // copy() is copying it, and it never waits for a writer; or it is copied already.
      while (current_->states[chunk].load(std::memory_order_acquire) != kCopied) std::this_thread::yield();
    }
  }
  // Copied already, holding no source bytes, or from no copy running: unprotect the page, which
  // also wakes the writer. It
  // may still be protected where its chunk's unprotect failed or did not reach it (remapped memory).
  release(page, page + page_bytes());
}

// Note [Counting copies after release]
// bytes_copied_after_release counts every chunk whose copy was taken on (pending -> copying) once
// the release flag was set, which copy() does just before it calls `released`, whichever thread
// copies it: copy() itself, or the handler for a write made by training. A chunk the handler
// copied earlier, for a write made before the release (malloc's metadata beside a source, by
// another thread), is not counted, so the figure is exactly the bytes copied while training may
// run. (It used to be decided per source, by its first chunk at the release.)
bool WriteProtectCopier::copy_chunk_and_release(Snapshot& snapshot, size_t chunk) {
  std::atomic<uint8_t>& state = snapshot.states[chunk];
  uint8_t expected = kPending;
  if (!state.compare_exchange_strong(expected, kCopying, std::memory_order_seq_cst)) return false;
  const bool after_release = snapshot.counters->released.load();
  const uint64_t bytes = snapshot.copy_chunk(chunk);
  if (after_release) snapshot.counters->bytes_after_release.fetch_add(bytes, std::memory_order_relaxed);
  if (const int error = set_protection(uffd_, snapshot.chunk_range(chunk), false)) {
    // ENOENT: memory between sources in this chunk was unmapped and mapped again meanwhile (it is
    // no longer registered, which fails the whole range). Either way, release the sources' own pages.
    if (error != ENOENT) record_failure(calls::kUnprotect, error);
    snapshot.for_each_piece(chunk, [&](const CopyOp&, Range part) {
      const Range pages = page_cover(part.begin, part.end);  // chunk ranges are page-aligned
      release(pages.begin, pages.end);
    });
  }
  state.store(kCopied, std::memory_order_release);
  return true;
}

WriteProtectCopier::Result WriteProtectCopier::copy(
    std::vector<CopyOp> ops, const std::function<void(const std::vector<CopyOp>&)>& copy_unprotected,
    const std::function<void()>& released) {
  std::lock_guard run(run_mutex_);
  Result result;
  std::erase_if(ops, [](const CopyOp& op) { return op.nbytes == 0; });
  std::sort(ops.begin(), ops.end(), [](const CopyOp& a, const CopyOp& b) { return a.src < b.src; });
  uint64_t total = 0;
  for (const CopyOp& op : ops) total += op.nbytes;

  // Page-aligned covers of the sources: `parts` join overlapping covers (sources sharing a page),
  // groups (below) join parts closer than kMergeGapBytes. A group that cannot be registered (a
  // hole or an unsupported mapping inside it) is registered part by part instead.
  const std::vector<Range> parts =
      sorted_covers(ops, [](const CopyOp& op) { return std::pair{reinterpret_cast<uintptr_t>(op.src), op.nbytes}; });
  const std::vector<Range> destinations =
      sorted_covers(ops, [](const CopyOp& op) { return std::pair{reinterpret_cast<uintptr_t>(op.dst), op.nbytes}; });
  // A destination inside a protected range would make the copy fault on its own writes: one on a
  // source's page falls back to plain copies, and no group spans one.
  const bool destination_protected =
      std::any_of(destinations.begin(), destinations.end(), [&](const Range& d) { return meets(parts, d); });
  if (total < kMinProtectedBytes || destination_protected || retired_.load()) {
    copy_unprotected(ops);
    released();
    return result;
  }
  failed_call_.store(nullptr);
  // The fault handler runs while anything is registered: it is started here and stopped (after
  // the block below has unregistered everything) on every way out.
  struct ServingHandler {
    WriteProtectCopier& self;
    std::thread thread;
    explicit ServingHandler(WriteProtectCopier& copier)
        : self(copier), thread(start_thread("copy-on-write fault handler", [this] { self.handler_loop(); })) {}
    ~ServingHandler() {
      self.stop_handler_.store(true);
      const uint64_t one = 1;
      if (write(self.stop_fd_, &one, sizeof(one)) < 0) {
      }
      thread.join();
      uint64_t count = 0;
      if (read(self.stop_fd_, &count, sizeof(count)) < 0) {  // reset the eventfd for the next copy
      }
      self.stop_handler_.store(false);
      if (self.must_close_.exchange(false)) self.retire();
    }
  };
  std::optional<ServingHandler> serving_handler(std::in_place, *this);
  // Everything protected is unprotected and unregistered when this block ends, however it ends.
  std::vector<CopyOp> protected_ops;
  {
    std::vector<Range> registered;
    std::vector<std::pair<size_t, size_t>> registered_parts;  // per registered range: its parts [first, last)
    struct Unregister {  // on every way out; also clears any protection left and wakes its writers
      WriteProtectCopier& self;
      const std::vector<Range>& ranges;
      const std::vector<std::pair<size_t, size_t>>& ranges_parts;
      const std::vector<Range>& parts;
      ~Unregister() {
        for (size_t i = 0; i < ranges.size(); ++i) {
          const int error = unregister_range(self.uffd_, ranges[i]);
          if (error == 0) continue;
          // EINVAL: memory between the parts was mapped again, as something that cannot be
          // registered: unregister the sources' own ranges.
          if (error != EINVAL) self.record_failure(calls::kUnregister, error);
          for (size_t k = ranges_parts[i].first; k < ranges_parts[i].second; ++k) {
            if (const int part_error = unregister_range(self.uffd_, parts[k])) {
              self.record_failure(calls::kUnregister, part_error);
              self.must_close_.store(true);  // Note [Copy-on-write failures]
            }
          }
        }
      }
    } unregister_all{*this, registered, registered_parts, parts};
    for (size_t i = 0; i < parts.size();) {
      size_t j = i + 1;
      while (j < parts.size() && parts[j].begin - parts[j - 1].end <= kMergeGapBytes &&
             !meets(destinations, {parts[j - 1].end, parts[j].begin})) {
        ++j;
      }
      const Range group{parts[i].begin, parts[j - 1].end};
      const int error = register_range(uffd_, group);
      if (error == 0) {
        registered.push_back(group);
        registered_parts.emplace_back(i, j);
      } else if (j == i + 1) {
        if (!cannot_be_protected(error)) record_failure(calls::kRegister, error);
      } else {
        // ENOMEM: a hole between the sources.
        if (!cannot_be_protected(error) && error != ENOMEM) record_failure(calls::kRegister, error);
        for (size_t k = i; k < j; ++k) {
          if (const int part_error = register_range(uffd_, parts[k])) {
            if (!cannot_be_protected(part_error)) record_failure(calls::kRegister, part_error);
          } else {
            registered.push_back(parts[k]);
            registered_parts.emplace_back(k, k + 1);
          }
        }
      }
      i = j;
    }
    throw_if_failed();

    Snapshot snapshot;
    std::vector<CopyOp> unprotected;
    {
      // Ops whose sources lie in a registered range go to the snapshot; the others are copied now.
      size_t r = 0;
      for (const CopyOp& op : ops) {
        const auto src = reinterpret_cast<uintptr_t>(op.src);
        while (r < registered.size() && registered[r].end <= src) ++r;
        if (r < registered.size() && registered[r].begin <= src) {
          snapshot.ops.push_back(op);
        } else {
          unprotected.push_back(op);
        }
      }
    }
    for (const Range& r : registered) snapshot.intervals.push_back({r, 0});
    snapshot.index_chunks();
    {
      std::lock_guard lock(snapshot_mutex_);
      current_ = &snapshot;
    }
    struct Uninstall {  // runs before unregister_all; a fault read after it is only released
      WriteProtectCopier& self;
      ~Uninstall() {
        std::lock_guard lock(self.snapshot_mutex_);
        self.current_ = nullptr;
      }
    };
    Uninstall uninstall{*this};

    for (size_t i = 0; i < registered.size(); ++i) {
      int error = set_protection(uffd_, registered[i], true);
      if (error == ENOENT) {
        // Memory between its sources was unmapped or mapped again since it was registered (by
        // another thread; the kernel stops at that memory): protect the sources' own pages.
        error = 0;
        for (size_t k = registered_parts[i].first; k < registered_parts[i].second && !error; ++k) {
          error = set_protection(uffd_, parts[k], true);
        }
      }
      if (error) record_failure(calls::kWriteProtect, error);
    }
    throw_if_failed();  // nothing is released yet; unregistering makes it all writable again

    std::exception_ptr failure;
    try {
      copy_unprotected(unprotected);
      snapshot.counters->released.store(true);  // Note [Counting copies after release]
      released();
    } catch (...) {
      failure = std::current_exception();  // still copy and unprotect everything before reporting it
    }
    const size_t chunks = snapshot.chunk_count();
    // Back to front: training tends to write its tensors in order (an optimizer step), so the
    // handler copies from the front what it writes first while this thread copies from the back.
    for (size_t c = chunks; c-- > 0;) copy_chunk_and_release(snapshot, c);
    for (size_t c = 0; c < chunks; ++c) {
      while (snapshot.states[c].load(std::memory_order_acquire) != kCopied) std::this_thread::yield();
    }
    result.write_faults = snapshot.counters->write_faults.load();
    result.bytes_copied_after_release = snapshot.counters->bytes_after_release.load();
    {
      // The handler reads snapshot.ops (holds_source_bytes): it stops before they are swapped out.
      // Every chunk is copied, so from here a fault is only released, as it would be anyway.
      std::lock_guard lock(snapshot_mutex_);
      current_ = nullptr;
    }
    protected_ops.swap(snapshot.ops);  // no allocation while a writer may still wait inside malloc
    if (failure) std::rethrow_exception(failure);
  }
  serving_handler.reset();
  throw_if_failed();
  collapse_later(protected_ops);  // Note [Huge pages for protected sources]
  return result;
}

void WriteProtectCopier::retire() noexcept {
  close(uffd_);  // unregisters everything left and wakes its writers
  uffd_ = -1;
  const char* call = failed_call_.load();
  try {
    retired_why_ = "copy-on-write staging was turned off in this process after " +
                   std::string(call ? call : "?") + " failed: " +
                   std::strerror(failed_errno_.load());
  } catch (...) {
  }
  retired_.store(true, std::memory_order_release);
}

}  // namespace fastdcp::detail
