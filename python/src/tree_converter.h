#pragma once
// TreeConverter: Python state dicts to fastdcp::Value and back, for the stager and checkpoints.
//
// Note [Python conversion]
// The Python tree is walked here, in C++, with an explicit stack: containers (dict and its
// subclasses, list, tuple), scalars, and tensors. A tensor is anything the TensorAdapter (given by
// the Python package: torch or DLPack/numpy) recognises; its storage is resolved through a table
// kept by the stager, so that the same framework storage maps to the same fastdcp Storage across
// calls and the C++ stager's buffer cache hits. Objects of any other type are "opaque": they are
// deep-copied by a Python callable, as upstream's deepcopy would. The staged Value is turned back
// into Python objects by walking it beside the source tree, so container types (OrderedDict, ...)
// and their instance attributes (module state dicts' `_metadata`) are kept.


#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <array>
#include <chrono>
#include <unordered_map>
#include <vector>

#include "fastdcp/common/logging.h"
#include "fastdcp/tensor/value.h"
#include "fastdcp/tensor/dlpack_interop.h"
#include "native_tensor_ops.h"

namespace fastdcp::python {

namespace nb = nanobind;

struct StorageKey {
  int device_type;
  int device_index;
  uintptr_t data;
  uint64_t nbytes;
  bool operator==(const StorageKey&) const = default;
};
struct StorageKeyHash {
  size_t operator()(const StorageKey& k) const {
    return std::hash<uintptr_t>()(k.data) ^ (std::hash<uint64_t>()(k.nbytes) * 31) ^ (k.device_index * 131);
  }
};

// Building tens of thousands of staged tensors would trigger many cyclic collections, each walking
// the whole heap (the training state included); none of the objects made here form cycles.
class CyclicGcPause {
 public:
  CyclicGcPause() : was_enabled_(PyGC_Disable() == 1) {}
  ~CyclicGcPause() {
    if (was_enabled_) PyGC_Enable();
  }
  CyclicGcPause(const CyclicGcPause&) = delete;
  CyclicGcPause& operator=(const CyclicGcPause&) = delete;

 private:
  bool was_enabled_;
};
class TreeConverter {
 public:
  // adapter: the framework glue, a Python object with
  //   is_tensor(obj) -> bool
  //   describe(t) -> (storage_ptr, storage_nbytes, device_type (0 cpu, 1 cuda), device_index,
  //                   dtype_name, shape tuple, strides tuple, storage_offset[, trait_flags,
  //                   framework_dtype]) (flags: kTrait* below; Note [Tensor traits])
  //   wrap_storage(dlpack_capsule_of_bytes, shared, pinned) -> framework storage
  //   make_view(storage, source_tensor, shape, strides, storage_offset) -> staged tensor (the
  //     source's Python attributes are then deep-copied onto it here)
  //   deepcopy(obj) -> copy of an opaque leaf
  //   rebuild_container(source, items) -> a container of source's type (tuple, dict subclass)
  //   copy_attributes (optional, default False) -> copy a source tensor's Python attributes
  //     (its __dict__) onto the staged one, as torch's stager does
  //   finish_view(source, view) (optional) -> fixes up a view made on the Python path
  //   typed_view(storage, dtype_name, shape, strides, storage_offset) (for loading) -> a tensor
  //     of the named fastdcp dtype
  //   native_ops (optional) -> a capsule of NativeTensorOps, see Note [Native tensor ops]
  //   apply_traits(t, trait_flags, framework_dtype) (optional) -> a loaded tensor with its traits
  //   sharded_type (optional) -> the framework's sharded tensor type (torch's DTensor), whose
  //     objects become sharded tensors (Note [Sharded tensors]) through
  //   describe_sharded(obj) -> (global shape tuple, dtype_name, [(global offset tuple, view of
  //     the local tensor)], replica_index, replica_count), the first view at the local origin;
  //   local_tensor(obj) -> its local tensor; rebuild_sharded(source, staged local or None) -> a
  //     sharded tensor like source over the staged copy of its local tensor
  explicit TreeConverter(nb::object adapter) : adapter_(std::move(adapter)) {
    is_tensor_ = adapter_.attr("is_tensor");
    // Frameworks may name a tensor type and dtype table: then tensors are described here, without a
    // Python-level call per tensor (see Note [Python conversion]).
    if (nb::hasattr(adapter_, "tensor_type")) {
      tensor_type_ = adapter_.attr("tensor_type");
      for (auto [dtype, name] : nb::cast<nb::dict>(adapter_.attr("dtype_names"))) {
        auto parsed = dtype_from_name(nb::cast<std::string>(name));
        if (!parsed) throw Error(ErrorCode::kInvalidArgument, "adapter names an unknown dtype");
        dtype_codes_.emplace(dtype.ptr(), *parsed);
        fast_dtypes_.push_back(nb::borrow(dtype));
      }
      as_strided_ = adapter_.attr("as_strided");
      view_dtype_ = adapter_.attr("view_dtype");
      is_parameter_ = adapter_.attr("is_parameter");
    }
    if (nb::hasattr(adapter_, "native_ops")) {
      nb::object capsule = adapter_.attr("native_ops");
      if (!capsule.is_none()) {
        native_ops_ = static_cast<const python::NativeTensorOps*>(
            PyCapsule_GetPointer(capsule.ptr(), python::kNativeTensorOpsCapsule));
        if (!native_ops_) throw nb::python_error();
        native_ops_owner_ = std::move(capsule);
      }
    }
    copy_attributes_ = nb::hasattr(adapter_, "copy_attributes") && nb::cast<bool>(adapter_.attr("copy_attributes"));
    if (nb::hasattr(adapter_, "finish_view")) finish_view_ = adapter_.attr("finish_view");
    describe_ = adapter_.attr("describe");
    wrap_storage_ = adapter_.attr("wrap_storage");
    make_view_ = adapter_.attr("make_view");
    if (nb::hasattr(adapter_, "typed_view")) typed_view_ = adapter_.attr("typed_view");
    if (nb::hasattr(adapter_, "apply_traits")) apply_traits_ = adapter_.attr("apply_traits");
    if (nb::hasattr(adapter_, "sharded_type") && !adapter_.attr("sharded_type").is_none()) {
      sharded_type_ = adapter_.attr("sharded_type");
      describe_sharded_ = adapter_.attr("describe_sharded");
      local_tensor_ = adapter_.attr("local_tensor");
      rebuild_sharded_ = adapter_.attr("rebuild_sharded");
    }
    deepcopy_ = adapter_.attr("deepcopy");
    rebuild_container_ = adapter_.attr("rebuild_container");
    object_state_ = adapter_.attr("object_state");
    rebuild_object_ = adapter_.attr("rebuild_object");
  }

  // Python -> Value, iteratively. Key paths are built only for error messages.
  Value from_python(nb::handle root) {
    ++epoch_;
    opaque_.clear();
    keep_alive_.clear();
    Value out;
    struct Frame {
      nb::handle src;
      Value* dst;
    };
    std::vector<Frame> stack;
    root_ = root;
    convert_leaf(root, out, stack);
    while (!stack.empty()) {
      Frame f = stack.back();
      stack.pop_back();
      if (PyDict_Check(f.src.ptr())) {
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        auto& entries = f.dst->entries();
        // Children pushed on the stack point into `entries`: it must not reallocate.
        entries.reserve(static_cast<size_t>(PyDict_Size(f.src.ptr())));
        while (PyDict_Next(f.src.ptr(), &pos, &key, &value)) {
          DictKey k = to_key(key);
          entries.emplace_back(std::move(k), Value());
          convert_leaf(value, entries.back().second, stack);
        }
      } else {
        nb::handle seq = f.src;
        const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
        PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
        auto& out_items = f.dst->items();
        out_items.resize(static_cast<size_t>(n));
        for (Py_ssize_t i = 0; i < n; ++i) convert_leaf(items[i], out_items[i], stack);
      }
    }
    std::erase_if(storages_, [&](const auto& e) { return e.second.last_seen != epoch_; });
    return out;
  }

  // Framework storages (and wrappers of staged buffers) not used by the latest call are
  // forgotten, so that the stager's cache entries for them can go too.
  // With `autograd_traits`, staged copies of parameters and of tensors that require grad are made
  // so again: for a staged tree that only a writer reads (the async checkpointer's), where they
  // must reach the file; copies handed to the caller stay plain tensors, as upstream's stager
  // makes them.
  nb::object to_python(nb::handle source, const Value& staged, bool autograd_traits = false) {
    path_.clear();
    autograd_traits_ = autograd_traits && apply_traits_.is_valid();
    nb::object out = build(source, staged, /*mirror=*/true);
    std::erase_if(wrapped_, [&](const auto& e) { return e.second.last_seen != epoch_; });
    return out;
  }

  // A loaded tree (no source to mirror) as Python objects: dicts, lists, tuples, scalars, and
  // tensors over the loaded storages, one framework storage per fastdcp Storage.
  // Nothing of a load is kept for the next call: the loaded memory goes when the caller drops the
  // tensors, not at the reader's next load.
  nb::object loaded_to_python(const Value& v) {
    ++epoch_;
    struct Forget {
      decltype(wrapped_)& wrapped;
      ~Forget() { wrapped.clear(); }  // on failure too: adopted device memory is not kept
    } forget{wrapped_};
    return build(nb::none(), v, /*mirror=*/false);
  }

  // For the next loaded_to_python: tensors over `s` are made over `framework_bytes`, a 1-D byte
  // tensor of the framework over the same memory (device memory it allocated for a load: Note
  // [Loading onto a device]), instead of a new wrapping of the memory.
  void adopt_storage(const Storage& s, nb::object framework_bytes) {
    WrappedStorage& wrapped = wrapped_[s.identity()];
    wrapped.storage = s;
    wrapped.typed_views.clear();
    wrapped.py_storage = std::move(framework_bytes);
  }

  const nb::object& adapter() const { return adapter_; }

  // After CheckpointReader::read_into on a tree that from_python made of `template_root`: puts the
  // non-tensor values the checkpoint replaced back into the Python containers (dicts and lists in
  // place, tuples rebuilt) and returns the root. Tensors were filled in place already.
  nb::object write_back(nb::handle template_root, const Value& loaded) {
    ++epoch_;
    nb::object out = write_back_node(template_root, loaded);
    wrapped_.clear();
    return out;
  }

  // Opaque leaves seen by the last from_python (objects no adapter rule covers).
  const std::vector<nb::object>& opaque_leaves() const { return opaque_; }

  // The key path of `target` (by identity) inside `root`, for error messages; "" if not found.
  static std::string path_of(nb::handle root, nb::handle target) {
    struct Frame {
      nb::handle node;
      std::string path;
    };
    std::vector<Frame> stack{{root, ""}};
    while (!stack.empty()) {
      Frame f = std::move(stack.back());
      stack.pop_back();
      if (f.node.is(target)) return f.path;
      if (PyDict_Check(f.node.ptr())) {
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(f.node.ptr(), &pos, &key, &value)) {
          std::string p = f.path;
          append_key_path(p, DictKey(nb::cast<std::string>(nb::str(key))));
          stack.push_back({value, std::move(p)});
        }
      } else if (PyList_Check(f.node.ptr()) || PyTuple_Check(f.node.ptr())) {
        const Py_ssize_t n = PySequence_Fast_GET_SIZE(f.node.ptr());
        for (Py_ssize_t i = 0; i < n; ++i) {
          std::string p = f.path;
          append_index_path(p, static_cast<size_t>(i));
          stack.push_back({PySequence_Fast_GET_ITEM(f.node.ptr(), i), std::move(p)});
        }
      }
    }
    return "";
  }

 private:
  static DictKey to_key(PyObject* key) {
    if (PyUnicode_Check(key)) {
      Py_ssize_t size = 0;
      const char* data = PyUnicode_AsUTF8AndSize(key, &size);
      if (!data) throw nb::python_error();
      return DictKey(std::string_view(data, static_cast<size_t>(size)));
    }
    if (PyLong_Check(key) && !PyBool_Check(key)) {
      const long long index = PyLong_AsLongLong(key);
      if (index == -1 && PyErr_Occurred()) throw nb::python_error();
      return DictKey(static_cast<int64_t>(index));
    }
    throw Error(ErrorCode::kInvalidArgument, "state dict keys must be str or int, got " +
                                                 std::string(Py_TYPE(key)->tp_name) + " key " +
                                                 nb::cast<std::string>(nb::repr(key)));
  }

  template <class Stack>
  void convert_leaf(nb::handle obj, Value& dst, Stack& stack) {
    PyObject* p = obj.ptr();
    if (p == Py_None) {
      dst = Value();
    } else if (PyBool_Check(p)) {
      dst = Value(p == Py_True);
    } else if (PyLong_CheckExact(p)) {
      int overflow = 0;
      const long long v = PyLong_AsLongLongAndOverflow(p, &overflow);
      if (overflow) {
        dst = opaque(obj);
      } else {
        dst = Value(static_cast<int64_t>(v));
      }
    } else if (PyFloat_CheckExact(p)) {
      dst = Value(PyFloat_AS_DOUBLE(p));
    } else if (PyUnicode_CheckExact(p)) {
      Py_ssize_t size = 0;
      const char* data = PyUnicode_AsUTF8AndSize(p, &size);
      if (!data) throw nb::python_error();
      dst = Value(std::string(data, static_cast<size_t>(size)));
    } else if (PyBytes_CheckExact(p)) {
      dst = Value(Bytes{std::string(PyBytes_AS_STRING(p), static_cast<size_t>(PyBytes_GET_SIZE(p)))});
    } else if (PyDict_Check(p)) {
      dst = Value::dict();
      stack.push_back({obj, &dst});
    } else if (PyList_CheckExact(p)) {
      dst = Value::list();
      stack.push_back({obj, &dst});
    } else if (PyTuple_Check(p)) {
      dst = Value::tuple();
      stack.push_back({obj, &dst});
    } else if (sharded_type_.is_valid() && PyObject_TypeCheck(p, reinterpret_cast<PyTypeObject*>(sharded_type_.ptr()))) {
      dst = Value(sharded_at(obj));  // before the tensor checks: a DTensor is a torch.Tensor
    } else if (python::NativeTensorDescription d; native_ops_ && describe_natively(p, d)) {
      Tensor t = make_source_tensor(d.storage_data, d.storage_nbytes, d.device_type, d.device_index,
                                    static_cast<DType>(d.dtype), Dims(std::span<const int64_t>(d.shape, static_cast<size_t>(d.ndim))),
                                    Dims(std::span<const int64_t>(d.strides, static_cast<size_t>(d.ndim))), d.storage_offset);
      if (d.trait_flags) t.set_traits(traits_from_flags(d.trait_flags, {}));
      dst = Value(std::move(t));
    } else if (tensor_type_.is_valid() && PyObject_TypeCheck(p, reinterpret_cast<PyTypeObject*>(tensor_type_.ptr()))) {
      dst = Value(tensor_at(obj, /*fast=*/true));
    } else if (nb::cast<bool>(is_tensor_(obj))) {
      dst = Value(tensor_at(obj, /*fast=*/false));
    } else if (nb::object state = object_state_(obj); !state.is_none()) {
      // An object staged through its attributes (a dataclass): tensors in it are staged too.
      dst = Value::dict();
      stack.push_back({state, &dst});
      keep_alive_.push_back(std::move(state));
    } else {
      dst = opaque(obj);
    }
  }

  // An opaque leaf travels through staging as a one-item tuple holding its index in opaque_;
  // build() recognises it because the source object at that position is not a tuple, and
  // deep-copies the source object instead.
  Value opaque(nb::handle obj) {
    Value v = Value::tuple();
    v.append(Value(static_cast<int64_t>(opaque_.size())));
    opaque_.push_back(nb::borrow(obj));
    return v;
  }

  static TensorTraits traits_from_flags(long long flags, std::string framework_dtype) {
    TensorTraits traits;
    traits.conj = flags & python::kTraitConj;
    traits.neg = flags & python::kTraitNeg;
    traits.requires_grad = flags & python::kTraitRequiresGrad;
    traits.parameter = flags & python::kTraitParameter;
    traits.quantized = flags & python::kTraitQuantized;
    traits.framework_dtype = std::move(framework_dtype);
    return traits;
  }
  static long long flags_of(const TensorTraits& traits) {
    return (traits.conj ? python::kTraitConj : 0) | (traits.neg ? python::kTraitNeg : 0) |
           (traits.requires_grad ? python::kTraitRequiresGrad : 0) | (traits.parameter ? python::kTraitParameter : 0) |
           (traits.quantized ? python::kTraitQuantized : 0);
  }

  bool describe_natively(PyObject* obj, python::NativeTensorDescription& d) const {
    const int described = native_ops_->describe(obj, &d);
    if (described < 0) throw nb::python_error();
    return described == 1;
  }

  // A framework tensor as a source tensor. One that cannot be used (a meta or sparse tensor, a
  // device fastdcp does not handle) is refused with its key path (that of `leaf`, the tree's
  // object it belongs to, when given) and the adapter's reason.
  Tensor tensor_at(nb::handle obj, bool fast, nb::handle leaf = nb::handle()) {
    try {
      if (fast) {
        try {
          return to_tensor_fast(obj);
        } catch (const std::exception&) {
          // The adapter's describe() says why.
        }
      }
      return to_tensor(obj);
    } catch (const std::exception& e) {
      refuse(leaf.is_valid() ? leaf : obj, "tensor", e);
    }
  }

  [[noreturn]] void refuse(nb::handle leaf, const char* what, const std::exception& e) const {
    const auto* python = dynamic_cast<const nb::python_error*>(&e);
    const std::string why = python ? nb::cast<std::string>(nb::str(python->value())) : e.what();
    throw Error(ErrorCode::kInvalidArgument,
                std::string("cannot checkpoint the ") + what + " at '" + path_of(root_, leaf) + "': " + why);
  }

  // A framework sharded tensor (DTensor) as this rank's boxes of it: views of its local tensor.
  ShardedTensor sharded_at(nb::handle obj) {
    nb::tuple d;
    ShardedTensor out;
    try {
      d = nb::cast<nb::tuple>(describe_sharded_(obj));
      out.global_shape = dims_from_tuple(d[0]);
      const auto dtype = dtype_from_name(nb::cast<std::string>(d[1]));
      if (!dtype) throw Error(ErrorCode::kInvalidArgument, "unsupported dtype " + nb::cast<std::string>(d[1]));
      out.dtype = *dtype;
      out.replica_index = nb::cast<int>(d[3]);
      out.replica_count = nb::cast<int>(d[4]);
    } catch (const std::exception& e) {
      refuse(obj, "DTensor", e);
    }
    for (nb::handle chunk : nb::cast<nb::list>(d[2])) {
      out.chunks.push_back(ShardChunk{dims_from_tuple(chunk[0]), tensor_at(chunk[1], /*fast=*/true, obj)});
    }
    try {
      out.validate("");
    } catch (const Error&) {
      out.validate(path_of(root_, obj));  // fails again, naming the key: finding it walks the tree
      throw;
    }
    return out;
  }

  // The torch path: attribute calls from C++ instead of a Python function per tensor.
  // Method calls without building bound-method objects: this runs once per tensor.
  static nb::object call_method(nb::handle obj, const nb::str& name) {
    PyObject* result = PyObject_CallMethodNoArgs(obj.ptr(), name.ptr());
    if (!result) throw nb::python_error();
    return nb::steal(result);
  }
  static long long as_integer(const nb::object& value) {
    const long long v = PyLong_AsLongLong(value.ptr());
    if (v == -1 && PyErr_Occurred()) throw nb::python_error();
    return v;
  }

  Tensor to_tensor_fast(nb::handle obj) {
    auto dtype_it = dtype_codes_.find(obj.attr(names_.dtype).ptr());
    if (dtype_it == dtype_codes_.end()) return to_tensor(obj);  // unusual dtype: the adapter knows
    const auto device = static_cast<int>(as_integer(call_method(obj, names_.get_device)));  // -1: CPU
    // -1 is also a meta tensor's, and other devices have indices too: the adapter handles (or
    // refuses) all but CPU and CUDA tensors.
    const int on_device = PyObject_IsTrue(obj.attr(device < 0 ? names_.is_cpu : names_.is_cuda).ptr());
    if (on_device < 0) throw nb::python_error();
    if (!on_device) return to_tensor(obj);
    nb::object storage = call_method(obj, names_.untyped_storage);
    const auto data = static_cast<uintptr_t>(as_integer(call_method(storage, names_.data_ptr)));
    const auto nbytes = static_cast<uint64_t>(as_integer(call_method(storage, names_.nbytes)));
    nb::object shape_t = obj.attr(names_.shape);
    nb::object strides_t = call_method(obj, names_.stride);
    const auto offset = static_cast<int64_t>(as_integer(call_method(obj, names_.storage_offset)));
    Tensor t = make_source_tensor(data, nbytes, device < 0 ? 0 : 1, std::max(device, 0), dtype_it->second,
                                  dims_from_tuple(shape_t), dims_from_tuple(strides_t), offset);
    const bool complex = dtype_it->second == DType::kC64 || dtype_it->second == DType::kC128;  // conj needs one
    const long long flags =
        (complex && call_method(obj, names_.is_conj).ptr() == Py_True ? python::kTraitConj : 0) |
        (call_method(obj, names_.is_neg).ptr() == Py_True ? python::kTraitNeg : 0) |
        (obj.attr(names_.requires_grad).ptr() == Py_True ? python::kTraitRequiresGrad : 0) |
        (Py_TYPE(obj.ptr()) != reinterpret_cast<PyTypeObject*>(tensor_type_.ptr()) &&
                 nb::cast<bool>(is_parameter_(obj))
             ? python::kTraitParameter
             : 0);
    if (flags) t.set_traits(traits_from_flags(flags, {}));
    return t;
  }

  static Dims dims_from_tuple(nb::handle tuple) {
    if (!PyTuple_Check(tuple.ptr())) throw Error(ErrorCode::kInvalidArgument, "tensor shape and strides must be tuples");
    const Py_ssize_t rank = PyTuple_GET_SIZE(tuple.ptr());
    Dims dims;
    dims.resize(static_cast<size_t>(rank));
    for (Py_ssize_t i = 0; i < rank; ++i) dims[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(tuple.ptr(), i));
    if (PyErr_Occurred()) throw nb::python_error();
    return dims;
  }

  Tensor make_source_tensor(uintptr_t data, uint64_t nbytes, int device_type, int device_index, DType dtype,
                            Dims shape, Dims strides, int64_t offset) {
    if (shape.size() != strides.size()) {
      throw Error(ErrorCode::kInvalidArgument, "tensor shape and strides must have one length");
    }
    const StorageKey key{device_type, device_index, data, nbytes};
    auto it = storages_.find(key);
    if (it == storages_.end()) {  // an entry only once wrapping succeeded
      const Device device = device_type == 0 ? Device::cpu() : Device::cuda(device_index);
      Storage storage = Storage::wrap(reinterpret_cast<void*>(data), nbytes, device);
      it = storages_.try_emplace(key).first;
      it->second.storage = std::move(storage);
    }
    it->second.last_seen = epoch_;
    return Tensor(it->second.storage, dtype, std::move(shape), std::move(strides), offset);
  }

  Tensor to_tensor(nb::handle obj) {
    nb::tuple d = nb::cast<nb::tuple>(describe_(obj));
    const auto data = nb::cast<uintptr_t>(d[0]);
    const auto nbytes = nb::cast<uint64_t>(d[1]);
    const auto dtype = dtype_from_name(nb::cast<std::string>(d[4]));
    if (!dtype) throw Error(ErrorCode::kInvalidArgument, "unsupported dtype " + nb::cast<std::string>(d[4]));
    Tensor t = make_source_tensor(data, nbytes, nb::cast<int>(d[2]), nb::cast<int>(d[3]), *dtype, dims_from_tuple(d[5]),
                                  dims_from_tuple(d[6]), nb::cast<int64_t>(d[7]));
    if (d.size() > 8) {
      const auto flags = nb::cast<long long>(d[8]);
      std::string framework_dtype = d.size() > 9 ? nb::cast<std::string>(d[9]) : std::string();
      if (flags || !framework_dtype.empty()) t.set_traits(traits_from_flags(flags, std::move(framework_dtype)));
    }
    return t;
  }

  // Python objects for a Value, without recursion: a checkpoint may nest containers as deep as
  // the format allows, and a staged tree is as deep as its source. With `mirror` (staging), `src`
  // is the source tree: containers get its types and attributes, tensors are views made like the
  // source tensors, and opaque leaves are copies of its objects. Without (loading), containers
  // are dicts, lists and tuples, and tensors are made from the loaded dtype and traits.
  nb::object build(nb::handle src_root, const Value& root, bool mirror) {
    struct Frame {
      nb::handle src;
      const Value* v;
      nb::object out;           // a dict, or a list (rebuilt as the tuple when complete)
      nb::object source_items;  // mirroring a dict: the source's entries (an object's attributes)
      PyObject* key = nullptr;  // the dict key of the child being built (borrowed)
      nb::object key_owner;     // that key, where made here
      size_t next = 0;
      Py_ssize_t pos = 0;
    };
    std::vector<Frame> stack;
    const auto is_container = [&](nb::handle src, const Value& v) {
      return v.kind() == Value::Kind::kList || v.kind() == Value::Kind::kDict ||
             (v.kind() == Value::Kind::kTuple && (!mirror || PyTuple_Check(src.ptr())));
    };
    const auto leaf = [&](nb::handle src, const Value& v) -> nb::object {
      if (v.is_tensor()) return mirror ? staged_tensor(src, v.as_tensor()) : loaded_tensor(v.as_tensor());
      if (v.is_sharded()) return staged_sharded(mirror ? src : nb::handle(), v.as_sharded());
      if (v.kind() == Value::Kind::kTuple) return copy_opaque(src);  // see opaque()
      return scalar(v);
    };
    const auto open = [&](nb::handle src, const Value& v) {
      Frame f{src, &v};
      f.out = v.kind() == Value::Kind::kDict ? nb::object(nb::dict()) : nb::object(nb::list());
      if (mirror && v.kind() == Value::Kind::kDict) {
        f.source_items = PyDict_Check(src.ptr()) ? nb::borrow(src) : object_state_(src);  // else staged through its attributes
      }
      stack.push_back(std::move(f));
    };
    const auto finish = [&](Frame& f) -> nb::object {
      if (f.v->kind() == Value::Kind::kList) return std::move(f.out);
      if (f.v->kind() == Value::Kind::kTuple) {
        if (mirror) return rebuild_container_(f.src, f.out);
        PyObject* tuple = PyList_AsTuple(f.out.ptr());
        if (!tuple) throw nb::python_error();
        return nb::steal(tuple);
      }
      if (!mirror || PyDict_CheckExact(f.src.ptr())) return std::move(f.out);
      if (!PyDict_Check(f.src.ptr())) return rebuild_object_(f.src, f.out);
      return rebuild_container_(f.src, f.out);
    };
    // Puts a finished child into the container on top of the stack.
    const auto attach = [&](const nb::object& child) {
      path_.pop_back();
      Frame& parent = stack.back();
      const int failed = parent.v->kind() == Value::Kind::kDict ? PyDict_SetItem(parent.out.ptr(), parent.key, child.ptr())
                                                                 : PyList_Append(parent.out.ptr(), child.ptr());
      if (failed != 0) throw nb::python_error();
    };
    if (!is_container(src_root, root)) return leaf(src_root, root);
    open(src_root, root);
    while (true) {
      Frame& f = stack.back();
      nb::handle child_src;
      const Value* child = nullptr;
      if (f.v->kind() != Value::Kind::kDict) {
        if (f.next < f.v->size()) {
          if (mirror) child_src = PySequence_Fast_ITEMS(f.src.ptr())[f.next];
          path_.push_back({nullptr, f.next});
          child = &f.v->items()[f.next++];
        }
      } else if (mirror) {
        PyObject *key, *value;
        if (PyDict_Next(f.source_items.ptr(), &f.pos, &key, &value)) {
          f.key = key;  // alive in f.source_items
          child_src = value;
          child = &f.v->entries()[f.next++].second;
        }
      } else if (f.next < f.v->size()) {
        const auto& [key, value] = f.v->entries()[f.next++];
        f.key_owner = key.is_int() ? nb::object(nb::int_(key.as_int()))
                                   : nb::object(nb::str(key.as_string().c_str(), key.as_string().size()));
        f.key = f.key_owner.ptr();
        child = &value;
      }
      if (child && f.v->kind() == Value::Kind::kDict) path_.push_back({f.key, 0});
      if (!child) {
        nb::object done = finish(f);
        stack.pop_back();
        if (stack.empty()) return done;
        attach(done);
      } else if (is_container(child_src, *child)) {
        open(child_src, *child);  // `f` is not used after this: the stack may have moved
      } else {
        attach(leaf(child_src, *child));
      }
    }
  }

  static nb::object scalar(const Value& v) {
    switch (v.kind()) {
      case Value::Kind::kBool: return nb::bool_(v.as_bool());
      case Value::Kind::kInt: return nb::int_(v.as_int());
      case Value::Kind::kDouble: return nb::float_(v.as_double());
      case Value::Kind::kString: return nb::str(v.as_string().c_str(), v.as_string().size());
      case Value::Kind::kBytes:
        return nb::steal(PyBytes_FromStringAndSize(v.as_bytes().data.data(), v.as_bytes().data.size()));
      default: return nb::none();
    }
  }

  // The key path of the value build() is at.
  std::string build_path() const {
    std::string path;
    for (const auto& step : path_) {
      if (step.key) {
        append_key_path(path, DictKey(nb::cast<std::string>(nb::str(step.key))));
      } else {
        append_index_path(path, step.index);
      }
    }
    return path;
  }

  // Opaque leaves are deep-copied by Python; a failure names the leaf's key path.
  nb::object copy_opaque(nb::handle src) {
    try {
      return deepcopy_(src);
    } catch (nb::python_error& e) {
      const std::string message = "cannot copy the state dict value at '" + build_path() + "' (a " +
                                  Py_TYPE(src.ptr())->tp_name + ")";
      nb::raise_from(e, e.type().ptr(), "%s", message.c_str());
    }
  }

  // The staged copy of a sharded tensor: one like the source over the staged copy of its local
  // tensor. Staging keeps each view's strides and offset in its staged buffer, so the staged local
  // tensor is the first chunk's view (which starts at the local origin) widened to the local shape.
  // A sharded tensor without its source (a tree received from another process) has no mesh to
  // rebuild it on.
  nb::object staged_sharded(nb::handle src, const ShardedTensor& s) {
    if (!src.is_valid() || !rebuild_sharded_.is_valid()) {
      throw Error(ErrorCode::kInvalidArgument, "the sharded tensor at '" + build_path() +
                                                   "' cannot be rebuilt without its device mesh: write it with "
                                                   "fastdcp's CheckpointWriter, or load it (as a full tensor)");
    }
    if (s.chunks.empty()) return rebuild_sharded_(src, nb::none());
    nb::object local_src = local_tensor_(src);
    const Tensor& first = s.chunks.front().data;
    const Tensor local(first.storage(), first.dtype(), dims_from_tuple(local_src.attr(names_.shape)), first.strides(),
                       first.storage_offset());
    return rebuild_sharded_(src, staged_tensor(local_src, local));
  }

  nb::object loaded_tensor(const Tensor& t) {
    WrappedStorage& wrapped = wrap_storage(t.storage());
    nb::object out;
    if (native_ops_) {
      PyObject* view = native_ops_->make_typed_view(wrapped.py_storage.ptr(), static_cast<int32_t>(t.dtype()),
                                                    static_cast<int32_t>(t.dim()), t.shape().data(),
                                                    t.strides().data(), t.storage_offset());
      if (!view) throw nb::python_error();
      out = nb::steal(view);
    } else {
      out = typed_view_(wrapped.py_storage, std::string(dtype_name(t.dtype())), dims_to_tuple(t.shape()),
                        dims_to_tuple(t.strides()), t.storage_offset());
    }
    const TensorTraits& traits = t.traits();
    if (traits.is_default()) return out;
    if (!apply_traits_.is_valid()) {
      // Without the framework's notion of them, autograd flags are dropped; values are not changed.
      if (!traits.conj && !traits.neg && traits.framework_dtype.empty()) return out;
      throw Error(ErrorCode::kInvalidArgument, "this framework cannot load a tensor saved as " + t.describe() +
                                                   ": load it with fastdcp.torch");
    }
    return apply_traits_(out, flags_of(traits), traits.framework_dtype);
  }

  static nb::tuple dims_to_tuple(const Dims& dims) {
    nb::tuple out = nb::steal<nb::tuple>(PyTuple_New(static_cast<Py_ssize_t>(dims.size())));
    for (size_t i = 0; i < dims.size(); ++i) PyTuple_SET_ITEM(out.ptr(), i, PyLong_FromLongLong(dims[i]));
    return out;
  }

  // See write_back(). Tensor leaves of the template were filled in place; every other leaf takes
  // the loaded value (a container or tensor, where the template had None).
  nb::object write_back_node(nb::handle py, const Value& v) {
    PyObject* p = py.ptr();
    if (v.is_tensor()) {
      if (is_tensor_(py).ptr() == Py_True) return nb::borrow(py);
      return loaded_tensor(v.as_tensor());
    }
    if (v.is_sharded()) return nb::borrow(py);  // the template's DTensor, filled in place
    if (PyDict_Check(p) && v.kind() == Value::Kind::kDict) {
      nb::list keys = nb::steal<nb::list>(PyDict_Keys(p));
      for (nb::handle key : keys) {
        const Value* child = v.find(to_key(key.ptr()));
        if (!child) continue;  // a missing key: left as it was
        PyObject* current = PyDict_GetItem(p, key.ptr());
        nb::object updated = write_back_node(current, *child);
        if (!updated.is(current) && PyDict_SetItem(p, key.ptr(), updated.ptr()) != 0) throw nb::python_error();
      }
      return nb::borrow(py);
    }
    if ((PyList_Check(p) || PyTuple_Check(p)) && (v.kind() == Value::Kind::kList || v.kind() == Value::Kind::kTuple)) {
      const Py_ssize_t n = PySequence_Fast_GET_SIZE(p);
      nb::list items;
      for (Py_ssize_t i = 0; i < n; ++i) {
        nb::handle item = PySequence_Fast_GET_ITEM(p, i);
        items.append(static_cast<size_t>(i) < v.size() ? write_back_node(item, v[static_cast<size_t>(i)]) : nb::borrow(item));
      }
      if (PyList_Check(p)) {
        if (PyList_SetSlice(p, 0, n, items.ptr()) != 0) throw nb::python_error();
        return nb::borrow(py);
      }
      return rebuild_container_(py, items);
    }
    return build(nb::none(), v, /*mirror=*/false);
  }

  // The framework storage of a fastdcp Storage: made once from a DLPack capsule of its bytes and
  // reused while the storage lives (staged buffers stay cached across stage calls).
  struct WrappedStorage;
  WrappedStorage& wrap_storage(const Storage& s) {
    auto [it, inserted] = wrapped_.try_emplace(s.identity());
    if ((inserted || it->second.storage != s) && native_ops_ && s.device().is_cpu()) {
      // The native way: torch holds a handle on the fastdcp Storage until it frees the memory.
      PyObject* bytes = native_ops_->wrap_memory(s.data(), s.nbytes(), new Storage(s),
                                                 [](void* handle) { delete static_cast<Storage*>(handle); });
      if (!bytes) throw nb::python_error();
      it->second.storage = s;
      it->second.typed_views.clear();
      it->second.py_storage = nb::steal(bytes);
    } else if (inserted || it->second.storage != s) {
      Tensor bytes = Tensor::contiguous(s, DType::kU8, {static_cast<int64_t>(s.nbytes())});
      DLManagedTensor* capsule = to_dlpack_legacy(bytes);
      // A consumer renames the capsule it took ownership of; only an unused one is ours to free.
      nb::object py_capsule = nb::steal(PyCapsule_New(capsule, "dltensor", [](PyObject* c) {
        if (!PyCapsule_IsValid(c, "dltensor")) return;
        auto* unused = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, "dltensor"));
        unused->deleter(unused);
      }));
      it->second.storage = s;
      it->second.typed_views.clear();
      it->second.py_storage = wrap_storage_(py_capsule, s.host_info().shared, s.host_info().pinned);
    }
    it->second.last_seen = epoch_;
    return it->second;
  }

  nb::object staged_tensor(nb::handle src, const Tensor& t) {
    nb::object out = tensor_to_python(src, t);
    const long long autograd = flags_of(t.traits()) & (python::kTraitParameter | python::kTraitRequiresGrad);
    if (!autograd_traits_ || autograd == 0) return out;
    return apply_traits_(out, autograd, "");
  }

  nb::object tensor_to_python(nb::handle src, const Tensor& t) {
    WrappedStorage& wrapped = wrap_storage(t.storage());
    if (python::NativeTensorDescription d; native_ops_ && describe_natively(src.ptr(), d)) {
      PyObject* view = native_ops_->make_view(wrapped.py_storage.ptr(), src.ptr(), static_cast<int32_t>(t.dim()),
                                              t.shape().data(), t.strides().data(), t.storage_offset());
      if (!view) throw nb::python_error();
      nb::object out = nb::steal(view);
      copy_tensor_attributes(src, out);
      return out;
    }
    nb::tuple shape = nb::steal<nb::tuple>(PyTuple_New(static_cast<Py_ssize_t>(t.dim())));
    nb::tuple strides = nb::steal<nb::tuple>(PyTuple_New(static_cast<Py_ssize_t>(t.dim())));
    for (size_t i = 0; i < t.dim(); ++i) {
      PyTuple_SET_ITEM(shape.ptr(), i, PyLong_FromLongLong(t.shape()[i]));
      PyTuple_SET_ITEM(strides.ptr(), i, PyLong_FromLongLong(t.strides()[i]));
    }
    if (as_strided_.is_valid() && !dtype_is_sub_byte(t.dtype()) &&
        t.storage().nbytes() % (dtype_bits(t.dtype()) / 8) == 0) {
      // One typed view of the whole buffer per dtype, then as_strided: a few µs per tensor.
      nb::object dtype = src.attr(names_.dtype);
      nb::object& typed = wrapped.typed_views[dtype.ptr()];
      if (!typed.is_valid()) typed = view_dtype_(wrapped.py_storage, dtype);
      nb::object offset = nb::steal(PyLong_FromLongLong(t.storage_offset()));
      PyObject* args[] = {typed.ptr(), shape.ptr(), strides.ptr(), offset.ptr()};
      PyObject* result = PyObject_Vectorcall(as_strided_.ptr(), args, 4, nullptr);
      if (!result) throw nb::python_error();
      nb::object out = nb::steal(result);
      finish_view(src, out);
      return out;
    }
    nb::object out = make_view_(wrapped.py_storage, src, shape, strides, t.storage_offset());
    finish_view(src, out);
    return out;
  }

  struct KnownStorage {
    Storage storage;
    uint64_t last_seen = 0;
  };
  struct WrappedStorage {
    Storage storage;
    nb::object py_storage;
    std::unordered_map<PyObject*, nb::object> typed_views;  // by dtype object (a singleton)
    uint64_t last_seen = 0;
  };

  // The Python path's last step: the adapter's finish_view (if any), then the attributes.
  void finish_view(nb::handle src, nb::handle out) {
    if (finish_view_.is_valid()) finish_view_(src, out);
    copy_tensor_attributes(src, out);
  }

  // Python attributes set on a source tensor are deep-copied onto the staged one, as upstream.
  void copy_tensor_attributes(nb::handle src, nb::handle out) {
    if (!copy_attributes_) return;
    PyObject** dict_ptr = _PyObject_GetDictPtr(src.ptr());
    if (!dict_ptr || !*dict_ptr || PyDict_Size(*dict_ptr) == 0) return;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(*dict_ptr, &pos, &key, &value)) {
      if (PyObject_SetAttr(out.ptr(), key, deepcopy_(nb::handle(value)).ptr()) != 0) throw nb::python_error();
    }
  }

  // Interned attribute names, looked up once.
  struct Names {
    nb::str dtype{"dtype"}, untyped_storage{"untyped_storage"}, data_ptr{"data_ptr"}, nbytes{"nbytes"},
        get_device{"get_device"}, shape{"shape"}, stride{"stride"}, storage_offset{"storage_offset"}, is_cpu{"is_cpu"},
        is_cuda{"is_cuda"}, is_conj{"is_conj"}, is_neg{"is_neg"}, requires_grad{"requires_grad"};
  } names_;
  nb::object tensor_type_, as_strided_, view_dtype_;
  const python::NativeTensorOps* native_ops_ = nullptr;
  nb::object finish_view_;
  nb::object typed_view_;  // typed_view(byte_storage, dtype_name, shape, strides, offset), for loading
  nb::object apply_traits_, is_parameter_;
  nb::object sharded_type_, describe_sharded_, local_tensor_, rebuild_sharded_;  // Note [Sharded tensors]
  bool autograd_traits_ = false;  // see to_python
  bool copy_attributes_ = false;
  nb::object native_ops_owner_;  // the capsule (and module) that native_ops_ points into
  std::unordered_map<PyObject*, DType> dtype_codes_;
  std::vector<nb::object> fast_dtypes_;  // keeps the dtype objects keyed above alive

  nb::object adapter_, is_tensor_, describe_, wrap_storage_, make_view_, deepcopy_, rebuild_container_, object_state_,
      rebuild_object_;
  std::vector<nb::object> keep_alive_;  // attribute dicts walked in this call
  struct PathStep {
    PyObject* key;  // a dict key, or nullptr for a sequence index
    size_t index;
  };
  std::vector<PathStep> path_;  // where build() is, for error messages
  uint64_t epoch_ = 0;
  std::unordered_map<StorageKey, KnownStorage, StorageKeyHash> storages_;
  std::unordered_map<const StorageImpl*, WrappedStorage> wrapped_;
  std::vector<nb::object> opaque_;  // this call's leaves to deep-copy in Python
  nb::handle root_;                 // the tree of the running from_python, for key paths in errors
};

}  // namespace fastdcp::python
