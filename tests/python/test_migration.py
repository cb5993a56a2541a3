"""Checkpoints that torch wrote, read by fastdcp (issue 15, item 6; fastdcp/torch/migrate.py):
DCP's (dcp.save) and the _experimental checkpointer's, through fastdcp.torch's load and
`fastdcp convert`, compared with torch's own loads (dcp.load, torch.load) byte for byte; and
hostile files, refused with errors that name the file."""

import io
import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._experimental.checkpoint_writer import CheckpointWriter as TorchWriter
from torch.distributed.checkpoint._experimental.checkpoint_writer import CheckpointWriterConfig as TorchWriterConfig
from torch.distributed.checkpoint._experimental.types import RankInfo as TorchRankInfo
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

import fastdcp
from fastdcp.torch import CheckpointReader, RankInfo, make_sync_checkpointer
from fastdcp.torch.convert import convert
from fastdcp.torch.migrate import UnsafeCheckpointError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128]


def same(a, b):
    """Equal values of equal types; tensors byte for byte, with dtype and shape."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(raw(a), raw(b)))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and (a == b or (a != a and b != b))


def raw(t):
    return torch.empty(t.shape, dtype=t.dtype).copy_(t.resolve_conj().resolve_neg()).reshape(-1).view(torch.uint8)


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (16 * max(1, torch.Size(shape).numel()),), generator=g, dtype=torch.uint8)
    width = torch.empty((), dtype=dtype).element_size()
    values = base[: (base.numel() // width) * width].view(dtype)
    if dtype == torch.bool:
        values = base % 2 == 1
    t = values[: torch.Size(shape).numel()].reshape(shape).clone()
    if t.dim() == 2 and draw(st.booleans()):
        t = t.t()  # non-contiguous
    elif t.dim() >= 1 and t.shape[0] > 1 and draw(st.booleans()):
        t = t[::2]  # a strided view of a larger storage
    return t


scalars = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=8), st.none(),
                    st.booleans())
keys = st.text(alphabet="abcxyz_", min_size=1, max_size=5)
values = st.recursive(
    st.one_of(tensors(), scalars),
    lambda children: st.one_of(st.dictionaries(keys, children, min_size=1, max_size=4),
                               st.lists(children, min_size=1, max_size=3)),
    max_leaves=12)
state_dicts = st.dictionaries(keys, values, min_size=1, max_size=5)


def dcp_whole(path):
    """DCP's own load without a template (what dcp_to_torch_save does)."""
    state = {}
    _load_state_dict(state, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state


def zeros_like_tree(tree):
    if isinstance(tree, torch.Tensor):
        return torch.zeros_like(tree)
    if isinstance(tree, dict):
        return {k: zeros_like_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [zeros_like_tree(v) for v in tree]
    return tree


def fresh_dir(tmp_path_factory, name):
    return str(tmp_path_factory.mktemp(name))


# ---- DCP, one rank ------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=state_dicts)
def test_dcp_save_loads_as_dcp_loads_it(tmp_path_factory, state):
    path = fresh_dir(tmp_path_factory, "dcp")
    dcp.save(state, checkpoint_id=path, no_dist=True)
    reader = CheckpointReader(RankInfo(0, 1))
    # Whole: the state dict DCP's own template-free load rebuilds.
    loaded, missing = reader.read(path)
    assert missing == []
    assert same(loaded, dcp_whole(path))
    # Into a template: filled as dcp.load fills the same template, tensors in place.
    oracle = zeros_like_tree(state)
    dcp.load(oracle, checkpoint_id=path, no_dist=True)
    template = zeros_like_tree(state)
    filled, missing = reader.read(path, template)
    assert same(filled, oracle)
    assert missing == []


def contiguous_tree(tree):
    if isinstance(tree, torch.Tensor):
        return tree.contiguous()
    if isinstance(tree, dict):
        return {k: contiguous_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [contiguous_tree(v) for v in tree]
    return tree


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=state_dicts.map(contiguous_tree))
def test_dcp_safetensors_serialization_loads_as_the_torch_save_one(tmp_path_factory, state):
    # FileSystemWriter(serialization_format=SAFETENSORS) appends one safetensors file per data file
    # (dcp.load itself cannot read it back in torch 2.13). Oracles: dcp.load of the same state saved
    # the default way, and safetensors' own reader of the appended file.
    from safetensors.torch import load as safetensors_load
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    if any(isinstance(t, torch.Tensor) and t.dtype == torch.complex128 for t in leaves(state)):
        return  # safetensors has no complex128
    plain, raw_path = fresh_dir(tmp_path_factory, "plain"), fresh_dir(tmp_path_factory, "st")
    dcp.save(state, checkpoint_id=plain, no_dist=True)
    dcp.save(state, storage_writer=FileSystemWriter(raw_path, serialization_format=SerializationFormat.SAFETENSORS),
             no_dist=True)
    loaded, _ = CheckpointReader(RankInfo(0, 1)).read(raw_path)
    assert same(loaded, dcp_whole(plain))
    md = FileSystemReader(raw_path).read_metadata()
    for index, info in md.storage_data.items():
        if index.offset is not None:  # a tensor: the safetensors file begins where its item points
            blob = Path(raw_path, info.relative_path).read_bytes()[info.offset:]
            path = md.planner_data[index.fqn]
            value = loaded
            for step in path:
                value = value[step]
            assert same(value, safetensors_load(blob)[index.fqn])


def leaves(tree):
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in leaves(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in leaves(v)]
    return [tree]


def test_large_dcp_items_load_on_threads_as_dcp_loads_them(tmp_path, monkeypatch):
    # Over 1 MiB per item on average: the items load on several threads, and errors still surface.
    from fastdcp.torch import migrate

    g = torch.Generator().manual_seed(3)
    state = {f"layer{i}": {"w": torch.randn(1_000_000 + i, generator=g).to(dtype), "n": i}
             for i, dtype in enumerate([torch.float32, torch.float64, torch.bfloat16, torch.float32] * 2)}
    path = str(tmp_path / "big")
    dcp.save(state, checkpoint_id=path, no_dist=True)
    threads = set()
    full_tensor = migrate._full_tensor

    def recording(*args):
        threads.add(threading.current_thread().name)
        return full_tensor(*args)

    monkeypatch.setattr(migrate, "_full_tensor", recording)
    loaded, _ = CheckpointReader(RankInfo(0, 1)).read(path)
    assert same(loaded, dcp_whole(path))
    assert all(name.startswith("fastdcp-migrate") for name in threads), threads
    (data_file,) = Path(path).glob("*.distcp")
    os.truncate(data_file, data_file.stat().st_size // 2)
    with pytest.raises(fastdcp.DataLossError, match=data_file.name):
        load_whole(path)


def test_dcp_template_semantics_strict_missing_unexpected_and_int_keys(tmp_path):
    state = {"model": {"w": torch.randn(3, 4), "b": torch.arange(4)},
             "optim": {"state": {0: {"exp_avg": torch.ones(3, 4)}, 1: {"exp_avg": torch.zeros(4)}},
                       "param_groups": [{"lr": 0.5, "params": [0, 1]}]},
             "step": 7}
    path = str(tmp_path / "dcp")
    dcp.save(state, checkpoint_id=path, no_dist=True)
    checkpointer = make_sync_checkpointer()
    # No template: the whole state dict, keys as DCP stores them (strings).
    whole = checkpointer.load(path)
    assert same(whole, dcp_whole(path))
    assert "0" in whole["optim"]["state"]
    # A template with an optimizer's int keys is filled as dcp.load fills it.
    template = zeros_like_tree(state)
    oracle = zeros_like_tree(state)
    dcp.load(oracle, checkpoint_id=path, no_dist=True)
    w = template["model"]["w"]
    out = checkpointer.load(path, state_dict=template, strict=True)
    assert same(out, oracle) and same(out, state)
    assert out["model"]["w"] is w
    # strict: missing and unexpected keys refused before anything changes, as for fastdcp checkpoints.
    partial = {"model": {"w": torch.zeros(3, 4), "extra": torch.zeros(1)}}
    with pytest.raises(RuntimeError, match="nothing was changed") as error:
        checkpointer.load(path, state_dict=partial, strict=True)
    assert "model.extra" in str(error.value) and "model.b" in str(error.value)
    assert torch.count_nonzero(partial["model"]["w"]) == 0
    reader = CheckpointReader(RankInfo(0, 1))
    filled, missing = reader.read(path, partial)
    assert missing == ["model.extra"]
    assert "model.b" in reader.last_unexpected_keys and "step" in reader.last_unexpected_keys
    assert torch.equal(filled["model"]["w"], state["model"]["w"])
    # A shape that differs is named.
    with pytest.raises(ValueError, match="'model.w'"):
        reader.read(path, {"model": {"w": torch.zeros(4, 3)}})
    # None takes what the checkpoint holds there, in memory of its own.
    taken, _ = reader.read(path, {"model": None})
    assert same(taken["model"], dcp_whole(path)["model"])
    checkpointer.close()


# ---- torch's _experimental checkpointer ---------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=state_dicts)
def test_experimental_checkpoint_loads_as_torch_load_does(tmp_path_factory, state):
    path = fresh_dir(tmp_path_factory, "exp")
    TorchWriter(TorchWriterConfig(), TorchRankInfo(0, 1)).write(path, state)
    oracle = torch.load(os.path.join(path, "checkpoint_0.pt"), weights_only=True)
    reader = CheckpointReader(RankInfo(0, 1))
    loaded, missing = reader.read(path)
    assert same(loaded, oracle) and missing == []
    template = zeros_like_tree(state)
    filled, missing = reader.read(path, template, strict=True)
    assert same(filled, oracle) and missing == []


@pytest.mark.parametrize("zipped", [True, False])
def test_experimental_template_loads_map_the_file_where_they_can(tmp_path, zipped):
    # A template load maps the file (torch.save's default format) and takes what it names; the
    # legacy format cannot be mapped and is read whole. A None takes a copy, not the mapping.
    state = {"w": torch.randn(5, 3), "z": torch.randn(4, dtype=torch.complex64), "n": 3}
    tmp_path.joinpath("exp").mkdir()
    torch.save(state, tmp_path / "exp" / "checkpoint_0.pt", _use_new_zipfile_serialization=zipped)
    reader = CheckpointReader(RankInfo(0, 1))
    template = {"w": torch.zeros(5, 3), "z": None}
    filled, missing = reader.read(str(tmp_path / "exp"), template)
    assert same(filled, {"w": state["w"], "z": state["z"]}) and missing == []
    assert reader.last_unexpected_keys == ["n"]
    assert same(reader.read(str(tmp_path / "exp"))[0], state)


def test_experimental_checkpoint_of_several_ranks_loads_each_ranks_own(tmp_path):
    path = str(tmp_path / "exp")
    saved = [{"rank": r, "t": torch.full((r + 1,), float(r))} for r in range(3)]
    for r in range(3):
        TorchWriter(TorchWriterConfig(), TorchRankInfo(r, 3)).write(path, saved[r])
    for r in range(3):
        loaded, _ = CheckpointReader(RankInfo(r, 3)).read(path)
        assert same(loaded, saved[r])
    # A rank without its file: named, with the world size that has them.
    with pytest.raises(FileNotFoundError, match=r"checkpoint_3\.pt.*ranks \[0, 1, 2\]"):
        CheckpointReader(RankInfo(3, 4)).read(path)


# ---- sharded DCP saves under torchrun --------------------------------------------------------------

@pytest.mark.parametrize("world", [3, 4])
def test_sharded_dcp_save_of_dtensors_loads_whole(tmp_path, world):
    script = Path(__file__).with_name("migrate_main.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(script),
         str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    reports = {r: json.loads((tmp_path / f"rank_{r}.json").read_text())
               for r in range(world) if (tmp_path / f"rank_{r}.json").exists()}
    details = f"exit {result.returncode}\n{json.dumps(reports, indent=1)}\n{result.stderr[-4000:]}"
    assert result.returncode == 0 and sorted(reports) == list(range(world)), details
    for report in reports.values():
        assert report == {"dcp_whole": True, "dcp_template": True, "dcp_in_place": True, "dcp_dtensors": True,
                          "experimental": True}, details
    # The sharded save converts to a one-rank fastdcp checkpoint of whole tensors: what DCP's own
    # template-free load gives (in its key order), and the full tensors the ranks shared.
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    assert convert(str(tmp_path / "dcp"), str(tmp_path / "converted"))["world_size"] == 1
    loaded, _ = CheckpointReader(RankInfo(0, 1)).read(str(tmp_path / "converted"))
    assert same(loaded, dcp_whole(str(tmp_path / "dcp")))
    assert loaded["model"].keys() == expected["model"].keys()
    assert all(same(loaded["model"][k], expected["model"][k]) for k in expected["model"])
    # The _experimental save converts rank by rank.
    assert convert(str(tmp_path / "exp"), str(tmp_path / "exp_converted"))["world_size"] == world
    for r in range(world):
        mine, _ = CheckpointReader(RankInfo(r, world)).read(str(tmp_path / "exp_converted"))
        assert same(mine, torch.load(tmp_path / "exp" / f"checkpoint_{r}.pt", weights_only=True))


# ---- convert --------------------------------------------------------------------------------------

def sample_state():
    return {"model": {"w": torch.randn(4, 5).to(torch.bfloat16), "z": torch.randn(3, dtype=torch.complex64)},
            "steps": [torch.tensor(1), 2, "three"], "lr": 0.25}


def fastdcp_command():
    command = Path(sys.executable).with_name("fastdcp")
    assert command.exists(), f"{command}: install fastdcp into this environment (pip install --no-build-isolation .)"
    return str(command)


def test_convert_command_writes_a_fastdcp_checkpoint(tmp_path):
    state = sample_state()
    src, dst = str(tmp_path / "dcp"), str(tmp_path / "out")
    dcp.save(state, checkpoint_id=src, no_dist=True)
    run = subprocess.run([fastdcp_command(), "convert", src, dst], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "DCP" in run.stdout and "1 rank" in run.stdout
    assert os.path.isfile(os.path.join(dst, "manifest.json"))
    assert fastdcp.verify(dst)["files"] == 1
    loaded, _ = CheckpointReader(RankInfo(0, 1)).read(dst)
    assert same(loaded, dcp_whole(src))
    # A second conversion to the same place must ask to replace it.
    run = subprocess.run([fastdcp_command(), "convert", src, dst], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "overwrite" in run.stderr
    run = subprocess.run([fastdcp_command(), "convert", src, dst, "--overwrite"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    # Python's module does the same; a missing source is status 1, naming it.
    run = subprocess.run([sys.executable, "-m", "fastdcp.torch.convert", str(tmp_path / "nothing"), dst],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "nothing" in run.stderr


def test_convert_of_a_fastdcp_checkpoint_copies_it(tmp_path):
    state = sample_state()
    checkpointer = make_sync_checkpointer()
    checkpointer.save(str(tmp_path / "a"), state)
    checkpointer.close()
    assert convert(str(tmp_path / "a"), str(tmp_path / "b"))["format"] == "fastdcp"
    assert same(CheckpointReader(RankInfo(0, 1)).read(str(tmp_path / "b"))[0], state)


# ---- hostile files --------------------------------------------------------------------------------

class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def dcp_dir(tmp_path):
    path = tmp_path / "dcp"
    dcp.save(sample_state(), checkpoint_id=str(path), no_dist=True)
    return path


def load_whole(path):
    return CheckpointReader(RankInfo(0, 1)).read(str(path))[0]


def test_a_metadata_pickle_that_would_run_a_command_is_refused(dcp_dir, tmp_path):
    marker = tmp_path / "ran"
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(_RunsACommand(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata.*(posix|os)\.system") as error:
        load_whole(dcp_dir)
    assert isinstance(error.value, fastdcp.DataLossError) and isinstance(error.value, pickle.UnpicklingError)
    assert not marker.exists()
    # torch's own functions are no exception: only its dtypes, torch.Size and the layout lookup.
    for module, name in (("torch", "load"), ("torch", "_dynamo"), ("builtins", "eval"), ("torch.serialization", "load")):
        (dcp_dir / ".metadata").write_bytes(b"\x80\x04\x8c" + bytes([len(module)]) + module.encode() + b"\x8c"
                                            + bytes([len(name)]) + name.encode() + b"\x93.")
        with pytest.raises(UnsafeCheckpointError, match=rf"{module}\.{name}"):
            load_whole(dcp_dir)
    # Hidden inside real metadata (as planner data) too.
    state = sample_state()
    dcp.save(state, checkpoint_id=str(tmp_path / "again"), no_dist=True)
    md = FileSystemReader(str(tmp_path / "again")).read_metadata()
    md.planner_data["lr"] = _RunsACommand(marker)
    (tmp_path / "again" / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_whole(tmp_path / "again")
    assert not marker.exists()


def test_a_value_that_would_run_a_command_is_refused(dcp_dir, tmp_path):
    marker = tmp_path / "ran"
    md = FileSystemReader(str(dcp_dir)).read_metadata()
    info = next(v for k, v in md.storage_data.items() if k.fqn == "lr")
    # Append a torch.save stream of the hostile object and point 'lr' at it.
    data_file = dcp_dir / info.relative_path
    blob = io.BytesIO()
    torch.save(_RunsACommand(marker), blob)
    info.offset, info.length = data_file.stat().st_size, len(blob.getvalue())
    with open(data_file, "ab") as f:
        f.write(blob.getvalue())
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(UnsafeCheckpointError, match=rf"{info.relative_path}.*'lr'.*weights_only"):
        load_whole(dcp_dir)
    assert not marker.exists()
    exp = tmp_path / "exp"
    exp.mkdir()
    torch.save({"x": _RunsACommand(marker)}, exp / "checkpoint_0.pt")
    with pytest.raises(UnsafeCheckpointError, match="checkpoint_0.pt"):
        load_whole(exp)
    assert not marker.exists()


def test_a_truncated_data_file_is_data_loss_naming_it(dcp_dir):
    (data_file,) = dcp_dir.glob("*.distcp")
    size = data_file.stat().st_size
    os.truncate(data_file, size - 100)
    with pytest.raises(fastdcp.DataLossError, match=rf"{data_file.name}.*outside the file"):
        load_whole(dcp_dir)


def test_a_damaged_item_is_data_loss_naming_the_file_and_key(dcp_dir):
    md = FileSystemReader(str(dcp_dir)).read_metadata()
    index, info = next((k, v) for k, v in md.storage_data.items() if k.fqn == "model.w")
    with open(dcp_dir / info.relative_path, "r+b") as f:  # the stream's zip header
        f.seek(info.offset)
        f.write(b"\0" * 64)
    with pytest.raises(fastdcp.DataLossError, match=rf"{info.relative_path}.*'model.w'"):
        load_whole(dcp_dir)


def test_a_broken_safetensors_header_is_data_loss_naming_the_file(tmp_path):
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    path = tmp_path / "st"
    dcp.save({"w": torch.ones(4)}, storage_writer=FileSystemWriter(str(path),
             serialization_format=SerializationFormat.SAFETENSORS), no_dist=True)
    info = next(v for k, v in FileSystemReader(str(path)).read_metadata().storage_data.items() if k.fqn == "w")
    with open(path / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write((10**9).to_bytes(8, "little"))
    with pytest.raises(fastdcp.DataLossError, match=rf"{info.relative_path}.*'w'.*safetensors header"):
        load_whole(path)


def test_metadata_byte_ranges_outside_the_file_are_data_loss(dcp_dir):
    md = FileSystemReader(str(dcp_dir)).read_metadata()
    info = next(v for k, v in md.storage_data.items() if k.fqn == "model.z")
    info.offset = 10**12
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(fastdcp.DataLossError, match=rf"{info.relative_path}.*'model.z'.*outside the file"):
        load_whole(dcp_dir)


def test_missing_files_are_not_found_naming_them(dcp_dir, tmp_path):
    (data_file,) = dcp_dir.glob("*.distcp")
    data_file.unlink()
    with pytest.raises(FileNotFoundError, match=data_file.name):
        load_whole(dcp_dir)
    exp = tmp_path / "exp"
    for r in (0, 2):
        TorchWriter(TorchWriterConfig(), TorchRankInfo(r, 3)).write(str(exp), {"r": r})
    with pytest.raises(FileNotFoundError, match=r"checkpoint_1\.pt"):
        CheckpointReader(RankInfo(1, 3)).read(str(exp))
    with pytest.raises(FileNotFoundError, match=r"ranks \[1\] are missing"):
        convert(str(exp), str(tmp_path / "out"))


def test_garbage_metadata_is_data_loss(dcp_dir):
    (dcp_dir / ".metadata").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(fastdcp.DataLossError, match=r"\.metadata"):
        load_whole(dcp_dir)
    (dcp_dir / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(fastdcp.DataLossError, match="not DCP metadata"):
        load_whole(dcp_dir)
