#include "fastdcp/common/fault.h"

#include <atomic>
#include <mutex>
#include <string>

#include "fastdcp/common/error.h"

namespace fastdcp::fault {
namespace {

// Note [Fault injection]: a slot's name is written once, before the slot is counted in `named`,
// and never changes; its arming is all atomics, so asking never races with arming.
struct Slot {
  char name[kMaxCallName];
  size_t length = 0;
  std::atomic<bool> armed{false};
  std::atomic<uint64_t> calls{0};  // asked since arming
  std::atomic<uint64_t> first{0};  // calls [first, last] fail
  std::atomic<uint64_t> last{0};
  std::atomic<int> error{0};
  std::atomic<void (*)(void*)> before{nullptr};
  std::atomic<void*> context{nullptr};

  std::string_view call() const { return {name, length}; }
};

Slot slots[kMaxCalls];
std::atomic<size_t> named{0};  // slots [0, named) have names
std::atomic<size_t> armed{0};  // slots armed: while 0, asking reads nothing else
std::mutex mutex;              // one arming or clearing at a time

}  // namespace

void inject(std::string_view call, const Fault& fault) {
  std::lock_guard lock(mutex);
  const size_t count = named.load(std::memory_order_relaxed);
  Slot* slot = nullptr;
  for (size_t i = 0; i < count && slot == nullptr; ++i) {
    if (slots[i].call() == call) slot = &slots[i];
  }
  if (slot == nullptr) {
    if (call.size() > kMaxCallName || count == kMaxCalls) {
      throw Error(ErrorCode::kInvalidArgument,
                  "fault::inject: cannot arm '" + std::string(call) + "': names are at most " +
                      std::to_string(kMaxCallName) + " bytes, and at most " + std::to_string(kMaxCalls) +
                      " calls can be named (raise kMaxCallName or kMaxCalls in fault.h)");
    }
    slot = &slots[count];
    call.copy(slot->name, call.size());
    slot->length = call.size();
    named.store(count + 1, std::memory_order_release);
  }
  const bool was_armed = slot->armed.exchange(false);
  slot->calls.store(0, std::memory_order_relaxed);
  slot->first.store(fault.nth, std::memory_order_relaxed);
  slot->last.store(fault.times > UINT64_MAX - fault.nth ? UINT64_MAX : fault.nth + fault.times - 1,
                   std::memory_order_relaxed);
  slot->error.store(fault.error, std::memory_order_relaxed);
  slot->before.store(fault.before, std::memory_order_relaxed);
  slot->context.store(fault.context, std::memory_order_relaxed);
  slot->armed.store(true, std::memory_order_release);
  if (!was_armed) armed.fetch_add(1, std::memory_order_release);
}

void clear() noexcept {
  std::lock_guard lock(mutex);
  const size_t count = named.load(std::memory_order_relaxed);
  for (size_t i = 0; i < count; ++i) slots[i].armed.store(false, std::memory_order_release);
  armed.store(0, std::memory_order_release);
}

int injected(std::string_view call) noexcept {
  if (armed.load(std::memory_order_relaxed) == 0) return 0;
  const size_t count = named.load(std::memory_order_acquire);
  for (size_t i = 0; i < count; ++i) {
    Slot& slot = slots[i];
    if (slot.call() != call) continue;
    if (!slot.armed.load(std::memory_order_acquire)) return 0;
    const uint64_t n = slot.calls.fetch_add(1, std::memory_order_relaxed) + 1;
    if (n < slot.first.load(std::memory_order_relaxed) || n > slot.last.load(std::memory_order_relaxed)) return 0;
    if (auto* before = slot.before.load(std::memory_order_relaxed)) {
      before(slot.context.load(std::memory_order_relaxed));
    }
    return slot.error.load(std::memory_order_relaxed);
  }
  return 0;
}

}  // namespace fastdcp::fault
