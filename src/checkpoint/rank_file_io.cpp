#include "checkpoint/rank_file_io.h"

#include <fcntl.h>
#include <limits.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>

#include "fastdcp/common/error.h"
#include "fastdcp/common/fault.h"
#include "fastdcp/common/parallel.h"
#include "fastdcp/format/checksum.h"
#include "io/file_error.h"

namespace fastdcp::detail {
namespace {

[[noreturn]] void throw_checksum_mismatch(const std::string& file, const std::string& entry, size_t chunk,
                                          size_t num_chunks, uint32_t expected, uint32_t actual) {
  char crcs[64];
  std::snprintf(crcs, sizeof crcs, "CRC32C %08x, expected %08x", actual, expected);
  throw ChecksumError("corrupt data in '" + file + "': " + entry + ", chunk " + std::to_string(chunk) + " of " +
                      std::to_string(num_chunks) + " (bytes " + std::to_string(chunk * kChecksumChunkBytes) +
                      "+): " + crcs);
}

const char kZeros[64] = {};

using Bounce = std::unique_ptr<char, decltype(&std::free)>;

// Aligned kDirectWindowBytes buffers for O_DIRECT, one per thread at most, freed with the pool.
class BouncePool {
 public:
  explicit BouncePool(size_t alignment) : alignment_(alignment) {}
  Bounce acquire() {
    {
      std::lock_guard lock(mutex_);
      if (!free_.empty()) {
        Bounce b = std::move(free_.back());
        free_.pop_back();
        return b;
      }
    }
    Bounce b(static_cast<char*>(std::aligned_alloc(alignment_, kDirectWindowBytes)), &std::free);
    if (!b) throw Error(ErrorCode::kResourceExhausted, "cannot allocate an O_DIRECT bounce buffer");
    return b;
  }
  void release(Bounce b) {
    std::lock_guard lock(mutex_);
    free_.push_back(std::move(b));
  }

 private:
  size_t alignment_;
  std::mutex mutex_;
  std::vector<Bounce> free_;
};

}  // namespace

IoPlan plan_io(const std::vector<StoredEntry>& entries, uint64_t data_offset, const std::vector<bool>& selected) {
  std::vector<size_t> order;
  for (size_t i = 0; i < entries.size(); ++i) {
    if (selected.empty() || selected[i]) order.push_back(i);
  }
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return entries[a].begin < entries[b].begin; });
  IoPlan plan;
  uint64_t batch_bytes = 0;
  uint64_t expected_offset = 0;
  for (const size_t e : order) {
    const StoredEntry& entry = entries[e];
    const size_t chunks = entry.num_chunks();
    for (size_t k = 0; k < chunks; ++k) {
      const uint64_t start = k * kChecksumChunkBytes;
      Piece piece{e, k, data_offset + entry.begin + start, std::min(kChecksumChunkBytes, entry.nbytes - start)};
      const bool contiguous = !plan.batches.empty() && piece.file_offset == expected_offset;
      if (!contiguous || batch_bytes + piece.size > kBatchBytes || plan.batches.back().num_pieces + 2 > kMaxIovecs) {
        plan.batches.push_back({plan.pieces.size(), 0});
        batch_bytes = 0;
      }
      plan.pieces.push_back(piece);
      ++plan.batches.back().num_pieces;
      batch_bytes += piece.size;
      expected_offset = piece.file_offset + piece.size;
    }
    // The padding after a raw entry keeps its batch going (writers fill it with zeros).
    if (chunks > 0 && entry.end - entry.begin > entry.nbytes) expected_offset = data_offset + entry.end;
  }
  return plan;
}

std::vector<std::vector<uint32_t>> write_entries(const File& file, const std::vector<StoredEntry>& entries,
                                                 const std::vector<Storage>& storages, uint64_t data_offset,
                                                 int threads) {
  std::vector<std::vector<uint32_t>> crcs(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) crcs[i].assign(entries[i].num_chunks(), 0);
  const IoPlan plan = plan_io(entries, data_offset);
  parallel_for(plan.batches.size(), threads, [&](size_t b) {
    const Batch& batch = plan.batches[b];
    std::vector<iovec> iov;
    iov.reserve(batch.num_pieces * 2);
    for (size_t p = batch.first_piece; p < batch.first_piece + batch.num_pieces; ++p) {
      const Piece& piece = plan.pieces[p];
      const StoredEntry& entry = entries[piece.entry];
      char* data = chunk_data(storages[piece.entry], piece.chunk);
      crcs[piece.entry][piece.chunk] = crc32c(data, piece.size);
      iov.push_back({data, piece.size});
      const bool last_chunk = piece.chunk + 1 == entry.num_chunks();
      if (last_chunk && entry.end - entry.begin > entry.nbytes) {
        iov.push_back({const_cast<char*>(kZeros), entry.end - entry.begin - entry.nbytes});
      }
    }
    const uint64_t offset = plan.pieces[batch.first_piece].file_offset;
    uint64_t length = 0;
    for (const iovec& v : iov) length += v.iov_len;
    file.write_vectored_at(std::move(iov), offset);
    // Start writing these pages back now, so that the final fdatasync waits only for the tail.
    ::sync_file_range(file.fd(), static_cast<off_t>(offset), static_cast<off_t>(length), SYNC_FILE_RANGE_WRITE);
  });
  return crcs;
}

std::vector<std::vector<uint32_t>> write_entries(storage::BlobWriter& blob, const std::vector<StoredEntry>& entries,
                                                 const std::vector<Storage>& storages, uint64_t data_offset) {
  std::vector<std::vector<uint32_t>> crcs(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) crcs[i].assign(entries[i].num_chunks(), 0);
  const IoPlan plan = plan_io(entries, data_offset);
  for (const Piece& piece : plan.pieces) {
    const StoredEntry& entry = entries[piece.entry];
    const char* data = chunk_data(storages[piece.entry], piece.chunk);
    crcs[piece.entry][piece.chunk] = crc32c(data, piece.size);
    blob.write_at(data, piece.size, piece.file_offset);
    if (piece.chunk + 1 == entry.num_chunks() && entry.end - entry.begin > entry.nbytes) {
      blob.write_at(kZeros, entry.end - entry.begin - entry.nbytes, data_offset + entry.begin + entry.nbytes);
    }
  }
  return crcs;
}

std::vector<std::vector<uint32_t>> write_entries_direct(const File& file, const std::vector<StoredEntry>& entries,
                                                        const std::vector<Storage>& storages, uint64_t data_offset,
                                                        uint64_t data_size, size_t alignment, int threads,
                                                        IoEngine engine) {
  std::vector<std::vector<uint32_t>> crcs(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) crcs[i].assign(entries[i].num_chunks(), 0);
  const IoPlan plan = plan_io(entries, data_offset);
  parallel_for(plan.pieces.size(), threads, [&](size_t p) {
    const Piece& piece = plan.pieces[p];
    crcs[piece.entry][piece.chunk] = crc32c(chunk_data(storages[piece.entry], piece.chunk), piece.size);
  });
  // Entries in file order, to find the ones overlapping each window.
  std::vector<size_t> order(entries.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return entries[a].begin < entries[b].begin; });
  const uint64_t windows = (data_size + kDirectWindowBytes - 1) / kDirectWindowBytes;
  BouncePool pool(std::max<size_t>(alignment, 4096));
  // Assembles window w in `bounce`: the entries' bytes, zeros in padding; returns its aligned size.
  const auto fill_window = [&](char* bounce, size_t w) {
    const uint64_t start = w * kDirectWindowBytes;
    const uint64_t end = std::min(data_size, start + kDirectWindowBytes);
    const uint64_t padded = (end - start + alignment - 1) / alignment * alignment;
    std::memset(bounce, 0, padded);
    auto first = std::lower_bound(order.begin(), order.end(), start,
                                  [&](size_t e, uint64_t at) { return entries[e].end <= at; });
    for (auto it = first; it != order.end() && entries[*it].begin < end; ++it) {
      const StoredEntry& e = entries[*it];
      const uint64_t from = std::max(start, e.begin);
      const uint64_t to = std::min(end, e.begin + e.nbytes);  // padding stays zero
      if (from < to) {
        std::memcpy(bounce + (from - start), static_cast<const char*>(storages[*it].data()) + (from - e.begin), to - from);
      }
    }
    return padded;
  };
  if (use_io_uring(engine)) {
    IoRing ring = IoRing::create(kDirectWritesInFlight);
    std::vector<Bounce> in_flight;
    in_flight.reserve(static_cast<size_t>(windows));
    for (uint64_t w = 0; w < windows; ++w) in_flight.emplace_back(nullptr, &std::free);
    ring.run(
        file, static_cast<size_t>(windows),
        [&](size_t w) {
          in_flight[w] = pool.acquire();
          const uint64_t padded = fill_window(in_flight[w].get(), w);
          return IoRing::Request{.write = true, .data = in_flight[w].get(), .size = padded,
                                 .offset = data_offset + w * kDirectWindowBytes};
        },
        [&](size_t w) { pool.release(std::move(in_flight[w])); });
  } else {
    parallel_for(static_cast<size_t>(windows), threads, [&](size_t w) {
      Bounce bounce = pool.acquire();
      const uint64_t padded = fill_window(bounce.get(), w);
      file.write_at(bounce.get(), padded, data_offset + w * kDirectWindowBytes);
      pool.release(std::move(bounce));
    });
  }
  return crcs;
}

void read_vectored(const storage::BlobReader& blob, std::vector<iovec> iov, uint64_t offset) {
  if (const File* file = blob.file()) return file->read_vectored_at(std::move(iov), offset);
  for (const iovec& v : iov) {
    blob.read_at(v.iov_base, v.iov_len, offset);
    offset += v.iov_len;
  }
}

void read_entries(const storage::BlobReader& blob, const std::string& file, const std::vector<StoredEntry>& entries,
                  const std::vector<Storage>& storages, const IoPlan& plan, int threads, bool verify,
                  const std::function<std::string(size_t)>& describe_entry) {
  parallel_for(plan.batches.size(), threads, [&](size_t b) {
    const Batch& batch = plan.batches[b];
    std::vector<iovec> iov;
    iov.reserve(batch.num_pieces * 2);
    char padding[64];
    for (size_t p = batch.first_piece; p < batch.first_piece + batch.num_pieces; ++p) {
      const Piece& piece = plan.pieces[p];
      const StoredEntry& entry = entries[piece.entry];
      iov.push_back({chunk_data(storages[piece.entry], piece.chunk), piece.size});
      const bool last_chunk = piece.chunk + 1 == entry.num_chunks();
      const bool more_in_batch = p + 1 < batch.first_piece + batch.num_pieces;
      if (last_chunk && more_in_batch && entry.end - entry.begin > entry.nbytes) {
        iov.push_back({padding, entry.end - entry.begin - entry.nbytes});
      }
    }
    read_vectored(blob, std::move(iov), plan.pieces[batch.first_piece].file_offset);
    if (!verify) return;
    for (size_t p = batch.first_piece; p < batch.first_piece + batch.num_pieces; ++p) {
      const Piece& piece = plan.pieces[p];
      check_chunk(file, entries, piece.entry, piece.chunk, chunk_data(storages[piece.entry], piece.chunk),
                  describe_entry);
    }
  });
}

void check_chunk(const std::string& file, const std::vector<StoredEntry>& entries, size_t entry, size_t chunk,
                 const void* data, const std::function<std::string(size_t)>& describe_entry) {
  const StoredEntry& e = entries[entry];
  const uint64_t size = chunk < e.num_chunks() ? std::min(kChecksumChunkBytes, e.nbytes - chunk * kChecksumChunkBytes) : 0;
  check_chunk_crc(file, entries, entry, chunk, crc32c(data, size), describe_entry);
}

void check_chunk_crc(const std::string& file, const std::vector<StoredEntry>& entries, size_t entry, size_t chunk,
                     uint32_t actual, const std::function<std::string(size_t)>& describe_entry) {
  const StoredEntry& e = entries[entry];
  if (chunk >= e.chunk_crc32c.size()) {  // a plain safetensors entry has none: callers must not check it
    throw Error(ErrorCode::kInternal, "no checksum for chunk " + std::to_string(chunk) + " of '" + e.name + "' in '" +
                                          file + "'");
  }
  if (actual != e.chunk_crc32c[chunk]) {
    throw_checksum_mismatch(file, describe_entry(entry), chunk, e.num_chunks(), e.chunk_crc32c[chunk], actual);
  }
}

void read_file_image(const File& file, const std::string& name, bool direct, uint64_t data_offset, uint64_t data_size, size_t alignment,
                     char* image, const std::vector<StoredEntry>& entries, int threads, IoEngine engine,
                     bool verify, const std::function<std::string(size_t)>& describe_entry) {
  // Every chunk, in data-region offsets and file order, and how many windows each still awaits.
  const IoPlan plan = verify ? plan_io(entries, 0) : IoPlan{};
  const auto window_of = [](uint64_t at) { return at / kBatchBytes; };
  auto windows_left = std::make_unique<std::atomic<int>[]>(plan.pieces.size());
  for (size_t p = 0; p < plan.pieces.size(); ++p) {
    const Piece& piece = plan.pieces[p];
    windows_left[p] = static_cast<int>(window_of(piece.file_offset + piece.size - 1) - window_of(piece.file_offset) + 1);
  }
  const uint64_t windows = (data_size + kBatchBytes - 1) / kBatchBytes;
  if (!direct) {
    ::posix_fadvise(file.fd(), static_cast<off_t>(data_offset), static_cast<off_t>(data_size), POSIX_FADV_SEQUENTIAL);
  }
  const auto window_length = [&](uint64_t needed) {
    return direct ? (needed + alignment - 1) / alignment * alignment : needed;
  };
  // Once window w has landed: drop its page-cache copy, check the chunks it completes.
  const auto landed = [&](size_t w) {
    const uint64_t start = w * kBatchBytes;
    const uint64_t needed = std::min(kBatchBytes, data_size - start);
    // Page-cache copies of what is now in the image would only double the memory in use.
    if (!direct) ::posix_fadvise(file.fd(), static_cast<off_t>(data_offset + start), static_cast<off_t>(needed),
                                 POSIX_FADV_DONTNEED);
    if (!verify) return;
    auto piece = std::lower_bound(plan.pieces.begin(), plan.pieces.end(), start,
                                  [](const Piece& p, uint64_t at) { return p.file_offset + p.size <= at; });
    for (; piece != plan.pieces.end() && piece->file_offset < start + needed; ++piece) {
      const size_t p = static_cast<size_t>(piece - plan.pieces.begin());
      if (windows_left[p].fetch_sub(1) != 1) continue;
      check_chunk(name, entries, piece->entry, piece->chunk, image + piece->file_offset, describe_entry);
    }
  };
  if (use_io_uring(engine)) {
    IoRing ring = IoRing::create(kReadWindowsInFlight);
    ring.run(
        file, static_cast<size_t>(windows),
        [&](size_t w) {
          const uint64_t start = w * kBatchBytes;
          const uint64_t needed = std::min(kBatchBytes, data_size - start);
          return IoRing::Request{.write = false, .data = image + start, .size = window_length(needed),
                                 .offset = data_offset + start, .required = needed};
        },
        landed);
    return;
  }
  parallel_for(static_cast<size_t>(windows), threads, [&](size_t w) {
    const uint64_t start = w * kBatchBytes;
    const uint64_t needed = std::min(kBatchBytes, data_size - start);
    const uint64_t length = window_length(needed);
    uint64_t done = 0;
    while (done < needed) {
      const int injected = fault::injected("pread");  // Note [Fault injection]
      const ssize_t n = injected ? (errno = injected, -1)
                                 : ::pread(file.fd(), image + start + done, length - done,
                                           static_cast<off_t>(data_offset + start + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        throw_file_error("cannot read", file.path(), "pread", errno);
      }
      done += static_cast<uint64_t>(n);
      // A short read ends the file; O_DIRECT could not go on from an unaligned place anyway.
      if (n == 0 || (done < needed && direct && done % alignment != 0)) {
        throw Error(ErrorCode::kDataLoss, "'" + file.path() + "' is truncated: it ends at byte " +
                                              std::to_string(data_offset + start + done));
      }
    }
    landed(w);
  });
}

void read_blob_image(const storage::BlobReader& blob, uint64_t data_offset, uint64_t data_size, char* image,
                     int threads) {
  const uint64_t windows = (data_size + kBatchBytes - 1) / kBatchBytes;
  parallel_for(static_cast<size_t>(windows), threads, [&](size_t w) {
    const uint64_t start = w * kBatchBytes;
    blob.read_at(image + start, std::min(kBatchBytes, data_size - start), data_offset + start);
  });
}

}  // namespace fastdcp::detail
