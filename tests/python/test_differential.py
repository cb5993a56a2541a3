"""Differential round trips with torch.save/torch.load as the oracle (issue 14).

Random state dicts of every torch dtype and tensor kind (0-dim, empty, non-contiguous, views
sharing a storage, lazily conjugated or negated, nn.Parameter, requires_grad, quantized) and
random templates (None, missing and extra keys, tensors of other dtypes and shapes) go through the
sync and the async checkpointer. What fastdcp loads must be what torch.load gives for the same
objects: type, dtype, shape, strides, storage offset, lazy bits, autograd flags, the storage's
bytes (NaN payloads included) and which tensors share a storage. Or the save or load refuses,
naming the key. The run is bounded for CI by the "differential" settings profile; the number of
cases run is printed (pytest -s) and checked."""

import io
import math
import os
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdcp.torch import CheckpointerConfig, CheckpointStagerConfig, DefaultStager, RankInfo, make_async_checkpointer
from fastdcp.torch import make_sync_checkpointer

RANK = RankInfo(global_rank=0, global_world_size=1)
settings.register_profile("differential", max_examples=120, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

NAMED = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64,
         torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
         torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
         torch.float8_e8m0fnu]
TORCH_ONLY = [torch.complex32, torch.float4_e2m1fn_x2, torch.bits8, torch.bits16, torch.bits1x8, torch.bits2x4,
              torch.bits4x2] + [getattr(torch, f"{k}{b}") for k in ("uint", "int") for b in range(1, 8)]
INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
COUNTS = {"cases": 0, "refused": 0, "torch_refused": 0, "cpp_cases": 0}
# The C++ leg's program (tests/checkpoint/support/cpp_api_round_trip_main.cpp), built with the C++
# tests; scripts/test.sh names it.
CPP_API_ROUND_TRIP = Path(os.environ.get("FASTDCP_CPP_API_ROUND_TRIP") or
                          Path(__file__).resolve().parents[2] / "build" / "tests" / "test_cpp_api_round_trip")


@pytest.fixture(scope="module")
def async_checkpointer():
    staging = CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False)
    checkpointer = make_async_checkpointer(CheckpointerConfig(staging_config=staging), RANK)
    yield checkpointer
    checkpointer.close()


@pytest.fixture(scope="module")
def sync_checkpointer():
    return make_sync_checkpointer(CheckpointerConfig(), RANK)


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    # torch cannot print tensors of some dtypes (uint1, ...); failing examples must still show.
    torch_repr = torch.Tensor.__repr__
    torch.Tensor.__repr__ = lambda t, **kwargs: (
        f"<{type(t).__name__} {t.dtype} {tuple(t.shape)} strides {t.stride()} offset {t.storage_offset()}"
        f"{' conj' if t.is_conj() else ''}{' neg' if t.is_neg() else ''}"
        f"{' grad' if t.requires_grad else ''} bytes {bytes(t.untyped_storage()).hex()}>")
    yield
    torch.Tensor.__repr__ = torch_repr
    # Shown in CI's quiet output too (a print is captured).
    line = (f"differential: {COUNTS['cases']} cases through the Python API and {COUNTS['cpp_cases']} through "
            f"the C++ API, {COUNTS['refused']} refused by key, "
            f"{COUNTS['torch_refused']} compared with the source (torch.save refused them)")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line(line)
    else:
        print(line)


# --- random state dicts ------------------------------------------------------------------------

@st.composite
def tensors(draw, bases):
    """One tensor leaf; views of an earlier drawn base share its storage."""
    if bases and draw(st.integers(0, 3)) == 0:
        base = draw(st.sampled_from(bases))
        flat = base.reshape(-1) if base.is_contiguous() else base
        if flat.dim() == 1 and flat.numel() >= 2:
            start = draw(st.integers(0, flat.numel() - 1))
            step = draw(st.integers(1, 3))
            return flat[start::step]
        return base
    kind = draw(st.sampled_from(["named", "named", "named", "torch_only", "quantized"]))
    shape = draw(st.sampled_from([(), (0,), (3,), (2, 3), (4, 1, 2), (3, 0)]))
    numel = math.prod(shape)
    if kind == "quantized":
        q = torch.quantize_per_tensor(torch.randn(shape), 0.5, 2, torch.quint8)
        return q
    dtype = draw(st.sampled_from(NAMED if kind == "named" else TORCH_ONLY))
    raw = draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize))
    t = torch.frombuffer(bytearray(raw) or bytearray(1), dtype=torch.uint8)[: len(raw)].clone()
    t = t.view(dtype).reshape(shape)
    layout = draw(st.sampled_from(["plain", "plain", "transposed", "conj", "neg", "param", "grad"]))
    if layout == "transposed" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif layout == "conj" and dtype in (torch.complex64, torch.complex128):
        t = t.conj()
        if draw(st.booleans()):
            t = t.imag  # conj().imag: a lazily negated float view
    elif layout == "neg" and dtype in (torch.float32, torch.float64):
        t = torch._neg_view(t)
    elif layout in ("param", "grad") and dtype.is_floating_point and dtype.itemsize > 1 and dtype in NAMED:
        requires_grad = draw(st.booleans()) if layout == "param" else True
        t = torch.nn.Parameter(t, requires_grad=requires_grad) if layout == "param" else t.requires_grad_(True)
    bases.append(t)
    return t


python_floats = st.floats(allow_nan=True, allow_infinity=True) | st.just(-0.0)
scalars = st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | python_floats | st.text(max_size=8) | \
    st.binary(max_size=8)


@st.composite
def state_dicts(draw):
    bases = []
    leaf = st.one_of(scalars, tensors(bases), tensors(bases))
    tree = st.recursive(leaf, lambda children: st.lists(children, max_size=3) |
                        st.lists(children, max_size=3).map(tuple) |
                        st.dictionaries(st.text("abcxyz", min_size=1, max_size=3), children, max_size=3),
                        max_leaves=8)
    return draw(st.dictionaries(st.text("abcdefgh", min_size=1, max_size=4), tree, min_size=1, max_size=5))


# --- comparison --------------------------------------------------------------------------------

def walk(tree, path=""):
    """(key path, leaf) in order, containers included as their type."""
    if isinstance(tree, dict):
        yield path, dict
        for k, v in tree.items():
            yield from walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(tree, (list, tuple)):
        yield path, type(tree)
        for i, v in enumerate(tree):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, tree


def resolved_bytes(t):
    """The element values as torch resolves them, row-major, as bytes."""
    t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if t.dtype == torch.complex128:
        t = torch.view_as_real(t)
    if t.element_size() in INT_OF_WIDTH and t.dtype not in (torch.complex128,):
        t = t.view(INT_OF_WIDTH[t.element_size()])
    # A fresh tensor: contiguous() keeps the stride of a size-1 dimension, which view() refuses.
    flat = torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1)
    return bytes(flat.view(torch.uint8).numpy()) if t.numel() else b""


def same_float(a, b):
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)  # the format keeps NaN, not its payload (reported)
    return struct.pack("<d", a) == struct.pack("<d", b)


def assert_like_torch_load(mine, theirs):
    mine_leaves, their_leaves = list(walk(mine)), list(walk(theirs))
    assert [p for p, _ in mine_leaves] == [p for p, _ in their_leaves]
    storages_mine, storages_theirs = {}, {}
    for (path, a), (_, b) in zip(mine_leaves, their_leaves):
        if isinstance(b, torch.Tensor):
            assert type(a) is type(b), path
            assert (a.dtype, a.shape, a.stride(), a.storage_offset()) == (b.dtype, b.shape, b.stride(),
                                                                            b.storage_offset()), path
            assert (a.is_conj(), a.is_neg(), a.requires_grad) == (b.is_conj(), b.is_neg(), b.requires_grad), path
            assert bytes(a.untyped_storage()) == bytes(b.untyped_storage()), path
            assert resolved_bytes(a) == resolved_bytes(b), path
            if b.untyped_storage().nbytes():
                storages_mine.setdefault(a.untyped_storage().data_ptr(), []).append(path)
                storages_theirs.setdefault(b.untyped_storage().data_ptr(), []).append(path)
        elif isinstance(b, float):
            assert type(a) is float and same_float(a, b), path
        else:
            assert type(a) is type(b) if not isinstance(b, type) else a is b, path
            if not isinstance(b, type):
                assert a == b, path
    assert sorted(storages_mine.values()) == sorted(storages_theirs.values())


def torch_round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def refusal_names_a_key(error, tree):
    return any(f"'{path}'" in str(error) for path, _ in walk(tree) if path)


def has_quantized(tree):
    return any(isinstance(v, torch.Tensor) and v.is_quantized for _, v in walk(tree))


# --- the tests ---------------------------------------------------------------------------------

@settings(settings.get_profile("differential"))
@given(source=state_dicts(), use_async=st.booleans())
def test_a_load_gives_what_torch_load_gives(tmp_path_factory, sync_checkpointer, async_checkpointer, source,
                                            use_async):
    COUNTS["cases"] += 1
    path = str(tmp_path_factory.mktemp("ck"))
    checkpointer = async_checkpointer if use_async else sync_checkpointer
    try:
        if use_async:
            checkpointer.save(path, source)[1].result()
        else:
            checkpointer.save(path, source)
    except ValueError as error:
        assert has_quantized(source), error
        assert "quantized" in str(error) and refusal_names_a_key(error, source), error
        COUNTS["refused"] += 1
        return
    assert not has_quantized(source)
    loaded = sync_checkpointer.load(path)
    assert_like_torch_load(loaded, oracle_of(source))


@settings(settings.get_profile("differential"), max_examples=60)
@given(source=state_dicts(), mode=st.sampled_from(["full", "mmap", "into"]))
def test_the_cpp_api_reads_and_writes_what_torch_load_gives(tmp_path_factory, sync_checkpointer, source, mode):
    if has_quantized(source):
        return  # refused at save, before C++ sees it (the test above checks the refusal)
    assert CPP_API_ROUND_TRIP.is_file(), (
        f"{CPP_API_ROUND_TRIP} is missing: build the C++ tests first (bash scripts/build.sh build) or name the "
        "program in FASTDCP_CPP_API_ROUND_TRIP")
    COUNTS["cpp_cases"] += 1
    saved, copied = tmp_path_factory.mktemp("saved"), tmp_path_factory.mktemp("copied") / "ck"
    sync_checkpointer.save(str(saved), source)
    result = subprocess.run([str(CPP_API_ROUND_TRIP), str(saved), str(copied), mode], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert_like_torch_load(sync_checkpointer.load(str(copied)), oracle_of(source))


def oracle_of(tree):
    """torch.load(torch.save(tree)), or the tree itself where torch cannot save it (uint1-7 and
    int1-7 tensors, a complex and a float view of one storage)."""
    try:
        return torch_round_trip(tree)
    except (RuntimeError, NotImplementedError, KeyError):
        COUNTS["torch_refused"] += 1
        return tree


@st.composite
def templates(draw, source):
    """A template for `source`'s top-level keys and what loading into it must do."""
    template = {}
    for key, value in source.items():
        choice = draw(st.sampled_from(["none", "same", "missing", "other"]))
        if choice == "none":
            template[key] = None
        elif choice == "same" and isinstance(value, torch.Tensor) and not value.is_quantized:
            template[key] = torch.zeros(value.numel() * value.element_size(), dtype=torch.uint8).view(
                value.dtype).reshape(value.shape)
            if value.is_conj():
                template[key] = template[key].conj()
            if value.is_neg():
                template[key] = torch._neg_view(template[key])
        elif choice == "other" and isinstance(value, torch.Tensor):
            template[key] = torch.zeros(value.numel() + 1, dtype=torch.float32 if value.dtype != torch.float32
                                        else torch.float64)
        elif choice != "missing":
            template[key] = None
    if draw(st.booleans()):
        template["__extra"] = torch.zeros(2)
    return template


@settings(settings.get_profile("differential"))
@given(data=st.data())
def test_a_load_into_a_template_fills_it_as_upstream_does(tmp_path_factory, sync_checkpointer, data):
    source = data.draw(state_dicts().filter(lambda t: not has_quantized(t)))
    template = data.draw(templates(source))
    COUNTS["cases"] += 1
    path = str(tmp_path_factory.mktemp("ck"))
    sync_checkpointer.save(path, source)
    oracle = oracle_of(source)
    kept = dict(template)
    mismatched = [k for k, v in template.items() if k in source and isinstance(v, torch.Tensor)
                  and (v.dtype, v.shape) != (source[k].dtype, source[k].shape)]
    try:
        out = sync_checkpointer.load(path, template)
    except ValueError as error:
        assert mismatched and any(f"'{k}'" in str(error) for k in mismatched), error
        COUNTS["refused"] += 1
        return
    assert not mismatched
    assert out is template
    for key, value in kept.items():
        if key not in source:
            assert out[key] is value  # an extra key is left as it was
        elif value is None:
            assert_like_torch_load({key: out[key]}, {key: oracle[key]})
        else:
            assert out[key] is value  # filled in place
            assert resolved_bytes(value) == resolved_bytes(source[key]), key
    assert set(out) == set(kept)


def nested_list(depth, leaf):
    root = node = []
    for _ in range(depth):
        node.append([])
        node = node[0]
    node.append(leaf)
    return root


def unnest(node, depth):
    for _ in range(depth):
        assert type(node) is list and len(node) == 1
        node = node[0]
    return node[0]


# The format's tree depth limit (kMaxTreeDepth): containers, the top-level dict included.
MAX_TREE_DEPTH = 10_000


def test_trees_as_deep_as_the_format_allows_round_trip_and_deeper_ones_are_refused(tmp_path, sync_checkpointer):
    # Once, not per tensor path: the conversion of containers is the same for both.
    depth = MAX_TREE_DEPTH - 2  # nested_list(depth) is depth + 1 lists, under the top-level dict
    root = nested_list(depth, torch.arange(3))
    sync_checkpointer.save(str(tmp_path / "ck"), {"deep": root})
    stager = DefaultStager(CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False,
                                                  use_async_staging=False))
    try:
        # Staging has no depth limit of its own, and turns trees into Python objects without recursion.
        very_deep = stager.stage({"deep": nested_list(79_000, torch.arange(3))})
        assert torch.equal(unnest(very_deep["deep"], 79_000), torch.arange(3))
        staged = stager.stage({"deep": root})
        loads = [sync_checkpointer.load(str(tmp_path / "ck")), sync_checkpointer.load(str(tmp_path / "ck"), {"deep": None})]
        for out in loads + [staged]:
            assert torch.equal(unnest(out["deep"], depth), torch.arange(3))
    finally:
        stager.close()
    # The original is the oracle: torch.save cannot pickle this depth.
    with pytest.raises(RecursionError):
        torch.save(root, io.BytesIO())
    # One level more is refused by name, and the committed checkpoint is left as it was.
    with pytest.raises(ValueError, match=f"more than {MAX_TREE_DEPTH} levels deep"):
        sync_checkpointer.save(str(tmp_path / "ck2"), {"deep": nested_list(depth + 1, torch.arange(3))})
    with pytest.raises(ValueError, match=f"more than {MAX_TREE_DEPTH} levels deep"):
        sync_checkpointer.save(str(tmp_path / "ck3"), {"deep": nested_list(79_000, torch.arange(3))})
