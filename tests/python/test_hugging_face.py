"""Hugging Face model directories against their oracles: exports read back with
safetensors.torch.load_file and compared with torch's own casts; directories written by
safetensors.torch.save_file (sharded with an index written as transformers writes it) loaded by
fastdcp and compared with load_file; hostile directories refused with the file and key named."""

import json
import os

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import fastdcp
from fastdcp.torch import (CheckpointWriter, CheckpointWriterConfig, RankInfo, export_hugging_face,
                           load_hugging_face)

RANK = RankInfo(global_rank=0, global_world_size=1)
INDEX = "model.safetensors.index.json"


def save_checkpoint(path, state_dict):
    CheckpointWriter(CheckpointWriterConfig(), RANK).write(str(path), state_dict)
    return path


def model_state():
    torch.manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0, 65504.0, 70000.0, 1e-8, 3.0e38, float("inf"), -float("inf"), 1 + 2**-11])
    return {
        "model": {
            "embed": {"weight": torch.randn(50, 16)},
            "layers": [{"w": torch.randn(16, 16, dtype=torch.float64), "b": torch.randn(16).to(torch.bfloat16)}
                       for _ in range(3)],
            "special": special,
            "half": torch.randn(8).to(torch.float16),
            "position_ids": torch.arange(50),
            "mask": torch.rand(7) > 0.5,
            "transposed": torch.randn(8, 4).t(),
        },
        "optim": {"step": 3, "lr": 0.1, "m": torch.randn(4)},
        "epoch": 2,
    }


def flatten(tree, prefix=""):
    """fastdcp's key paths: dict keys joined by '.', list indices as [i]."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = tree
    return out


def load_directory(out):
    """The oracle: every safetensors file of the directory through safetensors.torch.load_file."""
    loaded = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".safetensors"):
            part = safetensors.torch.load_file(str(out / name))
            assert not set(part) & set(loaded)
            loaded.update(part)
    return loaded


def assert_same(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    # Bitwise: torch.equal would call NaN unequal, and -0.0 equal to 0.0.
    assert torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16, torch.float32])
def test_export_equals_the_checkpoint_cast_by_torch(tmp_path, dtype):
    state = model_state()
    ckpt = save_checkpoint(tmp_path / "ck", state)
    out = tmp_path / "hf"
    limit = 2000
    report = export_hugging_face(ckpt, out, max_shard_size=limit, dtype=dtype, prefix="model.")
    expected = {k: v for k, v in flatten(state).items() if k.startswith("model.")}
    if dtype is not None:
        expected = {k: v.to(dtype) if v.is_floating_point() else v for k, v in expected.items()}
    loaded = load_directory(out)
    assert sorted(loaded) == sorted(expected)
    for k in expected:
        assert_same(loaded[k], expected[k])
    # The index, as transformers reads it, and the size limit, as huggingface_hub splits.
    index = json.loads((out / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    assert report["total_size"] == index["metadata"]["total_size"]
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(report["files"]) and len(files) > 1
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for name in files:
        with safe_open(str(out / name), "pt") as f:
            keys = list(f.keys())
            assert f.metadata() == {"format": "pt"}
        assert all(index["weight_map"][k] == name for k in keys)
        alone_and_larger = len(keys) == 1 and expected[keys[0]].numel() * expected[keys[0]].element_size() > limit
        assert os.path.getsize(out / name) <= limit or alone_and_larger, name
    assert report["skipped"] == []  # the prefix leaves out the non-tensors


def test_export_one_file_names_skipped_values_and_strips_the_prefix(tmp_path):
    state = model_state()
    ckpt = save_checkpoint(tmp_path / "ck", state)
    report = export_hugging_face(ckpt, tmp_path / "all")
    assert report["files"] == ["model.safetensors"] and report["index_file"] == ""
    assert sorted(os.listdir(tmp_path / "all")) == ["model.safetensors"]
    assert sorted(k for k, _ in report["skipped"]) == ["epoch", "optim.lr", "optim.step"]
    report = export_hugging_face(ckpt, tmp_path / "stripped", prefix="model.", strip_prefix=True)
    loaded = safetensors.torch.load_file(str(tmp_path / "stripped" / "model.safetensors"))
    assert "embed.weight" in loaded and "layers[2].b" in loaded
    assert_same(loaded["embed.weight"], state["model"]["embed"]["weight"])


def test_export_refuses_an_existing_directory_and_never_writes_through_links(tmp_path):
    ckpt = save_checkpoint(tmp_path / "ck", model_state())
    out = tmp_path / "hf"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (out / "model.safetensors").symlink_to(victim)
    with pytest.raises(RuntimeError, match="is not empty"):
        export_hugging_face(ckpt, out)
    export_hugging_face(ckpt, out, overwrite=True)
    assert victim.read_text() == "precious"
    assert not (out / "model.safetensors").is_symlink()
    assert set(load_directory(out)) == {k for k, v in flatten(model_state()).items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match="max_shard_size"):
        export_hugging_face(ckpt, tmp_path / "other", max_shard_size="5XB")
    with pytest.raises(ValueError, match="int8"):
        export_hugging_face(ckpt, tmp_path / "other", dtype=torch.int8)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def random_tensor(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    return torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=g).to(dtype)


def write_hf_directory(path, tensors, files):
    """What transformers' save_pretrained writes: save_file per shard and, for several, the index."""
    path.mkdir()
    names = list(tensors)
    if files == 1:
        safetensors.torch.save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(files):
        shard_name = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::files]}
        safetensors.torch.save_file(part, str(path / shard_name), metadata={"format": "pt"})
        weight_map.update({k: shard_name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


tensor_specs = st.lists(
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 6), min_size=0, max_size=3)),
    min_size=1, max_size=8)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=tensor_specs, files=st.integers(1, 3), seed=st.integers(0, 1000))
def test_import_equals_load_file(tmp_path_factory, specs, files, seed):
    path = tmp_path_factory.mktemp("hf") / "model"
    tensors = {f"model.layers.{i}.w": random_tensor(dtype, shape, seed + i) for i, (dtype, shape) in enumerate(specs)}
    files = min(files, len(tensors))
    write_hf_directory(path, tensors, files)
    oracle = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            oracle.update(safetensors.torch.load_file(str(path / name)))
    flat = load_hugging_face(path)
    assert sorted(flat) == sorted(oracle)
    for k in oracle:
        assert_same(flat[k], oracle[k])
    # Into a template, in place, names mapped by the prefix options.
    template = {k.removeprefix("model."): torch.zeros_like(v) for k, v in oracle.items()}
    result = load_hugging_face(path, template, strip_prefix="model.")
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k in oracle:
        assert_same(template[k.removeprefix("model.")], oracle[k])


def test_import_into_a_module_casts_only_when_asked(tmp_path):
    torch.manual_seed(1)
    source = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    bf16 = {f"model.{k}": v.to(torch.bfloat16) for k, v in source.state_dict().items()}
    path = tmp_path / "model"
    write_hf_directory(path, bf16, 2)
    target = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"cannot load '0.weight'.*BF16.*cast"):
        load_hugging_face(path, target.state_dict(), strip_prefix="model.")
    result = load_hugging_face(path, target.state_dict(), strip_prefix="model.", cast=True)
    assert result == ([], [])
    oracle = load_directory(path)
    for k, v in target.state_dict().items():
        assert_same(v, oracle[f"model.{k}"].to(torch.float32))
    # A non-contiguous target and one that is a view of a larger buffer.
    weight = torch.zeros(8, 16).t()
    load_hugging_face(path, {"0.weight": weight}, strip_prefix="model.", cast=True, strict=False)
    assert_same(weight.contiguous(), oracle["model.0.weight"].to(torch.float32))
    flat = load_hugging_face(path, dtype=torch.float64)
    assert_same(flat["model.2.bias"], oracle["model.2.bias"].to(torch.float64))


def test_import_strict_names_missing_and_unexpected_keys_and_changes_nothing(tmp_path):
    path = tmp_path / "model"
    write_hf_directory(path, {"a": torch.ones(3), "b": torch.ones(2)}, 1)
    template = {"a": torch.zeros(3), "c": torch.zeros(1)}
    with pytest.raises(RuntimeError, match=r"Missing from the files: c\..*Not in the target: b"):
        load_hugging_face(path, template)
    assert torch.equal(template["a"], torch.zeros(3))
    result = load_hugging_face(path, template, strict=False)
    assert result.missing_keys == ["c"] and result.unexpected_keys == ["b"]
    assert torch.equal(template["a"], torch.ones(3))
    with pytest.raises(ValueError, match=r"cannot load 'a'.*shape is \[4\], the file's \[3\]"):
        load_hugging_face(path, {"a": torch.zeros(4)}, strict=False)


def test_hostile_directories_name_the_file_and_the_key(tmp_path):
    path = tmp_path / "model"
    write_hf_directory(path, {"a": torch.ones(300), "b": torch.ones(200), "c": torch.ones(100)}, 2)
    index = json.loads((path / INDEX).read_text())

    def with_weight_map(weight_map):
        (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    with_weight_map({"a": "model-00003-of-00003.safetensors"})
    with pytest.raises(FileNotFoundError, match=r"maps 'a' to 'model-00003-of-00003.safetensors', which does not"):
        load_hugging_face(path)
    with_weight_map({"zzz": "model-00001-of-00002.safetensors"})
    with pytest.raises(fastdcp.DataLossError, match=r"maps 'zzz' to 'model-00001-of-00002.safetensors', which holds no"):
        load_hugging_face(path)
    with_weight_map({"a": "/etc/passwd"})
    with pytest.raises(fastdcp.DataLossError, match="not a file name in the model directory"):
        load_hugging_face(path)
    (path / INDEX).write_text("{not json")
    with pytest.raises(fastdcp.DataLossError, match="is not a Hugging Face index"):
        load_hugging_face(path)
    (path / INDEX).write_text(json.dumps(index))
    shard = path / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-5])
    with pytest.raises(fastdcp.DataLossError, match=r"model-00001-of-00002.safetensors.*truncated"):
        load_hugging_face(path)
    shard.write_bytes(data[:8] + b"{" * (len(data) - 8))
    with pytest.raises(fastdcp.DataLossError, match="model-00001-of-00002.safetensors"):
        load_hugging_face(path)
    shard.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(fastdcp.DataLossError, match="model-00001-of-00002.safetensors"):
        load_hugging_face(path)
    (path / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_hugging_face(path)


def test_a_fastdcp_checkpoint_round_trips_through_a_model_directory(tmp_path):
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 8))
    ckpt = save_checkpoint(tmp_path / "ck", {"model": model.state_dict(), "step": 5})
    export_hugging_face(ckpt, tmp_path / "hf", prefix="model.", strip_prefix=True, max_shard_size="500B")
    fresh = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 8))
    assert load_hugging_face(tmp_path / "hf", fresh.state_dict()) == ([], [])
    for k, v in model.state_dict().items():
        assert_same(fresh.state_dict()[k], v)


class TiedLM(torch.nn.Module):
    """An embedding and an LM head that is the same Parameter, as transformers' tie_word_embeddings."""

    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(12, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.lm_head = torch.nn.Linear(6, 12, bias=False)
        self.lm_head.weight = self.wte.weight


def test_tied_weights_export_once_and_load_as_safetensors_load_model_does(tmp_path):
    torch.manual_seed(3)
    model = TiedLM()
    ckpt = save_checkpoint(tmp_path / "ck", model.state_dict())
    report = export_hugging_face(ckpt, tmp_path / "hf")
    assert [key for key, _ in report["skipped"]] == ["lm_head.weight"]
    assert "tied" in report["skipped"][0][1]
    # The oracle: safetensors drops the alias as well (save_file refuses shared tensors), and its
    # load_model accepts the file into a tied model, strictly, with the same values.
    exported = safetensors.torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(exported) == ["norm.bias", "norm.weight", "wte.weight"]
    fresh = TiedLM()
    safetensors.torch.load_model(fresh, str(tmp_path / "hf" / "model.safetensors"), strict=True)
    for k, v in model.state_dict().items():
        assert_same(fresh.state_dict()[k], v)
    # fastdcp's import fills a tied template from either name: ours (the first in the state dict's
    # order, as save_pretrained keeps the embedding), or the one save_model keeps (the first sorted).
    safetensors.torch.save_model(model, str(tmp_path / "save_model.safetensors"))
    assert "lm_head.weight" in safetensors.torch.load_file(str(tmp_path / "save_model.safetensors"))
    for path in (tmp_path / "hf", tmp_path / "save_model.safetensors"):
        fresh = TiedLM()
        assert load_hugging_face(path, fresh.state_dict()) == ([], [])
        assert fresh.lm_head.weight is fresh.wte.weight
        for k, v in model.state_dict().items():
            assert_same(fresh.state_dict()[k], v)
