#include "fastdcp/tensor/sharded.h"

#include <algorithm>
#include <string>

#include "fastdcp/common/error.h"

namespace fastdcp {

namespace {
std::string dims_text(const Dims& dims) {
  std::string out = "[";
  for (size_t d = 0; d < dims.size(); ++d) out += (d ? ", " : "") + std::to_string(dims[d]);
  return out + "]";
}
}  // namespace

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

void ShardedTensor::validate(const std::string& what) const {
  auto refuse = [&](const std::string& why) {
    throw Error(ErrorCode::kInvalidArgument, "the sharded tensor at '" + what + "' " + why);
  };
  for (int64_t s : global_shape) {
    if (s < 0) refuse("has a negative global size " + dims_text(global_shape));
  }
  if (!contiguous_nbytes(dtype, global_shape)) refuse("has a global shape " + dims_text(global_shape) + " too large for int64");
  if (replica_count < 1 || replica_index < 0 || replica_index >= replica_count) {
    refuse("is replica " + std::to_string(replica_index) + " of " + std::to_string(replica_count));
  }
  for (size_t i = 0; i < chunks.size(); ++i) {
    const ShardChunk& c = chunks[i];
    if (c.data.dtype() != dtype) refuse("mixes dtypes across its chunks");
    if (c.offset.size() != global_shape.size() || c.data.dim() != global_shape.size()) {
      refuse("has a chunk of " + std::to_string(c.data.dim()) + " dims in a tensor of " +
             std::to_string(global_shape.size()));
    }
    const Box box = c.box();
    if (box.empty()) refuse("has an empty chunk at " + dims_text(c.offset));
    for (size_t d = 0; d < global_shape.size(); ++d) {
      if (c.offset[d] < 0 || box.sizes[d] > global_shape[d] || c.offset[d] > global_shape[d] - box.sizes[d]) {
        refuse("has a chunk at " + dims_text(c.offset) + " of sizes " + dims_text(box.sizes) +
               " outside its global shape " + dims_text(global_shape));
      }
    }
    for (size_t j = 0; j < i; ++j) {
      if (intersect(box, chunks[j].box())) {
        refuse("has overlapping chunks at " + dims_text(chunks[j].offset) + " and " + dims_text(c.offset));
      }
    }
  }
}

}  // namespace fastdcp
