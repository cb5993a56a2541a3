"""fastdcp.torch's staging API against PyTorch's own experimental DefaultStager, value by value and
view by view, on the same inputs."""

import collections
import dataclasses
import subprocess
import sys
import textwrap
from concurrent.futures import Future

import pytest
import torch
import torch.distributed.checkpoint._experimental.staging as upstream

import fastdcp.torch as fdt
from fastdcp.torch import CheckpointStagerConfig, DefaultStager, RankInfo, wrap_future
from fastdcp.torch.staging import CheckpointStager
from fastdcp.torch.types import STATE_DICT
from fastdcp.torch.utils import wrap_future as wrap_future_from_module

# Every test runs on both tensor paths (see conftest.py).
pytestmark = pytest.mark.usefixtures("tensor_path")

CPU = dict(use_pinned_memory=False, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False)


def ours(**overrides):
    return DefaultStager(CheckpointStagerConfig(**{**CPU, **overrides}))


def theirs():
    return upstream.DefaultStager(upstream.CheckpointStagerConfig(**CPU))


@dataclasses.dataclass(frozen=True)
class Frozen:
    name: str
    scale: float


def sample_state_dict():
    base = torch.arange(100, dtype=torch.float32).reshape(10, 10)
    model = collections.OrderedDict()
    model["weight"] = base
    model["flat"] = base.view(100)
    model["inner"] = base[2:8, 2:8]
    model["left"] = base[:, :5]
    model["flat_mid"] = base.view(100)[10:60]
    model["transposed"] = base.t()
    model["bias"] = torch.randn(7, dtype=torch.bfloat16)
    model["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    model["empty"] = torch.empty(0, 4)
    model._metadata = {"": {"version": 2}}
    optim = {
        "state": {0: {"exp_avg": torch.randn(3, 3), "step": torch.tensor(5)}, 1: {"exp_avg": torch.randn(2)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "name": None}],
    }
    return {"model": model, "optim": optim, "step": 11, "tag": "run-1", "blob": b"\x00\x01",
            "config": Frozen("adam", 0.5), "pair": (torch.ones(2), "x")}


def leaves(tree, path=""):
    """(path, value) for every leaf, in order."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from leaves(v, f"{path}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from leaves(v, f"{path}[{i}]")
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        yield path, type(tree)
        yield from leaves(vars(tree), path)
    else:
        yield path, tree


def storage_groups(tree):
    """Which tensor leaves share a storage, as a partition of their paths."""
    groups = collections.defaultdict(list)
    for path, v in leaves(tree):
        if isinstance(v, torch.Tensor):
            groups[v.untyped_storage().data_ptr()].append(path)
    return sorted(sorted(g) for g in groups.values())


def assert_same_staging(mine, reference, source):
    assert type(mine) is type(reference)
    mine_leaves, ref_leaves = list(leaves(mine)), list(leaves(reference))
    assert [p for p, _ in mine_leaves] == [p for p, _ in ref_leaves]
    for (path, a), (_, b) in zip(mine_leaves, ref_leaves):
        assert type(a) is type(b), path
        if isinstance(a, torch.Tensor):
            assert a.device.type == "cpu", path
            assert a.dtype == b.dtype and a.shape == b.shape, path
            assert a.stride() == b.stride() and a.storage_offset() == b.storage_offset(), path
            assert torch.equal(a, b), path
        else:
            assert a == b, path
    assert storage_groups(mine) == storage_groups(reference)
    # Nothing staged aliases the source.
    source_ptrs = {v.untyped_storage().data_ptr() for _, v in leaves(source) if isinstance(v, torch.Tensor)}
    assert not source_ptrs & {v.untyped_storage().data_ptr() for _, v in mine_leaves if isinstance(v, torch.Tensor)}


def test_matches_torch_value_by_value_and_view_by_view():
    sd = sample_state_dict()
    with ours() as stager:
        mine = stager.stage(sd)
    assert_same_staging(mine, theirs().stage(sd), sd)
    assert mine["model"]._metadata == {"": {"version": 2}}
    assert mine["model"]._metadata is not sd["model"]._metadata  # deep-copied
    assert isinstance(mine["model"], collections.OrderedDict)
    assert list(mine["optim"]["state"].keys()) == [0, 1]
    assert mine["config"] == Frozen("adam", 0.5)


@dataclasses.dataclass(frozen=True)
class FrozenWithTensor:
    weight: torch.Tensor
    label: str


def test_tensors_inside_dataclasses_are_staged_like_torch():
    t = torch.randn(8)
    sd = {"holder": FrozenWithTensor(t, "w"), "same": t}
    with ours() as stager:
        first = stager.stage(sd)
        second = stager.stage(sd)
    reference = theirs().stage(sd)
    assert type(first["holder"]) is FrozenWithTensor and first["holder"].label == "w"
    assert torch.equal(first["holder"].weight, t)
    # Staged into the cached buffer and aliased with the other reference to the same tensor, as
    # torch's deepcopy-based stager does.
    assert first["holder"].weight.data_ptr() == second["holder"].weight.data_ptr() != t.data_ptr()
    assert first["holder"].weight.data_ptr() == first["same"].data_ptr()
    assert (reference["holder"].weight.data_ptr() == reference["same"].data_ptr())


@dataclasses.dataclass
class Nested:
    first: dict
    second: dict
    third: list


def test_dataclass_with_several_container_fields():
    sd = {"n": Nested({"a": torch.ones(2)}, {"b": torch.zeros(3), "c": {"d": torch.full((1,), 7.0)}},
                      [torch.arange(4), {"e": 1}])}
    with ours() as stager:
        mine = stager.stage(sd)
    assert_same_staging(mine, theirs().stage(sd), sd)
    assert mine["n"].second["c"]["d"].item() == 7.0


def test_six_views_of_one_base_are_one_staged_storage():
    sd = sample_state_dict()["model"]
    with ours() as stager:
        staged = stager.stage(sd)
    views = ["weight", "flat", "inner", "left", "flat_mid", "transposed"]
    assert len({staged[k].untyped_storage().data_ptr() for k in views}) == 1
    assert staged["weight"].untyped_storage().nbytes() == 400


def test_cache_reuses_buffers_and_shows_new_values():
    t = torch.randn(1000)
    sd = {"t": t}
    with ours() as stager:
        first = stager.stage(sd)
        t.add_(1)
        second = stager.stage(sd)
        assert first["t"].data_ptr() == second["t"].data_ptr()
        assert torch.equal(second["t"], t)
        assert torch.equal(first["t"], t)  # same buffer, as upstream
        assert stager.stats().cache_hits == 1


def test_stats_are_a_read_only_stager_stats_object():
    # fastdcp's extra (upstream's DefaultStager has no stats): a bound class, no longer a dict.
    from fastdcp import _C
    t = torch.randn(1000)
    with ours() as stager:
        stager.stage({"t": t, "u": t[:10]})
        stats = stager.stats()
        assert type(stats) is _C.StagerStats
        assert (stats.stage_calls, stats.cache_misses, stats.bytes_copied) == (1, 1, t.nbytes)
        assert stats.bytes_copied_after_release == 0 and stats.last_native_s >= 0
        with pytest.raises(AttributeError):
            stats.stage_calls = 5
        with pytest.raises(TypeError):
            stats["stage_calls"]


def test_staged_copy_is_independent_of_later_changes():
    t = torch.randn(64)
    with ours() as stager:
        staged = stager.stage({"t": t})
        expected = t.clone()
        t.zero_()
        assert torch.equal(staged["t"], expected)


@pytest.mark.parametrize("dtype", [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64,
    torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
    torch.complex32,
])
def test_every_dtype_round_trips_bit_exactly(dtype):
    raw = torch.randint(0, 255, (6, 4), dtype=torch.uint8)
    width = torch.empty(0, dtype=dtype).element_size()
    t = raw.view(-1)[: 24 // width * width].view(dtype) if width > 1 else raw.view(dtype)
    with ours() as stager:
        staged = stager.stage({"t": t})["t"]
    assert staged.dtype == dtype
    assert torch.equal(staged.view(torch.uint8), t.view(torch.uint8))


def test_nn_parameter_and_tensor_attributes_like_torch():
    p = torch.nn.Parameter(torch.randn(3))
    t = torch.randn(2)
    t.note = {"kind": "custom"}
    sd = {"p": p, "t": t}
    with ours() as stager:
        mine = stager.stage(sd)
    reference = theirs().stage(sd)
    assert type(mine["p"]) is type(reference["p"])
    assert torch.equal(mine["p"], p.detach())
    assert mine["t"].note == {"kind": "custom"} and mine["t"].note is not t.note


def test_view_whose_storage_is_not_a_whole_number_of_elements():
    # A float32 view of a 6-byte storage cannot come from a typed view of the whole buffer: the
    # staged tensor takes the other path and must still carry values and attributes.
    storage = torch.arange(6, dtype=torch.uint8).untyped_storage()
    t = torch.empty(0, dtype=torch.float32).set_(storage, 0, (1,), (1,))
    t.note = [1, 2]
    with ours() as stager:
        staged = stager.stage({"t": t})["t"]
    assert staged.dtype == torch.float32 and staged.untyped_storage().nbytes() == 6
    assert torch.equal(staged.view(torch.uint8), t.view(torch.uint8))
    assert staged.note == [1, 2] and staged.note is not t.note


def test_resized_storage_gets_a_new_buffer_where_torch_asserts():
    t = torch.randn(16)
    sd = {"t": t}
    with ours() as stager:
        stager.stage(sd)
        t.resize_(64).normal_()
        staged = stager.stage(sd)
    assert torch.equal(staged["t"], t)


def test_async_staging_returns_a_future_and_wrap_future_hides_the_value():
    sd = {"t": torch.randn(100)}
    with ours(use_async_staging=True) as stager:
        future = stager.stage(sd)
        assert isinstance(future, Future)
        staged = future.result()
        assert torch.equal(staged["t"], sd["t"])
        assert wrap_future(future).result() is None
    assert wrap_future({"not": "a future"}).result() is None


def test_wrap_future_propagates_errors():
    failed = Future()
    wrapped = wrap_future(failed)
    failed.set_exception(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        wrapped.result()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_default_config_without_accelerator_raises_assertion_error_saying_what_to_change():
    with pytest.raises(AssertionError, match="use_non_blocking_copy=False"):
        DefaultStager()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_pinned_memory_without_cuda_warns_like_torch():
    with pytest.warns(UserWarning, match="Ignoring pin_memory flag for checkpoint staging"):
        stager = ours(use_pinned_memory=True)
    staged = stager.stage({"t": torch.randn(100)})
    assert not staged["t"].is_pinned()
    stager.close()


def test_keyword_arguments_and_use_after_close_are_clear_errors():
    stager = ours()
    with pytest.raises(TypeError, match="unexpected keyword"):
        stager.stage({"t": torch.ones(1)}, path="/tmp/x")
    stager.close()
    stager.close()
    with pytest.raises(RuntimeError, match="after close"):
        stager.stage({"t": torch.ones(1)})


def test_bad_keys_are_named():
    with ours() as stager, pytest.raises(ValueError, match=r"str or int.*\(1, 2\)"):
        stager.stage({(1, 2): torch.ones(1)})


def test_many_small_tensors_and_deep_nesting():
    sd = {f"layer{i}": torch.full((4,), float(i)) for i in range(20000)}
    with ours() as stager:
        staged = stager.stage(sd)
        staged = stager.stage(sd)
    assert all(staged[f"layer{i}"][0].item() == i for i in range(0, 20000, 997))
    deep = cursor = {}
    for _ in range(500):
        cursor["next"] = {}
        cursor = cursor["next"]
    cursor["leaf"] = torch.ones(3)
    with ours() as stager:
        out = stager.stage(deep)
    for _ in range(500):
        out = out["next"]
    assert torch.equal(out["leaf"], torch.ones(3))


def test_names_and_modules_match_upstream():
    assert issubclass(DefaultStager, CheckpointStager)
    assert wrap_future_from_module is wrap_future
    assert RankInfo(global_rank=1, global_world_size=2) == RankInfo(1, 2)
    assert STATE_DICT == dict[str, object] or STATE_DICT is not None
    assert set(fdt.__all__) >= {"CheckpointStager", "CheckpointStagerConfig", "DefaultStager", "RankInfo",
                                "STATE_DICT", "wrap_future"}
    defaults = CheckpointStagerConfig()
    assert (defaults.use_pinned_memory, defaults.use_shared_memory, defaults.use_async_staging,
            defaults.use_non_blocking_copy) == (True, True, True, True)


class Uncopyable:
    def __deepcopy__(self, memo):
        raise TypeError("no copies of me")


def test_uncopyable_value_is_named_by_its_key_path():
    sd = {"optim": {"param_groups": [{"lr": 0.1, "hook": Uncopyable()}]}}
    with ours() as stager, pytest.raises(TypeError, match=r"optim\.param_groups\[0\]\.hook"):
        stager.stage(sd)


def test_conjugated_and_negated_views_stay_lazy_where_torch_drops_the_bits():
    z = torch.randn(4, dtype=torch.complex64)
    source = {"z": z, "conj": z.conj(), "neg": z.conj().imag}
    with ours() as stager:
        staged = stager.stage(source)
    for key, tensor in source.items():
        assert staged[key].is_conj() == tensor.is_conj() and staged[key].is_neg() == tensor.is_neg(), key
        assert torch.equal(staged[key], tensor), key
    # torch's own stager returns the unconjugated values: the defect this fixes.
    assert not torch.equal(theirs().stage(source)["conj"], z.conj())


def test_native_tensor_ops_are_used_only_with_the_torch_they_were_built_for(monkeypatch):
    from fastdcp import _torch_C
    from fastdcp.torch import _adapter

    assert _torch_C.torch_version == torch.__version__
    assert _adapter._native_ops() is not None
    monkeypatch.setattr(_torch_C, "torch_version", "0.0.0")
    assert _adapter._native_ops() is None


@pytest.mark.parametrize("path", ["sync", "async", "checkpointer"])
def test_device_copies_wait_for_the_callers_stream_not_the_staging_threads(monkeypatch, tmp_path, path):
    # torch keeps the current device and stream per thread: under torchrun a rank works on cuda:r,
    # perhaps on a side stream, while the staging thread's current stream is cuda:0's default one.
    # The streams the copies wait for must be read in the thread that calls stage() or save().
    import threading
    readers = []

    class Stream:
        device, cuda_stream = torch.device("cuda", 3), 0xCAFE

    def current_stream(device=None):
        readers.append(threading.get_ident())
        return Stream()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a host with an accelerator
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    config = CheckpointStagerConfig(use_async_staging=path != "sync", use_pinned_memory=False,
                                    use_non_blocking_copy=False)
    if path == "checkpointer":
        checkpointer = fdt.make_async_checkpointer(fdt.CheckpointerConfig(staging_config=config))
        try:
            checkpointer.save(str(tmp_path / "ck"), {"w": torch.zeros(4)})[1].result(timeout=120)
        finally:
            checkpointer.close()
    else:
        with DefaultStager(config) as stager:
            result = stager.stage({"w": torch.zeros(4)})
            assert torch.equal((result.result() if path == "async" else result)["w"], torch.zeros(4))
    assert readers == [threading.get_ident()]


def test_no_producer_streams_before_cuda_is_initialized(monkeypatch):
    # Reading the current stream would initialize CUDA in a process that has not used it.
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: pytest.fail("read the current stream"))
    with DefaultStager(CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False)) as stager:
        assert torch.equal(stager.stage({"w": torch.ones(4)}).result()["w"], torch.ones(4))


def test_stats_while_another_thread_stages_and_its_release_callback_runs():
    # stage() holds the stager's lock while its on_released callback takes the GIL; stats() from
    # another thread must wait for that lock without the GIL, or the two deadlock. In a child
    # process, so that a regression fails here instead of hanging the suite.
    script = textwrap.dedent("""
        import threading, time, torch
        from fastdcp import _C
        from fastdcp.torch._adapter import TorchAdapter
        options = _C.StagingOptions()
        options.use_pinned_memory = options.use_shared_memory = options.use_async_staging = False
        options.use_non_blocking_copy = False
        stager = _C.Stager(options, False, TorchAdapter())
        inside = threading.Event()
        def on_released():
            inside.set()
            time.sleep(0.5)  # lets the main thread call stats() while the stager's lock is held
        worker = threading.Thread(target=lambda: stager.stage({"w": torch.ones(1 << 20)}, on_released=on_released))
        worker.start()
        inside.wait()
        assert stager.stats().stage_calls >= 0
        worker.join()
        assert stager.stats().stage_calls == 1
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
