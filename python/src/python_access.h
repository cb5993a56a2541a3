#pragma once
// Taking the GIL from fastdcp's own threads, safely up to the interpreter's exit.
//
// Note [The GIL at exit]
// Once the interpreter finalizes, CPython (3.11 to 3.13) ends any other thread that takes the GIL
// with pthread_exit. In a thread of fastdcp's, that forced unwind runs into a noexcept C++ frame (a
// destructor dropping a Python reference, a future's notifier) and the process aborts with
// "terminate called without an active exception": a script that stages and exits could die at its
// last line. So every GIL taken on a thread that may run on its own (stager workers, notifiers,
// the writer's barrier and hooks, storages dropped anywhere) goes through PythonAccess, and an
// atexit hook, registered when _C loads and run before finalization starts, closes it: later
// PythonAccess objects on other threads get no GIL (references are leaked, calls fail with
// kCancelled), and the hook waits (up to kExitWait) for the sections already inside to leave. The
// thread that finalizes holds the GIL and goes on dropping references as before.

#include <nanobind/nanobind.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>

namespace fastdcp::python {

class PythonAccess {
 public:
  // Takes the GIL unless the interpreter is exiting (then `*this` is false and Python must not be touched).
  // A thread that holds the GIL already (the interpreter's own, finalizing) keeps it.
  PythonAccess() {
    if (!holds_gil()) {
      std::lock_guard lock(state().mutex);
      if (state().closed) return;
      ++state().inside;
      counted_ = true;
    }
    gil_.emplace();
  }
  ~PythonAccess() {
    gil_.reset();
    if (!counted_) return;
    std::lock_guard lock(state().mutex);
    if (--state().inside == 0) state().left.notify_all();
  }
  PythonAccess(const PythonAccess&) = delete;
  PythonAccess& operator=(const PythonAccess&) = delete;

  explicit operator bool() const { return gil_.has_value(); }

  // The atexit hook (called with the GIL): no GIL for anyone from now on.
  static void close() {
    std::unique_lock lock(state().mutex);
    state().closed = true;
    nanobind::gil_scoped_release release;  // those inside may be waiting for it
    state().left.wait_for(lock, kExitWait, [] { return state().inside == 0; });
  }

  // Drops objects from any thread (leaked at exit).
  template <class... Objects>
  static void drop(Objects&... objects) noexcept {
    PythonAccess access;
    if (access) {
      (objects.reset(), ...);
    } else {
      (objects.release(), ...);
    }
  }

 private:
  static constexpr std::chrono::seconds kExitWait{10};
  struct State {
    std::mutex mutex;
    std::condition_variable left;
    int inside = 0;
    bool closed = false;
  };
  static bool holds_gil() {
#if PY_VERSION_HEX >= 0x030D0000
    PyThreadState* current = PyThreadState_GetUnchecked();
#else
    PyThreadState* current = _PyThreadState_UncheckedGet();
#endif
    return current != nullptr && current == PyGILState_GetThisThreadState();
  }
  static State& state() {
    static State* s = new State;  // never destroyed: threads may still look after static destruction
    return *s;
  }

  bool counted_ = false;
  std::optional<nanobind::gil_scoped_acquire> gil_;
};

// A Python object that any thread may drop: its last release takes the GIL (leaked at exit).
using Held = std::shared_ptr<nanobind::object>;
inline Held hold(nanobind::object object) {
  return Held(new nanobind::object(std::move(object)), [](nanobind::object* p) {
    PythonAccess::drop(*p);
    delete p;
  });
}

}  // namespace fastdcp::python
