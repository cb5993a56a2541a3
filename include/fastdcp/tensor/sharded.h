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
#include <optional>
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
};

// The common part of two boxes of the same rank (number of dims), or nullopt if it is empty.
std::optional<Box> intersect(const Box& a, const Box& b);

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

}  // namespace fastdcp
