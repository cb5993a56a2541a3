#pragma once
// Zero-copy exchange of tensors with frameworks through DLPack.
//
// Note [Storage identity across DLPack]
// A DLPack tensor carries a data pointer but not the allocation it belongs to, so two views of one
// framework storage arrive as unrelated pointers. A DLPackImporter therefore resolves storages:
//  - with a StorageHint (the producer's storage base address and size, e.g. from
//    torch's untyped_storage()), every view of that allocation maps to one Storage, exactly;
//  - without one, a view whose bytes fall inside a storage already seen on the same device joins
//    it; otherwise its own byte extent becomes a new storage.
// Importing the largest view (the base) first, or passing hints, keeps aliasing intact.

#include <cstdint>
#include <map>
#include <optional>
#include <utility>

#include "fastdcp/tensor/dlpack.h"
#include "fastdcp/tensor/tensor.h"

namespace fastdcp {

std::optional<DType> dtype_from_dlpack(DLDataType dtype) noexcept;
DLDataType dtype_to_dlpack(DType dtype);

struct StorageHint {
  const void* base = nullptr;  // start of the producer's allocation
  uint64_t nbytes = 0;         // its size in bytes
};

class DLPackImporter {
 public:
  // Takes ownership of `managed`: its deleter runs once no Storage needs the memory any more.
  // Throws Error(kInvalidArgument) for unsupported dtypes, devices, lanes or negative strides;
  // the deleter still runs.
  Tensor import(DLManagedTensorVersioned* managed, std::optional<StorageHint> hint = {});
  Tensor import(DLManagedTensor* managed, std::optional<StorageHint> hint = {});

  // Forgets known storages (tensors already imported keep theirs). The importer holds the storages
  // it resolved, and so the producers' capsules, until then or until it is destroyed.
  void clear() { storages_.clear(); }

 private:
  Tensor import_view(const DLTensor& tensor, std::shared_ptr<const void> owner, std::optional<StorageHint> hint);
  // Keyed by (device, base address); value is the Storage covering [base, base + nbytes).
  std::map<std::pair<uint64_t, uintptr_t>, Storage> storages_;
};

// Exports a view. The capsule keeps the storage alive until the consumer calls its deleter.
// `read_only` sets the versioned flag.
DLManagedTensorVersioned* to_dlpack_versioned(const Tensor& tensor, bool read_only = false);
DLManagedTensor* to_dlpack_legacy(const Tensor& tensor);

}  // namespace fastdcp
