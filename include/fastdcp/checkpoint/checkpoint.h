#pragma once
// Writing and reading checkpoints: one directory, one safetensors-compatible data file per rank,
// and a manifest written last that commits them (docs/format.md).
//
// Note [Commit protocol]
// A save picks generation g = (the committed manifest's generation) + 1, the same on every rank
// since they read the same manifest. It commits in two phases, through blobs in the checkpoint's
// store (files in its directory for file://, Note [Stores]), which every rank shares:
//  1. Each rank writes checkpoint_<rank>.g<g>.safetensors, fsyncs it, runs pre_commit, and votes:
//     a receipt (rank_<rank>.g<g>.json: its file's size and header checksum) when all went well,
//     a failure record (rank_<rank>.g<g>.failed.json, with the error) when anything failed. Then
//     the barrier (a failed rank joins it too, so that no rank waits it out). A vote is final: a
//     rank that voted to commit takes the commit's outcome, even if the barrier fails.
//  2. Rank 0 collects every rank's vote (within the barrier timeout). All receipts: it writes
//     manifest.json, put if absent (replaced where overwrite is asked): that put is the commit,
//     durable when it returns, and only then are the files of other generations removed. A failure record (its own included), or a vote missing at the timeout: rank 0
//     writes its failure record, which marks the attempt abandoned. Rank 0 decides only once
//     every rank has voted, because a rank that has not voted may not have picked its generation
//     yet. Every rank waits (within the same timeout) for the decision before it returns, so
//     every rank's save succeeds or fails together and none hangs. An abandoned generation is not
//     used again: the next save takes the first generation without rank 0's failure record, so
//     no vote of an abandoned attempt is taken for a later one. (Ranks save in lockstep, as with
//     any collective.)
// A crash at any moment leaves either the previous manifest with all its files, or the new one
// with all of its own; files no manifest names are never read, and the next save removes them.
//
// Note [One writer per checkpoint path]
// Each rank holds the store's lock on rank_<rank>.lock (Store::try_lock: a flock for files) for its
// whole save, the commit included, so a second process saving the same rank to the same path (a restarted job
// whose old writer still runs) fails at once with Error(kFailedPrecondition) instead of writing
// over the first one's files. Holding the lock also makes the files of its generation ours to
// remove: leftovers of a crashed save (whose lock died with it) are removed before being created
// afresh (Note [Files the writer creates] in fastdcp/io/file.h). A file system without flock
// gets a warning, and the save goes on unlocked.

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fastdcp/format/manifest.h"
#include "fastdcp/format/rank_file.h"
#include "fastdcp/io/file.h"
#include "fastdcp/io/io_ring.h"
#include "fastdcp/memory/cuda_runtime.h"
#include "fastdcp/storage/store.h"
#include "fastdcp/tensor/value.h"

namespace fastdcp {

class DeviceAllocator;  // fastdcp/checkpoint/device_targets.h

struct RankInfo {
  int global_rank = 0;
  int global_world_size = 1;
};

// What upstream calls a barrier: every rank calls execute(); it returns once all did, or throws.
class Barrier {
 public:
  virtual ~Barrier() = default;
  virtual void execute(std::chrono::milliseconds timeout) = 0;
};

// Called around the commit on every rank, with the checkpoint directory.
class WriterHook {
 public:
  virtual ~WriterHook() = default;
  virtual void pre_commit(const std::string& path) = 0;
  virtual void post_commit(const std::string& path) = 0;
};

struct WriterOptions {
  // Replacing a committed checkpoint must be asked for; the old one stays loadable until the
  // new one is committed.
  bool overwrite = false;
  // How the caller's API spells turning `overwrite` on, for the error that refuses a replacement.
  std::string overwrite_option = "WriterOptions{.overwrite = true}";
  // Threads writing (and checksumming) in parallel; 0: one per core, at least 4.
  int io_threads = 0;
  // false (the default): buffered pwritev from the staged buffers into preallocated space, with
  // early writeback and the pages dropped once durable (Note [Buffered writes]). true: O_DIRECT
  // through aligned bounce buffers, many windows in flight; falls back to buffered writes where
  // the file system has no O_DIRECT.
  bool direct_io = false;
  // How O_DIRECT windows reach the disk (Note [I/O engines] in fastdcp/io/io_ring.h).
  IoEngine io_engine = IoEngine::kThreads;
  // How long the barrier, and the committing rank's wait for every rank's receipt, may take.
  std::chrono::milliseconds barrier_timeout = std::chrono::seconds(600);
  // Copies the device tensors of a write (Note [Device tensors in a synchronous write]); null:
  // CudaRuntime::instance().
  std::shared_ptr<CudaRuntime> cuda;
};

struct WriteStats {
  uint64_t bytes_written = 0;  // this rank's file
  double seconds_data = 0;     // writing and syncing the data file
  double seconds_total = 0;    // including the commit
  std::string file;            // this rank's data file
};

class CheckpointWriter {
 public:
  explicit CheckpointWriter(RankInfo rank = {}, WriterOptions options = {}, std::shared_ptr<Barrier> barrier = nullptr,
                            std::shared_ptr<WriterHook> hook = nullptr);

  // Writes `state_dict` as this rank's part of the checkpoint at `path` and commits it; see Note
  // [Commit protocol]. Host tensors are written from where they are (staged ones, for a write that
  // must not see training change them); CUDA tensors are copied to the host first (Note [Device
  // tensors in a synchronous write]). On failure nothing is committed and the previous
  // checkpoint at `path`, if any, is untouched.
  WriteStats write(const std::string& path, const Value& state_dict);
  // The same for a state dict already planned (attach_plan: Note [Shared state dicts]): its header
  // is written as it was rendered, with the checksums filled in.
  WriteStats write(const std::string& path, RankFilePlan plan);

  // This rank cannot take part in the save at `path` (its state could not even be prepared): votes
  // against it, so that every rank's save fails at once, and returns with rank 0's decision.
  void abandon(const std::string& path, const std::string& error);

  const RankInfo& rank() const { return rank_; }
  const WriterOptions& options() const { return options_; }

 private:
  struct Save;  // one save: its store, this rank's lock on it, its generation (checkpoint.cpp)
  Save begin_save(const std::string& path) const;
  void finish_save(const Save& save, const std::optional<std::string>& failure);
  WriteStats write_planned(const std::string& path, const std::function<RankFilePlan()>& make_plan);
  WriteStats write_rank_file(storage::Store& store, RankFilePlan plan, uint64_t generation, ManifestRank& receipt);
  void vote_failed(storage::Store& store, uint64_t generation, const std::string& error) noexcept;
  // Rank 0: the votes of ranks first_rank.. (within the barrier timeout); why the save cannot commit, if it cannot.
  std::optional<std::string> collect_votes(storage::Store& store, uint64_t generation, Manifest& manifest,
                                           int first_rank) const;
  void commit(storage::Store& store, uint64_t generation, std::optional<std::string> why);
  void await_commit(storage::Store& store, uint64_t generation) const;

  RankInfo rank_;
  WriterOptions options_;
  std::shared_ptr<Barrier> barrier_;
  std::shared_ptr<WriterHook> hook_;
};

struct ReadOptions {
  bool verify_checksums = true;
  int io_threads = 0;  // 0: one per core, at least 4
  // Full loads only: tensors view a private, copy-on-write mapping of the file instead of being
  // read into memory (checksums, if verified, read every page once).
  bool use_mmap = false;
  // Full loads only: the file's data is read with O_DIRECT, skipping the page cache, where the file
  // system supports it. Either way, all tensors of a full load share one allocation (Note
  // [File-image reads] in src/checkpoint/rank_file_io.h).
  bool direct_io = true;
  // How full loads move their windows (Note [I/O engines] in fastdcp/io/io_ring.h).
  IoEngine io_engine = IoEngine::kThreads;
  // Full loads only: sharded keys are assembled whole from every rank's chunks. Without, they stay
  // this rank's chunks (a ShardedTensor), for a caller that assembles a few at a time with
  // CheckpointReader::read_sharded (an export of a checkpoint larger than memory).
  bool assemble_sharded = true;
  // Full loads only: where the loaded tensors go, the CPU or a CUDA device (torch's map_location;
  // Note [Loading onto a device]), their memory from `device_allocator` (null: cudaMalloc).
  Device device = Device::cpu();
  std::shared_ptr<DeviceAllocator> device_allocator;
  // Copies into a read_into target's CUDA tensors (Note [Loading into device tensors]) and onto
  // `device`; null: CudaRuntime::instance().
  std::shared_ptr<CudaRuntime> cuda;
};

struct LoadResult {
  std::vector<std::string> missing_keys;     // in the target, not in the checkpoint
  std::vector<std::string> unexpected_keys;  // in the checkpoint, not in the target
};

// Reads `<path>/manifest.json`; Error(kNotFound) for a missing directory, Error(kFailedPrecondition)
// for a directory without a committed checkpoint, Error(kDataLoss) for a damaged manifest.
Manifest read_manifest(const std::string& path);

class CheckpointReader {
 public:
  explicit CheckpointReader(RankInfo rank = {}, ReadOptions options = {});

  // The whole state dict this rank saved.
  Value read(const std::string& path) const;

  // Fills `target` in place: every tensor in it whose key path the checkpoint has receives the
  // saved values (shape and dtype must match; non-contiguous targets are fine); other leaves are
  // replaced by the saved ones. With `strict`, any missing or unexpected key or any mismatch is an
  // error raised before anything in `target` changes.
  LoadResult read_into(const std::string& path, Value& target, bool strict = false) const;

  // The full tensors of the sharded keys `keys` (key paths as the manifest's index names them), in
  // order, each assembled from the saved chunks; only those chunks' bytes are read.
  // Error(kInvalidArgument) naming a key the index lacks.
  std::vector<Tensor> read_sharded(const std::string& path, const std::vector<std::string>& keys) const;

 private:
  RankInfo rank_;
  ReadOptions options_;
};

// Fills `target` from `source`, a state dict already in memory (a checkpoint of another format
// that the caller has read, e.g. torch DCP's): the same matching, checks, key reports and
// strictness as CheckpointReader::read_into, so every format loads with one set of rules.
// `source_name` names the source in errors. Tensors that a None in the target takes (Note [None
// in a load target]) get storages of their own, since `source`'s memory stays the caller's.
LoadResult load_into(Value& target, const Value& source, bool strict, const std::string& source_name);

struct VerifyReport {
  int files = 0;
  uint64_t bytes = 0;
  uint64_t chunks = 0;
  // Plain safetensors files (docs/format.md): their header and layout are checked, but they carry
  // no checksums to check their bytes against.
  int files_without_checksums = 0;
};
// Checks every rank's file against the manifest, its header and tree as a load does, and every
// chunk's checksum; throws Error(kDataLoss) naming the first damaged file, tensor and chunk.
// `progress(done, total)` is called as bytes are checked.
VerifyReport verify_checkpoint(const std::string& path,
                               const std::function<void(uint64_t, uint64_t)>& progress = {});


}  // namespace fastdcp
