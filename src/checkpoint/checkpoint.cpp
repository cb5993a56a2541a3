// CheckpointWriter, CheckpointReader and verify_checkpoint. See Note [Commit protocol].

#include "fastdcp/checkpoint/checkpoint.h"

#include <fcntl.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>

#include "checkpoint/rank_file_io.h"
#include "checkpoint/reshard.h"
#include "fastdcp/checkpoint/device_targets.h"
#include "fastdcp/common/error.h"
#include "fastdcp/common/logging.h"
#include "fastdcp/common/parallel.h"
#include "fastdcp/format/checksum.h"
#include "fastdcp/io/file.h"
#include "fastdcp/memory/host_buffer.h"

namespace fastdcp {
namespace {

using Clock = std::chrono::steady_clock;

// I/O threads: more than cores, so that the disk sees several requests at once.
int io_thread_count(int requested) { return requested > 0 ? requested : std::max(4, resolve_thread_count(0)); }

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

using storage::Store;

// The bytes of the blob `name`, or nothing if the store has none of that name.
std::optional<std::string> read_blob(Store& store, const std::string& name) {
  std::unique_ptr<storage::BlobReader> blob;
  try {
    blob = store.open_reader(name);
  } catch (const Error& e) {
    if (e.code() != ErrorCode::kNotFound) throw;
    return std::nullopt;
  }
  std::string text(blob->size(), '\0');
  blob->read_at(text.data(), text.size(), 0);
  return text;
}

// How errors name the blob `name` of a checkpoint's store: for the file backend, its path.
std::string blob_path(const Store& store, const std::string& name) { return join_path(store.spec(), name); }

// Whether `name` is a file a save writes, of a generation other than `generation`, or a vote of
// it: what the commit removes.
bool replaced_by_commit(std::string_view name, uint64_t generation) {
  const uint64_t g = generation_of(name);
  return (g != 0 && g != generation) || (g == generation && name.starts_with("rank_"));
}

// Writes a small blob durably under its name, replacing any (Note [Stores]: the file backend
// writes a temporary of its own, syncs it and renames it into place).
void write_small_blob(Store& store, const std::string& name, const std::string& text) {
  const std::unique_ptr<storage::BlobWriter> blob = store.open_writer(name);
  blob->append(text.data(), text.size());
  blob->commit();
}

std::string lock_file_name(int rank) { return "rank_" + std::to_string(rank) + ".lock"; }

std::optional<Manifest> committed_manifest(Store& store) {
  const std::optional<std::string> text = read_blob(store, kManifestName);
  if (!text) return std::nullopt;
  return parse_manifest(*text, blob_path(store, kManifestName));
}

// The store of the checkpoint at `path` (a directory, or a store spec: Note [Stores]), to read.
std::shared_ptr<Store> checkpoint_store(const std::string& path) {
  if (path.empty()) throw Error(ErrorCode::kInvalidArgument, "the checkpoint path is empty");
  try {
    return storage::open_store(path);
  } catch (const Error& e) {
    if (e.code() != ErrorCode::kNotFound) throw;
    throw Error(ErrorCode::kNotFound, "no checkpoint at '" + path + "': the directory does not exist");
  }
}

void check_rank(const RankInfo& rank) {
  if (rank.global_world_size < 1 || rank.global_rank < 0 || rank.global_rank >= rank.global_world_size) {
    throw Error(ErrorCode::kInvalidArgument, "invalid rank " + std::to_string(rank.global_rank) + " of world size " +
                                                 std::to_string(rank.global_world_size));
  }
}

// Host memory for a loaded storage, not zeroed (every byte is about to be read into):
// page-aligned for large ones.
Storage allocate_for_reading(size_t nbytes) {
  if (nbytes == 0) return Storage::wrap(nullptr, 0, Device::cpu());
  const size_t alignment = nbytes >= (size_t{1} << 20) ? 4096 : 64;
  void* data = std::aligned_alloc(alignment, (nbytes + alignment - 1) / alignment * alignment);
  if (!data) throw Error(ErrorCode::kResourceExhausted, "cannot allocate " + std::to_string(nbytes) + " bytes to load into");
  std::shared_ptr<void> owner(data, [](void* p) { std::free(p); });
  return Storage::wrap(data, nbytes, Device::cpu(), std::move(owner));
}

// An opened, committed rank file: its header checked against the manifest.
struct OpenedRankFile {
  std::unique_ptr<storage::BlobReader> blob;
  std::string path;  // as errors name it
  RankFileHeader header;
};

// `header_read(blob, data_offset)` runs once the header's bytes are read and match the manifest,
// before they are parsed.
OpenedRankFile open_rank_file(Store& store, const Manifest& manifest, int rank,
                              const std::function<void(const storage::BlobReader&, uint64_t)>& header_read = {}) {
  const ManifestRank& record = manifest.ranks.at(static_cast<size_t>(rank));
  const std::string file_path = blob_path(store, record.file);
  std::unique_ptr<storage::BlobReader> blob;
  try {
    blob = store.open_reader(record.file);
  } catch (const Error& e) {
    if (e.code() != ErrorCode::kNotFound) throw;
    throw Error(ErrorCode::kNotFound, "the data file of rank " + std::to_string(rank) + " is missing: '" + file_path + "'");
  }
  const storage::BlobReader& file = *blob;
  const uint64_t size = file.size();
  if (size != record.size) {
    throw Error(ErrorCode::kDataLoss, "'" + file_path + "' has " + std::to_string(size) + " bytes; the manifest says " +
                                          std::to_string(record.size) + " (truncated or replaced)");
  }
  const std::string head =
      read_header_bytes([&](void* dst, uint64_t offset, uint64_t n) { file.read_at(dst, n, offset); }, size, file_path);
  if (crc32c(head.data(), head.size()) != record.header_crc32c) {
    throw ChecksumError("the header of '" + file_path + "' does not match the manifest's checksum");
  }
  if (header_read) header_read(file, head.size());
  RankFileHeader header = RankFileHeader::parse(std::string_view(head).substr(8), size, file_path);
  return {std::move(blob), file_path, std::move(header)};
}

// Note [Reading while the header parses]
// Parsing a header costs about 10 us per tensor (0.5 s for 50,000), as long as reading their
// data from a fast disk. A full load does not need the header to read the data region
// (Note [File-image reads]), only its offset and size, so with a large header the region is read
// on another thread while this one parses, and the chunks are verified afterwards in a parallel
// pass. A small header parses in no time; then the chunks are verified as each window lands,
// while still in cache.
constexpr uint64_t kParseWhileReadingHeaderBytes = uint64_t{1} << 20;

// The data region of a rank file in one allocation: where it goes, and, for a blob that is a POSIX
// file, a handle of its own to read it with (O_DIRECT where that works).
struct FileImage {
  std::shared_ptr<HostBuffer> memory;
  const storage::BlobReader* blob;
  File file;
  bool direct = false;
  size_t alignment = 1;

  FileImage(const storage::BlobReader& rank_file, uint64_t data_offset, bool direct_io) : blob(&rank_file) {
    const File* posix = rank_file.file();
    if (direct_io && posix) {
      try {
        const std::string dir = std::filesystem::path(posix->path()).parent_path();
        const size_t needed = std::max<size_t>(direct_io_alignment(dir.empty() ? "." : dir), 512);
        if (needed <= page_size() && data_offset % needed == 0) {
          file = File::open(posix->path(), File::Mode::kRead, File::Options{.direct_io = true});
          direct = true;
          alignment = needed;
        }
      } catch (const Error&) {
        // e.g. a file system without O_DIRECT: buffered reads
      }
    }
    if (!direct && posix) file = File::open(posix->path(), File::Mode::kRead);
    const uint64_t data_size = rank_file.size() - data_offset;
    memory = std::make_shared<HostBuffer>(
        HostBuffer::allocate((data_size + alignment - 1) / alignment * alignment, HostMemoryTraits{}));
  }
  char* data() const { return static_cast<char*>(memory->data()); }
  // Reads the region; `verify` checks each chunk as it lands where the blob is a file, else it
  // returns false and the caller verifies the image afterwards.
  bool read(const std::string& name, uint64_t data_offset, const std::vector<StoredEntry>& entries, int threads,
            IoEngine engine, bool verify, const std::function<std::string(size_t)>& describe_entry) const {
    if (!file.is_open()) {
      detail::read_blob_image(*blob, data_offset, blob->size() - data_offset, data(), threads);
      return false;
    }
    detail::read_file_image(file, name, direct, data_offset, file.size() - data_offset, alignment, data(), entries, threads,
                            engine, verify, describe_entry);
    return verify;
  }
};

// Checks every chunk of every entry, entry i's bytes being at base_of(i), on `threads` threads.
void verify_entries(const std::string& file, const std::vector<StoredEntry>& entries,
                    const std::function<const char*(size_t)>& base_of, int threads,
                    const std::function<std::string(size_t)>& describe_entry) {
  const detail::IoPlan plan = detail::plan_io(entries, 0);
  parallel_for(plan.pieces.size(), threads, [&](size_t p) {
    const detail::Piece& piece = plan.pieces[p];
    detail::check_chunk(file, entries, piece.entry, piece.chunk, base_of(piece.entry) + piece.chunk * kChecksumChunkBytes,
                        describe_entry);
  });
}

}  // namespace

// ---- writing -------------------------------------------------------------------------------

CheckpointWriter::CheckpointWriter(RankInfo rank, WriterOptions options, std::shared_ptr<Barrier> barrier,
                                   std::shared_ptr<WriterHook> hook)
    : rank_(rank), options_(options), barrier_(std::move(barrier)), hook_(std::move(hook)) {
  check_rank(rank_);
}

struct CheckpointWriter::Save {
  std::shared_ptr<Store> store;
  std::shared_ptr<void> lock;  // Note [One writer per checkpoint path]; none without flock
  uint64_t generation;
};

WriteStats CheckpointWriter::write(const std::string& path, const Value& state_dict) {
  // Bad values fail before anything is written; a failed device copy votes against the save.
  std::optional<Value> on_host;  // outlives the plan made of it
  return write_planned(path, [&] {
    on_host = with_device_tensors_on_host(state_dict, options_.cuda);
    return RankFilePlan::make(on_host ? *on_host : state_dict);
  });
}

WriteStats CheckpointWriter::write(const std::string& path, RankFilePlan plan) {
  return write_planned(path, [&] { return std::move(plan); });
}

WriteStats CheckpointWriter::write_planned(const std::string& path, const std::function<RankFilePlan()>& make_plan) {
  const auto start = Clock::now();
  const Save save = begin_save(path);
  const uint64_t generation = save.generation;
  const int rank = rank_.global_rank;

  // Phase one: this rank's file and pre_commit, then its vote. See Note [Commit protocol].
  WriteStats stats;
  std::exception_ptr error;
  std::optional<std::string> failure;
  try {
    ManifestRank receipt;
    stats = write_rank_file(*save.store, make_plan(), generation, receipt);
    if (hook_) hook_->pre_commit(path);
    write_small_blob(*save.store, receipt_file_name(rank, generation), render_receipt(receipt, generation));
  } catch (const std::exception& e) {
    error = std::current_exception();
    failure = "rank " + std::to_string(rank) + " failed: " + e.what();
  }
  finish_save(save, failure);
  if (error) std::rethrow_exception(error);
  if (hook_) hook_->post_commit(path);
  stats.seconds_total = seconds_since(start);
  return stats;
}

void CheckpointWriter::abandon(const std::string& path, const std::string& error) {
  finish_save(begin_save(path), "rank " + std::to_string(rank_.global_rank) + " failed: " + error);
}

CheckpointWriter::Save CheckpointWriter::begin_save(const std::string& path) const {
  if (path.empty()) throw Error(ErrorCode::kInvalidArgument, "the checkpoint path is empty");
  // A link to a directory is the user's: saved into.
  std::shared_ptr<Store> store = storage::open_store(path, storage::OpenOptions{.create = true});
  const int rank = rank_.global_rank;
  std::shared_ptr<void> lock;
  bool locked = false;
  try {
    lock = store->try_lock(lock_file_name(rank));
    locked = lock != nullptr;
  } catch (const Error& e) {
    if (e.code() != ErrorCode::kUnavailable) throw;
    warn("saving to '" + path + "' without its one-writer lock: " + e.what() +
         "; make sure no other process saves there at the same time");
    locked = true;  // as before the lock existed
  }
  if (!locked) {
    throw Error(ErrorCode::kFailedPrecondition,
                "another process is saving rank " + std::to_string(rank) + " to '" + path + "' (it holds the lock '" +
                    blob_path(*store, lock_file_name(rank)) +
                    "'); a checkpoint path has one writer at a time: wait for that save to finish, stop that "
                    "process (an earlier run of this job may still be saving), or save to another path");
  }
  const std::optional<Manifest> committed = committed_manifest(*store);
  if (committed && !options_.overwrite) {
    throw Error(ErrorCode::kFailedPrecondition, "'" + path + "' already holds a committed checkpoint (generation " +
                                                    std::to_string(committed->generation) +
                                                    "); pass " + options_.overwrite_option + " to replace it");
  }
  uint64_t generation = committed ? committed->generation + 1 : 1;
  // An abandoned save's generation is not used again (Note [Commit protocol]).
  while (read_blob(*store, failure_file_name(0, generation))) ++generation;
  // Votes of a crashed attempt at this generation are this rank's to take back; its other files
  // are replaced as they are written.
  store->remove(receipt_file_name(rank, generation));
  store->remove(failure_file_name(rank, generation));
  return Save{std::move(store), std::move(lock), generation};
}

void CheckpointWriter::finish_save(const Save& save, const std::optional<std::string>& failure) {
  const std::string& path = save.store->spec();
  const uint64_t generation = save.generation;
  const int rank = rank_.global_rank;
  // Rank 0 records its own failure only once every rank has voted: its record ends the attempt.
  if (failure && rank != 0) vote_failed(*save.store, generation, *failure);
  if (barrier_) {
    try {
      barrier_->execute(options_.barrier_timeout);
    } catch (const std::exception& e) {
      if (!failure) {
        warn("the checkpoint barrier failed after rank " + std::to_string(rank) + " voted to commit '" + path +
             "'; the commit decides this save's outcome: " + e.what());
      }
    }
  }
  // Phase two: rank 0 decides once every rank has voted; every rank returns only once the
  // decision is visible, so that the next save of every rank picks the same generation. A rank
  // that failed reports its own error, whatever the decision.
  try {
    if (rank == 0) {
      commit(*save.store, generation, failure);
    } else {
      await_commit(*save.store, generation);
    }
  } catch (...) {
    if (!failure) throw;
  }
}

WriteStats CheckpointWriter::write_rank_file(Store& store, RankFilePlan plan, uint64_t generation,
                                             ManifestRank& receipt) {
  const auto start = Clock::now();
  const int rank = rank_.global_rank;
  WriteStats stats;
  stats.file = rank_file_name(rank, generation);
  {
    const int threads = io_thread_count(options_.io_threads);
    // The blob replaces whatever has its name (a crashed save's file, anyone's link) only when
    // committed; the file backend writes a file it created new (Note [Files the writer creates]).
    std::unique_ptr<storage::BlobWriter> blob;
    bool direct = options_.direct_io && store.capabilities().direct_io;
    if (direct) {
      try {
        blob = store.open_writer(stats.file, storage::WriteOptions{.direct_io = true});
      } catch (const Error&) {
        direct = false;  // a file system without O_DIRECT (tmpfs): buffered writes
      }
    }
    if (!direct) blob = store.open_writer(stats.file);
    // The file backend hands out its file, for the engines of rank_file_io.h; other stores take
    // the bytes through the BlobWriter.
    const File* posix = blob->file();
    if (posix) posix->reserve(plan.file_size());  // a full disk fails here, before any data is written
    if (!posix) {
      const auto crcs = detail::write_entries(*blob, plan.entries(), plan.storages(), plan.data_offset());
      for (size_t i = 0; i < crcs.size(); ++i) plan.set_checksums(i, crcs[i]);
      blob->write_at(plan.header().data(), plan.header().size(), 0);
    } else if (direct) {
      const File& file = *posix;
      const size_t alignment = store.capabilities().direct_io_alignment;
      const auto crcs = detail::write_entries_direct(
          file, plan.entries(), plan.storages(), plan.data_offset(), plan.file_size() - plan.data_offset(), alignment,
          options_.io_threads > 0 ? options_.io_threads : detail::kDirectWritesInFlight, options_.io_engine);
      for (size_t i = 0; i < crcs.size(); ++i) plan.set_checksums(i, crcs[i]);
      // The header is a whole number of pages; write it from aligned memory too.
      std::unique_ptr<char, decltype(&std::free)> header(
          static_cast<char*>(std::aligned_alloc(std::max<size_t>(alignment, 4096), plan.header().size())), &std::free);
      if (!header) throw Error(ErrorCode::kResourceExhausted, "cannot allocate the header for O_DIRECT");
      std::memcpy(header.get(), plan.header().data(), plan.header().size());
      file.write_at(header.get(), plan.header().size(), 0);
      file.truncate(plan.file_size());  // the last window was padded
    } else {
      const File& file = *posix;
      const auto crcs = detail::write_entries(file, plan.entries(), plan.storages(), plan.data_offset(), threads);
      for (size_t i = 0; i < crcs.size(); ++i) plan.set_checksums(i, crcs[i]);
      file.write_at(plan.header().data(), plan.header().size(), 0);
    }
    if (posix && !direct) {
      posix->sync();
      // Note [Buffered writes]: once durable, the file's pages are clean and drop at no cost, so a
      // checkpoint does not crowd the training job out of the page cache.
      ::posix_fadvise(posix->fd(), 0, 0, POSIX_FADV_DONTNEED);
    }
    blob->commit();  // durable under its name
  }
  stats.bytes_written = plan.file_size();
  stats.seconds_data = seconds_since(start);
  receipt = ManifestRank{rank, stats.file, plan.file_size(), crc32c(plan.header().data(), plan.header().size()),
                         plan.sharded()};
  for (IndexEntry& e : receipt.sharded) {
    for (IndexChunk& c : e.chunks) c.rank = rank;
  }
  return stats;
}

void CheckpointWriter::vote_failed(Store& store, uint64_t generation, const std::string& error) noexcept {
  try {
    write_small_blob(store, failure_file_name(rank_.global_rank, generation),
                                render_failure(rank_.global_rank, generation, error));
  } catch (...) {
    // The directory itself may be what failed; the others then wait out their timeout.
  }
}

std::optional<std::string> CheckpointWriter::collect_votes(Store& store, uint64_t generation,
                                                           Manifest& manifest, int first_rank) const {
  const std::string& path = store.spec();
  const auto deadline = Clock::now() + options_.barrier_timeout;
  std::optional<std::string> why;
  for (int r = first_rank; r < rank_.global_world_size; ++r) {
    const std::string receipt = receipt_file_name(r, generation);
    for (;;) {
      if (r != 0) {
        if (const std::optional<std::string> failure = read_blob(store, failure_file_name(r, generation))) {
          if (!why) why = parse_failure(*failure);  // "rank <r> failed: ..."
          break;
        }
      }
      if (const std::optional<std::string> text = read_blob(store, receipt)) {
        if (!why) manifest.ranks.push_back(parse_receipt(*text, generation, blob_path(store, receipt)));
        break;
      }
      if (Clock::now() > deadline) {
        return why ? why
                   : "rank " + std::to_string(r) + " did not finish writing '" + path + "' within the barrier timeout";
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  return why;
}

void CheckpointWriter::commit(Store& store, uint64_t generation, std::optional<std::string> why) {
  const std::string& path = store.spec();
  Manifest manifest;
  manifest.generation = generation;
  manifest.world_size = rank_.global_world_size;
  // Every rank's vote, even when this save is lost already: a rank that has not voted may not have
  // picked its generation yet, and must not see this one abandoned before it does.
  const std::optional<std::string> votes = collect_votes(store, generation, manifest, /*first_rank=*/why ? 1 : 0);
  if (!why) why = votes;
  if (why) {
    vote_failed(store, generation, *why);  // rank 0's failure record: the attempt is abandoned
    throw Error(ErrorCode::kCancelled, "the save to '" + path + "' was abandoned: " + *why + "; nothing was committed");
  }
  try {
    build_index(manifest);  // Note [Global index]
  } catch (const Error& e) {
    vote_failed(store, generation, e.what());
    throw Error(e.code(), "the save to '" + path + "' was abandoned: " + e.what() + "; nothing was committed");
  }
  // The commit: the manifest put if absent, so that of racing savers exactly one commits, or put
  // in place of the one this save replaces (every data file is durable under its name already).
  try {
    const std::string text = render_manifest(manifest);
    const auto blob = store.open_writer(kManifestName, storage::WriteOptions{.if_absent = !options_.overwrite});
    blob->append(text.data(), text.size());
    blob->commit();
  } catch (const std::exception& e) {
    // Not committed: the other ranks learn it now rather than at their timeout.
    vote_failed(store, generation, "rank 0 failed to commit: " + std::string(e.what()));
    throw;
  }
  // Committed. Files of other generations (the replaced checkpoint, failed saves) go now, and
  // this generation's votes, and what crashed writers left: by name only, never following a link
  // (Note [Files the writer creates]).
  for (const std::string& name : store.list()) {
    if (replaced_by_commit(name, generation)) store.remove(name);
  }
  store.remove_leftovers(
      [](const std::string& blob) { return blob == kManifestName || generation_of(blob) != 0; });
}

void CheckpointWriter::await_commit(Store& store, uint64_t generation) const {
  const std::string& path = store.spec();
  const auto deadline = Clock::now() + options_.barrier_timeout;
  for (auto pause = std::chrono::milliseconds(1);; pause = std::min(pause * 2, std::chrono::milliseconds(20))) {
    const std::optional<Manifest> manifest = committed_manifest(store);
    if (manifest && manifest->generation >= generation) return;
    if (const std::optional<std::string> abandoned = read_blob(store, failure_file_name(0, generation))) {
      throw Error(ErrorCode::kCancelled, "the save to '" + path + "' was not committed: " + parse_failure(*abandoned));
    }
    if (Clock::now() > deadline) {
      throw Error(ErrorCode::kUnavailable, "rank 0 did not commit '" + path +
                                               "' within the barrier timeout; this rank's part is written but not committed");
    }
    std::this_thread::sleep_for(pause);
  }
}

// ---- reading -------------------------------------------------------------------------------

namespace {

Manifest read_manifest(Store& store) {
  const std::string& path = store.spec();
  std::optional<Manifest> manifest = committed_manifest(store);
  if (!manifest) {
    throw Error(ErrorCode::kFailedPrecondition, "'" + path + "' holds no committed checkpoint (no " +
                                                    std::string(kManifestName) +
                                                    "): its save did not finish, or it is not a checkpoint");
  }
  return std::move(*manifest);
}

}  // namespace

Manifest read_manifest(const std::string& path) { return read_manifest(*checkpoint_store(path)); }

CheckpointReader::CheckpointReader(RankInfo rank, ReadOptions options) : rank_(rank), options_(options) {
  check_rank(rank_);
}

namespace {

// Note [Loading at another world size]
// A checkpoint with a global index (Note [Global index]) loads at any world size: its sharded
// keys come from the index, and its other values, which are not sharded, are treated as
// replicated, as DCP does: rank r reads them from its own file if the checkpoint has one
// (r < the saved world size), else from rank 0's. A checkpoint without an index holds only
// per-rank values, and loads only at its own world size.
Manifest manifest_for_rank(Store& store, const RankInfo& rank) {
  const std::string& path = store.spec();
  Manifest manifest = read_manifest(store);
  // A checkpoint of one rank is a whole state dict: every rank may read it (its tensors fill
  // sharded targets box by box). Other checkpoints without an index hold per-rank parts.
  if (manifest.world_size != rank.global_world_size && manifest.index.empty() && manifest.world_size != 1) {
    const std::string n = std::to_string(manifest.world_size);
    throw Error(ErrorCode::kInvalidArgument,
                "'" + path + "' was written by " + n + " ranks; it loads on as many ranks, not on " +
                    std::to_string(rank.global_world_size) + ". To read rank r's part on its own, make the reader " +
                    "for rank r of " + n + " (fastdcp.torch: CheckpointReader(RankInfo(global_rank=r, " +
                    "global_world_size=" + n + ")).read(path); C++: CheckpointReader(RankInfo{r, " + n +
                    "})); `fastdcp inspect PATH --rank r` lists its tensors");
  }
  return manifest;
}

// Names an entry in error messages: a plain entry is its tensor; a raw one is named by the key
// paths of the tensors that view it (looked up only on the error path).
std::string describe_entry(const RankFileHeader& header, size_t entry) {
  const std::string& name = header.entries()[entry].name;
  if (!name.starts_with("__fastdcp__")) return "tensor '" + name + "'";
  std::vector<std::string> paths;
  for (const RankFileHeader::TensorRecord& t : header.tensors()) {
    if (t.entry == entry) paths.push_back(t.path);
  }
  if (paths.empty()) return "storage '" + name + "'";
  std::sort(paths.begin(), paths.end());
  std::string out = "tensor '" + paths[0] + "'";
  if (paths.size() > 1) out += " (and " + std::to_string(paths.size() - 1) + " more views of its storage)";
  return out;
}

// The rank whose file holds this rank's values that are not sharded (Note [Loading at another world size]).
int source_rank(const Manifest& manifest, const RankInfo& rank) {
  return rank.global_rank < manifest.world_size ? rank.global_rank : 0;
}

// ---- sharded keys (Note [Resharded loads]) ---------------------------------------------------

bool by_offset(const std::pair<Dims, Dims>& a, const std::pair<Dims, Dims>& b) {
  return std::lexicographical_compare(a.first.begin(), a.first.end(), b.first.begin(), b.first.end());
}

// The manifest's index by key, with each key's chunks grouped by rank.
class IndexLookup {
 public:
  explicit IndexLookup(const Manifest& manifest) : chunks_of_rank_(static_cast<size_t>(manifest.world_size), 0) {
    for (const IndexEntry& e : manifest.index) {
      Key& key = by_key_[e.key];
      key.entry = &e;
      key.by_rank.resize(e.chunks.size());
      for (size_t c = 0; c < e.chunks.size(); ++c) key.by_rank[c] = c;
      std::stable_sort(key.by_rank.begin(), key.by_rank.end(),
                       [&](size_t a, size_t b) { return e.chunks[a].rank < e.chunks[b].rank; });
      for (const IndexChunk& c : e.chunks) ++chunks_of_rank_[static_cast<size_t>(c.rank)];
    }
  }
  const IndexEntry* find(const std::string& key) const {
    const auto it = by_key_.find(key);
    return it == by_key_.end() ? nullptr : it->second.entry;
  }
  // The boxes of `key` that `rank`'s file holds, sorted.
  std::vector<std::pair<Dims, Dims>> boxes_of(const std::string& key, int rank) const {
    std::vector<std::pair<Dims, Dims>> out;
    const Key& k = by_key_.at(key);
    const auto first = std::lower_bound(k.by_rank.begin(), k.by_rank.end(), rank,
                                        [&](size_t c, int r) { return k.entry->chunks[c].rank < r; });
    for (auto it = first; it != k.by_rank.end() && k.entry->chunks[*it].rank == rank; ++it) {
      out.emplace_back(k.entry->chunks[*it].offset, k.entry->chunks[*it].sizes);
    }
    std::sort(out.begin(), out.end(), by_offset);
    return out;
  }
  size_t chunks_of_rank(int rank) const { return chunks_of_rank_[static_cast<size_t>(rank)]; }

 private:
  struct Key {
    const IndexEntry* entry = nullptr;
    std::vector<size_t> by_rank;  // chunk indices, by rank
  };
  std::unordered_map<std::string, Key> by_key_;
  std::vector<size_t> chunks_of_rank_;
};

// The sharded records of `rank`'s file, by key, checked against the index: Error(kDataLoss)
// naming the file and the key where the file's tree and the index disagree.
std::unordered_map<std::string, RankFileHeader::ShardedRecord> checked_sharded_records(const RankFileHeader& header,
                                                                                       const IndexLookup& index,
                                                                                       int rank,
                                                                                       const std::string& file) {
  std::unordered_map<std::string, RankFileHeader::ShardedRecord> out;
  size_t chunks = 0;
  for (RankFileHeader::ShardedRecord& r : header.sharded()) {
    auto disagree = [&](const std::string& why) {
      throw Error(ErrorCode::kDataLoss, "'" + file + "' disagrees with the manifest's index at '" + r.path + "': " + why);
    };
    const IndexEntry* entry = index.find(r.path);
    if (!entry) disagree("the index lacks that key");
    if (entry->dtype != r.dtype || entry->global_shape != r.global_shape) {
      disagree("the file has " + std::string(dtype_name(r.dtype)) + dims_text(r.global_shape) + ", the index " +
               std::string(dtype_name(entry->dtype)) + dims_text(entry->global_shape));
    }
    std::vector<std::pair<Dims, Dims>> held;
    for (const auto& [offset, t] : r.chunks) held.emplace_back(offset, t.shape);
    std::sort(held.begin(), held.end(), by_offset);
    if (held != index.boxes_of(r.path, rank)) disagree("the file holds other chunks than the index lists for rank " + std::to_string(rank));
    chunks += held.size();
    const std::string key = r.path;
    out.emplace(key, std::move(r));
  }
  if (chunks != index.chunks_of_rank(rank)) {
    throw Error(ErrorCode::kDataLoss, "'" + file + "' lacks sharded tensors that the manifest's index lists for rank " +
                                          std::to_string(rank));
  }
  return out;
}

// A load's target at a sharded key: boxes of the global tensor and the views to fill (a full
// tensor is one box).
struct ShardedTarget {
  std::string key;
  std::vector<std::pair<Box, Tensor>> boxes;
};

// Gaps between byte ranges smaller than this are read rather than split into two requests.
constexpr uint64_t kMergeGapBytes = uint64_t{64} << 10;

// Note [Landing reads in the target]
// A resharded overlap rarely starts or ends on a saved file's 4 MiB checksum chunks (4 -> 3 ranks:
// every rank's rows straddle two saved shards), yet a chunk is verified only whole. Each read is
// therefore one preadv whose pieces land where the bytes are wanted: an overlap whose saved bytes
// are one contiguous run, bound for a contiguous host target, lands straight in the target; the
// bytes only the checksum needs land in a reused scratch buffer, and the chunk's CRC runs over
// the pieces in order. Only overlaps that need a strided copy (their saved or target view is not
// contiguous, or another overlap reads the same bytes) go through a buffer and a copy. Reading
// into a buffer and copying cost a 4 -> 3 load of 1 GiB half its time: the copy, and first-touch
// page faults on the fresh buffers.

// Fills every target from the saved chunks of its key (Note [Resharded loads]); `own` is the
// already opened file of rank `own_rank`, if any, and `own_data` its data region when the caller
// has read and verified it whole (its chunks are then copied from there, not read again).
void fill_sharded(Store& store, const Manifest& manifest, const std::vector<ShardedTarget>& targets,
                  const ReadOptions& options, int threads, const OpenedRankFile* own, int own_rank,
                  const Storage* own_data = nullptr) {
  if (targets.empty()) return;
  const IndexLookup index(manifest);
  // Per entry, the memory its strided overlaps are read into: bytes [base, base + nbytes) of the entry.
  struct Buffer {
    Storage storage;
    uint64_t base = 0;
  };
  struct Source {
    std::optional<OpenedRankFile> opened;
    const OpenedRankFile* file = nullptr;
    const Storage* data = nullptr;  // the data region, already in memory
    std::unordered_map<std::string, RankFileHeader::ShardedRecord> records;
    std::map<size_t, std::vector<size_t>> copies_of;  // per entry, the copies from it
    std::map<size_t, Buffer> buffers;
  };
  std::map<int, Source> sources;  // by rank: each file opened, and its header read, once
  auto source = [&](int rank) -> Source& {
    Source& s = sources[rank];
    if (!s.file) {
      if (own && rank == own_rank) {
        s.file = own;
        s.data = own_data;
      } else {
        s.opened.emplace(open_rank_file(store, manifest, rank));
        s.file = &*s.opened;
      }
      s.records = checked_sharded_records(s.file->header, index, rank, s.file->path);
    }
    return s;
  };
  // One overlap: from a saved view (in its entry's bytes) into a target view.
  struct Copy {
    Tensor dst;
    int rank;
    size_t entry;
    DType dtype;
    Dims shape, strides;
    int64_t offset;
    std::vector<detail::ByteRange> ranges;  // of the entry, that the saved view touches
    bool direct = false;                    // read straight into dst (Note [Landing reads in the target])
  };
  std::vector<Copy> copies;
  for (const ShardedTarget& target : targets) {
    const IndexEntry* entry = index.find(target.key);
    if (!entry) throw Error(ErrorCode::kDataLoss, "the manifest's index lacks the sharded tensor at '" + target.key + "'");
    std::vector<Box> boxes;
    boxes.reserve(target.boxes.size());
    for (const auto& [box, view] : target.boxes) boxes.push_back(box);
    const uint64_t item = static_cast<uint64_t>(dtype_bits(entry->dtype) / 8);
    for (const detail::Overlap& o : detail::plan_overlaps(*entry, boxes)) {
      const IndexChunk& chunk = entry->chunks[o.chunk];
      Source* opened = nullptr;
      try {
        opened = &source(chunk.rank);
      } catch (const Error& e) {
        throw Error(e.code(), std::string(e.what()) + " (needed for the sharded tensor at '" + target.key + "')");
      }
      Source& s = *opened;
      const auto& record = s.records.at(target.key);  // checked against the index
      const auto held = std::find_if(record.chunks.begin(), record.chunks.end(),
                                     [&](const auto& c) { return c.first == chunk.offset; });
      const RankFileHeader::TensorRecord& t = held->second;
      const int64_t offset = sub_view_offset(chunk.box(), t.strides, t.offset, o.box);
      const auto& [target_box, view] = target.boxes[o.target];
      const Tensor dst = view.view_as(o.box.sizes, view.strides(),
                                      sub_view_offset(target_box, view.strides(), view.storage_offset(), o.box));
      s.copies_of[t.entry].push_back(copies.size());
      copies.push_back({dst, chunk.rank, t.entry, entry->dtype, o.box.sizes, t.strides, offset,
                        detail::view_byte_ranges(item, o.box.sizes, t.strides, offset)});
    }
  }
  // Where the read bytes go: byte range [begin, end) of entry `entry` lands at `at` (byte `begin`).
  struct Landing {
    uint64_t begin, end;
    char* at;
  };
  // One preadv: bytes [begin, end) of an entry, landing per `landings` (the rest in scratch), each
  // whole checksum chunk in it verified when `verify`.
  struct Request {
    const Source* source;
    size_t entry;
    uint64_t begin, end;
    size_t landings;  // index into landing_sets
    bool verify;
  };
  std::vector<std::vector<Landing>> landing_sets;
  std::vector<Request> requests;
  for (auto& [rank, s] : sources) {
    const RankFileHeader& header = s.file->header;
    const bool verify = options.verify_checksums && header.has_checksums();
    for (const auto& [e, from] : s.copies_of) {
      const StoredEntry& stored = header.entries()[e];
      if (s.data) {  // read and verified already: every overlap copies from memory
        s.buffers[e] = {Storage::wrap(static_cast<char*>(s.data->data()) + stored.begin, stored.nbytes, Device::cpu(),
                                      s.data->weak_identity().lock()),
                        0};
        continue;
      }
      // Which overlaps land in their target: a contiguous saved view into a contiguous host view of
      // its dtype, and no other overlap reading any of the same bytes.
      std::vector<std::pair<detail::ByteRange, size_t>> touched;
      for (size_t c : from) {
        for (const detail::ByteRange& r : copies[c].ranges) touched.emplace_back(r, c);
        Copy& copy = copies[c];
        copy.direct = copy.ranges.size() == 1 && contiguous_layout(copy.shape, copy.strides) &&
                      copy.dst.dtype() == copy.dtype && copy.dst.device().is_cpu() && copy.dst.is_contiguous();
      }
      std::sort(touched.begin(), touched.end(), [](const auto& a, const auto& b) { return a.first.begin < b.first.begin; });
      uint64_t reach = 0;  // the furthest end so far, and whose
      size_t reacher = 0;
      for (size_t i = 0; i < touched.size(); ++i) {
        const auto& [r, c] = touched[i];
        if (i > 0 && r.begin < reach && c != reacher) copies[c].direct = copies[reacher].direct = false;
        if (i == 0 || r.end > reach) reach = r.end, reacher = c;
      }
      std::vector<Landing> landings;
      std::vector<detail::ByteRange> needed, buffered;
      for (size_t c : from) {
        const Copy& copy = copies[c];
        needed.insert(needed.end(), copy.ranges.begin(), copy.ranges.end());
        if (copy.direct) {
          landings.push_back({copy.ranges[0].begin, copy.ranges[0].end, static_cast<char*>(copy.dst.data_ptr())});
        } else {
          buffered.insert(buffered.end(), copy.ranges.begin(), copy.ranges.end());
        }
      }
      buffered = detail::merge_ranges(std::move(buffered), 0);
      if (!buffered.empty()) {
        Buffer& buffer = s.buffers[e];
        buffer.base = buffered.front().begin;  // an element's first byte: ranges start at elements
        buffer.storage = allocate_for_reading(buffered.back().end - buffer.base);
        for (const detail::ByteRange& r : buffered) {
          landings.push_back({r.begin, r.end, static_cast<char*>(buffer.storage.data()) + (r.begin - buffer.base)});
        }
      }
      std::sort(landings.begin(), landings.end(), [](const Landing& a, const Landing& b) { return a.begin < b.begin; });
      // With checksums, whole chunks are read; requests of at most kBatchBytes start at chunk
      // boundaries then, since the ranges do.
      const auto ranges =
          detail::merge_ranges(std::move(needed), kMergeGapBytes, verify ? kChecksumChunkBytes : 0, stored.nbytes);
      if (ranges.empty()) continue;
      landing_sets.push_back(std::move(landings));
      for (const detail::ByteRange& r : ranges) {
        for (uint64_t at = r.begin; at < r.end; at += detail::kBatchBytes) {
          requests.push_back({&s, e, at, std::min(r.end, at + detail::kBatchBytes), landing_sets.size() - 1, verify});
        }
      }
    }
  }
  // Scratch buffers, reused across requests (fresh pages cost first-touch faults), freed on return.
  struct ScratchPool {
    std::mutex mutex;
    std::vector<std::vector<char>> free;
  } scratch_pool;
  struct ScratchLease {
    ScratchPool& pool;
    std::vector<char> buffer;
    explicit ScratchLease(ScratchPool& p) : pool(p) {
      std::lock_guard lock(pool.mutex);
      if (!pool.free.empty()) {
        buffer = std::move(pool.free.back());
        pool.free.pop_back();
      }
    }
    ~ScratchLease() {
      std::lock_guard lock(pool.mutex);
      try {
        pool.free.push_back(std::move(buffer));
      } catch (const std::bad_alloc&) {  // the buffer is freed instead of kept
      }
    }
    ScratchLease(const ScratchLease&) = delete;
    ScratchLease& operator=(const ScratchLease&) = delete;
  };
  parallel_for(requests.size(), threads, [&](size_t i) {
    const Request& r = requests[i];
    const RankFileHeader& header = r.source->file->header;
    const StoredEntry& stored = header.entries()[r.entry];
    const std::vector<Landing>& landings = landing_sets[r.landings];
    // The pieces in file order: landings, and gaps into scratch (placed once the gaps' size is known).
    std::vector<iovec> pieces;
    uint64_t gaps = 0;
    const auto gap = [&](uint64_t n) {
      pieces.push_back({nullptr, n});
      gaps += n;
    };
    uint64_t at = r.begin;
    auto l = std::upper_bound(landings.begin(), landings.end(), r.begin,
                              [](uint64_t x, const Landing& land) { return x < land.end; });
    for (; l != landings.end() && l->begin < r.end; ++l) {
      const uint64_t begin = std::max(l->begin, r.begin), end = std::min(l->end, r.end);
      if (begin > at) gap(begin - at);
      pieces.push_back({l->at + (begin - l->begin), end - begin});
      at = end;
    }
    if (r.end > at) gap(r.end - at);
    ScratchLease lease(scratch_pool);
    std::vector<char>& scratch = lease.buffer;
    if (scratch.size() < gaps) scratch.resize(gaps);
    uint64_t used = 0;
    for (iovec& p : pieces) {
      if (p.iov_base) continue;
      p.iov_base = scratch.data() + used;
      used += p.iov_len;
    }
    detail::read_vectored(*r.source->file->blob, pieces, header.data_offset() + stored.begin + r.begin);
    if (!r.verify) return;
    // Each chunk's CRC over its pieces, in order.
    size_t p = 0;
    uint64_t into = 0;  // bytes of pieces[p] already summed
    for (uint64_t chunk_begin = r.begin; chunk_begin < r.end; chunk_begin += kChecksumChunkBytes) {
      const uint64_t chunk_end = std::min(r.end, chunk_begin + kChecksumChunkBytes);
      uint32_t crc = 0;
      for (uint64_t pos = chunk_begin; pos < chunk_end;) {
        const uint64_t n = std::min<uint64_t>(pieces[p].iov_len - into, chunk_end - pos);
        crc = crc32c(static_cast<const char*>(pieces[p].iov_base) + into, n, crc);
        pos += n;
        into += n;
        if (into == pieces[p].iov_len) ++p, into = 0;
      }
      detail::check_chunk_crc(r.source->file->path, header.entries(), r.entry,
                              chunk_begin / kChecksumChunkBytes, crc, [&](size_t e) { return describe_entry(header, e); });
    }
  });
  parallel_for(copies.size(), threads, [&](size_t i) {
    const Copy& c = copies[i];
    if (c.direct) return;
    const Buffer& buffer = sources.at(c.rank).buffers.at(c.entry);
    const int64_t item = dtype_bits(c.dtype) / 8;
    copy_tensor(c.dst, Tensor(buffer.storage, c.dtype, c.shape, c.strides, c.offset - static_cast<int64_t>(buffer.base) / item));
  });
}

// Replaces every sharded leaf under `root` (at key path `root_path`) by a full tensor to be filled.
void take_sharded_whole(Value& root, const std::string& root_path, std::vector<ShardedTarget>& targets) {
  for_each_leaf(root, [&](const std::string& path, Value& v) {
    if (!v.is_sharded()) return;
    Tensor full = Tensor::empty_cpu(v.as_sharded().dtype, v.as_sharded().global_shape);
    targets.push_back({path, {{Box::whole(full.shape()), full}}});
    v = Value(std::move(full));
  }, root_path);
}

// Private copy-on-write mapping of a whole file, unmapped when the last tensor viewing it dies.
std::shared_ptr<void> map_file(const File& file, uint64_t size) {
  void* base = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, file.fd(), 0);
  if (base == MAP_FAILED) throw_system_error("cannot map '" + file.path() + "'", errno);
  return std::shared_ptr<void>(base, [size](void* p) { ::munmap(p, size); });
}

}  // namespace

Value CheckpointReader::read(const std::string& path) const {
  check_device(options_.device, options_.cuda, "map_location, ReadOptions::device");  // before anything is read
  const std::shared_ptr<Store> store = checkpoint_store(path);
  const Manifest manifest = manifest_for_rank(*store, rank_);
  const int source = source_rank(manifest, rank_);
  const int threads = io_thread_count(options_.io_threads);
  // A large header parses while the data is read (Note [Reading while the header parses]).
  std::optional<FileImage> image;
  std::future<void> reading;  // declared after `image`: joined before the image goes
  const auto read_while_parsing = [&](const storage::BlobReader& file, uint64_t data_offset) {
    if (options_.use_mmap || data_offset < kParseWhileReadingHeaderBytes) return;
    image.emplace(file, data_offset, options_.direct_io);
    reading = std::async(std::launch::async, [&, data_offset] {
      image->read(path, data_offset, {}, threads, options_.io_engine, /*verify=*/false, {});
    });
  };
  OpenedRankFile opened = open_rank_file(*store, manifest, source, read_while_parsing);
  const RankFileHeader& header = opened.header;
  const auto& entries = header.entries();
  auto namer = [&](size_t e) { return describe_entry(header, e); };
  const bool verify = options_.verify_checksums && header.has_checksums();
  std::shared_ptr<void> memory;
  const char* base = nullptr;
  if (reading.valid()) {
    reading.get();
    if (verify) {
      verify_entries(opened.path, entries, [&](size_t e) { return image->data() + entries[e].begin; }, threads, namer);
    }
    memory = image->memory;
    base = image->data();
  } else if (options_.use_mmap && opened.blob->file() && opened.blob->size() > 0) {
    // A private, copy-on-write mapping: only a file's can be that (a store's shared mapping
    // would let a tensor write into the stored blob), so other stores' blobs are read.
    memory = map_file(*opened.blob->file(), opened.blob->size());
    base = static_cast<const char*>(memory.get()) + header.data_offset();
    if (verify) {
      verify_entries(opened.path, entries, [&](size_t e) { return base + entries[e].begin; }, threads, namer);
    }
  } else {
    // The whole data region into one allocation (Note [File-image reads]), each chunk verified
    // as its last window lands.
    image.emplace(*opened.blob, header.data_offset(), options_.direct_io);
    if (!image->read(opened.path, header.data_offset(), entries, threads, options_.io_engine, verify, namer) && verify) {
      verify_entries(opened.path, entries, [&](size_t e) { return image->data() + entries[e].begin; }, threads, namer);
    }
    memory = image->memory;
    base = image->data();
  }
  std::vector<Storage> storages(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    // An empty entry shares its offset with the next one: give it no memory, not an alias.
    storages[i] = entries[i].nbytes == 0
                      ? Storage::wrap(nullptr, 0, Device::cpu())
                      : Storage::wrap(const_cast<char*>(base) + entries[i].begin, entries[i].nbytes, Device::cpu(), memory);
  }
  Value tree = header.build_tree(storages);
  // Sharded keys load whole, from every rank's chunks (Note [Resharded loads]).
  std::vector<ShardedTarget> targets;
  if (header.format_version() >= 3 && options_.assemble_sharded) take_sharded_whole(tree, "", targets);
  // This rank's chunks are in memory, verified: copied from there, not read again.
  uint64_t data_size = 0;
  for (const StoredEntry& e : entries) data_size = std::max(data_size, e.begin + e.nbytes);
  const Storage data = Storage::wrap(const_cast<char*>(base), data_size, Device::cpu(), memory);
  fill_sharded(*store, manifest, targets, options_, threads, &opened, source, &data);
  if (options_.device.is_cuda()) move_to_device(tree, options_.device, options_.device_allocator.get(), options_.cuda);
  return tree;
}

std::vector<Tensor> CheckpointReader::read_sharded(const std::string& path, const std::vector<std::string>& keys) const {
  const std::shared_ptr<Store> store = checkpoint_store(path);
  const Manifest manifest = manifest_for_rank(*store, rank_);
  std::unordered_map<std::string_view, const IndexEntry*> entry_of;
  for (const IndexEntry& e : manifest.index) entry_of.emplace(e.key, &e);
  std::vector<Tensor> out;
  std::vector<ShardedTarget> targets;
  for (const std::string& key : keys) {
    const auto it = entry_of.find(key);
    if (it == entry_of.end()) {
      throw Error(ErrorCode::kInvalidArgument, "'" + path + "' has no sharded tensor at '" + key + "'");
    }
    out.push_back(Tensor::empty_cpu(it->second->dtype, it->second->global_shape));
    targets.push_back({key, {{Box::whole(out.back().shape()), out.back()}}});
  }
  fill_sharded(*store, manifest, targets, options_, io_thread_count(options_.io_threads), nullptr, -1);
  return out;
}

namespace {

// What read_into does, worked out before anything in the target changes.
struct LoadPlan {
  std::vector<std::pair<Tensor, Tensor>> copies;        // (target, source)
  std::vector<std::pair<Value*, const Value*>> leaves;  // target leaf := source value
  std::vector<ShardedTarget> sharded;                   // targets at sharded keys
  std::vector<std::pair<Value*, std::string>> taken_roots;  // None targets, by key path
  // Storages that a leaf taken whole views (a None in the target: Note [None in a load target]).
  std::vector<const StorageImpl*> taken;
  LoadResult result;
};

// Note [None in a load target]
// As in upstream's reader, a None where the checkpoint has a tensor or a container means "what
// the checkpoint holds here": the leaf takes the whole source subtree, its tensors over storages
// read in full (views of one storage stay views of one storage, as in a load without a target).
// Such storages are never read straight into a target tensor, whose memory they would alias.
void take_subtree(const Value& source, LoadPlan& plan) {
  for_each_leaf(source, [&](const Value& v) {
    if (v.is_tensor()) plan.taken.push_back(v.as_tensor().storage().identity());
  });
}

void plan_load(Value& target, const Value& source, LoadPlan& plan) {
  struct Frame {
    Value* t;
    const Value* s;
    std::string path;
  };
  std::vector<Frame> stack{{&target, &source, ""}};
  while (!stack.empty()) {
    Frame f = std::move(stack.back());
    stack.pop_back();
    Value& t = *f.t;
    const Value& s = *f.s;
    auto mismatch = [&](const std::string& what) {
      throw Error(ErrorCode::kInvalidArgument, "cannot load '" + (f.path.empty() ? std::string("<root>") : f.path) +
                                                   "': " + what);
    };
    if (s.is_sharded() && (t.is_sharded() || t.is_tensor())) {
      // Filled from the index (Note [Resharded loads]): a sharded target gets its boxes, a plain
      // tensor the whole tensor.
      const ShardedTensor& ss = s.as_sharded();
      const std::string saved = std::string(dtype_name(ss.dtype)) + dims_text(ss.global_shape);
      ShardedTarget& target = plan.sharded.emplace_back(ShardedTarget{f.path, {}});
      if (t.is_sharded()) {
        const ShardedTensor& ts = t.as_sharded();
        ts.validate(f.path);
        if (ts.dtype != ss.dtype || ts.global_shape != ss.global_shape) {
          mismatch("the target is a sharded " + std::string(dtype_name(ts.dtype)) + dims_text(ts.global_shape) +
                   ", the checkpoint has " + saved);
        }
        for (const ShardChunk& c : ts.chunks) {
          if (!c.data.device().is_cpu()) mismatch("the target tensor is on " + c.data.device().str() + "; load into CPU tensors");
          target.boxes.emplace_back(c.box(), c.data);
        }
      } else {
        const Tensor& tt = t.as_tensor();
        if (tt.dtype() != ss.dtype || tt.shape() != ss.global_shape) {
          mismatch("the target is " + tt.describe() + ", the checkpoint has the sharded tensor " + saved);
        }
        if (!tt.device().is_cpu()) mismatch("the target tensor is on " + tt.device().str() + "; load into CPU tensors");
        target.boxes.emplace_back(Box::whole(tt.shape()), tt);
      }
      continue;
    }
    // The bytes are copied as they are: a lazy conjugate or negative bit, or a framework dtype
    // stored under another one, must match too, or the values would change.
    const auto same_values = [](const Tensor& a, const Tensor& b) {
      const TensorTraits& ta = a.traits();
      const TensorTraits& tb = b.traits();
      return a.dtype() == b.dtype() && ta.framework_dtype == tb.framework_dtype && ta.conj == tb.conj && ta.neg == tb.neg;
    };
    if (t.is_sharded()) {
      // A whole tensor saved unsharded (by fewer ranks, or read from another format) fills a
      // sharded target too: each box is cut from it, as DCP loads a tensor into a DTensor.
      if (!s.is_tensor()) mismatch(std::string("the target is a sharded tensor, the checkpoint has a ") + Value::kind_name(s.kind()));
      const ShardedTensor& ts = t.as_sharded();
      const Tensor& st = s.as_tensor();
      ts.validate(f.path);
      if (ts.global_shape != st.shape() ||
          std::any_of(ts.chunks.begin(), ts.chunks.end(), [&](const ShardChunk& c) { return !same_values(c.data, st); }) ||
          (ts.chunks.empty() && ts.dtype != st.dtype())) {
        mismatch("the target is a sharded " + std::string(dtype_name(ts.dtype)) + dims_text(ts.global_shape) +
                 ", the checkpoint has " + st.describe());
      }
      for (const ShardChunk& c : ts.chunks) {
        if (!c.data.device().is_cpu()) mismatch("the target tensor is on " + c.data.device().str() + "; load into CPU tensors");
        plan.copies.emplace_back(c.data, box_view(st, Dims::zeros(st.dim()), c.box()));
      }
    } else if (t.is_tensor()) {
      if (!s.is_tensor()) mismatch(std::string("the target is a tensor, the checkpoint has a ") + Value::kind_name(s.kind()));
      const Tensor& tt = t.as_tensor();
      const Tensor& st = s.as_tensor();
      if (!same_values(tt, st) || tt.shape() != st.shape()) {
        mismatch("the target is " + tt.describe() + ", the checkpoint has " + st.describe());
      }
      if (!tt.device().is_cpu()) mismatch("the target tensor is on " + tt.device().str() + "; load into CPU tensors");
      plan.copies.emplace_back(tt, st);
    } else if (t.kind() == Value::Kind::kDict) {
      if (s.kind() != Value::Kind::kDict) mismatch(std::string("the target is a dict, the checkpoint has a ") + Value::kind_name(s.kind()));
      for (auto& [key, child] : t.entries()) {
        std::string p = f.path;
        append_key_path(p, key);
        if (const Value* sc = s.find(key)) {
          stack.push_back({&child, sc, std::move(p)});
        } else {
          plan.result.missing_keys.push_back(std::move(p));
        }
      }
      for (const auto& [key, child] : s.entries()) {
        if (!t.find(key)) {
          std::string p = f.path;
          append_key_path(p, key);
          plan.result.unexpected_keys.push_back(std::move(p));
        }
      }
    } else if (t.kind() == Value::Kind::kList || t.kind() == Value::Kind::kTuple) {
      if (s.kind() != Value::Kind::kList && s.kind() != Value::Kind::kTuple) {
        mismatch(std::string("the target is a ") + Value::kind_name(t.kind()) + ", the checkpoint has a " +
                 Value::kind_name(s.kind()));
      }
      for (size_t i = 0; i < std::max(t.size(), s.size()); ++i) {
        std::string p = f.path;
        append_index_path(p, i);
        if (i >= s.size()) {
          plan.result.missing_keys.push_back(std::move(p));
        } else if (i >= t.size()) {
          plan.result.unexpected_keys.push_back(std::move(p));
        } else {
          stack.push_back({&t.items()[i], &s.items()[i], std::move(p)});
        }
      }
    } else if (t.kind() == Value::Kind::kNone) {
      take_subtree(s, plan);
      plan.leaves.emplace_back(&t, &s);
      plan.taken_roots.emplace_back(&t, f.path);
    } else {
      if (s.is_tensor() || s.is_sharded()) {
        mismatch("the target is not a tensor, the checkpoint has one: pass a tensor or None to load into");
      }
      plan.leaves.emplace_back(&t, &s);
    }
  }
}

std::string list_keys(const std::vector<std::string>& keys) {
  std::string out;
  for (size_t i = 0; i < keys.size() && i < 10; ++i) out += (i ? ", " : "") + keys[i];
  if (keys.size() > 10) out += " (and " + std::to_string(keys.size() - 10) + " more)";
  return out;
}

// A strict load with missing or unexpected keys fails before anything changes.
void check_strict(const LoadResult& result, bool strict, const std::string& path) {
  if (!strict || (result.missing_keys.empty() && result.unexpected_keys.empty())) return;
  std::string message = "strict load of '" + path + "' refused; nothing was changed.";
  if (!result.missing_keys.empty()) message += " Missing from the checkpoint: " + list_keys(result.missing_keys) + ".";
  if (!result.unexpected_keys.empty()) message += " Not in the target: " + list_keys(result.unexpected_keys) + ".";
  // kFailedPrecondition, a RuntimeError in Python, as upstream's strict load raises.
  throw Error(ErrorCode::kFailedPrecondition, message);
}

}  // namespace

LoadResult CheckpointReader::read_into(const std::string& path, Value& target, bool strict) const {
  DeviceTargets device_targets(target, options_.cuda);  // Note [Loading into device tensors]
  const std::shared_ptr<Store> store = checkpoint_store(path);
  const Manifest manifest = manifest_for_rank(*store, rank_);
  const int source_file = source_rank(manifest, rank_);
  OpenedRankFile opened = open_rank_file(*store, manifest, source_file);
  const RankFileHeader& header = opened.header;
  const auto& entries = header.entries();
  // Storages are allocated but not touched: only the entries the target needs are read.
  std::vector<Storage> storages(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) storages[i] = allocate_for_reading(entries[i].nbytes);
  const Value source = header.build_tree(storages);
  LoadPlan plan;
  plan_load(target, source, plan);
  check_strict(plan.result, strict, path);
  // Which entries to read, and which of them can land in the target's memory directly: a tensor
  // that is its storage, whole and contiguous, into a contiguous target.
  std::unordered_map<const StorageImpl*, size_t> entry_of;
  for (size_t i = 0; i < storages.size(); ++i) entry_of.emplace(storages[i].identity(), i);
  std::vector<bool> selected(entries.size(), false);
  for (const StorageImpl* storage : plan.taken) selected[entry_of.at(storage)] = true;  // read whole, not direct
  std::vector<bool> direct(plan.copies.size(), false);
  for (size_t c = 0; c < plan.copies.size(); ++c) {
    const auto& [t, s] = plan.copies[c];
    const size_t e = entry_of.at(s.storage().identity());
    if (!selected[e] && s.is_contiguous() && s.storage_offset() == 0 && s.nbytes() == entries[e].nbytes &&
        t.is_contiguous() && entries[e].nbytes > 0) {
      storages[e].reset(t.data_ptr(), entries[e].nbytes, t.storage().weak_identity().lock());
      direct[c] = true;
    }
    selected[e] = true;
  }
  const int threads = io_thread_count(options_.io_threads);
  detail::read_entries(*opened.blob, opened.path, entries, storages, detail::plan_io(entries, header.data_offset(), selected), threads,
                       options_.verify_checksums && header.has_checksums(),
                       [&](size_t e) { return describe_entry(header, e); });
  for (size_t c = 0; c < plan.copies.size(); ++c) {
    if (!direct[c]) copy_tensor(plan.copies[c].first, plan.copies[c].second);
  }
  for (auto& [t, s] : plan.leaves) *t = s->clone();
  // Sharded leaves under a None target load whole.
  for (auto& [t, p] : plan.taken_roots) take_sharded_whole(*t, p, plan.sharded);
  fill_sharded(*store, manifest, plan.sharded, options_, threads, &opened, source_file);
  device_targets.copy_back();
  return std::move(plan.result);
}

LoadResult load_into(Value& target, const Value& source, bool strict, const std::string& source_name) {
  DeviceTargets device_targets(target, nullptr);  // Note [Loading into device tensors]
  LoadPlan plan;
  plan_load(target, source, plan);
  check_strict(plan.result, strict, source_name);
  // Everything is copied on the host: a device source is refused before anything changes.
  for_each_leaf(source, [&](const Value& v) {
    if (v.is_tensor() && !v.as_tensor().device().is_cpu()) {
      throw Error(ErrorCode::kInvalidArgument, "'" + source_name + "': load_into takes host tensors");
    }
  });
  for (const auto& [t, s] : plan.copies) copy_tensor(t, s);
  // Subtrees taken whole: their tensors move onto copies of their storages (views of one storage
  // stay views of one copy), so that nothing the caller gets back aliases `source`.
  std::unordered_map<const StorageImpl*, Storage> copies;
  for (auto& [t, s] : plan.leaves) {
    *t = s->clone();
    for_each_leaf(*t, [&](Value& v) {
      if (!v.is_tensor()) return;
      const Tensor& old = v.as_tensor();
      auto [it, fresh] = copies.try_emplace(old.storage().identity());
      if (fresh) {
        it->second = allocate_for_reading(old.storage().nbytes());
        if (old.storage().nbytes() > 0) std::memcpy(it->second.data(), old.storage().data(), old.storage().nbytes());
      }
      Tensor moved(it->second, old.dtype(), old.shape(), old.strides(), old.storage_offset());
      moved.share_traits(old);
      v = Value(std::move(moved));
    });
  }
  device_targets.copy_back();
  return std::move(plan.result);
}

// ---- verification --------------------------------------------------------------------------

VerifyReport verify_checkpoint(const std::string& path, const std::function<void(uint64_t, uint64_t)>& progress) {
  const std::shared_ptr<Store> store = checkpoint_store(path);
  const Manifest manifest = read_manifest(*store);
  VerifyReport report;
  uint64_t total = 0;
  for (const ManifestRank& r : manifest.ranks) total += r.size;
  uint64_t done = 0;
  const IndexLookup index(manifest);
  for (int rank = 0; rank < manifest.world_size; ++rank) {
    OpenedRankFile opened = open_rank_file(*store, manifest, rank);
    // The tree too, as a load checks it (nesting, keys, every view inside its storage), and its
    // sharded leaves against the index: every indexed box is in its rank's file, and only those.
    (void)opened.header.tensors();
    (void)checked_sharded_records(opened.header, index, rank, opened.path);
    const auto& entries = opened.header.entries();
    report.bytes += manifest.ranks[static_cast<size_t>(rank)].size;
    ++report.files;
    if (!opened.header.has_checksums()) {  // a plain safetensors file: nothing to check its bytes against
      ++report.files_without_checksums;
      continue;
    }
    // Chunk by chunk, into one buffer per thread, so that memory stays bounded for any file size.
    const detail::IoPlan plan = detail::plan_io(entries, opened.header.data_offset());
    std::mutex progress_mutex;
    parallel_for(plan.pieces.size(), io_thread_count(0), [&](size_t p) {
      const detail::Piece& piece = plan.pieces[p];
      thread_local std::vector<char> buffer;
      buffer.resize(piece.size);
      opened.blob->read_at(buffer.data(), piece.size, piece.file_offset);
      detail::check_chunk(opened.path, entries, piece.entry, piece.chunk, buffer.data(),
                          [&](size_t e) { return describe_entry(opened.header, e); });
      if (progress) {
        std::lock_guard lock(progress_mutex);
        done += piece.size;
        progress(done, total);
      }
    });
    report.chunks += plan.pieces.size();
  }
  return report;
}

}  // namespace fastdcp
