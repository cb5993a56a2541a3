#include "fastdcp/tensor/sharded.h"

#include <algorithm>
#include <string>

#include "fastdcp/common/error.h"

namespace fastdcp {

int64_t Box::numel() const {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  return n;
}

bool Box::empty() const { return std::any_of(sizes.begin(), sizes.end(), [](int64_t s) { return s == 0; }); }

std::optional<Box> intersect(const Box& a, const Box& b) {
  if (a.offset.size() != b.offset.size()) return std::nullopt;
  Box out;
  out.offset.resize(a.offset.size());
  out.sizes.resize(a.offset.size());
  for (size_t d = 0; d < a.offset.size(); ++d) {
    const int64_t begin = std::max(a.offset[d], b.offset[d]);
    const int64_t end = std::min(a.offset[d] + a.sizes[d], b.offset[d] + b.sizes[d]);
    if (end <= begin) return std::nullopt;
    out.offset[d] = begin;
    out.sizes[d] = end - begin;
  }
  return out;
}

Tensor box_view(const Tensor& holder, const Dims& holder_offset, const Box& box) {
  const Box held{holder_offset, holder.shape()};
  if (box.offset.size() != holder.dim() || holder_offset.size() != holder.dim() ||
      (!box.empty() && intersect(held, box) != box)) {
    throw Error(ErrorCode::kInvalidArgument, "the box at " + dims_text(box.offset) + " of sizes " + dims_text(box.sizes) +
                                                 " is not inside " + holder.describe() + " at " + dims_text(holder_offset));
  }
  return holder.view_as(box.sizes, holder.strides(), sub_view_offset(held, holder.strides(), holder.storage_offset(), box));
}

int64_t sub_view_offset(const Box& holder, const Dims& strides, int64_t offset, const Box& box) {
  for (size_t d = 0; d < strides.size(); ++d) offset += (box.offset[d] - holder.offset[d]) * strides[d];
  return offset;
}

void ShardedTensor::validate(const std::string& what) const {
  auto refuse = [&](const std::string& why) {
    throw Error(ErrorCode::kInvalidArgument, "the sharded tensor at '" + what + "' " + why);
  };
  if (replica_count < 1 || replica_index < 0 || replica_index >= replica_count) {
    refuse("is replica " + std::to_string(replica_index) + " of " + std::to_string(replica_count));
  }
  std::vector<Box> boxes;
  boxes.reserve(chunks.size());
  for (const ShardChunk& c : chunks) {
    if (c.data.dtype() != dtype) refuse("mixes dtypes across its chunks");
    boxes.push_back(c.box());
  }
  if (const std::string why = chunk_layout_problem(dtype, global_shape, boxes); !why.empty()) refuse(why);
}

std::string chunk_layout_problem(DType dtype, const Dims& global_shape, const std::vector<Box>& boxes) {
  for (int64_t s : global_shape) {
    if (s < 0) return "has a negative global size " + dims_text(global_shape);
  }
  if (!contiguous_nbytes(dtype, global_shape)) return "has a global shape " + dims_text(global_shape) + " too large for int64";
  for (const Box& box : boxes) {
    if (box.offset.size() != global_shape.size() || box.sizes.size() != global_shape.size()) {
      return "has a chunk of " + std::to_string(box.sizes.size()) + " dims in a tensor of " +
             std::to_string(global_shape.size());
    }
    if (box.empty()) return "has an empty chunk at " + dims_text(box.offset);
    for (size_t d = 0; d < global_shape.size(); ++d) {
      if (box.offset[d] < 0 || box.sizes[d] > global_shape[d] || box.offset[d] > global_shape[d] - box.sizes[d]) {
        return "has a chunk at " + dims_text(box.offset) + " of sizes " + dims_text(box.sizes) +
               " outside its global shape " + dims_text(global_shape);
      }
    }
  }
  if (const auto pair = find_overlap(boxes)) {
    return "has overlapping chunks at " + dims_text(boxes[pair->first].offset) + " and " +
           dims_text(boxes[pair->second].offset);
  }
  return "";
}

namespace {
// Whether two boxes of the same rank share an element: intersect() without building the box.
bool meet(const Box& a, const Box& b) {
  for (size_t d = 0; d < a.offset.size(); ++d) {
    if (std::max(a.offset[d], b.offset[d]) >= std::min(a.offset[d] + a.sizes[d], b.offset[d] + b.sizes[d])) return false;
  }
  return true;
}
}  // namespace

std::optional<std::pair<size_t, size_t>> find_overlap(const std::vector<Box>& boxes) {
  if (boxes.size() < 2) return std::nullopt;
  const size_t rank = boxes[0].offset.size();
  if (rank == 0) return std::make_pair(size_t{0}, size_t{1});  // two boxes of a scalar: the same element
  // The sweep dim: the one along which the boxes start at the most places.
  size_t dim = 0;
  size_t most = 0;
  for (size_t d = 0; d < rank; ++d) {
    std::vector<int64_t> starts;
    starts.reserve(boxes.size());
    for (const Box& b : boxes) starts.push_back(b.offset[d]);
    std::sort(starts.begin(), starts.end());
    const auto distinct = static_cast<size_t>(std::unique(starts.begin(), starts.end()) - starts.begin());
    if (distinct > most) most = distinct, dim = d;
  }
  std::vector<size_t> order(boxes.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return boxes[a].offset[dim] < boxes[b].offset[dim]; });
  std::vector<size_t> active;  // boxes whose extent along `dim` reaches the current start
  for (const size_t i : order) {
    const int64_t start = boxes[i].offset[dim];
    std::erase_if(active, [&](size_t j) { return boxes[j].offset[dim] + boxes[j].sizes[dim] <= start; });
    for (const size_t j : active) {
      if (!boxes[i].empty() && !boxes[j].empty() && meet(boxes[i], boxes[j])) return std::make_pair(j, i);
    }
    active.push_back(i);
  }
  return std::nullopt;
}

std::string tiling_problem(const Dims& shape, const std::vector<Box>& boxes) {
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  int64_t volume = 0;
  for (const Box& b : boxes) {
    bool inside = b.offset.size() == shape.size() && b.sizes.size() == shape.size();
    for (size_t d = 0; inside && d < shape.size(); ++d) {
      inside = b.offset[d] >= 0 && b.sizes[d] >= 0 && b.sizes[d] <= shape[d] && b.offset[d] <= shape[d] - b.sizes[d];
    }
    if (!inside) return "the chunk at " + dims_text(b.offset) + " of sizes " + dims_text(b.sizes) + " lies outside the global shape " + dims_text(shape);
    volume += b.numel();  // each at most numel, and a sum beyond numel stops the loop
    if (volume > numel) break;
  }
  if (const auto pair = find_overlap(boxes)) {
    return "the chunks at " + dims_text(boxes[pair->first].offset) + " and " + dims_text(boxes[pair->second].offset) + " overlap";
  }
  if (volume != numel) {
    return "the chunks cover " + std::to_string(volume) + " of its " + std::to_string(numel) + " elements";
  }
  return "";
}

std::vector<bool> replica_writes(const std::vector<const ShardedTensor*>& leaves) {
  std::vector<bool> out(leaves.size());
  ReplicaWriters writers;
  for (size_t i = 0; i < leaves.size(); ++i) out[i] = writers.writes(*leaves[i]);
  return out;
}

bool ReplicaWriters::writes(const ShardedTensor& leaf) {
  if (leaf.replica_count <= 1) return true;
  uint64_t bytes = 0;
  for (const ShardChunk& c : leaf.chunks) bytes += c.data.nbytes();
  std::vector<uint64_t>& load = bytes_[leaf.replica_count];
  load.resize(static_cast<size_t>(leaf.replica_count), 0);
  const auto writer = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
  load[writer] += bytes;
  return writer == static_cast<size_t>(leaf.replica_index);
}

}  // namespace fastdcp
