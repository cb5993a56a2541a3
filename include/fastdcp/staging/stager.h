#pragma once
// Staging: a training-safe host copy of a state dict, made synchronously or in the background.
//
// Note [Staging semantics] (matching torch.distributed.checkpoint._experimental's DefaultStager)
//  - The staged tree has the source's structure, keys, container kinds and scalar values; every
//    tensor is a CPU tensor with the source's dtype, shape, strides and storage offset.
//  - Within one call, all views of one source storage become views of one staged buffer, whose
//    bytes are copied once. Storage sharing in the input is reproduced exactly, and only that.
//  - Across calls, staged buffers are cached by source storage: staging the same live storages
//    again copies into the same buffers (so earlier staged results see the new values, as
//    upstream). A storage whose size changed gets a new buffer. Cache entries of storages that no
//    longer exist are dropped at the next stage call.
//  - Staged bytes never change when the source changes later (always a copy).
//
// Note [Staging engine]
// A stage call walks the tree once with an explicit stack, deduplicates storages in a reusable
// open-addressing index, and collects one copy per storage. Host copies are split by bytes across
// the copy threads (a 1 GiB tensor is cut into equal parts; 100,000 small tensors are dealt out in
// runs), so cost grows with bytes, not tensor count. Device-to-host copies go on a dedicated
// stream per device that first waits, through an event recorded when stage() is called, on the
// producer's stream; they are chunked, land in pinned buffers, and are completed by an event on
// the copy stream, never by a device-wide synchronize.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "fastdcp/common/future.h"
#include "fastdcp/memory/cuda_runtime.h"
#include "fastdcp/memory/host_pool.h"
#include "fastdcp/tensor/value.h"

namespace fastdcp {

struct StagingOptions {
  // Upstream's four flags, with upstream's defaults.
  bool use_pinned_memory = true;      // register staged buffers with CUDA (downgraded, with a warning, without it)
  bool use_shared_memory = true;      // stage into memfd-backed memory another process can map
  bool use_async_staging = true;      // stage() returns at once; a background worker fills the future
  bool use_non_blocking_copy = true;  // queue all device-to-host copies, then wait once (needs CUDA)

  uint64_t pin_memory_min_bytes = 5;  // smaller storages are not pinned (upstream's default)
  unsigned copy_threads = 0;          // host copy threads; 0: one per hardware thread
  uint64_t memory_budget_bytes = 0;   // 0: unlimited
  uint64_t cuda_copy_chunk_bytes = uint64_t{32} << 20;
  // For calls that ask to be told when the sources may change (on_sources_released): write-protect
  // CPU sources and copy them after telling, where the host allows; Note [Copy-on-write staging].
  bool copy_on_write = true;
};

// Where the producer (training) queued the work that writes the tensors being staged.
struct ProducerStream {
  int device = 0;
  CudaStream stream = nullptr;  // nullptr: the legacy default stream
};

// Note [Staging leases]
// Cached buffers are reused by the next stage call (upstream's semantics), which is wrong for a
// staged tree that a background write still reads. A call made with a lease token holds the
// buffers it stages into for as long as the token lives: no later call writes into them; a
// storage whose cached buffer is held is staged into a fresh buffer from the pool, which becomes
// its cache entry. Dropping the token releases the hold (the buffers themselves live as long as
// any staged tree uses them and then return to the pool), so N tokens alive means at most N + 1
// sets of buffers, and steady state reuses them all.
struct StageCallOptions {
  // Copies of tensors on these devices wait for everything queued on these streams before the
  // stage() call. Empty: the legacy default stream of the calling thread's current device. A device
  // holding tensors but named here by no stream waits for its own legacy default stream.
  std::vector<ProducerStream> producer_streams;
  // See Note [Staging leases]; null: the buffers staged into are not held.
  std::shared_ptr<const void> lease;
  // Called once, before the call's future is ready, as soon as the sources may change again (with
  // copy-on-write staging, before their bytes are all copied); not called when staging fails
  // before that point. A copy-on-write failure after it fails the future (Note [Copy-on-write
  // staging]); the sources may still change.
  // It runs on the staging thread and must not wait for that stager's future.
  std::function<void()> on_sources_released;
};

// Note [Copy-on-write staging]
// A checkpointer must block training only until the sources may change, not until they are
// copied. For calls with on_sources_released, CPU sources are write-protected through
// userfaultfd (UFFDIO_WRITEPROTECT, Linux 6.4+) instead of copied: protecting 1 GiB takes
// milliseconds. The callback then runs, and the staging thread copies the protected sources in
// 2 MiB chunks, unprotecting each once copied. A write to a chunk not yet copied faults; a
// handler thread copies that chunk first and unprotects it, so the writer waits about 0.1 ms once
// per chunk and the staged bytes are exactly those at the stage() call. The future is ready once
// every byte is copied and nothing is protected.
//  - Pages are protected whole, so bytes beside a source (malloc's own, other objects) fault too;
//    their chunk is copied and they go on. Pages between sources less than 256 KiB apart are
//    protected with them; a write there is let through at once, the sources staying protected. The handler takes no lock and allocates nothing, so a
//    writer blocked inside malloc cannot deadlock it (Note [Fault handler]).
//  - Memory that cannot be protected (file mappings, pinned CUDA memory, hugetlbfs, a host
//    without userfaultfd or this feature) is copied before the callback, as without this option.
//  - Writes that bypass the page tables, by a device's DMA into host memory pinned by someone
//    else (cudaHostRegister, RDMA), are not seen: turn copy_on_write off when tensors are written
//    that way. torch's own pinned memory (cudaHostAlloc) cannot be protected, so it is copied.
//  - Sources must stay allocated until the future is ready (the checkpointers keep them alive);
//    in-place writes are what this is for, but a storage freed or reallocated (resize_) meanwhile
//    is not allowed.
//  - Protecting costs per page: about 40 ms per GiB of 4 KiB pages, 0.1 ms per GiB of huge pages.
//    So after a save, large sources are collapsed into transparent huge pages in the background,
//    and later saves of them block training for about a millisecond per GiB (Note [Huge pages
//    for protected sources] in src/staging/write_protect_copier.cpp).
//  - One protected copy runs at a time per process; FASTDCP_COPY_ON_WRITE=0 turns it off.
//  - A userfaultfd call that fails fails the call's future with Error(kIoError) naming the call
//    and errno, after every page is writable again; training never stays blocked on it (Note
//    [Copy-on-write failures] in src/staging/write_protect_copier.cpp). Sources less than 256 KiB
//    apart are protected as one range, never across a staged buffer.

class CheckpointStager {
 public:
  virtual ~CheckpointStager() = default;
  // Stages `state_dict`. The returned future is already complete when staging is synchronous.
  // The tree must not be mutated until the future is ready; it is kept alive until then.
  virtual Future<Value> stage(std::shared_ptr<const Value> state_dict, const StageCallOptions& call = {}) = 0;
  // Releases threads and cached buffers. Staged trees already returned stay valid.
  virtual void close() = 0;
};

struct StagerStats {
  uint64_t stage_calls = 0;
  uint64_t cache_hits = 0;     // storages staged into an existing cached buffer (over all calls)
  uint64_t cache_misses = 0;   // storages that needed a new buffer
  uint64_t cache_entries = 0;
  uint64_t bytes_copied = 0;   // over all calls
  uint64_t leased_skips = 0;   // storages staged into a fresh buffer because their cached one was held
  // Copied after on_sources_released (copy-on-write), counted per 2 MiB chunk: a chunk copied
  // before it, for a write made then, is not counted.
  uint64_t bytes_copied_after_release = 0;
  uint64_t write_faults = 0;   // chunks copied early because the sources were written meanwhile
};

class DefaultStager final : public CheckpointStager {
 public:
  // Throws Error(kInvalidArgument) naming use_non_blocking_copy when it is set and `cuda` has no
  // device. Pinned memory without CUDA is downgraded with a warning (pinning_downgraded()).
  explicit DefaultStager(StagingOptions options = {},
                         std::shared_ptr<const CudaRuntime> cuda = CudaRuntime::instance());
  ~DefaultStager() override;
  DefaultStager(const DefaultStager&) = delete;
  DefaultStager& operator=(const DefaultStager&) = delete;

  Future<Value> stage(std::shared_ptr<const Value> state_dict, const StageCallOptions& call = {}) override;
  // Stages on the calling thread whatever use_async_staging says.
  Value stage_now(const Value& state_dict, const StageCallOptions& call = {});
  // Waits for queued staging, then releases threads, streams and cached buffers. Idempotent.
  void close() override;
  bool closed() const;

  // Drops cache entries of storages that no longer exist and trims unused pool memory.
  void release_unused_memory();

  const StagingOptions& options() const;
  bool pinning_downgraded() const;
  StagerStats stats() const;
  HostMemoryStats memory_stats() const;
  // Whether calls with on_sources_released are staged copy-on-write; why not, when they are not.
  bool copy_on_write_available(std::string* why_not = nullptr) const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace fastdcp
