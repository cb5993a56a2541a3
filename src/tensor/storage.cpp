#include "fastdcp/tensor/storage.h"

#include <cstdlib>
#include <cstring>

#include "fastdcp/common/error.h"
#include "tensor/storage_impl.h"

namespace fastdcp {

std::string Device::str() const {
  return is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(index);
}

Device Device::parse(const std::string& text) {
  if (text == "cpu") return cpu();
  if (text == "cuda") return cuda(0);
  if (text.starts_with("cuda:") && text.size() > 5 && text.size() <= 14 &&
      text.find_first_not_of("0123456789", 5) == std::string::npos) {
    return cuda(std::stoi(text.substr(5)));
  }
  throw Error(ErrorCode::kInvalidArgument,
              "unknown device '" + text + "': fastdcp's tensors live on 'cpu' or 'cuda:<index>'");
}

Storage Storage::wrap(void* data, size_t nbytes, Device device, std::shared_ptr<const void> keep_alive,
                      HostMemoryInfo info) {
  if (data == nullptr && nbytes != 0) {
    throw Error(ErrorCode::kInvalidArgument, "Storage::wrap: null data pointer with " + std::to_string(nbytes) + " bytes");
  }
  Storage storage;
  storage.impl_ = std::make_shared<StorageImpl>();
  storage.impl_->data = data;
  storage.impl_->nbytes = nbytes;
  storage.impl_->device = device;
  storage.impl_->keep_alive = std::move(keep_alive);
  storage.impl_->info = info;
  return storage;
}

Storage Storage::allocate_cpu(size_t nbytes) {
  const size_t rounded = (nbytes + 63) / 64 * 64;
  void* data = rounded ? std::aligned_alloc(64, rounded) : nullptr;
  if (rounded && !data) throw Error(ErrorCode::kResourceExhausted, "cannot allocate " + std::to_string(nbytes) + " bytes");
  if (data) std::memset(data, 0, rounded);
  std::shared_ptr<void> owner(data, [](void* p) { std::free(p); });
  return wrap(data, nbytes, Device::cpu(), std::move(owner));
}

void* Storage::data() const { return impl_ ? impl_->data : nullptr; }
size_t Storage::nbytes() const { return impl_ ? impl_->nbytes : 0; }
Device Storage::device() const { return impl_ ? impl_->device : Device::cpu(); }
const HostMemoryInfo& Storage::host_info() const {
  static const HostMemoryInfo kNone;
  return impl_ ? impl_->info : kNone;
}

void Storage::reset(void* data, size_t nbytes, std::shared_ptr<const void> keep_alive) {
  if (!impl_) throw Error(ErrorCode::kFailedPrecondition, "Storage::reset on an undefined storage");
  impl_->data = data;
  impl_->nbytes = nbytes;
  impl_->keep_alive = std::move(keep_alive);
  impl_->info = {};
}

}  // namespace fastdcp
