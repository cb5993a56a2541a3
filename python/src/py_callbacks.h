#pragma once
// Python callables behind the writer's C++ interfaces, and the check that a state dict can be
// saved; shared by bindings.cpp and engine_bindings.cpp.

#include <nanobind/nanobind.h>

#include <chrono>
#include <cmath>
#include <memory>
#include <sstream>
#include <string>

#include "fastdcp/checkpoint/checkpoint.h"
#include "python_access.h"
#include "tree_converter.h"

namespace fastdcp::python {

// A timeout that never ends: a century, which a steady_clock deadline holds without overflow.
inline constexpr std::chrono::milliseconds kNoTimeout = std::chrono::hours(24 * 365 * 100);

// A timeout option given in seconds, as Python spells them, rounded to the nearest millisecond.
// `option` names it for the error: NaN or a negative number (which cast to an integer overflowed,
// or timed out at once) is refused; a century or more, inf included, is kNoTimeout.
inline std::chrono::milliseconds timeout_from_seconds(double seconds, const std::string& option) {
  if (!(seconds >= 0)) {
    std::ostringstream message;
    message << option << " is " << seconds << ": a timeout must be a number of seconds >= 0";
    throw Error(ErrorCode::kInvalidArgument, message.str());
  }
  if (seconds >= std::chrono::duration<double>(kNoTimeout).count()) return kNoTimeout;
  return std::chrono::milliseconds(std::llround(seconds * 1000));
}

// A Python callable as the writer's barrier: called as barrier(timeout_seconds).
class PyBarrier : public Barrier {
 public:
  explicit PyBarrier(nb::object fn) : fn_(std::move(fn)) {}
  // None: no barrier.
  static std::shared_ptr<Barrier> from(nb::object fn) {
    if (fn.is_none()) return nullptr;
    return std::make_shared<PyBarrier>(std::move(fn));
  }
  ~PyBarrier() override { PythonAccess::drop(fn_); }
  void execute(std::chrono::milliseconds timeout) override {
    PythonAccess access;
    if (!access) throw Error(ErrorCode::kCancelled, "the barrier was not run: Python is exiting");
    fn_(static_cast<double>(timeout.count()) / 1000.0);
  }

 private:
  nb::object fn_;
};

// Python callables as the writer's hooks: pre_commit(path), post_commit(path); either may be None.
class PyHook : public WriterHook {
 public:
  PyHook(nb::object pre, nb::object post) : pre_(std::move(pre)), post_(std::move(post)) {}
  ~PyHook() override { PythonAccess::drop(pre_, post_); }
  void pre_commit(const std::string& path) override { call(pre_, path); }
  void post_commit(const std::string& path) override { call(post_, path); }

 private:
  static void call(const nb::object& fn, const std::string& path) {
    PythonAccess access;
    if (!access) throw Error(ErrorCode::kCancelled, "the commit hook was not run: Python is exiting");
    if (!fn.is_none()) fn(path);
  }
  nb::object pre_, post_;
};

// A state dict as a tree the checkpoint format can hold; an error names any other leaf.
inline Value checkpointable_tree(TreeConverter& converter, nb::handle state_dict) {
  Value tree;
  {
    CyclicGcPause gc_pause;
    tree = converter.from_python(state_dict);
  }
  if (!converter.opaque_leaves().empty()) {
    nb::handle leaf = converter.opaque_leaves().front();
    const std::string where = "cannot save the value at '" + TreeConverter::path_of(state_dict, leaf) + "'";
    if (PyLong_CheckExact(leaf.ptr())) {
      throw Error(ErrorCode::kInvalidArgument,
                  where + ": the int " + nb::cast<std::string>(nb::repr(leaf)) +
                      " exceeds 64 bits (checkpoints hold ints from -2**63 to 2**63-1); store it as a str or bytes");
    }
    throw Error(ErrorCode::kInvalidArgument,
                where + " (a " + Py_TYPE(leaf.ptr())->tp_name +
                    "): checkpoints hold tensors, dicts, lists, tuples, None, bool, int, float, str and bytes");
  }
  return tree;
}

}  // namespace fastdcp::python
