#include "fastdcp/io/fault.h"

#include <atomic>
#include <mutex>
#include <string>
#include <vector>

namespace fastdcp::fault {
namespace {

struct Rule {
  std::string call;
  int countdown;  // calls until the first failure
  int error;
  int times;  // failures left
};

std::atomic<int> armed{0};  // rules in `rules`: the fast path reads only this
std::mutex mutex;
std::vector<Rule>& rules() {
  static std::vector<Rule> list;
  return list;
}

}  // namespace

void inject(std::string_view call, int nth, int error, int times) {
  if (nth < 1 || times < 1 || error == 0) return;
  std::lock_guard lock(mutex);
  rules().push_back({std::string(call), nth, error, times});
  armed.store(static_cast<int>(rules().size()));
}

void clear() {
  std::lock_guard lock(mutex);
  rules().clear();
  armed.store(0);
}

int injected(std::string_view call) {
  if (armed.load(std::memory_order_relaxed) == 0) return 0;
  std::lock_guard lock(mutex);
  auto& list = rules();
  for (auto it = list.begin(); it != list.end(); ++it) {
    if (it->call != call) continue;
    if (--it->countdown > 0) return 0;
    const int error = it->error;
    it->countdown = 1;
    if (--it->times == 0) list.erase(it);
    armed.store(static_cast<int>(list.size()));
    return error;
  }
  return 0;
}

}  // namespace fastdcp::fault
