// Python bindings of the async engine: fastdcp.torch's CheckpointProcess, AsyncCheckpointer and
// asynchronous DefaultStager are the C++ classes, and the writer child serves the C++ frame
// protocol (Note [Python writer process]).
//
// Note [Python writer process]
// fastdcp.torch's writer process is a Python interpreter (upstream's init functions and writer
// factories are Python callables) that CheckpointProcess starts, times, kills and restarts like
// fastdcp-writer: its argv runs fastdcp.torch.checkpoint_process's child entry, which calls
// serve_writer() -> run_writer_process(). The kInit request carries the pickled init functions
// (CheckpointProcessOptions::init_blob); the child's setup runs them and returns the writer. A
// fastdcp CheckpointWriter becomes a NativeWriter: the shared tree is written as it is, and only
// its barrier and hooks call into Python. Any other writer gets torch tensors over the shared
// buffers. Each write's keyword arguments travel pickled as its call_args; a Python error in the
// child travels pickled in a CarriedError, so the trainer raises the writer's own exception, with
// the child's traceback as a note (Note [Errors across the writer process]).
//
// Note [Errors across the writer process]
// A failed write fails its own future with the exception the writer raised, pickled with its class
// (a full disk's OSError keeps its errno), and the child's traceback as a note; an exception the
// trainer cannot unpickle becomes the type of its error code, with the traceback as its message.
// The writer goes on serving (upstream-behaviour.md 5.2). Errors of fastdcp's own writer keep
// their ErrorCode and errno through the frames (ENOSPC arrives as OSError(ENOSPC)).
//
// GIL: every call that may wait for a thread which completes a future releases the GIL, and
// futures are completed into concurrent.futures.Future on threads holding no fastdcp lock
// (Note [Completing futures outside locks]), where they take it.

#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <chrono>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "fastdcp/checkpoint/checkpointer.h"
#include "fastdcp/checkpoint/shared_state_dict.h"
#include "fastdcp/io/io_ring.h"
#include "py_callbacks.h"
#include "tree_converter.h"

namespace fastdcp::python {
namespace {

using ProducerStreams = std::vector<std::pair<int, uintptr_t>>;

// A Python exception raised on the trainer's side of a future (e.g. by a stager outside fastdcp),
// kept as itself.
class PyErrorHolder : public std::exception {
 public:
  explicit PyErrorHolder(nb::python_error& error)  // with the GIL
      : error_(hold(nb::borrow(error.value()))), what_(nb::cast<std::string>(nb::str(error.value()))) {}
  const char* what() const noexcept override { return what_.c_str(); }
  nb::object object() const { return *error_; }

 private:
  Held error_;
  std::string what_;
};

// The Python exception for a C++ one (with the GIL): a PyErrorHolder's own object; the writer
// process's own exception, unpickled, with its traceback as a note; anything else as bindings.cpp
// translates it.
nb::object python_exception(const std::exception_ptr& error) {
  std::optional<std::string> note;
  try {
    std::rethrow_exception(error);
  } catch (const PyErrorHolder& e) {
    return e.object();
  } catch (const CarriedError& e) {
    note = "raised in the checkpoint writer process";
    if (!e.blob().empty()) {
      try {
        nb::object carried = nb::module_::import_("pickle").attr("loads")(nb::bytes(e.blob().data(), e.blob().size()));
        if (PyObject_IsInstance(carried.ptr(), PyExc_Exception) == 1) {
          carried.attr("add_note")(*note + ":\n" + e.what());
          return carried;
        }
      } catch (nb::python_error&) {
        // a class this process cannot import: the error's code gives the type, the text the rest
      }
    }
  } catch (...) {
  }
  nb::object out;
  try {
    nb::cpp_function([error] { std::rethrow_exception(error); })();
  } catch (nb::python_error& e) {
    out = nb::borrow(e.value());
  }
  if (note) out.attr("add_note")(*note);
  return out;
}

// Completes `target` (a concurrent.futures.Future, with the GIL) with result(f) or f's error.
template <class T, class Result>
void complete_python_future(nb::handle target, Result& result, const Future<T>& f) {
  try {
    if (!nb::cast<bool>(target.attr("set_running_or_notify_cancel")())) return;  // cancelled by its user
    nb::object value;
    std::exception_ptr error = f.error();
    if (!error) {
      try {
        value = result(f);
      } catch (nb::python_error& e) {
        target.attr("set_exception")(nb::borrow(e.value()));
        return;
      } catch (...) {
        error = std::current_exception();
      }
    }
    if (error) {
      target.attr("set_exception")(python_exception(error));
    } else {
      target.attr("set_result")(value);
    }
  } catch (nb::python_error& e) {
    e.discard_as_unraisable("fastdcp: completing a future");
  }
}

// A concurrent.futures.Future completed when `future` is, with result(f) (called with the GIL) or
// its error. `via`: complete it there, for futures completed under their producer's locks.
template <class T, class Result>
nb::object to_python_future(const Future<T>& future, Result result, std::shared_ptr<SerialExecutor> via = nullptr) {
  nb::object out = nb::module_::import_("concurrent.futures").attr("Future")();
  // Called once, and moved rather than copied on its way, so that what it holds goes in it, while it
  // may still take the GIL (Note [The GIL at exit]).
  auto complete = [target = hold(out), result = std::make_shared<Result>(std::move(result))](const Future<T>& f) mutable {
    PythonAccess access;
    if (!access) return;  // nobody is left to wait for it
    complete_python_future(*target, *result, f);
    target.reset();
    result.reset();
  };
  if (!via) {
    future.on_ready(std::move(complete));
  } else {
    future.on_ready([via, complete = std::move(complete)](const Future<T>& f) mutable {
      via->post([complete = std::move(complete), f]() mutable { complete(f); });
    });
  }
  return out;
}

template <class T>
nb::object none_future(const Future<T>& future) {
  return to_python_future(future, [](const Future<T>&) { return nb::none(); });
}

// The streams whose queued work the device-to-host copies wait for, as the adapter reads them on
// the calling thread (adapter.producer_streams() -> [(device, cudaStream_t as an int)]), with the GIL.
StageCallOptions call_options(nb::handle adapter) {
  StageCallOptions call;
  if (!nb::hasattr(adapter, "producer_streams")) return call;
  for (auto [device, stream] : nb::cast<ProducerStreams>(adapter.attr("producer_streams")())) {
    call.producer_streams.push_back(ProducerStream{device, reinterpret_cast<CudaStream>(stream)});
  }
  return call;
}

template <class T>
Future<T> failed_future(std::exception_ptr error) {
  Promise<T> promise;
  promise.set_exception(std::move(error));
  return promise.get_future();
}

// What the writer process writes, from a state dict or a concurrent.futures.Future of one (with
// the GIL). keep_until_written holds the Python tree, whose storages the Value points into: pass
// it to the write future's on_ready.
struct StagedInput {
  Future<Value> tree;
  std::function<void(const Future<WriteStats>&)> keep_until_written;
};

StagedInput staged_input(nb::object adapter, nb::handle staged) {
  auto promise = std::make_shared<Promise<Value>>();
  auto source = std::make_shared<Held>();
  Future<Value> tree = promise->get_future();
  auto convert = [adapter, source](Promise<Value>& out, nb::handle state_dict) {
    try {
      TreeConverter converter(adapter);
      Value value = checkpointable_tree(converter, state_dict);
      *source = hold(nb::borrow(state_dict));
      out.set_value(std::move(value));
    } catch (nb::python_error& e) {
      out.set_exception(std::make_exception_ptr(PyErrorHolder(e)));
    } catch (...) {
      out.set_exception(std::current_exception());
    }
  };
  nb::object future_type = nb::module_::import_("concurrent.futures").attr("Future");
  if (PyObject_IsInstance(staged.ptr(), future_type.ptr()) == 1) {
    // The future keeps its done-callbacks: this one lets go of the promise once it ran, or an error
    // (whose traceback reaches that future) would hold itself through it, out of the GC's sight.
    auto slot = std::make_shared<std::shared_ptr<Promise<Value>>>(promise);
    staged.attr("add_done_callback")(nb::cpp_function([convert, slot](nb::handle done) {
      const std::shared_ptr<Promise<Value>> out = std::move(*slot);
      if (!out) return;
      nb::object result;
      try {
        result = done.attr("result")();
      } catch (nb::python_error& e) {
        out->set_exception(std::make_exception_ptr(PyErrorHolder(e)));
        return;
      }
      convert(*out, result);
    }));
  } else {
    convert(*promise, staged);
  }
  return {tree, [source](const Future<WriteStats>&) { source->reset(); }};
}

// fastdcp.torch's CheckpointWriterConfig as WriterOptions, converted where the torch API's
// synchronous writer converts it (checkpoint_writer._native_options), so both read it alike.
WriterOptions writer_options(nb::handle config) {
  return nb::cast<WriterOptions>(
      nb::module_::import_("fastdcp.torch.checkpoint_writer").attr("_native_options")(config));
}

RankInfo rank_info(nb::handle info) {
  return RankInfo{nb::cast<int>(info.attr("global_rank")), nb::cast<int>(info.attr("global_world_size"))};
}

// ---- the trainer's side ---------------------------------------------------------------------------

class PyCheckpointProcess {
 public:
  // `config`: a CheckpointProcessConfig; `writer_config`: the CheckpointWriterConfig of the votes
  // this process casts itself (CheckpointProcess::write); `argv`: the child's program and arguments.
  PyCheckpointProcess(nb::handle rank, nb::handle config, nb::handle writer_config, std::vector<std::string> argv,
                      nb::bytes init_blob, nb::object adapter)
      : adapter_(std::move(adapter)) {
    if (argv.empty()) throw Error(ErrorCode::kInvalidArgument, "CheckpointProcess: argv names no program");
    CheckpointProcessOptions options;
    options.writer_executable = argv.front();
    options.writer_arguments.assign(argv.begin() + 1, argv.end());
    options.init_blob.assign(init_blob.c_str(), init_blob.size());
    auto timeout = [&](const char* name) {
      return timeout_from_seconds(nb::cast<double>(config.attr(name)), std::string("CheckpointProcessConfig.") + name);
    };
    options.init_timeout = timeout("subprocess_init_timeout_secs");
    options.shutdown_timeout = timeout("subprocess_shutdown_timeout_secs");
    // None: no limit.
    options.write_timeout =
        config.attr("subprocess_write_timeout_secs").is_none() ? kNoTimeout : timeout("subprocess_write_timeout_secs");
    process_ = std::make_shared<CheckpointProcess>(rank_info(rank), writer_options(writer_config), std::move(options));
  }

  // Without the GIL, which the threads that complete its futures take. Python gets here when an
  // unclosed object is collected.
  ~PyCheckpointProcess() {
    nb::gil_scoped_release release;
    process_->close();
  }

  nb::object write(nb::handle staged, const std::string& path, nb::bytes call_args) {
    StagedInput input = staged_input(adapter_, staged);
    Future<WriteStats> written;
    {
      nb::gil_scoped_release release;
      written = process_->write(input.tree, path, std::string(call_args.c_str(), call_args.size()));
    }
    written.on_ready(input.keep_until_written);
    return none_future(written);
  }

  nb::object started() const { return none_future(process_->started()); }
  void close() {
    nb::gil_scoped_release release;
    process_->close();
  }
  pid_t pid() const { return process_->pid(); }
  int restarts() const { return process_->restarts(); }

  const std::shared_ptr<CheckpointProcess>& native() const { return process_; }
  const nb::object& adapter() const { return adapter_; }

 private:
  nb::object adapter_;
  std::shared_ptr<CheckpointProcess> process_;
};

// fastdcp.torch's DefaultStager.stage(): the staged state dict, or with use_async_staging a
// concurrent.futures.Future of it. Source trees are converted by one TreeConverter, whose table
// maps a framework storage to the same fastdcp Storage on every call, so that the stager's buffer
// cache hits (Note [Python conversion]); the AsyncCheckpointer converts through it too.
class PyStaging {
 public:
  PyStaging(std::shared_ptr<DefaultStager> stager, nb::object adapter)
      : stager_(std::move(stager)), adapter_(adapter), sources_(std::move(adapter)) {}

  // With the GIL. `checkpointable`: refuse what a checkpoint cannot hold, naming the key.
  Value from_python(nb::handle state_dict, bool checkpointable) {
    std::unique_lock lock(mutex_, std::defer_lock);
    {
      nb::gil_scoped_release release;  // its holder may be waiting for the GIL
      lock.lock();
    }
    if (checkpointable) return checkpointable_tree(sources_, state_dict);
    CyclicGcPause gc_pause;
    return sources_.from_python(state_dict);
  }

  ~PyStaging() { close(); }

  nb::object stage(nb::handle state_dict) {
    auto tree = std::make_shared<const Value>(from_python(state_dict, false));
    const StageCallOptions call = call_options(adapter_);
    Future<Value> staged;
    {
      nb::gil_scoped_release release;
      if (!stager_->options().use_async_staging) {
        staged = make_ready_future(stager_->stage_now(*tree, call));
      } else {
        staged = stager_->stage(tree, call);
      }
    }
    if (!stager_->options().use_async_staging) return TreeConverter(adapter_).to_python(state_dict, staged.get());
    // The stager completes its future under its locks: the notifier builds the Python tree.
    return to_python_future(
        staged,
        [adapter = hold(adapter_), source = hold(nb::borrow(state_dict))](const Future<Value>& f) {
          TreeConverter out(*adapter);
          return out.to_python(*source, f.get());
        },
        notifier_);
  }

  void close() {
    nb::gil_scoped_release release;
    stager_->close();
    notifier_->close();
  }
  const std::shared_ptr<DefaultStager>& native() const { return stager_; }

 private:
  std::shared_ptr<DefaultStager> stager_;
  nb::object adapter_;
  std::mutex mutex_;  // over sources_
  TreeConverter sources_;
  std::shared_ptr<SerialExecutor> notifier_ = std::make_shared<SerialExecutor>("fastdcp staged notifier");
};

class PyAsyncCheckpointer {
 public:
  // `staging`: fastdcp's own stager, or None when every save is save_staged_by().
  PyAsyncCheckpointer(PyStaging* staging, const PyCheckpointProcess& process, int max_pending_saves)
      : adapter_(process.adapter()),
        staging_(staging),
        checkpointer_(staging ? staging->native() : nullptr, process.native(), CheckpointReader(RankInfo{}),
                      max_pending_saves) {}

  ~PyAsyncCheckpointer() { close(); }

  // (staged, written) for fastdcp's own stager, with leases (Note [Saves in flight]).
  nb::tuple save(const std::string& path, nb::handle state_dict, nb::bytes call_args) {
    std::string args(call_args.c_str(), call_args.size());
    if (!staging_) throw Error(ErrorCode::kFailedPrecondition, "AsyncCheckpointer.save: no stager of fastdcp's");
    std::shared_ptr<const Value> tree;
    std::exception_ptr error;
    try {
      tree = std::make_shared<const Value>(staging_->from_python(state_dict, true));
    } catch (nb::python_error& e) {  // e.g. a str that is not valid Unicode
      error = std::make_exception_ptr(PyErrorHolder(e));
    } catch (const Error&) {
      error = std::current_exception();
    }
    if (error) {
      // This rank cannot save it: both futures fail, and the save is voted against.
      Future<WriteStats> written;
      {
        nb::gil_scoped_release release;
        written = checkpointer_.save_staged_by(path, [&] { return failed_future<Value>(error); }, std::move(args));
      }
      return nb::make_tuple(none_future(failed_future<void>(error)), none_future(written));
    }
    const StageCallOptions call = call_options(adapter_);
    std::pair<Future<void>, Future<WriteStats>> futures;
    {
      nb::gil_scoped_release release;
      futures = checkpointer_.save(path, tree, call, std::move(args));
    }
    // The sources are the training's tensors: they stay allocated until the write has read them.
    futures.second.on_ready([keep = hold(nb::borrow(state_dict))](const Future<WriteStats>&) {});
    return nb::make_tuple(none_future(futures.first), none_future(futures.second));
  }

  // The write of a save that `stage` (a Python callable returning the staged state dict or a
  // future of it) stages, called once every earlier write is done.
  nb::object save_staged_by(const std::string& path, nb::object stage, nb::bytes call_args) {
    std::function<void(const Future<WriteStats>&)> keep;
    Future<WriteStats> written;
    {
      nb::gil_scoped_release release;
      written = checkpointer_.save_staged_by(
          path,
          [&] {
            PythonAccess access;
            if (!access) throw Error(ErrorCode::kCancelled, "the save was not staged: Python is exiting");
            StagedInput input = staged_input(adapter_, stage());
            keep = std::move(input.keep_until_written);
            return input.tree;
          },
          std::string(call_args.c_str(), call_args.size()));
    }
    written.on_ready(keep);
    return none_future(written);
  }

  void wait_for_path(const std::string& path) {
    nb::gil_scoped_release release;
    checkpointer_.wait_for_path(path);
  }
  void close() {
    nb::gil_scoped_release release;
    checkpointer_.close();
  }

 private:
  nb::object adapter_;
  PyStaging* staging_;  // kept alive by the Python object (nb::keep_alive)
  AsyncCheckpointer checkpointer_;
};

// ---- the writer child ----------------------------------------------------------------------------

// The call_args of a write: the keyword arguments of save(), pickled by fastdcp.torch.
nb::dict call_kwargs(const std::string& call_args) {
  if (call_args.empty()) return nb::dict();
  return nb::cast<nb::dict>(nb::module_::import_("pickle").attr("loads")(nb::bytes(call_args.data(), call_args.size())));
}

// A Python error of the writer process, for the trainer (with the GIL): the exception pickled,
// its traceback as the message, and the code (and errno) of its type for when it cannot be unpickled.
[[noreturn]] void carry(nb::python_error& error) {
  nb::handle value = error.value();
  std::string text;
  for (nb::handle line : nb::module_::import_("traceback").attr("format_exception")(value)) {
    text += nb::cast<std::string>(line);
  }
  std::string blob;
  try {
    nb::bytes pickled = nb::cast<nb::bytes>(nb::module_::import_("pickle").attr("dumps")(value));
    blob.assign(pickled.c_str(), pickled.size());
  } catch (nb::python_error&) {
    // not picklable: the trainer gets the text
  }
  ErrorCode code = ErrorCode::kInternal;
  int errnum = 0;
  if (nb::isinstance(value, nb::handle(PyExc_OSError))) {
    code = ErrorCode::kIoError;
    if (nb::object e = value.attr("errno"); !e.is_none()) errnum = nb::cast<int>(e);
  } else if (nb::isinstance(value, nb::handle(PyExc_ValueError))) {
    code = ErrorCode::kInvalidArgument;
  } else if (nb::isinstance(value, nb::handle(PyExc_TimeoutError))) {
    code = ErrorCode::kDeadlineExceeded;
  }
  throw CarriedError(code, text, errnum, std::move(blob));
}

// fastdcp's CheckpointWriter in the writer child: its options, and its barrier and commit hook
// (Python objects with execute_barrier() and pre_commit/post_commit(path, **kwargs), or None).
struct PyNativeWriter {
  WriterOptions options;
  nb::object barrier, hook;
};

class NativeHandler final : public WriterProcessHandler {
 public:
  NativeHandler(RankInfo rank, const PyNativeWriter& spec) : rank_(rank), options_(spec.options) {
    if (!spec.barrier.is_none()) {
      barrier_ = std::make_shared<PyBarrier>(
          nb::cpp_function([barrier = spec.barrier](double) { barrier.attr("execute_barrier")(); }));
    }
    hook_ = hold(spec.hook);
  }
  WriteStats write(const std::string& path, SharedWrite& shared, const std::string& call_args) override {
    RankFilePlan plan = attach_plan(shared.message(), shared.take_fds());  // called without the GIL
    std::shared_ptr<WriterHook> hook;
    {
      nb::gil_scoped_acquire gil;
      if (!hook_->is_none()) {
        nb::object partial = nb::module_::import_("functools").attr("partial");
        nb::dict kwargs = call_kwargs(call_args);
        hook = std::make_shared<PyHook>(partial(hook_->attr("pre_commit"), **kwargs),
                                        partial(hook_->attr("post_commit"), **kwargs));
      }
    }
    return carrying([&] { return CheckpointWriter(rank_, options_, barrier_, hook).write(path, std::move(plan)); });
  }
  void abandon(const std::string& path, const std::string& error, const std::string&) override {
    carrying([&] {
      CheckpointWriter(rank_, options_, barrier_).abandon(path, error);
      return 0;
    });
  }

 private:
  // Runs `fn` without the GIL; a Python error of a hook or barrier reaches the trainer as itself.
  template <class Fn>
  static std::invoke_result_t<Fn> carrying(Fn fn) {
    try {
      return fn();
    } catch (nb::python_error& e) {
      nb::gil_scoped_acquire gil;
      carry(e);
    }
  }

  RankInfo rank_;
  WriterOptions options_;
  std::shared_ptr<Barrier> barrier_;
  Held hook_;
};

// Any other writer object: write(path=, state_dict=, **kwargs) with torch tensors over the shared
// buffers, and close() if it has one; it cannot vote against a save (the trainer does).
class PythonWriterHandler final : public WriterProcessHandler {
 public:
  PythonWriterHandler(nb::object writer, nb::object adapter) : writer_(hold(std::move(writer))), adapter_(hold(std::move(adapter))) {}
  WriteStats write(const std::string& path, SharedWrite& shared, const std::string& call_args) override {
    const Value state_dict = attach_state_dict(shared.message(), shared.take_fds());
    nb::gil_scoped_acquire gil;
    try {
      TreeConverter converter(*adapter_);
      nb::object tree;
      {
        CyclicGcPause gc_pause;
        tree = converter.loaded_to_python(state_dict);
      }
      nb::dict kwargs = call_kwargs(call_args);
      kwargs["path"] = path;
      kwargs["state_dict"] = tree;
      writer_->attr("write")(**kwargs);
    } catch (nb::python_error& e) {
      carry(e);
    }
    return WriteStats{};
  }
  void abandon(const std::string&, const std::string&, const std::string&) override {
    nb::gil_scoped_acquire gil;
    throw Error(ErrorCode::kFailedPrecondition,
                std::string(Py_TYPE(writer_->ptr())->tp_name) + " cannot vote against a save");
  }
  void close() override {
    nb::gil_scoped_acquire gil;
    try {
      if (nb::hasattr(*writer_, "close")) writer_->attr("close")();
    } catch (nb::python_error& e) {
      carry(e);
    }
  }

 private:
  Held writer_, adapter_;
};

// The handler of fastdcp.torch's writer child, from the kInit blob that CheckpointProcess made:
// pickle.dumps((preparation, pickle.dumps((subprocess_init_fn, args, checkpoint_writer_init_fn,
// kwargs)))). The child prepares itself as multiprocessing's spawn does (sys.path, cwd, the
// trainer's __main__) before it unpickles the functions, which may live in that __main__.
std::unique_ptr<WriterProcessHandler> torch_writer_handler(const WriterProcessInit& init) {
  nb::gil_scoped_acquire gil;
  try {
    nb::object loads = nb::module_::import_("pickle").attr("loads");
    nb::tuple blob = nb::cast<nb::tuple>(loads(nb::bytes(init.blob.data(), init.blob.size())));
    nb::module_::import_("multiprocessing.spawn").attr("prepare")(blob[0]);
    nb::tuple functions = nb::cast<nb::tuple>(loads(blob[1]));
    functions[0](*functions[1]);
    nb::object writer = functions[2](**functions[3]);
    nb::object fastdcp_writer = nb::module_::import_("fastdcp.torch.checkpoint_writer").attr("CheckpointWriter");
    if (writer.type().is(fastdcp_writer)) {
      // Its parts, as CheckpointWriter keeps them (python/fastdcp/torch/checkpoint_writer.py).
      return std::make_unique<NativeHandler>(
          init.rank, PyNativeWriter{writer_options(writer.attr("_config")), writer.attr("_barrier"),
                                    writer.attr("_commit_hook")});
    }
    return std::make_unique<PythonWriterHandler>(
        std::move(writer), nb::module_::import_("fastdcp.torch._adapter").attr("TorchAdapter")());
  } catch (nb::python_error& e) {
    carry(e);
  }
}

// The writer child's main: serves the trainer on `fd` until told to stop; the exit status.
int serve_writer(int fd) {
  WriterProcessSetup setup;
  setup.make_handler = torch_writer_handler;
  nb::gil_scoped_release release;
  return run_writer_process(fd, setup);
}

}  // namespace
}  // namespace fastdcp::python

using namespace fastdcp;
using namespace fastdcp::python;

void register_engine(nb::module_& m) {
  nb::class_<DefaultStager>(m, "NativeStager");  // only handed from Stager.native to the classes below
  nb::class_<PyCheckpointProcess>(m, "CheckpointProcess")
      .def(nb::init<nb::handle, nb::handle, nb::handle, std::vector<std::string>, nb::bytes, nb::object>(),
           nb::arg("rank_info"), nb::arg("config"), nb::arg("writer_config"), nb::arg("argv"), nb::arg("init_blob"),
           nb::arg("adapter"))
      .def("write", &PyCheckpointProcess::write, nb::arg("staged"), nb::arg("path"), nb::arg("call_args"),
           nb::sig("def write(self, staged: object, path: str, call_args: bytes) -> concurrent.futures.Future[None]"),
           "Writes the staged state dict, or what a concurrent.futures.Future of one yields, after earlier writes.")
      .def("started", &PyCheckpointProcess::started,
           nb::sig("def started(self) -> concurrent.futures.Future[None]"), "Done once the writer process serves.")
      .def("close", &PyCheckpointProcess::close)
      .def_prop_ro("pid", &PyCheckpointProcess::pid)
      .def_prop_ro("restarts", &PyCheckpointProcess::restarts);
  nb::class_<PyAsyncCheckpointer>(m, "AsyncCheckpointer")
      .def(nb::init<PyStaging*, const PyCheckpointProcess&, int>(), nb::arg("staging").none(), nb::arg("process"),
           nb::arg("max_pending_saves"), nb::keep_alive<1, 2>())
      .def("save", &PyAsyncCheckpointer::save, nb::arg("path"), nb::arg("state_dict"), nb::arg("call_args"),
           nb::sig("def save(self, path: str, state_dict: object, call_args: bytes) -> "
                   "tuple[concurrent.futures.Future[None], concurrent.futures.Future[None]]"),
           "Stages and writes with fastdcp's stager: (staged, written).")
      .def("save_staged_by", &PyAsyncCheckpointer::save_staged_by, nb::arg("path"), nb::arg("stage"),
           nb::arg("call_args"),
           nb::sig("def save_staged_by(self, path: str, stage: collections.abc.Callable[[], object], "
                   "call_args: bytes) -> concurrent.futures.Future[None]"),
           "Writes what stage() returns (a state dict or a concurrent.futures.Future of one), called once "
           "every earlier write is done: the write's future.")
      .def("wait_for_path", &PyAsyncCheckpointer::wait_for_path, nb::arg("path"))
      .def("close", &PyAsyncCheckpointer::close);
  nb::class_<PyStaging>(m, "Staging")
      .def(nb::init<std::shared_ptr<DefaultStager>, nb::object>(), nb::arg("stager"), nb::arg("adapter"))
      .def("stage", &PyStaging::stage, nb::arg("state_dict"))
      .def("close", &PyStaging::close);
  m.def("serve_writer", &serve_writer, nb::arg("fd"));
}
