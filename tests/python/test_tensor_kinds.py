"""Tensor kinds a checkpoint must give back as torch.load does, or refuse by key path (issue 14):
templates with None, lazy conjugate/negative bits, dtypes fastdcp has no name for, quantized
tensors, nn.Parameter and requires_grad. (Deep trees: test_differential.py.)"""

import io
import json

import pytest
import safetensors.torch
import torch

from fastdcp.torch import (CheckpointerConfig, CheckpointReader, CheckpointStagerConfig, CheckpointWriter,
                           CheckpointWriterConfig, DefaultStager, RankInfo, make_async_checkpointer)

RANK = RankInfo(global_rank=0, global_world_size=1)
STAGING = CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False, use_async_staging=False)

pytestmark = pytest.mark.usefixtures("tensor_path")


def save(path, state_dict):
    CheckpointWriter(CheckpointWriterConfig(), RANK).write(str(path), state_dict)


def load(path, template=None):
    return CheckpointReader(RANK).read(str(path), template)[0]


def torch_round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def assert_same_tensor(mine, theirs, where=""):
    """Everything torch.load keeps: type, dtype, layout, lazy bits, autograd flag, and the bytes."""
    assert type(mine) is type(theirs), where
    assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, where
    assert mine.stride() == theirs.stride() and mine.storage_offset() == theirs.storage_offset(), where
    assert mine.is_conj() == theirs.is_conj() and mine.is_neg() == theirs.is_neg(), where
    assert mine.requires_grad == theirs.requires_grad, where
    assert bytes(mine.untyped_storage()) == bytes(theirs.untyped_storage()), where
    if mine.dtype.is_complex or mine.dtype.is_floating_point and mine.element_size() > 1:
        # The values as torch resolves them (conjugation and negation applied).
        assert torch.equal(mine.detach().resolve_conj().resolve_neg().contiguous().view(torch.uint8),
                           theirs.detach().resolve_conj().resolve_neg().contiguous().view(torch.uint8)), where


def test_none_in_a_template_takes_what_the_checkpoint_holds(tmp_path):
    linear = torch.nn.Linear(4, 2).state_dict()
    base = torch.randn(6, 6)
    save(tmp_path / "ck", {"model": linear, "step": 1, "views": [base, base[1:, ::2]], "t": torch.arange(3)})
    out = load(tmp_path / "ck", {"model": None, "step": None, "views": None, "t": None})
    assert torch.equal(out["model"]["bias"], linear["bias"]) and torch.equal(out["model"]["weight"], linear["weight"])
    assert out["step"] == 1 and torch.equal(out["t"], torch.arange(3))
    assert torch.equal(out["views"][1], base[1:, ::2])
    assert out["views"][1].untyped_storage().data_ptr() == out["views"][0].untyped_storage().data_ptr()
    # A None beside a tensor filled in place: the filled one keeps its memory, the None one is its own.
    target = torch.zeros(6, 6)
    out = load(tmp_path / "ck", {"views": [target, None]})
    assert out["views"][0] is target and torch.equal(target, base)
    assert torch.equal(out["views"][1], base[1:, ::2])
    assert out["views"][1].untyped_storage().data_ptr() != target.untyped_storage().data_ptr()


def test_lazy_conjugate_and_negative_bits_load_as_torch_load_gives(tmp_path):
    z = torch.randn(3, 4, dtype=torch.complex64)
    source = {"conj": z.conj(), "imag": z.conj().imag, "t": z.conj().t(), "plain": z}
    save(tmp_path / "ck", source)
    loaded = load(tmp_path / "ck")
    for key in source:
        # One key at a time: torch.save refuses a complex and a float view of one storage together.
        assert_same_tensor(loaded[key], torch_round_trip(source[key]), key)
        assert torch.equal(loaded[key].resolve_conj().resolve_neg(), source[key].resolve_conj().resolve_neg()), key
    assert loaded["imag"].untyped_storage().data_ptr() == loaded["plain"].untyped_storage().data_ptr()
    # A safetensors reader sees dtype and bytes only: no plain entry may read as other values.
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    flat = safetensors.torch.load_file(str(tmp_path / "ck" / manifest["ranks"][0]["file"]))
    assert not {"conj", "t"} & set(flat)
    # Into a template: a template of the same kind is filled, one whose bits differ is refused.
    target = torch.zeros(3, 4, dtype=torch.complex64).conj()
    load(tmp_path / "ck", {"conj": target})
    assert torch.equal(target.resolve_conj(), z.conj().resolve_conj())
    with pytest.raises(ValueError, match="'conj'"):
        load(tmp_path / "ck", {"conj": torch.zeros(3, 4, dtype=torch.complex64)})


TORCH_ONLY_DTYPES = [torch.complex32, torch.float4_e2m1fn_x2, torch.bits8, torch.bits16, torch.bits1x8,
                     torch.bits2x4, torch.bits4x2] + [getattr(torch, f"{kind}{bits}") for kind in ("uint", "int")
                                                      for bits in range(1, 8)]


@pytest.mark.parametrize("dtype", TORCH_ONLY_DTYPES, ids=str)
def test_dtypes_fastdcp_has_no_name_for_come_back_as_themselves(tmp_path, dtype):
    width = dtype.itemsize
    raw = torch.randint(0, 256, (12 * width,), dtype=torch.uint8)
    t = raw.view(dtype).reshape(3, 4)
    source = {"t": t, "col": t[:, 1]}
    save(tmp_path / "ck", source)
    for out in (load(tmp_path / "ck"), load(tmp_path / "ck", {"t": None, "col": None})):
        assert out["t"].dtype == dtype and out["col"].dtype == dtype
        assert out["col"].stride() == (4,) and out["col"].storage_offset() == 1
        assert bytes(out["t"].untyped_storage()) == bytes(t.untyped_storage())
    # A template of the dtype is filled in place.
    target = torch.zeros(3 * 4 * width, dtype=torch.uint8).view(dtype).reshape(3, 4)
    load(tmp_path / "ck", {"t": target})
    assert bytes(target.untyped_storage()) == bytes(t.untyped_storage())


@pytest.mark.parametrize("make", [
    lambda: torch.quantize_per_tensor(torch.randn(4), 0.1, 3, torch.quint8),
    lambda: torch.quantize_per_tensor(torch.randn(4), 0.1, 3, torch.qint8),
    lambda: torch.quantize_per_channel(torch.randn(2, 3), torch.tensor([0.1, 0.2]), torch.tensor([0, 1]), 0,
                                       torch.qint32),
], ids=["per_tensor_quint8", "per_tensor_qint8", "per_channel_qint32"])
def test_quantized_tensors_are_refused_naming_the_key(tmp_path, make):
    with pytest.raises(ValueError, match=r"'layer\.q'.*quantized"):
        save(tmp_path / "ck", {"layer": {"q": make()}})
    assert not (tmp_path / "ck" / "manifest.json").exists()


def parameters_and_grads():
    """A keep_vars state dict: a Parameter with and one without requires_grad, a plain tensor that
    requires grad, and a tied Parameter."""
    module = torch.nn.Linear(3, 2)
    module.bias.requires_grad_(False)
    source = dict(module.state_dict(keep_vars=True))
    source["grad"] = torch.randn(2, requires_grad=True)
    source["tied"] = source["weight"]
    return source


def test_parameters_and_requires_grad_load_as_torch_load_gives(tmp_path):
    source = parameters_and_grads()
    save(tmp_path / "ck", source)
    loaded = load(tmp_path / "ck")
    oracle = torch_round_trip(source)
    for key in source:
        assert_same_tensor(loaded[key], oracle[key], key)
    assert loaded["tied"].data_ptr() == loaded["weight"].data_ptr()
    # None in a template: the same.
    out = load(tmp_path / "ck", {"weight": None, "grad": None})
    assert_same_tensor(out["weight"], oracle["weight"])
    assert_same_tensor(out["grad"], oracle["grad"])


def test_the_async_checkpointer_keeps_parameters_and_requires_grad(tmp_path):
    source = parameters_and_grads()
    checkpointer = make_async_checkpointer(CheckpointerConfig(staging_config=STAGING), RANK)
    try:
        staging, write = checkpointer.save(str(tmp_path / "ck"), source)
        staging.result()
        write.result()
    finally:
        checkpointer.close()
    loaded = load(tmp_path / "ck")
    oracle = torch_round_trip(source)
    for key in source:
        assert_same_tensor(loaded[key], oracle[key], key)
    assert loaded["tied"].data_ptr() == loaded["weight"].data_ptr()
    # The caller's own staged copies stay as upstream's stager makes them: plain tensors.
    stager = DefaultStager(STAGING)
    try:
        staged = stager.stage(source)
        staged = staged.result() if hasattr(staged, "result") else staged
        assert type(staged["weight"]) is torch.Tensor and not staged["grad"].requires_grad
    finally:
        stager.close()


def test_the_async_checkpointer_keeps_lazy_bits_and_torch_only_dtypes(tmp_path):
    z = torch.randn(5, dtype=torch.complex64)
    source = {"conj": z.conj(), "neg": z.conj().imag, "half": torch.randn(4, dtype=torch.complex32)}
    checkpointer = make_async_checkpointer(CheckpointerConfig(staging_config=STAGING), RANK)
    try:
        checkpointer.save(str(tmp_path / "ck"), source)[1].result()
    finally:
        checkpointer.close()
    loaded = load(tmp_path / "ck")
    for key in source:
        assert_same_tensor(loaded[key], torch_round_trip(source[key]), key)


def test_the_numpy_api_loads_parameters_and_refuses_what_it_would_misread(tmp_path):
    import fastdcp
    weight = torch.nn.Parameter(torch.randn(2, 3))
    save(tmp_path / "p", {"w": weight})
    assert (fastdcp.load(tmp_path / "p")["w"] == weight.detach().numpy()).all()
    save(tmp_path / "z", {"zc": torch.randn(2, dtype=torch.complex64).conj()})
    with pytest.raises(ValueError, match="fastdcp.torch"):
        fastdcp.load(tmp_path / "z")
