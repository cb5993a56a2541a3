#pragma once
// Moving rank files' bytes between storages and disk, in parallel, with checksums: what the
// writer, the reader and verify share.

#include <sys/uio.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "fastdcp/format/rank_file.h"
#include "fastdcp/io/file.h"
#include "fastdcp/io/io_ring.h"
#include "fastdcp/storage/store.h"

namespace fastdcp::detail {

// One checksum chunk of one entry: the unit of checksumming, and of I/O for large entries.
struct Piece {
  size_t entry;
  size_t chunk;
  uint64_t file_offset;
  uint64_t size;
};

// Consecutive pieces that one vectored call moves: up to kBatchBytes and kMaxIovecs buffers.
struct Batch {
  size_t first_piece;
  size_t num_pieces;
};

inline constexpr uint64_t kBatchBytes = uint64_t{16} << 20;
// O_DIRECT writes: the window each request carries, and how many are in flight at most. The
// disk wants many requests at once (measured: 16 in flight beat 4 and 8 on this project's
// machines); each in-flight window has its own bounce buffer.
inline constexpr uint64_t kDirectWindowBytes = uint64_t{8} << 20;
inline constexpr int kDirectWritesInFlight = 16;
inline constexpr int kReadWindowsInFlight = 8;

// The pieces of the given entries (all when `selected` is empty), in file order, and their batches.
// A batch never spans a gap between entries, so its pieces are contiguous in the file (the
// padding after a raw entry excepted, which writers fill with zeros and readers skip).
struct IoPlan {
  std::vector<Piece> pieces;
  std::vector<Batch> batches;
};
IoPlan plan_io(const std::vector<StoredEntry>& entries, uint64_t data_offset, const std::vector<bool>& selected = {});

// Note [Buffered writes]
// Saves go through the page cache by default. Measured on this project's machines (ext4, 1 GiB,
// 4 threads of 8 MiB writes then fdatasync, median of 4 interleaved rounds): buffered writes into
// fallocated space 2.17 s; O_DIRECT without fallocate 2.65 s; O_DIRECT into fallocated space
// 3.27 s, because ext4 must convert each written range of an unwritten extent, and buffered
// writes without fallocate 3.16 s (2.0-4.1). The space is reserved first anyway, so that a full
// disk fails before any data is written; that settles it for buffered writes. Each batch is
// handed to writeback at once (sync_file_range), so the final fdatasync waits only for the tail,
// and once the file is durable its pages are dropped (POSIX_FADV_DONTNEED), as O_DIRECT would have
// left the page cache. O_DIRECT remains an option for storage where it wins.

// Writes the entries' bytes (entry i from storages[i]) with pwritev on `threads` threads,
// computing each chunk's CRC32C just before it is written; returns the CRCs per entry.
std::vector<std::vector<uint32_t>> write_entries(const File& file, const std::vector<StoredEntry>& entries,
                                                 const std::vector<Storage>& storages, uint64_t data_offset,
                                                 int threads);

// The same into a blob of a store without a POSIX file (BlobWriter::file() is null), one write
// per batch on this thread (a BlobWriter takes one writer at a time), padding as zeros.
std::vector<std::vector<uint32_t>> write_entries(storage::BlobWriter& blob, const std::vector<StoredEntry>& entries,
                                                 const std::vector<Storage>& storages, uint64_t data_offset);

// The same through O_DIRECT (`file` opened with it): the data region is cut into aligned windows
// of kDirectWindowBytes, each assembled in an aligned bounce buffer and written with one pwrite; the
// last window is padded to `alignment` (the caller truncates the file to its size afterwards).
// Checksums are computed from the storages in a separate parallel pass. With io_uring (Note [I/O
// engines]) one thread fills the windows while kDirectWritesInFlight of them are written.
std::vector<std::vector<uint32_t>> write_entries_direct(const File& file, const std::vector<StoredEntry>& entries,
                                                        const std::vector<Storage>& storages, uint64_t data_offset,
                                                        uint64_t data_size, size_t alignment, int threads,
                                                        IoEngine engine);

// The bytes of checksum chunk `chunk` of a storage.
inline char* chunk_data(const Storage& storage, size_t chunk) {
  return static_cast<char*>(storage.data()) + chunk * kChecksumChunkBytes;
}

// Checks chunk `chunk` of entries[entry], whose bytes are at `data`, against its CRC32C: an
// Error(kDataLoss) naming the file, the entry (through describe_entry) and the chunk if it differs.
void check_chunk(const std::string& file, const std::vector<StoredEntry>& entries, size_t entry, size_t chunk,
                 const void* data, const std::function<std::string(size_t)>& describe_entry);

// The same for a chunk whose CRC32C the caller computed (`actual`), e.g. over scattered pieces.
void check_chunk_crc(const std::string& file, const std::vector<StoredEntry>& entries, size_t entry, size_t chunk,
                     uint32_t actual, const std::function<std::string(size_t)>& describe_entry);

// Reads consecutive bytes at `offset` into the buffers of `iov`: preadv where the blob is a POSIX
// file, else one read per buffer.
void read_vectored(const storage::BlobReader& blob, std::vector<iovec> iov, uint64_t offset);

// Reads the planned pieces into storages[piece.entry] (whose memory must hold the entry's
// nbytes) with preadv on `threads` threads, checking each chunk's CRC32C when `verify`.
// `file` names the blob and `describe_entry(i)` an entry in error messages (the tensors it holds).
void read_entries(const storage::BlobReader& blob, const std::string& file, const std::vector<StoredEntry>& entries,
                  const std::vector<Storage>& storages, const IoPlan& plan, int threads, bool verify,
                  const std::function<std::string(size_t)>& describe_entry);

// Note [File-image reads]
// A full load reads the file's data region as it is into one allocation, and every storage views
// its entry's bytes there. Whatever the number of tensors, that is a few large reads (O_DIRECT
// where the file system allows it: the data region starts aligned, so the image needs no slack)
// and one allocation instead of one per tensor, which gets transparent huge pages: first-touch
// page faults on fresh 4 KiB pages cost more than the copy itself (measured 0.8-1.0 s against
// 0.3 s for 1 GiB read from tmpfs on one thread). The price is that the allocation lives as long
// as any tensor loaded from it, as with use_mmap.

// Reads the data region of `file` (data_size bytes from data_offset) into `image`, which holds at
// least data_size rounded up to `alignment` bytes, in windows of kBatchBytes on `threads` threads
// or, with io_uring, kReadWindowsInFlight at a time from this thread.
// `name` names the blob in checksum errors. `direct` says that `file` was opened with O_DIRECT
// and that `alignment` suits it and the image.
// With `verify`, each chunk of every entry is checked by the thread that completes the last
// window it overlaps, while its bytes are still in cache.
void read_file_image(const File& file, const std::string& name, bool direct, uint64_t data_offset, uint64_t data_size, size_t alignment,
                     char* image, const std::vector<StoredEntry>& entries, int threads, IoEngine engine,
                     bool verify, const std::function<std::string(size_t)>& describe_entry);

// The same from a blob of a store without a POSIX file, unchecked: windows of kBatchBytes read on
// `threads` threads.
void read_blob_image(const storage::BlobReader& blob, uint64_t data_offset, uint64_t data_size, char* image,
                     int threads);

}  // namespace fastdcp::detail
