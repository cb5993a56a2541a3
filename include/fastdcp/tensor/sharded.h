#pragma once
// Sharded tensors: a tensor that several ranks hold pieces of (a torch DTensor under FSDP2 or
// tensor parallelism), as one rank sees it.
//
// Note [Sharded tensors]
// A rank holds one or more boxes of the global tensor: n-dimensional rectangles, each given by its
// offset in the global tensor and viewed in memory by an ordinary Tensor (a view of the rank's
// local shard, whose shape is the box's sizes). Shard and Replicate placements give one box per
// rank; a strided shard (_StridedShard) gives several, each a narrowed view of the local shard.
// Placements and meshes are not kept: boxes are what a save records (the manifest's index lists
// every saved box of every key, docs/format.md) and what a load asks for, so that a load can cut
// the global tensor differently from the save (another world size, mesh or layout). The framework
// layer turns its own sharding into boxes; the C++ core plans and moves bytes between boxes.

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "fastdcp/tensor/dims.h"
#include "fastdcp/tensor/tensor.h"

namespace fastdcp {

// An n-dimensional rectangle of a global tensor: [offset[d], offset[d] + sizes[d]) in every dim d.
struct Box {
  Dims offset;
  Dims sizes;

  int64_t numel() const;
  bool empty() const;  // some size is 0
  friend bool operator==(const Box&, const Box&) = default;

  // The box of a whole tensor of this shape: offset 0 in every dim.
  static Box whole(const Dims& shape) { return Box{Dims::zeros(shape.size()), shape}; }
};

// The common part of two boxes of the same rank (number of dims), or nullopt if it is empty.
std::optional<Box> intersect(const Box& a, const Box& b);

// The view of `box` inside `holder`, a tensor that holds the box of the same global tensor that
// starts at `holder_offset` (a whole tensor: offset 0). Error(kInvalidArgument) if `box` is not
// inside it.
Tensor box_view(const Tensor& holder, const Dims& holder_offset, const Box& box);

// The storage offset of `box` (global coordinates) inside a view of `holder` (its box) with these
// strides and storage offset: the same strides, the offset moved to the box's first element.
int64_t sub_view_offset(const Box& holder, const Dims& strides, int64_t offset, const Box& box);

// One box of a sharded tensor that this rank holds.
struct ShardChunk {
  Dims offset;  // of `data` in the global tensor
  Tensor data;  // a view of the rank's local shard; its shape is the box's sizes

  Box box() const { return Box{offset, data.shape()}; }
};

struct ShardedTensor {
  Dims global_shape;
  DType dtype = DType::kF32;  // every chunk's dtype; kept for ranks that hold no chunk
  std::vector<ShardChunk> chunks;  // the boxes this rank holds; none is empty; none overlaps another
  // Other ranks may hold copies of these same boxes (Replicate placements): this rank holds copy
  // replica_index of replica_count. A save writes each box once, and the copies share the
  // writing; a load fills every copy.
  int replica_index = 0;
  int replica_count = 1;

  // Error(kInvalidArgument) naming `what` unless: every chunk lies inside global_shape, has this
  // dtype and this rank, is not empty, overlaps no other chunk; 0 <= replica_index < replica_count.
  void validate(const std::string& what) const;
};

// Why a sharded tensor of this dtype and global shape cannot hold chunks at `boxes` (a phrase such
// as "has an empty chunk at [0, 4]"), or "" if it can: the global shape is not negative and fits
// int64, and every box has its number of dims, is not empty, lies inside it and overlaps no other.
// Saves (ShardedTensor::validate) and rank-file parsing check sharded leaves with it alike.
std::string chunk_layout_problem(DType dtype, const Dims& global_shape, const std::vector<Box>& boxes);

// Two boxes of `boxes` that overlap, or nullopt. A sweep along the dim with the most distinct
// offsets: O(n log n + n k) for n boxes of which at most k cross one plane across that dim (small
// for the grids that shardings make), not O(n^2).
std::optional<std::pair<size_t, size_t>> find_overlap(const std::vector<Box>& boxes);

// Why `boxes` do not tile a tensor of `shape` exactly (a phrase), or "" if they do: each inside
// the shape, none overlapping another, their volumes adding up to the element count.
std::string tiling_problem(const Dims& shape, const std::vector<Box>& boxes);

// Note [Writing replicas]
// A sharded leaf with replica_count R > 1 is held, box for box, by R ranks; exactly one of them
// writes it, and the R replicas share the writing evenly without talking to each other: over the
// sharded leaves in tree order, the leaves with the same R go, each in turn, to the replica that
// has the fewest bytes so far (ties: the lowest index). Ranks of one SPMD program hold the same
// tree, so every replica computes the same assignment. Element i of the result says whether this
// rank (its leaves' replica_index) writes leaves[i]; a leaf with R == 1 is always written.
std::vector<bool> replica_writes(const std::vector<const ShardedTensor*>& leaves);
// The same, one leaf at a time in tree order (what a walk over the tree uses).
class ReplicaWriters {
 public:
  bool writes(const ShardedTensor& leaf);

 private:
  std::map<int, std::vector<uint64_t>> bytes_;  // per replica count, bytes assigned to each replica
};

}  // namespace fastdcp
