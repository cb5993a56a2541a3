#pragma once
// Loads into device tensors through host stand-ins.
//
// Note [Loading into device tensors]
// A load target's CUDA tensors (a model on its GPU, the usual load_state_dict) are filled through
// host memory, by the loaders themselves (CheckpointReader::read_into, load_into,
// load_hugging_face), through the CudaRuntime (Note [CUDA is optional]). Before the load, every
// CUDA storage the target views gets one host copy of the byte range its views span, and each
// view is replaced in the tree by the same view of that copy, so views of one storage (tied
// weights, a flat parameter's slices) stay views of one host copy and the loaders' matching, checks
// and strictness treat them as host targets. The device bytes are read into the copy first unless
// one contiguous view covers the whole range (a strided view's gaps must survive the copy back).
// After a load that succeeded, each range is copied back to its device; on failure nothing is.
// Either way the device tensors return to their places in the tree: the caller's tree is the
// one it passed. The copies are synchronous cudaMemcpy calls on the legacy default stream, so they
// are ordered after work queued on blocking streams (PyTorch's default stream); work that a
// non-blocking side stream still has queued on a target must be synchronised by the caller first.

#include <cstdint>
#include <memory>
#include <vector>

#include "fastdcp/memory/cuda_runtime.h"
#include "fastdcp/tensor/value.h"

namespace fastdcp {

class DeviceTargets {
 public:
  // Swaps the CUDA tensors of `target` (plain ones and sharded chunks) for host stand-ins. `cuda`
  // (null: CudaRuntime::instance(), asked only when there is a CUDA tensor) copies the bytes.
  DeviceTargets(Value& target, std::shared_ptr<CudaRuntime> cuda);
  // Puts the device tensors back (without copying, unless copy_back() ran).
  ~DeviceTargets();
  DeviceTargets(const DeviceTargets&) = delete;
  DeviceTargets& operator=(const DeviceTargets&) = delete;

  // After the load: copies every stand-in's range to its device.
  void copy_back();

 private:
  struct Span {
    Storage device;
    Storage host;
    uint64_t begin = 0, end = 0;  // bytes of the device storage that the host copy holds
    bool covered = false;         // one contiguous view is the whole range: nothing to read first
  };
  struct Slot {
    Tensor* place;  // in the target tree
    Tensor device;
    size_t span;
  };
  std::shared_ptr<CudaRuntime> cuda_;
  std::vector<Span> spans_;
  std::vector<Slot> slots_;
};

}  // namespace fastdcp
