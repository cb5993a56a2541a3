#include "checkpoint/reshard.h"

#include <algorithm>
#include <string>

#include "fastdcp/common/error.h"

namespace fastdcp::detail {

std::vector<Overlap> plan_overlaps(const IndexEntry& entry, const std::vector<Box>& targets) {
  std::vector<Overlap> out;
  for (size_t t = 0; t < targets.size(); ++t) {
    const Box& target = targets[t];
    int64_t covered = 0;
    for (size_t c = 0; c < entry.chunks.size(); ++c) {
      if (std::optional<Box> common = intersect(target, entry.chunks[c].box())) {
        covered += common->numel();
        out.push_back({t, c, std::move(*common)});
      }
    }
    // Saved chunks do not overlap (the index tiles the tensor), so the volumes add up.
    if (covered != target.numel()) {
      throw Error(ErrorCode::kDataLoss, "the saved chunks of '" + entry.key + "' cover " + std::to_string(covered) +
                                            " of the " + std::to_string(target.numel()) + " elements of the box at " +
                                            dims_text(target.offset) + " of sizes " + dims_text(target.sizes));
    }
  }
  return out;
}

std::vector<ByteRange> view_byte_ranges(uint64_t item, const Dims& shape, const Dims& strides, int64_t offset) {
  const size_t rank = shape.size();
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  if (numel == 0) return {};
  // The innermost dims that are one contiguous run: [inner, rank).
  size_t inner = rank;
  int64_t run = 1;
  while (inner > 0 && (shape[inner - 1] == 1 || strides[inner - 1] == run)) {
    --inner;
    run *= shape[inner];
  }
  const int64_t runs = numel / run;
  std::vector<ByteRange> out;
  if (static_cast<uint64_t>(runs) > kMaxRuns) {
    int64_t last = offset;
    for (size_t d = 0; d < rank; ++d) last += (shape[d] - 1) * strides[d];
    out.push_back({static_cast<uint64_t>(offset) * item, static_cast<uint64_t>(last + 1) * item});
    return out;
  }
  out.reserve(static_cast<size_t>(runs));
  std::vector<int64_t> index(inner, 0);
  for (int64_t r = 0; r < runs; ++r) {
    int64_t at = offset;
    for (size_t d = 0; d < inner; ++d) at += index[d] * strides[d];
    out.push_back({static_cast<uint64_t>(at) * item, static_cast<uint64_t>(at + run) * item});
    for (size_t d = inner; d-- > 0;) {
      if (++index[d] < shape[d]) break;
      index[d] = 0;
    }
  }
  return merge_ranges(std::move(out), 0);
}

std::vector<ByteRange> merge_ranges(std::vector<ByteRange> ranges, uint64_t gap, uint64_t align, uint64_t limit) {
  if (align > 0) {
    for (ByteRange& r : ranges) {
      r.begin = r.begin / align * align;
      r.end = std::min((r.end + align - 1) / align * align, limit);
    }
  }
  std::sort(ranges.begin(), ranges.end(), [](const ByteRange& a, const ByteRange& b) { return a.begin < b.begin; });
  std::vector<ByteRange> out;
  for (const ByteRange& r : ranges) {
    if (r.begin == r.end) continue;
    if (!out.empty() && r.begin <= out.back().end + gap) {
      out.back().end = std::max(out.back().end, r.end);
    } else {
      out.push_back(r);
    }
  }
  return out;
}

}  // namespace fastdcp::detail
