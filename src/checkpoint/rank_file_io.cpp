#include "checkpoint/rank_file_io.h"

#include <limits.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>

#include "fastdcp/common/error.h"
#include "fastdcp/common/parallel.h"
#include "fastdcp/format/checksum.h"

namespace fastdcp::detail {
namespace {

constexpr size_t kMaxIov = IOV_MAX > 1024 ? 1024 : IOV_MAX;

// The next part of a vectored transfer after `done` bytes of it moved.
void advance(std::vector<iovec>& iov, size_t& first, size_t done) {
  while (done > 0 && first < iov.size()) {
    if (done >= iov[first].iov_len) {
      done -= iov[first].iov_len;
      ++first;
    } else {
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + done;
      iov[first].iov_len -= done;
      done = 0;
    }
  }
}

void write_all(const File& file, std::vector<iovec> iov, uint64_t offset) {
  size_t first = 0;
  while (first < iov.size()) {
    const int count = static_cast<int>(std::min(iov.size() - first, kMaxIov));
    const ssize_t n = ::pwritev(file.fd(), iov.data() + first, count, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      std::string what = "cannot write '" + file.path() + "'";
      if (errno == ENOSPC) what += " (the disk is full)";
      if (errno == EFBIG) what += " (the file-size limit was reached)";
      throw_system_error(what, errno);
    }
    if (n == 0) throw_system_error("cannot write '" + file.path() + "'", ENOSPC);
    offset += static_cast<uint64_t>(n);
    advance(iov, first, static_cast<size_t>(n));
  }
}

void read_all(const File& file, std::vector<iovec> iov, uint64_t offset) {
  size_t first = 0;
  while (first < iov.size()) {
    const int count = static_cast<int>(std::min(iov.size() - first, kMaxIov));
    const ssize_t n = ::preadv(file.fd(), iov.data() + first, count, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_system_error("cannot read '" + file.path() + "'", errno);
    }
    if (n == 0) {
      throw Error(ErrorCode::kDataLoss, "'" + file.path() + "' is truncated: it ends at byte " + std::to_string(offset));
    }
    offset += static_cast<uint64_t>(n);
    advance(iov, first, static_cast<size_t>(n));
  }
}

const char kZeros[64] = {};

using Bounce = std::unique_ptr<char, decltype(&std::free)>;

// Aligned kBatchBytes buffers for O_DIRECT, one per thread at most, freed with the pool.
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
    Bounce b(static_cast<char*>(std::aligned_alloc(alignment_, kBatchBytes)), &std::free);
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
      if (!contiguous || batch_bytes + piece.size > kBatchBytes || plan.batches.back().num_pieces + 2 > kMaxIov) {
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
      auto* data = static_cast<char*>(storages[piece.entry].data()) + piece.chunk * kChecksumChunkBytes;
      crcs[piece.entry][piece.chunk] = crc32c(data, piece.size);
      iov.push_back({data, piece.size});
      const bool last_chunk = piece.chunk + 1 == entry.num_chunks();
      if (last_chunk && entry.end - entry.begin > entry.nbytes) {
        iov.push_back({const_cast<char*>(kZeros), entry.end - entry.begin - entry.nbytes});
      }
    }
    write_all(file, std::move(iov), plan.pieces[batch.first_piece].file_offset);
  });
  return crcs;
}

std::vector<std::vector<uint32_t>> write_entries_direct(const File& file, const std::vector<StoredEntry>& entries,
                                                        const std::vector<Storage>& storages, uint64_t data_offset,
                                                        uint64_t data_size, size_t alignment, int threads) {
  std::vector<std::vector<uint32_t>> crcs(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) crcs[i].assign(entries[i].num_chunks(), 0);
  const IoPlan plan = plan_io(entries, data_offset);
  parallel_for(plan.pieces.size(), threads, [&](size_t p) {
    const Piece& piece = plan.pieces[p];
    crcs[piece.entry][piece.chunk] =
        crc32c(static_cast<const char*>(storages[piece.entry].data()) + piece.chunk * kChecksumChunkBytes, piece.size);
  });
  // Entries in file order, to find the ones overlapping each window.
  std::vector<size_t> order(entries.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return entries[a].begin < entries[b].begin; });
  const uint64_t windows = (data_size + kBatchBytes - 1) / kBatchBytes;
  BouncePool pool(std::max<size_t>(alignment, 4096));
  parallel_for(static_cast<size_t>(windows), threads, [&](size_t w) {
    const uint64_t start = w * kBatchBytes;
    const uint64_t end = std::min(data_size, start + kBatchBytes);
    const uint64_t padded = (end - start + alignment - 1) / alignment * alignment;
    Bounce bounce = pool.acquire();
    std::memset(bounce.get(), 0, padded);
    auto first = std::lower_bound(order.begin(), order.end(), start,
                                  [&](size_t e, uint64_t at) { return entries[e].end <= at; });
    for (auto it = first; it != order.end() && entries[*it].begin < end; ++it) {
      const StoredEntry& e = entries[*it];
      const uint64_t from = std::max(start, e.begin);
      const uint64_t to = std::min(end, e.begin + e.nbytes);  // padding stays zero
      if (from < to) {
        std::memcpy(bounce.get() + (from - start), static_cast<const char*>(storages[*it].data()) + (from - e.begin),
                    to - from);
      }
    }
    file.write_at(bounce.get(), padded, data_offset + start);
    pool.release(std::move(bounce));
  });
  return crcs;
}

void read_entries(const File& file, const std::vector<StoredEntry>& entries, const std::vector<Storage>& storages,
                  const IoPlan& plan, int threads, bool verify, const std::function<std::string(size_t)>& describe_entry) {
  parallel_for(plan.batches.size(), threads, [&](size_t b) {
    const Batch& batch = plan.batches[b];
    std::vector<iovec> iov;
    iov.reserve(batch.num_pieces * 2);
    char padding[64];
    for (size_t p = batch.first_piece; p < batch.first_piece + batch.num_pieces; ++p) {
      const Piece& piece = plan.pieces[p];
      const StoredEntry& entry = entries[piece.entry];
      iov.push_back({static_cast<char*>(storages[piece.entry].data()) + piece.chunk * kChecksumChunkBytes, piece.size});
      const bool last_chunk = piece.chunk + 1 == entry.num_chunks();
      const bool more_in_batch = p + 1 < batch.first_piece + batch.num_pieces;
      if (last_chunk && more_in_batch && entry.end - entry.begin > entry.nbytes) {
        iov.push_back({padding, entry.end - entry.begin - entry.nbytes});
      }
    }
    read_all(file, std::move(iov), plan.pieces[batch.first_piece].file_offset);
    if (!verify) return;
    for (size_t p = batch.first_piece; p < batch.first_piece + batch.num_pieces; ++p) {
      const Piece& piece = plan.pieces[p];
      const StoredEntry& entry = entries[piece.entry];
      const auto* data = static_cast<const char*>(storages[piece.entry].data()) + piece.chunk * kChecksumChunkBytes;
      const uint32_t actual = crc32c(data, piece.size);
      if (actual != entry.chunk_crc32c[piece.chunk]) {
        throw_checksum_mismatch(file.path(), describe_entry(piece.entry), piece.chunk, entry.num_chunks(),
                                entry.chunk_crc32c[piece.chunk], actual);
      }
    }
  });
}

void throw_checksum_mismatch(const std::string& file, const std::string& entry, size_t chunk, size_t num_chunks,
                             uint32_t expected, uint32_t actual) {
  char crcs[64];
  std::snprintf(crcs, sizeof crcs, "CRC32C %08x, expected %08x", actual, expected);
  throw Error(ErrorCode::kDataLoss, "corrupt data in '" + file + "': " + entry + ", chunk " + std::to_string(chunk) +
                                        " of " + std::to_string(num_chunks) + " (bytes " +
                                        std::to_string(chunk * kChecksumChunkBytes) + "+): " + crcs);
}

}  // namespace fastdcp::detail
