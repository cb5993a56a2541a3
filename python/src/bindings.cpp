// Python bindings: the stager and checkpoint I/O, over TreeConverter (tree_converter.h).

#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <array>
#include <chrono>
#include <optional>

#include "fastdcp/checkpoint/checkpoint.h"
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
using fastdcp::python::PyBarrier;
using fastdcp::python::PyHook;
using fastdcp::python::TreeConverter;

namespace {

// fastdcp.DataLossError: a checkpoint whose stored bytes are truncated or corrupt (kDataLoss).
// A RuntimeError, what torch.load raises for a damaged file.
PyObject* data_loss_error = nullptr;

// Error codes become Python exception types, here only; see Note [Error policy]. (The writer
// process sends the exception object itself to the trainer: Note [Errors across the writer process].)
void translate_errors() {
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const Error& e) {
      switch (e.code()) {
        case ErrorCode::kInvalidArgument: PyErr_SetString(PyExc_ValueError, e.what()); break;
        case ErrorCode::kResourceExhausted: PyErr_SetString(PyExc_MemoryError, e.what()); break;
        case ErrorCode::kFailedPrecondition: PyErr_SetString(PyExc_RuntimeError, e.what()); break;
        case ErrorCode::kIoError:
          if (e.errnum() != 0) {
            // OSError(errno, message): errno stays readable, and OSError picks its subclass.
            nb::object args = nb::make_tuple(e.errnum(), e.what());
            PyErr_SetObject(PyExc_OSError, args.ptr());
          } else {
            PyErr_SetString(PyExc_OSError, e.what());
          }
          break;
        case ErrorCode::kNotFound: PyErr_SetString(PyExc_FileNotFoundError, e.what()); break;
        case ErrorCode::kDataLoss: PyErr_SetString(data_loss_error, e.what()); break;
        case ErrorCode::kDeadlineExceeded: PyErr_SetString(PyExc_TimeoutError, e.what()); break;
        default: PyErr_SetString(PyExc_RuntimeError, e.what()); break;
      }
    }
  });
}

// A hold on the buffers of one stage call; see Note [Staging leases].
struct PyStagingLease {
  std::shared_ptr<const void> token = std::make_shared<int>(0);
  void release() { token.reset(); }
  bool held() const { return token != nullptr; }
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
        nb::gil_scoped_acquire gil;
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
  nb::dict stats() const {
    StagerStats s;
    HostMemoryStats m;
    {
      // Without the GIL: a stage() on another thread takes it for on_released while holding the
      // stager's lock, which stats() waits for (Note [Completing futures outside locks]).
      nb::gil_scoped_release release;
      s = stager_->stats();
      m = stager_->memory_stats();
    }
    nb::dict d;
    d["stage_calls"] = s.stage_calls;
    d["cache_hits"] = s.cache_hits;
    d["cache_misses"] = s.cache_misses;
    d["cache_entries"] = s.cache_entries;
    d["bytes_copied"] = s.bytes_copied;
    d["leased_skips"] = s.leased_skips;
    d["bytes_copied_after_release"] = s.bytes_copied_after_release;
    d["write_faults"] = s.write_faults;
    d["reserved_bytes"] = m.total_reserved();
    d["pinned_bytes"] = m.pinned_bytes();
    d["shared_bytes"] = m.shared_bytes();
    // Where the last stage() spent its time: reading the Python tree (GIL held), staging
    // (GIL released), building the staged Python tree (GIL held).
    d["last_from_python_s"] = last_phases_[0];
    d["last_native_s"] = last_phases_[1];
    d["last_to_python_s"] = last_phases_[2];
    return d;
  }

 private:
  TreeConverter converter_;
  std::shared_ptr<DefaultStager> stager_;
  std::array<double, 3> last_phases_{};
};

bool all_tensors_on_cpu(const Value& root) {
  std::vector<const Value*> stack{&root};
  while (!stack.empty()) {
    const Value* v = stack.back();
    stack.pop_back();
    if (v->is_tensor()) {
      if (!v->as_tensor().device().is_cpu()) return false;
    } else if (v->is_sharded()) {
      for (const ShardChunk& chunk : v->as_sharded().chunks) {
        if (!chunk.data.device().is_cpu()) return false;
      }
    } else if (v->kind() == Value::Kind::kDict) {
      for (const auto& [key, child] : v->entries()) stack.push_back(&child);
    } else if (v->kind() == Value::Kind::kList || v->kind() == Value::Kind::kTuple) {
      for (const Value& child : v->items()) stack.push_back(&child);
    }
  }
  return true;
}

// Checkpoint writing and reading for one rank, with a framework adapter for the Python side.
class PyCheckpointIO {
 public:
  // `overwrite_option`: how the Python API spells overwriting, for the error that asks for it.
  PyCheckpointIO(nb::object adapter, int rank, int world_size, std::string overwrite_option)
      : converter_(std::move(adapter)), rank_{rank, world_size}, overwrite_option_(std::move(overwrite_option)) {
    CheckpointReader check(rank_);  // validates the rank
  }

  nb::dict write(const std::string& path, nb::handle state_dict, bool overwrite, int io_threads, bool direct_io,
                 const std::string& io_engine, double barrier_timeout_s, nb::object barrier, nb::object pre_commit,
                 nb::object post_commit) {
    Value tree;
    try {
      tree = checkpointable_tree(converter_, state_dict);
    } catch (const std::exception& e) {
      // This rank's state cannot be saved at all: vote against the save as the async path does,
      // so that the other ranks fail now instead of waiting out the barrier timeout.
      try {
        abandon(path, e.what(), overwrite, barrier_timeout_s, barrier);
      } catch (const std::exception& vote_error) {
        warn("could not vote against the save to '" + path + "': " + vote_error.what());
      }
      throw;
    }
    return write_tree(path, std::move(tree), overwrite, io_threads, direct_io, io_engine, barrier_timeout_s,
                      std::move(barrier), std::move(pre_commit), std::move(post_commit));
  }

  // This rank's part of the save cannot be written: votes against it (CheckpointWriter::abandon).
  // With `barrier`, this rank joins the save's barrier as a writer that failed would.
  void abandon(const std::string& path, const std::string& error, bool overwrite, double barrier_timeout_s,
               nb::object barrier) {
    const WriterOptions options = commit_options(overwrite, barrier_timeout_s);
    std::shared_ptr<Barrier> native_barrier = PyBarrier::from(std::move(barrier));
    nb::gil_scoped_release release;
    CheckpointWriter(rank_, options, native_barrier).abandon(path, error);
  }

  nb::object read(const std::string& path, bool verify, bool use_mmap, int io_threads, bool direct_io,
                  const std::string& io_engine) {
    const ReadOptions options{verify, io_threads, use_mmap, direct_io, io_engine_from_string(io_engine)};
    Value loaded;
    {
      nb::gil_scoped_release release;
      loaded = CheckpointReader(rank_, options).read(path);
    }
    CyclicGcPause gc_pause;
    return converter_.loaded_to_python(loaded);
  }

  // A Hugging Face model directory into the template's tensors (Note [Hugging Face model directories]).
  nb::tuple load_hugging_face(const std::string& path, nb::handle target, bool strict, bool cast,
                              const std::string& strip_prefix, const std::string& add_prefix, int io_threads) {
    Value tree;
    {
      CyclicGcPause gc_pause;
      tree = converter_.from_python(target);
    }
    const HfImportOptions options{strip_prefix, add_prefix, strict, cast, std::nullopt, io_threads};
    LoadResult result;
    {
      nb::gil_scoped_release release;
      result = fastdcp::load_hugging_face(path, tree, options);
    }
    CyclicGcPause gc_pause;
    nb::object out = converter_.write_back(target, tree);
    return nb::make_tuple(out, result.missing_keys, result.unexpected_keys);
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

  nb::tuple read_into(const std::string& path, nb::handle target, bool strict, bool verify, int io_threads) {
    Value tree;
    {
      CyclicGcPause gc_pause;
      tree = converter_.from_python(target);
    }
    LoadResult result;
    {
      nb::gil_scoped_release release;
      result = CheckpointReader(rank_, ReadOptions{verify, io_threads, false}).read_into(path, tree, strict);
    }
    CyclicGcPause gc_pause;
    nb::object out = converter_.write_back(target, tree);
    return nb::make_tuple(out, result.missing_keys, result.unexpected_keys);
  }

  // read_into's counterpart for a state dict already in memory (a checkpoint of another format,
  // read in Python: fastdcp/torch/migrate.py), through the same matching (fastdcp::load_into).
  nb::tuple load_into(nb::handle source, nb::handle target, bool strict, const std::string& source_name) {
    Value source_tree, tree;
    {
      CyclicGcPause gc_pause;
      source_tree = checkpointable_tree(converter_, source);
      tree = converter_.from_python(target);
    }
    LoadResult result;
    {
      nb::gil_scoped_release release;
      result = fastdcp::load_into(tree, source_tree, strict, source_name);
    }
    CyclicGcPause gc_pause;
    nb::object out = converter_.write_back(target, tree);
    return nb::make_tuple(out, result.missing_keys, result.unexpected_keys);
  }

 private:
  // The options every save and vote shares.
  WriterOptions commit_options(bool overwrite, double barrier_timeout_s) const {
    WriterOptions options;
    options.overwrite = overwrite;
    options.overwrite_option = overwrite_option_;
    options.barrier_timeout = std::chrono::milliseconds(static_cast<int64_t>(barrier_timeout_s * 1000));
    return options;
  }

  nb::dict write_tree(const std::string& path, Value source, bool overwrite, int io_threads, bool direct_io,
                      const std::string& io_engine, double barrier_timeout_s, nb::object barrier, nb::object pre_commit,
                      nb::object post_commit) {
    WriterOptions options = commit_options(overwrite, barrier_timeout_s);
    options.io_threads = io_threads;
    options.direct_io = direct_io;
    options.io_engine = io_engine_from_string(io_engine);
    std::shared_ptr<Barrier> native_barrier = PyBarrier::from(std::move(barrier));
    std::shared_ptr<WriterHook> hook;
    if (!pre_commit.is_none() || !post_commit.is_none()) {
      hook = std::make_shared<PyHook>(std::move(pre_commit), std::move(post_commit));
    }
    WriteStats stats;
    {
      nb::gil_scoped_release release;
      if (!all_tensors_on_cpu(source)) {
        // Device tensors are copied to host first, through a stager kept for later saves.
        if (!device_stager_) {
          StagingOptions staging;
          staging.use_shared_memory = false;
          staging.use_async_staging = false;
          device_stager_.emplace(staging, CudaRuntime::instance());
        }
        source = device_stager_->stage_now(source);
      }
      stats = CheckpointWriter(rank_, options, native_barrier, hook).write(path, source);
    }
    nb::dict d;
    d["file"] = stats.file;
    d["bytes_written"] = stats.bytes_written;
    d["seconds_data"] = stats.seconds_data;
    d["seconds_total"] = stats.seconds_total;
    return d;
  }

  TreeConverter converter_;
  RankInfo rank_;
  std::string overwrite_option_;
  std::optional<DefaultStager> device_stager_;
};

}  // namespace

void register_engine(nb::module_& m);  // engine_bindings.cpp

NB_MODULE(_C, m) {
  data_loss_error = PyErr_NewExceptionWithDoc(
      "fastdcp.DataLossError", "A checkpoint's stored bytes are truncated or corrupt; the message names the file.",
      PyExc_RuntimeError, nullptr);
  m.attr("DataLossError") = nb::handle(data_loss_error);
  translate_errors();
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
  nb::class_<PyCheckpointIO>(m, "CheckpointIO")
      .def(nb::init<nb::object, int, int, std::string>(), nb::arg("adapter"), nb::arg("rank"), nb::arg("world_size"),
           nb::arg("overwrite_option") = "overwrite=True")
      .def("write", &PyCheckpointIO::write, nb::arg("path"), nb::arg("state_dict"), nb::arg("overwrite"),
           nb::arg("io_threads"), nb::arg("direct_io"), nb::arg("io_engine"), nb::arg("barrier_timeout_s"),
           nb::arg("barrier").none(), nb::arg("pre_commit").none(), nb::arg("post_commit").none())
      .def("abandon", &PyCheckpointIO::abandon, nb::arg("path"), nb::arg("error"), nb::arg("overwrite"),
           nb::arg("barrier_timeout_s"), nb::arg("barrier").none() = nb::none())
      .def("read", &PyCheckpointIO::read, nb::arg("path"), nb::arg("verify"), nb::arg("use_mmap"), nb::arg("io_threads"),
           nb::arg("direct_io"), nb::arg("io_engine"))
      .def("read_into", &PyCheckpointIO::read_into, nb::arg("path"), nb::arg("target"), nb::arg("strict"),
           nb::arg("verify"), nb::arg("io_threads"))
      .def("load_into", &PyCheckpointIO::load_into, nb::arg("source"), nb::arg("target"), nb::arg("strict"),
           nb::arg("source_name"))

      .def("load_hugging_face", &PyCheckpointIO::load_hugging_face, nb::arg("path"), nb::arg("target"),
           nb::arg("strict"), nb::arg("cast"), nb::arg("strip_prefix"), nb::arg("add_prefix"), nb::arg("io_threads"))
      .def("read_hugging_face", &PyCheckpointIO::read_hugging_face, nb::arg("path"), nb::arg("dtype"),
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
  });
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
      nb::arg("checkpoint"), nb::arg("out"), nb::arg("max_shard_size"), nb::arg("dtype"), nb::arg("prefix"),
      nb::arg("strip_prefix"), nb::arg("overwrite"), nb::arg("rank"), nb::arg("verify"), nb::arg("io_threads"));
  register_engine(m);
  m.def("cuda_available", [] { return CudaRuntime::instance()->available(); });
  m.def("set_warning_handler", [](nb::object handler) {
    set_warning_sink([handler](const std::string& message) {
      nb::gil_scoped_acquire gil;
      handler(message);
    });
  });
  // The sink holds a Python object: release it while the interpreter still exists.
  nb::module_::import_("atexit").attr("register")(nb::cpp_function([] { set_warning_sink({}); }));
}
