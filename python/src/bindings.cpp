// Python bindings: the stager and checkpoint I/O, over TreeConverter (tree_converter.h).

#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <optional>
#include <variant>

#include "fastdcp/checkpoint/checkpoint.h"
#include "fastdcp/checkpoint/device_targets.h"
#include "fastdcp/checkpoint/shared_state_dict.h"
#include "fastdcp/common/logging.h"
#include "fastdcp/interop/hugging_face.h"
#include "fastdcp/staging/stager.h"
#include "py_callbacks.h"
#include "tree_converter.h"

namespace nb = nanobind;
using namespace fastdcp;
using fastdcp::python::checkpointable_tree;
using fastdcp::python::CyclicGcPause;
using fastdcp::python::hold;
using fastdcp::python::PyBarrier;
using fastdcp::python::PyHook;
using fastdcp::python::PythonAccess;
using fastdcp::python::TreeConverter;

namespace {

// Note [Python exception types]
// Every ErrorCode is one Python type, fastdcp.errors.<Name> (re-exported as fastdcp.<Name>), made
// here and nowhere else. Each subclasses the built-in a caller already catches (the table in
// make_error_types) and fastdcp.errors.Error, and carries its code as the class attribute `code`
// (a fastdcp.ErrorCode). kDataLoss has a subclass, ChecksumError, for a C++ ChecksumError. An
// OSError's subclass follows its errno (EACCES: PermissionError), which OSError(errno, message)
// picks only for OSError itself: so kIoError has one subclass per such built-in,
// Io<Builtin>(IoError, <Builtin>), made up front. All are attributes of the module, so that an
// exception pickled in the writer process (Note [Errors across the writer process]) unpickles to
// the same type.
struct ErrorTypes {
  std::array<PyObject*, static_cast<size_t>(ErrorCode::kInternal) + 1> by_code{};
  PyObject* checksum = nullptr;
  std::vector<std::pair<PyObject*, PyObject*>> io_by_builtin;  // (OSError subclass, IoError subclass)
};
ErrorTypes error_types;  // owned by the module, whose attributes they are

// A new exception type fastdcp.errors.<name> on `m`, deriving from `bases` (a tuple).
PyObject* new_error_type(nb::module_& m, const std::string& name, const char* doc, nb::handle bases, nb::handle code) {
  nb::dict attributes;
  if (code.is_valid()) attributes["code"] = code;
  nb::object type = nb::steal(
      PyErr_NewExceptionWithDoc(("fastdcp.errors." + name).c_str(), doc, bases.ptr(), attributes.ptr()));
  if (!type.is_valid()) throw nb::python_error();
  m.attr(name.c_str()) = type;
  return type.ptr();
}

// The subclass OSError(errnum, ...) is (PermissionError for EACCES), or OSError itself.
nb::handle oserror_type_for(int errnum) { return nb::handle(PyExc_OSError)(errnum, "").type(); }

void make_error_types(nb::module_& m) {
  const nb::handle root =
      new_error_type(m, "Error", "Any error fastdcp reports; `code` says which (fastdcp.ErrorCode).",
                     nb::make_tuple(nb::handle(PyExc_Exception)), nb::handle());
  const nb::handle value_error(PyExc_ValueError), runtime_error(PyExc_RuntimeError), os_error(PyExc_OSError);
  const nb::object cancelled = nb::module_::import_("concurrent.futures").attr("CancelledError");
  // kAlreadyExists and kCancelled are RuntimeErrors too, what they were before they had types of
  // their own, so that handlers written then still catch them.
  const struct {
    ErrorCode code;
    const char* name;
    nb::object bases;
    const char* doc;
  } specs[] = {
      {ErrorCode::kInvalidArgument, "InvalidArgumentError", nb::make_tuple(value_error, root),
       "A value or option fastdcp cannot use; the message names the key or option."},
      {ErrorCode::kFailedPrecondition, "FailedPreconditionError", nb::make_tuple(runtime_error, root),
       "An object or checkpoint in the wrong state (closed, not committed)."},
      {ErrorCode::kResourceExhausted, "ResourceExhaustedError", nb::make_tuple(nb::handle(PyExc_MemoryError), root),
       "A memory budget, shared memory or address space is exhausted."},
      {ErrorCode::kUnavailable, "UnavailableError", nb::make_tuple(runtime_error, root),
       "An optional facility (CUDA, io_uring, a peer within its timeout) is absent."},
      {ErrorCode::kCudaError, "CudaError", nb::make_tuple(runtime_error, root),
       "A CUDA runtime call failed; the message names the call and its error."},
      {ErrorCode::kIoError, "IoError", nb::make_tuple(os_error, root),
       "An operating-system call failed; errno and strerror are set."},
      {ErrorCode::kNotFound, "NotFoundError", nb::make_tuple(nb::handle(PyExc_FileNotFoundError), root),
       "A checkpoint, rank file or key that should exist does not."},
      {ErrorCode::kAlreadyExists, "AlreadyExistsError",
       nb::make_tuple(nb::handle(PyExc_FileExistsError), runtime_error, root), "A name that must be new is taken."},
      {ErrorCode::kDataLoss, "DataLossError", nb::make_tuple(runtime_error, root),
       "A checkpoint's stored bytes are truncated or corrupt; the message names the file."},
      {ErrorCode::kCancelled, "CancelledError", nb::make_tuple(cancelled, runtime_error, root),
       "The work was abandoned before it completed (a save another rank voted against)."},
      {ErrorCode::kDeadlineExceeded, "DeadlineExceededError", nb::make_tuple(nb::handle(PyExc_TimeoutError), root),
       "A wait ran past its timeout (a write, the writer's start); the message names the timeout option."},
      {ErrorCode::kInternal, "InternalError", nb::make_tuple(runtime_error, root), "A broken invariant inside fastdcp."},
  };
  for (const auto& spec : specs) {
    error_types.by_code[static_cast<size_t>(spec.code)] =
        new_error_type(m, spec.name, spec.doc, spec.bases, nb::cast(spec.code));
  }
  const nb::handle data_loss = error_types.by_code[static_cast<size_t>(ErrorCode::kDataLoss)];
  error_types.checksum =
      new_error_type(m, "ChecksumError", "Stored bytes do not match their recorded CRC32C; the message names the chunk.",
                     nb::make_tuple(data_loss), nb::cast(ErrorCode::kDataLoss));
  const nb::handle io_error = error_types.by_code[static_cast<size_t>(ErrorCode::kIoError)];
  for (int errnum = 1; errnum < 256; ++errnum) {
    const nb::handle builtin = oserror_type_for(errnum);
    if (builtin.is(os_error)) continue;
    auto known = [&](const auto& entry) { return builtin.is(entry.first); };
    if (std::any_of(error_types.io_by_builtin.begin(), error_types.io_by_builtin.end(), known)) continue;
    const std::string name = "Io" + nb::cast<std::string>(builtin.attr("__name__"));
    error_types.io_by_builtin.emplace_back(
        builtin.ptr(), new_error_type(m, name, "fastdcp.IoError with the errno of this OSError subclass.",
                                      nb::make_tuple(io_error, builtin), nb::cast(ErrorCode::kIoError)));
  }
}

// Sets the Python exception for `e`, as Note [Python exception types] describes.
void raise_error(const Error& e) {
  PyObject* type = dynamic_cast<const ChecksumError*>(&e) ? error_types.checksum
                                                          : error_types.by_code[static_cast<size_t>(e.code())];
  if (e.errnum() == 0 || !PyObject_IsSubclass(type, PyExc_OSError)) {
    PyErr_SetString(type, e.what());
    return;
  }
  // OSError(errno, message): errno stays readable, and the subclass follows it.
  nb::object args = nb::make_tuple(e.errnum(), e.what());
  if (e.code() == ErrorCode::kIoError) {
    const nb::handle builtin = oserror_type_for(e.errnum());
    for (auto [os_type, io_type] : error_types.io_by_builtin) {
      if (builtin.is(os_type)) type = io_type;
    }
  }
  PyErr_SetObject(type, args.ptr());
}

void translate_errors() {
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const Error& e) {
      raise_error(e);
    }
  });
}

// A hold on the buffers of one stage call; see Note [Staging leases].
struct PyStagingLease {
  std::shared_ptr<const void> token = std::make_shared<int>(0);
  void release() { token.reset(); }
  bool held() const { return token != nullptr; }
};

// What Stager.stats() returns: the stager's counters, its host memory, and where the last stage()
// spent its time.
struct PyStagerStats : StagerStats {
  uint64_t reserved_bytes = 0, pinned_bytes = 0, shared_bytes = 0;
  double last_from_python_s = 0, last_native_s = 0, last_to_python_s = 0;
};

class PyStager {
 public:
  PyStager(StagingOptions options, bool use_cuda, nb::object adapter)
      : converter_(std::move(adapter)),
        stager_(std::make_shared<DefaultStager>(
            options, use_cuda ? CudaRuntime::instance() : CudaRuntime::unavailable("CUDA disabled by the caller"))) {}

  // `on_released`, when given, is called (with the GIL) as soon as the sources may change again,
  // before stage() returns; see Note [Copy-on-write staging]. `producer_streams`: (device,
  // cudaStream_t as an integer) pairs whose queued work the device-to-host copies wait for.
  nb::object stage(nb::handle state_dict, const PyStagingLease* lease, nb::handle on_released,
                   const std::vector<std::pair<int, uintptr_t>>& producer_streams, bool autograd_traits) {
    using Clock = std::chrono::steady_clock;
    CyclicGcPause gc_pause;
    const auto t0 = Clock::now();
    const Value source = converter_.from_python(state_dict);
    const auto t1 = Clock::now();
    StageCallOptions call;
    if (lease) {
      if (!lease->held()) throw Error(ErrorCode::kInvalidArgument, "stage(): the lease was already released");
      call.lease = lease->token;
    }
    for (auto [device, stream] : producer_streams) {
      call.producer_streams.push_back(ProducerStream{device, reinterpret_cast<CudaStream>(stream)});
    }
    if (on_released.is_valid() && !on_released.is_none()) {
      call.on_sources_released = [on_released] {
        PythonAccess access;
        if (!access) return;
        try {
          on_released();
        } catch (nb::python_error& error) {
          error.discard_as_unraisable("fastdcp: the sources-released callback of stage()");
        }
      };
    }
    Value staged;
    {
      nb::gil_scoped_release release;
      staged = stager_->stage_now(source, call);
    }
    const auto t2 = Clock::now();
    nb::object out = converter_.to_python(state_dict, staged, autograd_traits);
    const auto t3 = Clock::now();
    auto seconds = [](auto d) { return std::chrono::duration<double>(d).count(); };
    last_phases_ = {seconds(t1 - t0), seconds(t2 - t1), seconds(t3 - t2)};
    return out;
  }

  void close() {
    nb::gil_scoped_release release;
    stager_->close();
  }
  // The stager itself, for fastdcp.torch's asynchronous staging and checkpointer (engine_bindings.cpp).
  std::shared_ptr<DefaultStager> native() const { return stager_; }
  bool pinning_downgraded() const { return stager_->pinning_downgraded(); }
  // (available, why not)
  std::pair<bool, std::string> copy_on_write_available() const {
    std::string why_not;
    const bool available = stager_->copy_on_write_available(&why_not);
    return {available, why_not};
  }
  PyStagerStats stats() const {
    PyStagerStats out;
    HostMemoryStats m;
    {
      // Without the GIL: a stage() on another thread takes it for on_released while holding the
      // stager's lock, which stats() waits for (Note [Completing futures outside locks]).
      nb::gil_scoped_release release;
      static_cast<StagerStats&>(out) = stager_->stats();
      m = stager_->memory_stats();
    }
    out.reserved_bytes = m.total_reserved();
    out.pinned_bytes = m.pinned_bytes();
    out.shared_bytes = m.shared_bytes();
    out.last_from_python_s = last_phases_[0];
    out.last_native_s = last_phases_[1];
    out.last_to_python_s = last_phases_[2];
    return out;
  }

 private:
  TreeConverter converter_;
  std::shared_ptr<DefaultStager> stager_;
  std::array<double, 3> last_phases_{};
};

// The io_engine option of WriterOptions and ReadOptions, as Python spells it ("threads", ...).
template <typename Options>
std::string io_engine_name(const Options& options) {
  return to_string(options.io_engine);
}
template <typename Options>
void set_io_engine(Options& options, const std::string& name) {
  options.io_engine = io_engine_from_string(name);
}

// WriterOptions::barrier_timeout as Python spells it, in seconds.
double timeout_seconds(std::chrono::milliseconds timeout) { return std::chrono::duration<double>(timeout).count(); }

// What read_into, load_into and load_hugging_face return to Python: the filled template (a new
// object where a tuple in it was rebuilt) and the key report.
struct PyLoadResult : LoadResult {
  nb::object state_dict;
};

// Device memory for a load, from the framework: the adapter's empty_device(nbytes, device_index)
// returns a 1-D byte tensor and its data pointer (Note [Loading onto a device]). Each allocation is
// remembered, so that the loaded tensors are made over the framework's own tensor.
class PyDeviceAllocator : public DeviceAllocator {
 public:
  explicit PyDeviceAllocator(nb::object empty_device) : empty_device_(std::move(empty_device)) {}

  Storage allocate(Device device, uint64_t nbytes) override {
    nb::gil_scoped_acquire gil;
    nb::tuple made = nb::cast<nb::tuple>(empty_device_(nbytes, device.index));
    nb::object bytes = made[0];
    const auto data = nb::cast<uintptr_t>(made[1]);
    // The storage keeps the framework's tensor alive, wherever it is dropped.
    Storage storage = Storage::wrap(reinterpret_cast<void*>(data), nbytes, device, hold(bytes));
    made_.emplace_back(storage, std::move(bytes));
    return storage;
  }

  // The framework's tensor of every storage allocated, for TreeConverter::adopt_storage.
  std::vector<std::pair<Storage, nb::object>>& made() { return made_; }

  ~PyDeviceAllocator() override {
    nb::gil_scoped_acquire gil;
    made_.clear();
    empty_device_.reset();
  }

 private:
  nb::object empty_device_;
  std::vector<std::pair<Storage, nb::object>> made_;
};

// Checkpoint writing and reading for one rank, with a framework adapter for the Python side.
class PyCheckpointIO {
 public:
  PyCheckpointIO(nb::object adapter, int rank, int world_size) : converter_(std::move(adapter)), rank_{rank, world_size} {
    CheckpointReader check(rank_);  // validates the rank
  }

  WriteStats write(const std::string& path, nb::handle state_dict, const WriterOptions& options, nb::object barrier,
                   nb::object pre_commit, nb::object post_commit) {
    Value tree;
    try {
      tree = checkpointable_tree(converter_, state_dict);
    } catch (const std::exception& e) {
      // This rank's state cannot be saved at all: vote against the save as the async path does,
      // so that the other ranks fail now instead of waiting out the barrier timeout.
      try {
        abandon(path, e.what(), options, barrier);
      } catch (const std::exception& vote_error) {
        warn("could not vote against the save to '" + path + "': " + vote_error.what());
      }
      throw;
    }
    return write_tree(path, std::move(tree), options, std::move(barrier), std::move(pre_commit),
                      std::move(post_commit));
  }

  // This rank's part of the save cannot be written: votes against it (CheckpointWriter::abandon).
  // With `barrier`, this rank joins the save's barrier as a writer that failed would.
  void abandon(const std::string& path, const std::string& error, const WriterOptions& options, nb::object barrier) {
    std::shared_ptr<Barrier> native_barrier = PyBarrier::from(std::move(barrier));
    nb::gil_scoped_release release;
    CheckpointWriter(rank_, options, native_barrier).abandon(path, error);
  }

  nb::object read(const std::string& path, const ReadOptions& options) {
    ReadOptions read_options = options;
    std::shared_ptr<PyDeviceAllocator> allocator;
    if (options.device.is_cuda() && nb::hasattr(converter_.adapter(), "empty_device")) {
      allocator = std::make_shared<PyDeviceAllocator>(converter_.adapter().attr("empty_device"));
      read_options.device_allocator = allocator;
    }
    Value loaded;
    {
      nb::gil_scoped_release release;
      loaded = CheckpointReader(rank_, read_options).read(path);
    }
    if (allocator) {
      for (auto& [storage, bytes] : allocator->made()) converter_.adopt_storage(storage, std::move(bytes));
      allocator->made().clear();
    }
    CyclicGcPause gc_pause;
    return converter_.loaded_to_python(loaded);
  }

  // A Hugging Face model directory into the template's tensors (Note [Hugging Face model directories]).
  PyLoadResult load_hugging_face(const std::string& path, nb::handle target, bool strict, bool cast,
                                 const std::string& strip_prefix, const std::string& add_prefix, int io_threads) {
    const HfImportOptions options{strip_prefix, add_prefix, strict, cast, std::nullopt, io_threads};
    return fill(target, [&](Value& tree) { return fastdcp::load_hugging_face(path, tree, options); });
  }

  // The same as a flat dict; `dtype` ("" for none) is what floating tensors become.
  nb::object read_hugging_face(const std::string& path, const std::string& dtype, const std::string& strip_prefix,
                               const std::string& add_prefix, int io_threads) {
    HfImportOptions options{strip_prefix, add_prefix, false, true, std::nullopt, io_threads};
    if (!dtype.empty()) options.dtype = hf::parse_float_dtype(dtype, "dtype");
    Value loaded;
    {
      nb::gil_scoped_release release;
      loaded = fastdcp::read_hugging_face(path, options);
    }
    CyclicGcPause gc_pause;
    return converter_.loaded_to_python(loaded);
  }

  PyLoadResult read_into(const std::string& path, nb::handle target, const ReadOptions& options, bool strict) {
    return fill(target, [&](Value& tree) { return CheckpointReader(rank_, options).read_into(path, tree, strict); });
  }

  // read_into's counterpart for a state dict already in memory (a checkpoint of another format,
  // read in Python: fastdcp/torch/migrate.py), through the same matching (fastdcp::load_into).
  PyLoadResult load_into(nb::handle source, nb::handle target, bool strict, const std::string& source_name) {
    Value source_tree;
    {
      CyclicGcPause gc_pause;
      source_tree = checkpointable_tree(converter_, source);
    }
    return fill(target, [&](Value& tree) { return fastdcp::load_into(tree, source_tree, strict, source_name); });
  }

 private:
  // Runs `load(tree)` (without the GIL) on the template's tree and writes the result back into it.
  template <typename Load>
  PyLoadResult fill(nb::handle target, Load&& load) {
    Value tree;
    {
      CyclicGcPause gc_pause;
      tree = converter_.from_python(target);
    }
    PyLoadResult result;
    {
      nb::gil_scoped_release release;
      static_cast<LoadResult&>(result) = load(tree);
    }
    CyclicGcPause gc_pause;
    result.state_dict = converter_.write_back(target, tree);
    return result;
  }

  // `source`: a tree, or a plan made in another process (Note [Shared state dicts]).
  WriteStats write_tree(const std::string& path, std::variant<Value, RankFilePlan> source, const WriterOptions& options,
                        nb::object barrier, nb::object pre_commit, nb::object post_commit) {
    std::shared_ptr<Barrier> native_barrier = PyBarrier::from(std::move(barrier));
    std::shared_ptr<WriterHook> hook;
    if (!pre_commit.is_none() || !post_commit.is_none()) {
      hook = std::make_shared<PyHook>(std::move(pre_commit), std::move(post_commit));
    }
    nb::gil_scoped_release release;
    Value* tree = std::get_if<Value>(&source);
    CheckpointWriter writer(rank_, options, native_barrier, hook);
    return tree ? writer.write(path, *tree) : writer.write(path, std::get<RankFilePlan>(std::move(source)));
  }

  TreeConverter converter_;
  RankInfo rank_;
};

}  // namespace

void register_engine(nb::module_& m);  // engine_bindings.cpp

NB_MODULE(_C, m) {
  nb::enum_<ErrorCode>(m, "ErrorCode", "What went wrong, as fastdcp's C++ core classifies it (Note [Error policy]).")
      .value("INVALID_ARGUMENT", ErrorCode::kInvalidArgument)
      .value("FAILED_PRECONDITION", ErrorCode::kFailedPrecondition)
      .value("RESOURCE_EXHAUSTED", ErrorCode::kResourceExhausted)
      .value("UNAVAILABLE", ErrorCode::kUnavailable)
      .value("CUDA_ERROR", ErrorCode::kCudaError)
      .value("IO_ERROR", ErrorCode::kIoError)
      .value("NOT_FOUND", ErrorCode::kNotFound)
      .value("ALREADY_EXISTS", ErrorCode::kAlreadyExists)
      .value("DATA_LOSS", ErrorCode::kDataLoss)
      .value("CANCELLED", ErrorCode::kCancelled)
      .value("DEADLINE_EXCEEDED", ErrorCode::kDeadlineExceeded)
      .value("INTERNAL", ErrorCode::kInternal);
  make_error_types(m);
  translate_errors();
  // For tests of the codes that no call reachable from Python raises (tests/python/test_errors.py).
  m.def(
      "_raise_error",
      [](ErrorCode code, const std::string& message, int errnum) { throw Error(code, message, errnum); },
      nb::arg("code"), nb::arg("message"), nb::arg("errnum") = 0);
  nb::class_<StagingOptions>(m, "StagingOptions")
      .def(nb::init<>())
      .def_rw("use_pinned_memory", &StagingOptions::use_pinned_memory)
      .def_rw("use_shared_memory", &StagingOptions::use_shared_memory)
      .def_rw("use_async_staging", &StagingOptions::use_async_staging)
      .def_rw("use_non_blocking_copy", &StagingOptions::use_non_blocking_copy)
      .def_rw("pin_memory_min_bytes", &StagingOptions::pin_memory_min_bytes)
      .def_rw("copy_threads", &StagingOptions::copy_threads)
      .def_rw("memory_budget_bytes", &StagingOptions::memory_budget_bytes)
      .def_rw("copy_on_write", &StagingOptions::copy_on_write);
  nb::class_<PyStagingLease>(m, "StagingLease")
      .def(nb::init<>())
      .def("release", &PyStagingLease::release)
      .def_prop_ro("held", &PyStagingLease::held);
  nb::class_<PyStagerStats>(m, "StagerStats", "What a Stager has done, over all its stage() calls.")
      .def_ro("stage_calls", &PyStagerStats::stage_calls)
      .def_ro("cache_hits", &PyStagerStats::cache_hits, "storages staged into an existing cached buffer")
      .def_ro("cache_misses", &PyStagerStats::cache_misses, "storages that needed a new buffer")
      .def_ro("cache_entries", &PyStagerStats::cache_entries)
      .def_ro("bytes_copied", &PyStagerStats::bytes_copied)
      .def_ro("leased_skips", &PyStagerStats::leased_skips,
              "storages staged into a fresh buffer because their cached one was leased")
      .def_ro("bytes_copied_after_release", &PyStagerStats::bytes_copied_after_release,
              "copied once the sources were released (copy-on-write), counted per 2 MiB chunk")
      .def_ro("write_faults", &PyStagerStats::write_faults,
              "chunks copied early because the sources were written meanwhile")
      .def_ro("reserved_bytes", &PyStagerStats::reserved_bytes, "host memory held, of every kind")
      .def_ro("pinned_bytes", &PyStagerStats::pinned_bytes)
      .def_ro("shared_bytes", &PyStagerStats::shared_bytes)
      .def_ro("last_from_python_s", &PyStagerStats::last_from_python_s,
              "the last stage(): reading the Python tree (GIL held)")
      .def_ro("last_native_s", &PyStagerStats::last_native_s, "the last stage(): staging (GIL released)")
      .def_ro("last_to_python_s", &PyStagerStats::last_to_python_s,
              "the last stage(): building the staged Python tree (GIL held)");
  nb::class_<PyStager>(m, "Stager")
      .def(nb::init<StagingOptions, bool, nb::object>(), nb::arg("options"), nb::arg("use_cuda"), nb::arg("adapter"))
      .def("stage", &PyStager::stage, nb::arg("state_dict"), nb::arg("lease").none() = nb::none(),
           nb::arg("on_released").none() = nb::none(),
           nb::arg("producer_streams") = std::vector<std::pair<int, uintptr_t>>{}, nb::arg("autograd_traits") = false)
      .def("copy_on_write_available", &PyStager::copy_on_write_available)
      .def("close", &PyStager::close)
      .def_prop_ro("pinning_downgraded", &PyStager::pinning_downgraded)
      .def_prop_ro("native", &PyStager::native)
      .def("stats", &PyStager::stats);
  const WriterOptions write_defaults;
  nb::class_<WriterOptions>(m, "WriteOptions", "How CheckpointIO.write saves (WriterOptions in checkpoint.h).")
      .def(
          "__init__",
          [](WriterOptions* self, bool overwrite, const std::string& overwrite_option, int io_threads, bool direct_io,
             const std::string& io_engine, double barrier_timeout_s) {
            new (self) WriterOptions{
                .overwrite = overwrite,
                .overwrite_option = overwrite_option,
                .io_threads = io_threads,
                .direct_io = direct_io,
                .io_engine = io_engine_from_string(io_engine),
                .barrier_timeout = python::timeout_from_seconds(barrier_timeout_s, "WriteOptions.barrier_timeout_s")};
          },
          nb::kw_only(), nb::arg("overwrite") = write_defaults.overwrite,
          nb::arg("overwrite_option") = write_defaults.overwrite_option, nb::arg("io_threads") = write_defaults.io_threads,
          nb::arg("direct_io") = write_defaults.direct_io, nb::arg("io_engine") = to_string(write_defaults.io_engine),
          nb::arg("barrier_timeout_s") = timeout_seconds(write_defaults.barrier_timeout))
      .def_rw("overwrite", &WriterOptions::overwrite, "replace a committed checkpoint")
      .def_rw("overwrite_option", &WriterOptions::overwrite_option,
              "how the caller's API spells overwriting, for the error that asks for it")
      .def_rw("io_threads", &WriterOptions::io_threads, "0: one per core, at least 4")
      .def_rw("direct_io", &WriterOptions::direct_io)
      .def_prop_rw("io_engine", &io_engine_name<WriterOptions>, &set_io_engine<WriterOptions>,
                   "'threads', 'io_uring' or 'auto'")
      .def_prop_rw(
          "barrier_timeout_s", [](const WriterOptions& o) { return timeout_seconds(o.barrier_timeout); },
          [](WriterOptions& o, double seconds) {
            o.barrier_timeout = python::timeout_from_seconds(seconds, "WriteOptions.barrier_timeout_s");
          },
          "how long the barrier and rank 0's wait for every rank may take");
  const ReadOptions read_defaults;
  nb::class_<ReadOptions>(m, "ReadOptions", "How CheckpointIO reads (ReadOptions in checkpoint.h).")
      .def(
          "__init__",
          [](ReadOptions* self, bool verify_checksums, int io_threads, bool use_mmap, bool direct_io,
             const std::string& io_engine, bool assemble_sharded, const std::string& device) {
            new (self) ReadOptions{.verify_checksums = verify_checksums,
                                   .io_threads = io_threads,
                                   .use_mmap = use_mmap,
                                   .direct_io = direct_io,
                                   .io_engine = io_engine_from_string(io_engine),
                                   .assemble_sharded = assemble_sharded,
                                   .device = Device::parse(device)};
          },
          nb::kw_only(), nb::arg("verify_checksums") = read_defaults.verify_checksums,
          nb::arg("io_threads") = read_defaults.io_threads, nb::arg("use_mmap") = read_defaults.use_mmap,
          nb::arg("direct_io") = read_defaults.direct_io, nb::arg("io_engine") = to_string(read_defaults.io_engine),
          nb::arg("assemble_sharded") = read_defaults.assemble_sharded, nb::arg("device") = read_defaults.device.str())
      .def_rw("verify_checksums", &ReadOptions::verify_checksums)
      .def_rw("io_threads", &ReadOptions::io_threads, "0: one per core, at least 4")
      .def_rw("use_mmap", &ReadOptions::use_mmap, "whole reads: map the file instead of reading it")
      .def_rw("direct_io", &ReadOptions::direct_io, "whole reads: O_DIRECT where the file system allows it")
      .def_prop_rw("io_engine", &io_engine_name<ReadOptions>, &set_io_engine<ReadOptions>,
                   "'threads', 'io_uring' or 'auto'")
      .def_rw("assemble_sharded", &ReadOptions::assemble_sharded)
      .def_prop_rw(
          "device", [](const ReadOptions& o) { return o.device.str(); },
          [](ReadOptions& o, const std::string& device) { o.device = Device::parse(device); },
          "whole reads: 'cpu' or 'cuda:<index>', where the loaded tensors go (map_location)");
  nb::class_<WriteStats>(m, "WriteStats", "What one rank's write did.")
      .def_ro("file", &WriteStats::file, "this rank's data file")
      .def_ro("bytes_written", &WriteStats::bytes_written)
      .def_ro("seconds_data", &WriteStats::seconds_data, "writing and syncing the data file")
      .def_ro("seconds_total", &WriteStats::seconds_total, "including the commit");
  nb::class_<PyLoadResult>(m, "LoadResult", "A template filled in place, and the keys that did not match.")
      .def_ro("state_dict", &PyLoadResult::state_dict, "the template (rebuilt where it held tuples)")
      .def_ro("missing_keys", &PyLoadResult::missing_keys, "in the template, not in the checkpoint")
      .def_ro("unexpected_keys", &PyLoadResult::unexpected_keys, "in the checkpoint, not in the template");
  nb::class_<PyCheckpointIO>(m, "CheckpointIO")
      .def(nb::init<nb::object, int, int>(), nb::arg("adapter"), nb::arg("rank"), nb::arg("world_size"))
      .def("write", &PyCheckpointIO::write, nb::arg("path"), nb::arg("state_dict"), nb::arg("options"), nb::kw_only(),
           nb::arg("barrier").none() = nb::none(), nb::arg("pre_commit").none() = nb::none(),
           nb::arg("post_commit").none() = nb::none(),
           nb::sig("def write(self, path: str, state_dict: object, options: WriteOptions, *, "
                   "barrier: collections.abc.Callable[[float], None] | None = None, "
                   "pre_commit: collections.abc.Callable[[str], None] | None = None, "
                   "post_commit: collections.abc.Callable[[str], None] | None = None) -> WriteStats"))
      .def("abandon", &PyCheckpointIO::abandon, nb::arg("path"), nb::arg("error"), nb::arg("options"), nb::kw_only(),
           nb::arg("barrier").none() = nb::none(),
           nb::sig("def abandon(self, path: str, error: str, options: WriteOptions, *, "
                   "barrier: collections.abc.Callable[[float], None] | None = None) -> None"))
      .def("read", &PyCheckpointIO::read, nb::arg("path"), nb::arg("options"))
      .def("read_into", &PyCheckpointIO::read_into, nb::arg("path"), nb::arg("target"), nb::arg("options"),
           nb::kw_only(), nb::arg("strict") = false)
      .def("load_into", &PyCheckpointIO::load_into, nb::arg("source"), nb::arg("target"), nb::kw_only(),
           nb::arg("strict"), nb::arg("source_name"))
      .def("load_hugging_face", &PyCheckpointIO::load_hugging_face, nb::arg("path"), nb::arg("target"), nb::kw_only(),
           nb::arg("strict"), nb::arg("cast"), nb::arg("strip_prefix"), nb::arg("add_prefix"), nb::arg("io_threads"))
      .def("read_hugging_face", &PyCheckpointIO::read_hugging_face, nb::arg("path"), nb::kw_only(), nb::arg("dtype"),
           nb::arg("strip_prefix"), nb::arg("add_prefix"), nb::arg("io_threads"));
  nb::class_<SharedStateDict>(m, "SharedStateDict")
      .def_prop_ro("message", [](const SharedStateDict& s) { return nb::bytes(s.message.data(), s.message.size()); })
      .def_ro("fds", &SharedStateDict::fds)
      .def_ro("bytes_copied", &SharedStateDict::bytes_copied);
  m.def("verify", [](const std::string& path) {
    VerifyReport report;
    {
      nb::gil_scoped_release release;
      report = verify_checkpoint(path);
    }
    nb::dict d;
    d["files"] = report.files;
    d["bytes"] = report.bytes;
    d["chunks"] = report.chunks;
    d["files_without_checksums"] = report.files_without_checksums;
    return d;
  }, nb::arg("path"), nb::sig("def verify(path: str) -> dict[str, int]"));
  m.def(
      "export_hugging_face",
      [](const std::string& checkpoint, const std::string& out, const std::string& max_shard_size,
         const std::string& dtype, const std::string& prefix, bool strip_prefix, bool overwrite, int rank, bool verify,
         int io_threads) {
        HfExportOptions options;
        options.max_shard_bytes = hf::parse_size(max_shard_size, "max_shard_size");
        if (!dtype.empty()) options.dtype = hf::parse_float_dtype(dtype, "dtype");
        options.prefix = prefix;
        options.strip_prefix = strip_prefix;
        options.overwrite = overwrite;
        options.rank = rank;
        options.verify_checksums = verify;
        options.io_threads = io_threads;
        HfExportReport report;
        {
          nb::gil_scoped_release release;
          report = fastdcp::export_hugging_face(checkpoint, out, options);
        }
        nb::dict d;
        d["files"] = report.files;
        d["index_file"] = report.index_file;
        d["total_size"] = report.total_size;
        d["tensors"] = report.tensors;
        d["skipped"] = report.skipped;
        d["peak_sharded_bytes"] = report.peak_sharded_bytes;
        return d;
      },
      nb::arg("checkpoint"), nb::arg("out"), nb::kw_only(), nb::arg("max_shard_size"), nb::arg("dtype"),
      nb::arg("prefix"), nb::arg("strip_prefix"), nb::arg("overwrite"), nb::arg("rank"), nb::arg("verify"),
      nb::arg("io_threads"),
      nb::sig("def export_hugging_face(checkpoint: str, out: str, *, max_shard_size: str, dtype: str, prefix: str, "
              "strip_prefix: bool, overwrite: bool, rank: int, verify: bool, io_threads: int) "
              "-> dict[str, int | str | list[str] | list[tuple[str, str]]]"));
  register_engine(m);
  m.def("cuda_available", [] { return CudaRuntime::instance()->available(); });
  m.def("set_warning_handler", [](nb::object handler) {
    set_warning_sink([handler](const std::string& message) {
      PythonAccess access;
      if (access) handler(message);
    });
  }, nb::arg("handler"), nb::sig("def set_warning_handler(handler: collections.abc.Callable[[str], None]) -> None"));
  // The sink holds a Python object: release it while the interpreter still exists. Then no thread
  // of fastdcp's takes the GIL any more (Note [The GIL at exit]).
  nb::module_::import_("atexit").attr("register")(nb::cpp_function([] {
    set_warning_sink({});
    PythonAccess::close();
  }));
}
