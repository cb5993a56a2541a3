"""Checkpoint writer and reader from Python: round trips against the source, safetensors
compatibility, partial loads, hooks and barrier order, and the errors for damaged or missing data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

import fastdcp
from fastdcp.torch import CheckpointReader, CheckpointWriter, CheckpointWriterConfig, RankInfo, WriterHook
from test_torch_staging import leaves, sample_state_dict, storage_groups

RANK = RankInfo(global_rank=0, global_world_size=1)

pytestmark = pytest.mark.usefixtures("tensor_path")


def save(path, state_dict, **config):
    CheckpointWriter(CheckpointWriterConfig(**config), RANK).write(str(path), state_dict)


def load(path, template=None, **kwargs):
    return CheckpointReader(RANK).read(str(path), template, **kwargs)


def savable(tree):
    """sample_state_dict without what the format does not hold (a dataclass)."""
    tree = dict(tree)
    tree.pop("config")
    return tree


def data_file(path):
    manifest = json.loads((path / "manifest.json").read_text())
    return path / manifest["ranks"][0]["file"]


def test_round_trip_keeps_values_views_and_aliasing(tmp_path):
    source = savable(sample_state_dict())
    save(tmp_path / "ck", source)
    for options in ({}, {"mmap": True}, {"direct_io": False}):
        loaded, missing = load(tmp_path / "ck", **options)
        assert missing == []
        mine, theirs = list(leaves(loaded)), list(leaves(source))
        assert [p for p, _ in mine] == [p for p, _ in theirs]
        for (path, a), (_, b) in zip(mine, theirs):
            if isinstance(b, torch.Tensor):
                assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), path
                assert a.storage_offset() == b.storage_offset() and torch.equal(a, b), path
            else:
                assert a == b and type(a) is type(b), path
        assert storage_groups(loaded) == storage_groups(source)
        # Containers come back as plain dicts, lists and tuples.
        assert type(loaded["model"]) is dict and type(loaded["pair"]) is tuple


@pytest.mark.parametrize("engine", ["threads", "auto", "io_uring"])
def test_every_io_engine_writes_the_same_file_and_reads_it(tmp_path, engine):
    source = {"w": torch.randn(3 << 20), "b": torch.arange(10)}  # 12 MiB: windows in flight
    save(tmp_path / "reference", source, io_engine="threads", direct_io=False)
    try:
        save(tmp_path / "ck", source, io_engine=engine)
    except RuntimeError as e:  # io_uring refused by this kernel or sandbox: said so, by name
        assert engine == "io_uring" and "io_uring is unavailable" in str(e)
        return
    assert data_file(tmp_path / "ck").read_bytes() == data_file(tmp_path / "reference").read_bytes()
    for direct_io in (True, False):
        loaded, _ = load(tmp_path / "ck", io_engine=engine, direct_io=direct_io)
        assert torch.equal(loaded["w"], source["w"]) and torch.equal(loaded["b"], source["b"])


def test_an_unknown_io_engine_is_named(tmp_path):
    with pytest.raises(ValueError, match="io_engine must be 'auto', 'threads' or 'io_uring', not 'aio'"):
        save(tmp_path / "ck", {"x": torch.ones(1)}, io_engine="aio")
    assert not (tmp_path / "ck").exists()


def test_loaded_memory_is_released_when_the_tensors_are_dropped(tmp_path):
    # A memory-mapped load shows in /proc/self/maps while its tensors live. The reader outlives
    # them here: it must not keep the mapping (or any loaded memory) for its next call.
    save(tmp_path / "ck", {"w": torch.arange(1 << 20, dtype=torch.float32), "v": [torch.ones(3)]})
    rank_file = str(data_file(tmp_path / "ck"))

    def mapped():
        with open("/proc/self/maps") as maps:
            return rank_file in maps.read()

    reader = CheckpointReader(RANK)
    loaded, _ = reader.read(str(tmp_path / "ck"), mmap=True)
    assert mapped() and loaded["w"][7] == 7
    del loaded
    assert not mapped()
    template = {"w": torch.zeros(1 << 20), "v": [torch.zeros(3)]}
    reader.read(str(tmp_path / "ck"), template)
    assert not mapped() and template["w"][7] == 7


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32,
                                   torch.uint32, torch.int64, torch.uint64, torch.float16, torch.bfloat16,
                                   torch.float32, torch.float64, torch.complex64, torch.complex128,
                                   torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
                                   torch.float8_e5m2fnuz, torch.float8_e8m0fnu])
def test_every_dtype_round_trips_bit_exactly(tmp_path, dtype):
    raw = torch.randint(0, 256, (6 * torch.empty(0, dtype=dtype).element_size(),), dtype=torch.uint8)
    tensor = raw.view(dtype).reshape(2, 3)
    save(tmp_path / "ck", {"t": tensor, "s": tensor[0, 1]})
    loaded, _ = load(tmp_path / "ck")
    assert loaded["t"].dtype == dtype
    assert torch.equal(loaded["t"].view(torch.uint8), tensor.view(torch.uint8))
    assert loaded["s"].dim() == 0


def test_files_open_with_the_safetensors_library(tmp_path):
    base = torch.randn(8, 8)
    source = {"model": {"w": torch.randn(4, 5), "b": torch.randn(5).bfloat16()}, "base": base, "view": base[2:]}
    save(tmp_path / "ck", source)
    path = str(data_file(tmp_path / "ck"))
    flat = safetensors.torch.load_file(path)
    assert torch.equal(flat["model.w"], source["model"]["w"]) and torch.equal(flat["model.b"], source["model"]["b"])
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.get_slice("model.w").get_shape() == [4, 5]
        assert "fastdcp.tree" in f.metadata()
    # The aliased storage is one raw entry, not a plain tensor.
    assert "base" not in flat and any(k.startswith("__fastdcp__.storage.") for k in flat)


def test_partial_load_fills_tensors_in_place_and_reports_missing_keys(tmp_path):
    source = {"model": {"w": torch.randn(6, 4), "b": torch.randn(4)}, "step": 7, "lr": 0.1}
    save(tmp_path / "ck", source)
    target_w = torch.zeros(4, 6).t()  # non-contiguous
    template = {"model": {"w": target_w, "extra": torch.zeros(1)}, "step": None}
    out, missing = load(tmp_path / "ck", template)
    assert out is template and out["model"]["w"] is target_w
    assert torch.equal(target_w, source["model"]["w"])
    assert out["step"] == 7 and missing == ["model.extra"]
    reader = CheckpointReader(RANK)
    reader.read(str(tmp_path / "ck"), {"model": {}})
    assert sorted(reader.last_unexpected_keys) == ["lr", "model.b", "model.w", "step"]


def test_strict_load_and_mismatches_change_nothing(tmp_path):
    save(tmp_path / "ck", {"w": torch.ones(3), "v": torch.ones(2)})
    target = torch.zeros(3)
    with pytest.raises(RuntimeError, match="nothing was changed.*v"):  # upstream's type for a strict load
        load(tmp_path / "ck", {"w": target}, strict=True)
    assert torch.equal(target, torch.zeros(3))
    with pytest.raises(ValueError, match="'w'.*F32\\[4\\]"):
        load(tmp_path / "ck", {"w": torch.zeros(4)})


class RecordingHook(WriterHook):
    def __init__(self, log):
        self.log = log

    def pre_commit(self, path, **kwargs):
        self.log.append(("pre", path, kwargs, os.path.exists(os.path.join(path, "manifest.json"))))

    def post_commit(self, path, **kwargs):
        self.log.append(("post", path, kwargs, os.path.exists(os.path.join(path, "manifest.json"))))


class RecordingBarrier:
    def __init__(self, log):
        self.log = log

    def execute_barrier(self):
        self.log.append(("barrier",))


def test_hooks_and_barrier_run_in_upstreams_order_with_the_commit_between(tmp_path):
    log = []
    path = str(tmp_path / "ck")
    writer = CheckpointWriter(CheckpointWriterConfig(), RANK, barrier=RecordingBarrier(log), commit_hook=RecordingHook(log))
    assert writer.write(path, {"x": torch.ones(1)}, tag="a") is None
    assert log == [("pre", path, {"tag": "a"}, False), ("barrier",), ("post", path, {"tag": "a"}, True)]


def test_overwriting_must_be_asked_for(tmp_path):
    save(tmp_path / "ck", {"step": 1})
    with pytest.raises(RuntimeError, match="overwrite"):
        save(tmp_path / "ck", {"step": 2})
    assert load(tmp_path / "ck")[0]["step"] == 1
    save(tmp_path / "ck", {"step": 2}, overwrite=True)
    assert load(tmp_path / "ck")[0]["step"] == 2


def test_damage_is_detected_and_named(tmp_path):
    save(tmp_path / "ck", {"model": {"w": torch.randn(1000)}})
    path = data_file(tmp_path / "ck")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="tensor 'model.w', chunk 0 of 1"):
        load(tmp_path / "ck")
    with pytest.raises(RuntimeError, match="model.w"):
        fastdcp.verify(tmp_path / "ck")
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(RuntimeError, match="has .* bytes; the manifest says"):
        load(tmp_path / "ck")


def test_missing_and_uncommitted_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="no committed checkpoint"):
        load(tmp_path / "empty")


def test_values_the_format_cannot_hold_are_named_by_key_path(tmp_path):
    with pytest.raises(ValueError, match=r"'optim.param_groups\[0\].fn' \(a function\)"):
        save(tmp_path / "ck", {"optim": {"param_groups": [{"fn": lambda: 0}]}})
    assert not (tmp_path / "ck" / "manifest.json").exists()


def test_numpy_trees_save_and_load_through_the_neutral_api(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    fastdcp.save(tmp_path / "ck", {"a": a, "t": a.T, "n": [1, "x"]})
    loaded = fastdcp.load(tmp_path / "ck")
    np.testing.assert_array_equal(loaded["t"], a.T)
    assert np.shares_memory(loaded["a"], loaded["t"]) and loaded["n"] == [1, "x"]
    target = np.zeros((3, 4), dtype=np.float32)
    out, missing, unexpected = fastdcp.load(tmp_path / "ck", {"a": target})
    np.testing.assert_array_equal(target, a)
    assert missing == [] and sorted(unexpected) == ["n", "t"]
    assert fastdcp.verify(tmp_path / "ck")["files"] == 1


def test_the_fastdcp_command_is_installed_with_the_package(tmp_path):
    import subprocess
    import sys

    save(tmp_path / "ck", {"model": {"w": torch.randn(3, 4)}})
    command = os.path.join(os.path.dirname(sys.executable), "fastdcp")
    inspected = subprocess.run([command, "inspect", str(tmp_path / "ck")], capture_output=True, text=True)
    assert inspected.returncode == 0 and "model.w" in inspected.stdout and "[3, 4]" in inspected.stdout
    path = data_file(tmp_path / "ck")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    verified = subprocess.run([command, "verify", str(tmp_path / "ck")], capture_output=True, text=True)
    assert verified.returncode == 1 and "model.w" in verified.stderr


# The fake CUDA runtime of the C++ tests (tests/fake_cuda), built with them; scripts/test.sh names it.
FAKE_CUDART = Path(os.environ.get("FASTDCP_FAKE_CUDART") or
                   Path(__file__).resolve().parents[2] / "build" / "tests" / "libfake_cudart.so")


def run_on_fake_devices(tmp_path, mode):
    """fake_device_main.py on a saved sample state dict, in a process whose fastdcp sees two fake GPUs."""
    assert FAKE_CUDART.is_file(), f"build the C++ tests first (cmake --build build): no {FAKE_CUDART}"
    source = savable(sample_state_dict())
    save(tmp_path / "ck", source)
    torch.save(source, tmp_path / "oracle.pt")
    env = {**os.environ, "FASTDCP_CUDART": str(FAKE_CUDART), "FAKE_CUDA_DEVICE_COUNT": "2"}
    env.pop("FASTDCP_DISABLE_CUDA", None)
    return subprocess.run([sys.executable, "fake_device_main.py", str(tmp_path / "ck"), str(tmp_path / "oracle.pt"), mode],
                          cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=300)


def test_map_location_copies_each_saved_storage_once_into_memory_the_framework_allocates(tmp_path):
    # Note [Loading onto a device]: values, views and ties as torch.load gives them, every storage
    # from torch's allocator on the device asked for, and nothing kept once the tensors go.
    done = run_on_fake_devices(tmp_path, "load")
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr


def test_a_failed_device_allocation_reaches_the_caller_as_raised_and_frees_the_rest(tmp_path):
    done = run_on_fake_devices(tmp_path, "fail")
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr


def test_map_location_that_names_no_one_cpu_or_cuda_device_is_refused_before_reading(tmp_path):
    save(tmp_path / "ck", {"w": torch.arange(4.0)})
    with pytest.raises(TypeError, match="map_location: fastdcp loads a checkpoint onto one device"):
        load(tmp_path / "ck", map_location={"cuda:0": "cpu"})
    with pytest.raises(TypeError, match="not a function"):
        load(tmp_path / "ck", map_location=lambda storage, location: storage)
    with pytest.raises(ValueError, match=r"map_location='meta'.*\.to\('meta'\)"):
        load(tmp_path / "ck", map_location="meta")
    # A device this process does not have: an invalid argument on a GPU machine, a failed
    # precondition without CUDA; both name it. Nothing is read: a missing checkpoint says the same.
    for path in (tmp_path / "ck", tmp_path / "absent"):
        with pytest.raises((fastdcp.errors.InvalidArgumentError, fastdcp.errors.FailedPreconditionError),
                           match=r"cannot load onto cuda:99 \(map_location"):
            load(path, map_location="cuda:99")
    loaded, _ = load(tmp_path / "ck", map_location=torch.device("cpu"))
    assert loaded["w"].device.type == "cpu" and torch.equal(loaded["w"], torch.arange(4.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is false)")
def test_map_location_cuda_loads_as_torch_load_does(tmp_path):
    source = savable(sample_state_dict())
    save(tmp_path / "ck", source)
    torch.save(source, tmp_path / "oracle.pt")
    oracle = torch.load(tmp_path / "oracle.pt", map_location="cuda:0", weights_only=False)
    before = torch.cuda.memory_allocated(0)
    loaded, _ = load(tmp_path / "ck", map_location="cuda")
    assert torch.cuda.memory_allocated(0) > before  # torch's caching allocator holds the memory
    mine, theirs = list(leaves(loaded)), list(leaves(oracle))
    assert [p for p, _ in mine] == [p for p, _ in theirs]
    for (key, a), (_, b) in zip(mine, theirs):
        if isinstance(b, torch.Tensor):
            assert a.device == b.device and a.dtype == b.dtype and a.stride() == b.stride(), key
            assert torch.equal(a, b), key
    assert storage_groups(loaded) == storage_groups(oracle)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is false)")
def test_a_synchronous_write_takes_gpu_tensors_as_torch_save_does(tmp_path):
    # Note [Device tensors in a synchronous write]: copied to the host in the write, ties kept.
    w = torch.randn(4, 4, device="cuda")
    source = {"w": w, "row": w[1], "host": torch.arange(3)}
    save(tmp_path / "ck", source)
    torch.save(source, tmp_path / "oracle.pt")
    oracle = torch.load(tmp_path / "oracle.pt", map_location="cpu")
    loaded, _ = load(tmp_path / "ck")
    for key in source:
        assert loaded[key].device.type == "cpu" and torch.equal(loaded[key], oracle[key]), key
    assert storage_groups(loaded) == storage_groups(oracle)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is false)")
def test_a_gpu_template_is_filled_in_place_by_the_native_reader(tmp_path):
    # Note [Loading into device tensors]: a strided view keeps the bytes between its elements,
    # views of one storage stay views of it, and a refused load changes nothing on the device.
    saved = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.arange(6.0) + 100, "h": torch.arange(4.0)}
    save(tmp_path / "ck", saved)
    storage = torch.full((20,), -1.0, device="cuda")
    template = {"w": storage[:12].view(3, 4), "b": storage[12:18], "h": torch.full((9,), -1.0, device="cuda")[::2][:4]}
    holder_of_h = template["h"]
    out, missing = load(tmp_path / "ck", template)
    assert missing == [] and out["w"] is template["w"] and out["h"] is holder_of_h
    assert torch.equal(storage[:18].cpu(), torch.cat([saved["w"].flatten(), saved["b"]]))
    assert torch.equal(storage[18:].cpu(), torch.full((2,), -1.0))
    assert torch.equal(holder_of_h._base[1::2].cpu(), torch.full((4,), -1.0))  # the gaps
    assert torch.equal(holder_of_h.cpu(), saved["h"])
    before = storage.clone()
    with pytest.raises(RuntimeError, match="strict"):
        load(tmp_path / "ck", {**template, "extra": torch.zeros(2, device="cuda")}, strict=True)
    assert torch.equal(storage, before)
