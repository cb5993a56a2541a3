#include <algorithm>
#include <atomic>
#include <bit>
#include <deque>
#include <optional>
#include <thread>
#include <unordered_map>

#include "fastdcp/common/logging.h"
#include "fastdcp/common/parallel.h"
#include "fastdcp/staging/stager.h"
#include "staging/copy_engine.h"
#include "staging/write_protect_copier.h"
#include "tensor/storage_impl.h"

namespace fastdcp {
namespace {

// Note [Stager cache]
// Entries live in a dense vector, found through the tag each StorageImpl carries (one load, no
// hashing; entries are visited in the order the tree is walked) and, failing that, a hash index.
// Entries not used by a call are dropped at its end once their storage is dead. A new storage at a
// dead one's address may meet the old entry first: it then simply reuses that buffer (staged bytes
// are always copied afresh) and takes the entry over. `last_call` also deduplicates storages
// within a call.
struct CacheEntry {
  const StorageImpl* key = nullptr;  // nullptr: a free slot
  std::weak_ptr<const StorageImpl> source;
  Storage staged;
  uint64_t last_call = 0;
  std::weak_ptr<const void> held_by;  // the lease of the call that staged into it; Note [Staging leases]
};

constexpr int kTagSlotBits = 40;
std::atomic<uint64_t> g_next_stager_id{1};

struct DeviceCopy {
  int device;
  void* dst;
  const void* src;
  size_t nbytes;
};

// Events recorded on the producers' streams when stage() was called; see Note [Staging engine].
struct ProducerEvents {
  std::vector<std::pair<int, CudaEvent>> events;  // (device, event)
};

struct Request {
  std::shared_ptr<const Value> state_dict;
  ProducerEvents producers;
  std::shared_ptr<const void> lease;
  std::function<void()> on_sources_released;
  Promise<Value> promise;
};

// Slabs are at most 1/16 of a budget, so that a small budget is not spent on one slab.
HostPoolOptions pool_options(uint64_t budget) {
  HostPoolOptions options;
  options.budget_bytes = budget;
  if (budget != 0) {
    options.slab_bytes = std::clamp<size_t>(std::bit_floor(budget / 16), size_t{64} << 10, options.slab_bytes);
    options.small_max_bytes = std::min(options.small_max_bytes, options.slab_bytes);
  }
  return options;
}

}  // namespace

struct DefaultStager::Impl {
  StagingOptions options;
  std::shared_ptr<const CudaRuntime> cuda;
  bool has_cuda = false;
  bool pin = false;
  bool pinning_downgraded = false;
  HostMemoryPool pool;
  std::optional<detail::HostCopyEngine> copier;  // reset by close() to release its threads

  // Staging state: one stage at a time.
  mutable std::mutex stage_mutex;
  const uint64_t stager_id = g_next_stager_id.fetch_add(1);
  std::vector<CacheEntry> cache;  // see Note [Stager cache]
  std::vector<uint32_t> free_slots;
  std::unordered_map<const StorageImpl*, uint32_t> cache_index;
  uint64_t call_epoch = 0;
  std::shared_ptr<const void> call_lease;
  size_t storages_this_call = 0;
  uint64_t host_bytes_this_call = 0;
  std::vector<DeviceCopy> device_copies;
  bool copy_on_write_this_call = false;
  std::vector<detail::CopyOp> protected_copies;  // host copies deferred by copy-on-write staging
  std::vector<std::pair<const Value*, Value*>> walk_stack;
  std::vector<CudaStream> copy_streams;  // per device, created on first use
  std::vector<CudaEvent> copy_done;      // per device
  StagerStats stats;

  // Background staging.
  std::mutex queue_mutex;
  std::condition_variable queue_cv;
  std::deque<Request> queue;
  bool closing = false;
  bool closed = false;
  std::thread worker;

  Impl(const StagingOptions& opts, std::shared_ptr<const CudaRuntime> runtime)
      : options(opts),
        cuda(runtime ? std::move(runtime) : CudaRuntime::unavailable("no CUDA runtime given")),
        pool(pool_options(opts.memory_budget_bytes), cuda),
        copier(std::in_place, opts.copy_threads) {
    has_cuda = cuda->available();
    if (options.use_non_blocking_copy && !has_cuda) {
      throw Error(ErrorCode::kInvalidArgument,
                  "use_non_blocking_copy=true requires a CUDA device, but none is available (" +
                      cuda->unavailable_reason() + "); set use_non_blocking_copy=false to stage on this host");
    }
    pin = options.use_pinned_memory && has_cuda;
    if (options.use_pinned_memory && !has_cuda) {
      pinning_downgraded = true;
      warn("Ignoring pin_memory flag for checkpoint staging: CUDA is unavailable (" + cuda->unavailable_reason() +
           "); staged buffers are not pinned");
    }
    if (options.cuda_copy_chunk_bytes == 0) {
      throw Error(ErrorCode::kInvalidArgument, "cuda_copy_chunk_bytes must be positive");
    }
    if (options.use_async_staging) worker = start_thread("background staging", [this] { worker_loop(); });
  }

  ~Impl() { shutdown(); }

  // --- producer ordering -------------------------------------------------------------------
  ProducerEvents record_producer_events(const StageCallOptions& call) {
    ProducerEvents out;
    if (!has_cuda) return out;
    std::vector<ProducerStream> streams = call.producer_streams;
    if (streams.empty()) streams.push_back({cuda->current_device(), nullptr});
    try {
      for (const auto& producer : streams) {
        CudaEvent event = cuda->create_event(producer.device);
        out.events.emplace_back(producer.device, event);
        CudaDeviceGuard guard(*cuda, producer.device);
        cuda->record_event(event, producer.stream);
      }
    } catch (...) {
      release_events(out);
      throw;
    }
    return out;
  }

  void release_events(ProducerEvents& producers) {
    for (auto [device, event] : producers.events) cuda->destroy_event(device, event);
    producers.events.clear();
  }

  // --- the walk ------------------------------------------------------------------------------
  // Finds the cache slot of `id`, or returns false.
  bool lookup(const StorageImpl* id, uint32_t& slot) {
    const uint64_t tag = id->stager_tag.load(std::memory_order_relaxed);
    if ((tag >> kTagSlotBits) == stager_id) {
      slot = static_cast<uint32_t>((tag & ((uint64_t{1} << kTagSlotBits) - 1)) - 1);
      if (slot < cache.size() && cache[slot].key == id) return true;
    }
    auto it = cache_index.find(id);
    if (it == cache_index.end()) return false;
    slot = it->second;
    if (cache[slot].source.expired()) cache[slot].source = id->weak_from_this();
    set_tag(id, slot);
    return true;
  }

  void set_tag(const StorageImpl* id, uint32_t slot) {
    id->stager_tag.store((stager_id << kTagSlotBits) | (uint64_t{slot} + 1), std::memory_order_relaxed);
  }

  Storage new_staged_buffer(size_t nbytes) {
    const HostMemoryTraits traits{pin && nbytes >= options.pin_memory_min_bytes, options.use_shared_memory};
    std::shared_ptr<HostAllocation> alloc = pool.allocate(nbytes, traits);
    const HostMemoryInfo info{traits.pinned, traits.shared, alloc->shared_fd(), alloc->shared_offset()};
    void* data = alloc->data();
    return Storage::wrap(data, nbytes, Device::cpu(), std::move(alloc), info);
  }

  // Drops the entries, unused by the current call, of storages that no longer exist; their buffers
  // return to the pool once no staged tree uses them. Free when the call used every entry.
  void drop_dead_entries() {
    if (cache.size() - free_slots.size() <= storages_this_call) return;
    for (uint32_t slot = 0; slot < cache.size(); ++slot) {
      CacheEntry& entry = cache[slot];
      if (entry.key && entry.last_call != call_epoch && entry.source.expired()) {
        cache_index.erase(entry.key);
        entry = CacheEntry{};
        free_slots.push_back(slot);
      }
    }
  }

  Storage staged_storage_for(const Storage& source) {
    const StorageImpl* id = source.identity();
    const size_t nbytes = source.nbytes();
    uint32_t slot = 0;
    if (lookup(id, slot)) {
      CacheEntry& entry = cache[slot];
      if (entry.last_call == call_epoch) return entry.staged;  // another view of a storage in this call
      if (!entry.held_by.expired()) {
        entry.staged = new_staged_buffer(nbytes);  // still read by a write: Note [Staging leases]
        ++stats.leased_skips;
        ++stats.cache_misses;
      } else if (entry.staged.nbytes() == nbytes) {
        ++stats.cache_hits;
      } else {
        entry.staged = new_staged_buffer(nbytes);  // resized: see upstream-behaviour.md 5.1.7
        ++stats.cache_misses;
      }
    } else {
      Storage staged = new_staged_buffer(nbytes);
      if (free_slots.empty()) {
        slot = static_cast<uint32_t>(cache.size());
        cache.emplace_back();
      } else {
        slot = free_slots.back();
        free_slots.pop_back();
      }
      cache[slot] = CacheEntry{id, source.weak_identity(), std::move(staged), 0, {}};
      cache_index.emplace(id, slot);
      set_tag(id, slot);
      ++stats.cache_misses;
    }
    CacheEntry& entry = cache[slot];
    entry.last_call = call_epoch;
    entry.held_by = call_lease;
    ++storages_this_call;
    if (nbytes != 0) {
      if (source.device().is_cpu()) {
        if (copy_on_write_this_call) {
          protected_copies.push_back({entry.staged.data(), source.data(), nbytes});
        } else {
          copier->add(entry.staged.data(), source.data(), nbytes);  // starts while the walk goes on
        }
        host_bytes_this_call += nbytes;
      } else {
        if (!has_cuda) {
          throw Error(ErrorCode::kUnavailable, "cannot stage a tensor on " + source.device().str() +
                                                   ": CUDA is unavailable (" + cuda->unavailable_reason() + ")");
        }
        device_copies.push_back({source.device().index, entry.staged.data(), source.data(), nbytes});
      }
    }
    return entry.staged;
  }

  Tensor stage_tensor(const Tensor& t) {
    Tensor staged(staged_storage_for(t.storage()), t.dtype(), t.shape(), t.strides(), t.storage_offset());
    staged.share_traits(t);
    return staged;
  }

  Value stage_leaf(const Value& src) {
    switch (src.kind()) {
      case Value::Kind::kNone: return Value();
      case Value::Kind::kBool: return Value(src.as_bool());
      case Value::Kind::kInt: return Value(src.as_int());
      case Value::Kind::kDouble: return Value(src.as_double());
      case Value::Kind::kString: return Value(src.as_string());
      case Value::Kind::kBytes: return Value(src.as_bytes());
      case Value::Kind::kTensor: return Value(stage_tensor(src.as_tensor()));
      case Value::Kind::kSharded: {
        // The chunks are views like any: views of one local storage stay views of one staged one.
        ShardedTensor staged = src.as_sharded();
        for (ShardChunk& c : staged.chunks) c.data = stage_tensor(c.data);
        return Value(std::move(staged));
      }
      case Value::Kind::kList: return Value::list(ValueList(src.size()));
      case Value::Kind::kTuple: return Value::tuple(ValueList(src.size()));
      case Value::Kind::kDict: {
        DictEntries entries;
        entries.reserve(src.size());
        for (const auto& entry : src.entries()) entries.emplace_back(entry.first, Value());
        return Value::dict(std::move(entries));
      }
    }
    return Value();
  }

  // Source storages are scattered through the heap; touching each one is a cache miss. Asking for
  // the storage a few tensors ahead hides most of that latency.
  static void prefetch_storage(const Value& value) {
    if (value.is_tensor()) __builtin_prefetch(value.as_tensor().storage().identity());
  }
  static constexpr size_t kPrefetchAhead = 8;

  // Builds the staged tree and the copy lists; see Note [Deep trees] for why there is no recursion.
  Value plan(const Value& root_src) {
    device_copies.clear();
    walk_stack.clear();
    Value root = stage_leaf(root_src);
    if (root_src.is_container()) walk_stack.emplace_back(&root_src, &root);
    while (!walk_stack.empty()) {
      auto [src, dst] = walk_stack.back();
      walk_stack.pop_back();
      if (src->kind() == Value::Kind::kDict) {
        const auto& in = src->entries();
        auto& out = dst->entries();
        for (size_t i = 0; i < in.size(); ++i) {
          if (i + kPrefetchAhead < in.size()) prefetch_storage(in[i + kPrefetchAhead].second);
          out[i].second = stage_leaf(in[i].second);
          if (in[i].second.is_container()) walk_stack.emplace_back(&in[i].second, &out[i].second);
        }
      } else {
        const auto& in = src->items();
        auto& out = dst->items();
        for (size_t i = 0; i < in.size(); ++i) {
          if (i + kPrefetchAhead < in.size()) prefetch_storage(in[i + kPrefetchAhead]);
          out[i] = stage_leaf(in[i]);
          if (in[i].is_container()) walk_stack.emplace_back(&in[i], &out[i]);
        }
      }
    }
    return root;
  }

  // --- copies ----------------------------------------------------------------------------------
  CudaStream copy_stream(int device) {
    if (device < 0 || device >= cuda->device_count()) {
      throw Error(ErrorCode::kInvalidArgument, "tensor on cuda:" + std::to_string(device) + ", but only " +
                                                   std::to_string(cuda->device_count()) + " CUDA devices exist");
    }
    if (copy_streams.size() < static_cast<size_t>(cuda->device_count())) {
      copy_streams.resize(cuda->device_count(), nullptr);
      copy_done.resize(cuda->device_count(), nullptr);
    }
    if (!copy_streams[device]) {
      copy_streams[device] = cuda->create_stream(device);
      copy_done[device] = cuda->create_event(device);
    }
    return copy_streams[device];
  }

  // Queues the device-to-host copies; returns the devices whose completion must be awaited.
  std::vector<int> issue_device_copies(const ProducerEvents& producers) {
    std::vector<int> devices;
    for (const auto& copy : device_copies) {
      if (std::find(devices.begin(), devices.end(), copy.device) == devices.end()) devices.push_back(copy.device);
    }
    for (int device : devices) {
      CudaStream stream = copy_stream(device);
      bool ordered = false;
      for (auto [event_device, event] : producers.events) {
        if (event_device != device) continue;
        cuda->stream_wait_event(stream, event);
        ordered = true;
      }
      if (!ordered) {
        // No producer stream was named on this device (the caller named only its current device's,
        // and this tensor lives on another): the copies wait for everything queued so far on the
        // device's legacy default stream, never for nothing. A wait captures the event's latest
        // record, so copy_done can be re-recorded after the copies.
        CudaDeviceGuard guard(*cuda, device);
        cuda->record_event(copy_done[device], nullptr);
        cuda->stream_wait_event(stream, copy_done[device]);
      }
    }
    const uint64_t chunk = options.cuda_copy_chunk_bytes;
    for (const auto& copy : device_copies) {
      CudaDeviceGuard guard(*cuda, copy.device);
      CudaStream stream = copy_streams[copy.device];
      for (uint64_t offset = 0; offset < copy.nbytes; offset += chunk) {
        cuda->memcpy_device_to_host_async(static_cast<char*>(copy.dst) + offset,
                                          static_cast<const char*>(copy.src) + offset,
                                          std::min<uint64_t>(chunk, copy.nbytes - offset), stream);
      }
      if (!options.use_non_blocking_copy) {  // blocking copies: each storage completes in turn
        cuda->record_event(copy_done[copy.device], stream);
        cuda->event_synchronize(copy_done[copy.device]);
      }
    }
    for (int device : devices) {
      CudaDeviceGuard guard(*cuda, device);
      cuda->record_event(copy_done[device], copy_streams[device]);
    }
    return devices;
  }

  detail::WriteProtectCopier* copy_on_write_engine(std::string* why_not) const {
    if (!options.copy_on_write) {
      if (why_not) *why_not = "StagingOptions::copy_on_write is false";
      return nullptr;
    }
    return detail::WriteProtectCopier::instance(why_not);
  }

  Value run_stage(const Value& src, ProducerEvents& producers, std::shared_ptr<const void> lease,
                  const std::function<void()>& on_sources_released) {
    struct EventsReleaser {
      Impl* self;
      ProducerEvents& events;
      ~EventsReleaser() { self->release_events(events); }
    } releaser{this, producers};

    std::lock_guard lock(stage_mutex);
    ++call_epoch;
    call_lease = std::move(lease);
    struct LeaseReset {  // the stager itself must not keep the caller's token alive
      std::shared_ptr<const void>& lease;
      ~LeaseReset() { lease.reset(); }
    } lease_reset{call_lease};
    storages_this_call = 0;
    host_bytes_this_call = 0;
    detail::WriteProtectCopier* protector = on_sources_released ? copy_on_write_engine(nullptr) : nullptr;
    copy_on_write_this_call = protector != nullptr;
    protected_copies.clear();
    copier->begin();
    Value staged;
    std::vector<int> devices;
    bool copies_finished = false;
    auto finish_copies = [&] {
      copies_finished = true;
      copier->finish();  // overlaps with the device-to-host DMA
      for (int device : devices) cuda->event_synchronize(copy_done[device]);
    };
    try {
      staged = plan(src);
      devices = issue_device_copies(producers);
      if (protector) {
        const auto result = protector->copy(
            std::move(protected_copies),
            [&](const std::vector<detail::CopyOp>& unprotected) {
              for (const auto& op : unprotected) copier->add(op.dst, op.src, op.nbytes);
              finish_copies();
            },
            on_sources_released);
        stats.bytes_copied_after_release += result.bytes_copied_after_release;
        stats.write_faults += result.write_faults;
      } else {
        finish_copies();
        if (on_sources_released) on_sources_released();
      }
    } catch (...) {
      if (!copies_finished) copier->finish();  // never leave copies running into buffers we may release
      drain_copy_streams();
      throw;
    }
    drop_dead_entries();

    ++stats.stage_calls;
    stats.bytes_copied += host_bytes_this_call;
    for (const auto& op : device_copies) stats.bytes_copied += op.nbytes;
    return staged;
  }

  // After a failed issue, waits (best effort) for copies already queued into our buffers.
  void drain_copy_streams() noexcept {
    for (size_t d = 0; d < copy_streams.size(); ++d) {
      if (!copy_streams[d]) continue;
      try {
        CudaDeviceGuard guard(*cuda, static_cast<int>(d));
        cuda->record_event(copy_done[d], copy_streams[d]);
        cuda->event_synchronize(copy_done[d]);
      } catch (...) {
      }
    }
  }

  // --- background worker ---------------------------------------------------------------------
  void worker_loop() {
    for (;;) {
      Request request;
      {
        std::unique_lock lock(queue_mutex);
        queue_cv.wait(lock, [&] { return closing || !queue.empty(); });
        if (queue.empty()) return;  // closing, and everything queued has been staged
        request = std::move(queue.front());
        queue.pop_front();
      }
      try {
        request.promise.set_value(run_stage(*request.state_dict, request.producers, std::move(request.lease),
                                            request.on_sources_released));
      } catch (...) {
        request.promise.set_exception(std::current_exception());
      }
    }
  }

  void check_open(const char* what) {
    if (closing) throw Error(ErrorCode::kFailedPrecondition, std::string("DefaultStager::") + what + " after close()");
  }

  void shutdown() {
    {
      std::lock_guard lock(queue_mutex);
      if (closed) return;
      closing = true;
    }
    queue_cv.notify_all();
    if (worker.joinable()) worker.join();
    std::lock_guard lock(stage_mutex);
    cache.clear();
    cache_index.clear();
    free_slots.clear();
    for (size_t d = 0; d < copy_streams.size(); ++d) {
      cuda->destroy_event(static_cast<int>(d), copy_done[d]);
      cuda->destroy_stream(static_cast<int>(d), copy_streams[d]);
    }
    copy_streams.clear();
    copy_done.clear();
    copier.reset();
    pool.trim();
    std::lock_guard queue_lock(queue_mutex);
    closed = true;
  }
};

DefaultStager::DefaultStager(StagingOptions options, std::shared_ptr<const CudaRuntime> cuda)
    : impl_(std::make_unique<Impl>(options, std::move(cuda))) {}

DefaultStager::~DefaultStager() = default;

Future<Value> DefaultStager::stage(std::shared_ptr<const Value> state_dict, const StageCallOptions& call) {
  if (!state_dict) throw Error(ErrorCode::kInvalidArgument, "DefaultStager::stage: state_dict is null");
  if (!impl_->options.use_async_staging) return make_ready_future(stage_now(*state_dict, call));
  Request request;
  request.state_dict = std::move(state_dict);
  request.lease = call.lease;
  request.on_sources_released = call.on_sources_released;
  auto future = request.promise.get_future();
  {
    std::lock_guard lock(impl_->queue_mutex);
    impl_->check_open("stage");
    // Recorded under the queue lock so that the events are ordered like the queue.
    request.producers = impl_->record_producer_events(call);
    impl_->queue.push_back(std::move(request));
  }
  impl_->queue_cv.notify_one();
  return future;
}

Value DefaultStager::stage_now(const Value& state_dict, const StageCallOptions& call) {
  {
    std::lock_guard lock(impl_->queue_mutex);
    impl_->check_open("stage_now");
  }
  ProducerEvents producers = impl_->record_producer_events(call);
  return impl_->run_stage(state_dict, producers, call.lease, call.on_sources_released);
}

void DefaultStager::close() { impl_->shutdown(); }

bool DefaultStager::closed() const {
  std::lock_guard lock(impl_->queue_mutex);
  return impl_->closing;
}

void DefaultStager::release_unused_memory() {
  std::lock_guard lock(impl_->stage_mutex);
  ++impl_->call_epoch;  // no entry counts as used
  impl_->storages_this_call = 0;
  impl_->drop_dead_entries();
  impl_->pool.trim();
}

const StagingOptions& DefaultStager::options() const { return impl_->options; }
bool DefaultStager::pinning_downgraded() const { return impl_->pinning_downgraded; }

StagerStats DefaultStager::stats() const {
  std::lock_guard lock(impl_->stage_mutex);
  StagerStats out = impl_->stats;
  out.cache_entries = impl_->cache.size() - impl_->free_slots.size();
  return out;
}

HostMemoryStats DefaultStager::memory_stats() const { return impl_->pool.stats(); }

bool DefaultStager::copy_on_write_available(std::string* why_not) const {
  return impl_->copy_on_write_engine(why_not) != nullptr;
}

}  // namespace fastdcp
