#pragma once
// Planning a resharded load: which saved chunks each target box needs, and which byte ranges of
// the saved views those overlaps touch. Pure functions over boxes and view layouts, so that the
// planner is tested on its own; checkpoint.cpp moves the bytes (Note [Resharded loads]).
//
// Note [Resharded loads]
// A load fills each sharded (or full) target from the manifest's index (Note [Global index]):
// per target box, its overlaps with the key's saved chunks (O(chunks) per box); the overlaps are
// grouped per rank file, whose header is read once; the byte ranges of the saved views that the
// overlaps touch are merged into requests (a contiguous run is one request; with checksums, the
// 4 MiB checksum chunks the ranges touch, each verified once) and read in parallel, each straight
// into its target where the overlap is contiguous on both sides (Note [Landing reads in the target]
// in checkpoint.cpp); the other overlaps are copied, strided, from a buffer into their target
// views. Nothing else of a file is read, so a small overlap costs a small read.

#include <cstdint>
#include <vector>

#include "fastdcp/format/manifest.h"
#include "fastdcp/tensor/sharded.h"

namespace fastdcp::detail {

// The part of target box `target` that saved chunk `chunk` (an index into the entry's chunks)
// holds, in global coordinates.
struct Overlap {
  size_t target;
  size_t chunk;
  Box box;
};

// The overlaps of every target box with the key's saved chunks, by target box. Throws
// Error(kDataLoss) naming the key if the saved chunks do not cover a target box.
std::vector<Overlap> plan_overlaps(const IndexEntry& entry, const std::vector<Box>& targets);

struct ByteRange {
  uint64_t begin = 0;
  uint64_t end = 0;
  friend bool operator==(const ByteRange&, const ByteRange&) = default;
};

// The byte ranges of its storage that a strided view (element size `item` bytes, non-negative
// strides) touches: one per contiguous run, merged where they touch. Views of more runs than
// kMaxRuns give their byte extent instead.
inline constexpr uint64_t kMaxRuns = uint64_t{1} << 16;
std::vector<ByteRange> view_byte_ranges(uint64_t item, const Dims& shape, const Dims& strides, int64_t offset);

// Sorts and merges ranges that overlap or lie less than `gap` bytes apart; with `align` > 0, each
// range first grows to whole multiples of `align`, capped at `limit`.
std::vector<ByteRange> merge_ranges(std::vector<ByteRange> ranges, uint64_t gap, uint64_t align = 0, uint64_t limit = 0);

}  // namespace fastdcp::detail
