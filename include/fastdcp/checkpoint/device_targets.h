#pragma once
// Device tensors in checkpoints: loads into them through host stand-ins, whole loads onto a device,
// and synchronous writes of them.
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
#include <optional>
#include <string>
#include <vector>

#include "fastdcp/memory/cuda_runtime.h"
#include "fastdcp/tensor/value.h"

namespace fastdcp {

// Note [Loading onto a device]
// A whole load with ReadOptions::device on a CUDA device (torch's map_location) reads the data to
// host memory as any load does, verifies it there, and then copies every host storage of the tree
// to one device storage of its own: views of one storage (tied weights) stay views of one device
// storage, as torch.load keeps them, and each saved storage is freed on its own, as after
// torch.load. The device memory comes from a DeviceAllocator: the framework's (the Python
// bindings hand in torch's caching allocator, through the adapter), so that loaded tensors are
// the framework's own memory and count in its statistics; without one, cudaMalloc. The device is
// checked before anything is read; a failed copy frees what was allocated. The host image is freed
// when the copies are done, so the peak host memory is that of a load to the CPU.

// Device memory for loaded tensors.
class DeviceAllocator {
 public:
  virtual ~DeviceAllocator() = default;
  // `nbytes` (possibly 0) of uninitialised memory on the CUDA device `device`, owned by the storage.
  virtual Storage allocate(Device device, uint64_t nbytes) = 0;
};

// Throws unless `device` is the CPU or a CUDA device that `cuda` (null: CudaRuntime::instance())
// can reach: Error(kFailedPrecondition) without CUDA, Error(kInvalidArgument) for a device index
// out of range; `option` names the caller's setting in the message.
void check_device(Device device, const std::shared_ptr<CudaRuntime>& cuda, const std::string& option);

// Copies every tensor of `tree` (plain ones and sharded chunks) that is not on `device` there, one
// device storage per source storage (Note [Loading onto a device]). `allocator` null: cudaMalloc.
void move_to_device(Value& tree, Device device, DeviceAllocator* allocator, std::shared_ptr<CudaRuntime> cuda);

// Note [Device tensors in a synchronous write]
// CheckpointWriter::write takes device tensors as torch.save does: their bytes are copied to host
// memory first, in the write, by a DefaultStager made for it (no shared or pinned memory: nothing is
// kept for a next write, and registering memory for one copy costs more than it saves). Only device
// tensors are copied; host tensors are written from where they are. The asynchronous checkpointer
// stages everything itself and never comes here.
//
// `state_dict` with every CUDA tensor (plain ones and sharded chunks) replaced by a host copy;
// views of one device storage stay views of one copy. None when every tensor is on the host (the
// tree is not copied then). `cuda` null: CudaRuntime::instance().
std::optional<Value> with_device_tensors_on_host(const Value& state_dict, std::shared_ptr<CudaRuntime> cuda);

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
