"""Checkpoints that torch wrote, read by fastdcp (issue 15, item 6; fastdcp/torch/migrate.py):
DCP's (dcp.save) and the _experimental checkpointer's, through fastdcp.torch's load and
`fastdcp convert`, compared with torch's own loads (dcp.load, torch.load) byte for byte; and
hostile files, refused with errors that name the file."""

import contextlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, assume, given, settings
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

# (DCP's rank-local saves take rank 0's metadata file for an earlier checkpoint.)
pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              pytest.mark.filterwarnings("ignore:Detected an existing checkpoint")]

# Every dtype DCP saves (its torch.save streams take them all).
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128, torch.uint16, torch.uint32,
          torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2]


def same(a, b):
    """Equal values of equal types; tensors byte for byte, with dtype and shape."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(raw(a), raw(b)))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, io.BytesIO):
        return type(b) is io.BytesIO and a.getvalue() == b.getvalue()
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
keys = st.text(alphabet="abcxyz_./", min_size=1, max_size=5)  # DCP joins key paths with dots


def state_dicts_of(leaves):
    values = st.recursive(
        st.one_of(tensors(), leaves),
        lambda children: st.one_of(st.dictionaries(keys, children, min_size=1, max_size=4),
                                   st.lists(children, min_size=1, max_size=3)),
        max_leaves=12)
    return st.dictionaries(keys, values, min_size=1, max_size=5)


state_dicts = state_dicts_of(scalars)
# DCP also saves bytes and io.BytesIO (torch.load(weights_only=True) takes neither b"" nor io.BytesIO).
dcp_state_dicts = state_dicts_of(st.one_of(scalars, st.binary(max_size=8), st.binary(max_size=8).map(io.BytesIO)))


def flat_keys(tree, prefix=""):
    """The keys DCP flattens a state dict to (dcp.save's flatten_state_dict)."""
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in flat_keys(v, f"{prefix}{key}.")]
    if isinstance(tree, list):
        return [k for i, v in enumerate(tree) for k in flat_keys(v, f"{prefix}{i}.")]
    return [prefix[:-1]]


def dcp_whole(path):
    """DCP's own load without a template (what dcp_to_torch_save does)."""
    state = {}
    _load_state_dict(state, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state


def zeros_like_tree(tree):
    if isinstance(tree, torch.Tensor):
        return torch.zeros_like(tree)
    if isinstance(tree, io.BytesIO):
        return io.BytesIO(b"template")
    if isinstance(tree, dict):
        return {k: zeros_like_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [zeros_like_tree(v) for v in tree]
    return tree


def fresh_dir(tmp_path_factory, name):
    return str(tmp_path_factory.mktemp(name))


# ---- DCP, one rank ------------------------------------------------------------------------------

writer_options = st.fixed_dictionaries({
    "single_file_per_rank": st.booleans(),  # False: a file per tensor and value
    "thread_count": st.integers(1, 3),  # several files per rank
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=dcp_state_dicts, options=writer_options, rank_local=st.booleans())
def test_dcp_save_loads_as_dcp_loads_it(tmp_path_factory, state, options, rank_local):
    # Every file layout of FileSystemWriter, with the global .metadata or, without rank
    # coordination, the rank-local __0.metadata; all of DCP's dtypes, empty and non-contiguous
    # tensors, bytes and io.BytesIO values, keys with dots and slashes.
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    assume(len(set(flat_keys(state))) == len(flat_keys(state)))  # else DCP itself keeps only one
    path = fresh_dir(tmp_path_factory, "dcp")
    dcp.save(state, storage_writer=FileSystemWriter(path, **options), no_dist=True, use_collectives=not rank_local)
    assert os.path.isfile(os.path.join(path, "__0.metadata" if rank_local else ".metadata"))
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
@given(state=dcp_state_dicts.map(contiguous_tree))
def test_dcp_safetensors_serialization_loads_as_the_torch_save_one(tmp_path_factory, state):
    # FileSystemWriter(serialization_format=SAFETENSORS) appends one safetensors file per data file
    # (dcp.load itself cannot read it back in torch 2.13). Oracles: dcp.load of the same state saved
    # the default way, and safetensors' own reader of the appended file.
    from safetensors.torch import load as safetensors_load
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    from safetensors.torch import _SIZE as safetensors_dtypes  # the dtypes its save takes

    assume(all(t.dtype in safetensors_dtypes for t in leaves(state) if isinstance(t, torch.Tensor)))
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


def test_bytes_io_values_fill_templates_as_dcp_load_does_and_convert_to_bytes(tmp_path):
    path = str(tmp_path / "dcp")
    dcp.save({"w": torch.ones(2), "data": io.BytesIO(b"loader state"), "empty": b""}, checkpoint_id=path,
             no_dist=True)
    reader = CheckpointReader(RankInfo(0, 1))
    oracle = {"w": torch.zeros(2), "data": io.BytesIO(), "empty": None}
    dcp.load(oracle, checkpoint_id=path, no_dist=True)
    mine = io.BytesIO(b"kept")
    template = {"w": torch.zeros(2), "data": io.BytesIO(), "empty": None, "absent": mine}
    filled, missing = reader.read(path, template)
    assert same(filled, dict(oracle, absent=mine)) and filled["absent"] is mine and missing == ["absent"]
    # A strict load that fails changes nothing, io.BytesIO included.
    kept = io.BytesIO(b"x")
    template = {"data": kept, "absent": mine}
    with pytest.raises(RuntimeError, match="nothing was changed"):
        reader.read(path, template, strict=True)
    assert template["data"] is kept and template["absent"] is mine
    # fastdcp checkpoints hold bytes: a conversion turns io.BytesIO into its bytes.
    convert(path, str(tmp_path / "out"))
    assert same(load_whole(tmp_path / "out"), {"w": torch.ones(2), "data": b"loader state", "empty": b""})


# ---- DCP saves without rank coordination (rank-local metadata) -----------------------------------

@contextlib.contextmanager
def fake_rank(rank, world):
    """This process as rank ``rank`` of ``world`` on torch's fake backend: enough for dcp.save
    without collectives (use_collectives=False), which is what each rank runs alone."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def local_dtensor(full, mesh, placements):
    """The DTensor whose local tensor on this rank is its part of ``full``."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    local = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))].clone()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=full.shape, stride=full.stride())


def own_metadata_view(path, rank, view):
    """A directory where dcp.load without a process group (rank 0) reads rank ``rank``'s own
    metadata: what dcp.load on rank ``rank`` reads from a rank-local save."""
    os.makedirs(view)
    for name in os.listdir(path):
        if name.endswith(".distcp"):
            os.symlink(os.path.join(path, name), os.path.join(view, name))
    Path(view, "__0.metadata").write_bytes(Path(path, f"__{rank}.metadata").read_bytes())
    return view


placements = st.sampled_from(["Shard(0)", "Shard(1)", "Replicate()"])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(world=st.integers(1, 4), shape=st.tuples(st.integers(0, 7), st.integers(1, 5)),
       dtype=st.sampled_from(DTYPES), saved=placements, loaded=placements, seed=st.integers(0, 2**31))
def test_rank_local_dcp_saves_load_merged(tmp_path_factory, world, shape, dtype, saved, loaded, seed):
    # Each rank saves its shards and a value of its own with dcp.save(use_collectives=False), as
    # torchrun would; fastdcp merges the __<r>.metadata files (Note [Rank-local DCP metadata]).
    from torch.distributed.tensor import Replicate, Shard  # noqa: F401 (the placements' names)

    g = torch.Generator().manual_seed(seed)
    full = torch.randint(0, 256, (shape[0], shape[1] * dtype.itemsize), generator=g, dtype=torch.uint8)
    full = (full % 2 == 1) if dtype == torch.bool else full.view(dtype)
    path = fresh_dir(tmp_path_factory, "local")
    for r in range(world):
        with fake_rank(r, world) as mesh:
            dcp.save({"w": local_dtensor(full, mesh, [eval(saved)]), "rank": r, "step": 5}, checkpoint_id=path,
                     use_collectives=False)
    assert sorted(n for n in os.listdir(path) if "metadata" in n) == [f"__{r}.metadata" for r in range(world)]
    # Whole, on any rank of any world size: the full tensor; of a value every rank saved, the
    # reading rank's own (what dcp.load gives it), else the lowest rank's.
    for r in range(world + 1):
        whole, missing = CheckpointReader(RankInfo(r, world + 1)).read(path)
        assert same(whole, {"w": full, "rank": r if r < world else 0, "step": 5}) and missing == []
    for r in range(world):
        with fake_rank(r, world) as mesh:
            # At the saving layout: as dcp.load on rank r fills it from its own metadata file.
            zeros = torch.zeros_like(full)
            oracle = {"w": local_dtensor(zeros, mesh, [eval(saved)]), "rank": -1}
            view = own_metadata_view(path, r, fresh_dir(tmp_path_factory, "view") + "/v")
            _load_state_dict(oracle, storage_reader=FileSystemReader(view), no_dist=True)
            template = {"w": local_dtensor(zeros, mesh, [eval(saved)]), "rank": -1}
            filled, _ = CheckpointReader(RankInfo(r, world)).read(path, template, strict=False)
            assert same(filled["w"].to_local(), oracle["w"].to_local()) and filled["rank"] == oracle["rank"] == r
            # At another layout, which dcp.load cannot read from rank-local files: the full tensor's part.
            template = {"w": local_dtensor(zeros, mesh, [eval(loaded)])}
            filled, _ = CheckpointReader(RankInfo(r, world)).read(path, template)
            assert same(filled["w"].to_local(), local_dtensor(full, mesh, [eval(loaded)]).to_local())
    # Converted: one rank of whole tensors, rank 0's values.
    convert(path, path + "_converted")
    assert same(load_whole(path + "_converted"), {"w": full, "rank": 0, "step": 5})


def test_rank_local_metadata_of_different_saves_is_refused_naming_the_files(tmp_path):
    full = torch.arange(24.0).reshape(4, 6)
    path = tmp_path / "local"

    def save(rank, placement, tensor=full):
        from torch.distributed.tensor import Replicate, Shard  # noqa: F401

        with fake_rank(rank, 2) as mesh:
            dcp.save({"w": local_dtensor(tensor, mesh, [eval(placement)])}, checkpoint_id=str(path),
                     use_collectives=False)

    save(0, "Shard(0)")
    save(1, "Shard(1)")  # rows 2-3 from rank 0's layout, columns 3-5 from rank 1's: they overlap
    with pytest.raises(fastdcp.DataLossError, match=r"'.*__0\.metadata' and '.*__1\.metadata': the chunks of 'w' at "
                                                  r"\[0, 0\] of size \[2, 6\] and at \[0, 3\] of size \[4, 3\] overlap"):
        load_whole(path)
    save(1, "Shard(0)", torch.zeros(5, 6))  # another global size
    with pytest.raises(fastdcp.DataLossError, match=r"'w' is a tensor torch.float32\[4, 6\] in '.*__0\.metadata' "
                                                  r"and a tensor torch.float32\[5, 6\] in '.*__1\.metadata'"):
        load_whole(path)
    (path / "__1.metadata").unlink()  # a rank's metadata lost: its rows are missing
    with pytest.raises(fastdcp.DataLossError, match=r"'w' in '.*__0\.metadata': its chunks cover 12 of its 24"):
        load_whole(path)


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
                          "local_whole": True, "local_dtensors": True, "experimental": True}, details
    # The sharded save converts to a one-rank fastdcp checkpoint of whole tensors: what DCP's own
    # template-free load gives (in its key order), and the full tensors the ranks shared.
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    assert convert(str(tmp_path / "dcp"), str(tmp_path / "converted"))["world_size"] == 1
    loaded, _ = CheckpointReader(RankInfo(0, 1)).read(str(tmp_path / "converted"))
    assert same(loaded, dcp_whole(str(tmp_path / "dcp")))
    assert loaded["model"].keys() == expected["model"].keys()
    assert all(same(loaded["model"][k], expected["model"][k]) for k in expected["model"])
    # The rank-local save converts the same way (its keys in the order the ranks saved them), with
    # rank 0's own values.
    convert(str(tmp_path / "dcp_local"), str(tmp_path / "local_converted"))
    local = load_whole(tmp_path / "local_converted")
    assert local.pop("rank") == 0 and local.keys() == loaded.keys() and local["model"].keys() == loaded["model"].keys()
    assert all(same(local[k], loaded[k]) for k in loaded if k != "model")
    assert all(same(local["model"][k], loaded["model"][k]) for k in loaded["model"])
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


def rewrite_metadata(path, change):
    """Rewrites the .metadata at ``path`` with ``change(metadata)`` applied."""
    md = FileSystemReader(str(path)).read_metadata()
    change(md)
    (Path(path) / ".metadata").write_bytes(pickle.dumps(md))


def test_chunks_that_overlap_and_leave_a_gap_are_data_loss(tmp_path):
    # Two chunks of 2 rows each over a tensor of 4: as many elements as the tensor, but row 1 twice
    # and row 3 never. Without the check, row 3 held whatever memory the tensor got.
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    full = torch.arange(12.0).reshape(4, 3)
    dcp.save({"a": full[0:2].clone(), "b": full[1:3].clone()}, checkpoint_id=str(tmp_path), no_dist=True)

    def overlap(md):
        w = md.state_dict_metadata.pop("a")
        del md.state_dict_metadata["b"]
        w.size = torch.Size([4, 3])
        w.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 3])),
                    ChunkStorageMetadata(torch.Size([1, 0]), torch.Size([2, 3]))]
        md.state_dict_metadata["w"] = w
        infos = {k.fqn: v for k, v in md.storage_data.items()}
        md.storage_data = {MetadataIndex("w", torch.Size([0, 0])): infos["a"],
                           MetadataIndex("w", torch.Size([1, 0])): infos["b"]}
        md.planner_data = {"w": ("w",)}

    rewrite_metadata(tmp_path, overlap)
    with pytest.raises(fastdcp.DataLossError, match=r"/\.metadata': the chunks of 'w' at \[0, 0\] of size \[2, 3\] and "
                                                  r"at \[1, 0\] of size \[2, 3\] overlap"):
        load_whole(tmp_path)


def set_field(fqn, **fields):
    def change(md):
        for index, info in md.storage_data.items():
            if index.fqn == fqn:
                for name, value in fields.items():
                    setattr(info, name, value)
    return change


def set_tensor(fqn, **fields):
    def change(md):
        for name, value in fields.items():
            setattr(md.state_dict_metadata[fqn], name, value)
    return change


def huge(md):
    # Two chunks of 2**39 elements each, their bytes said to be the small items' own.
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    w = md.state_dict_metadata["model.w"]
    info = next(v for k, v in md.storage_data.items() if k.fqn == "model.w")
    w.size = torch.Size([2**40])
    w.chunks = [ChunkStorageMetadata(torch.Size([0]), torch.Size([2**39])),
                ChunkStorageMetadata(torch.Size([2**39]), torch.Size([2**39]))]
    md.storage_data.update({MetadataIndex("model.w", c.offsets): info for c in w.chunks})


@pytest.mark.parametrize("change, message", [
    (set_field("model.w", relative_path=".."), r"names the data file '\.\.' outside the checkpoint directory \(for 'model.w'\)"),
    (set_field("model.w", relative_path="."), r"names the data file '\.' outside the checkpoint directory \(for 'model.w'\)"),
    (set_field("model.w", relative_path="../dcp/x.distcp"), r"names the data file '\.\./dcp/x\.distcp' outside"),
    (set_field("lr", length=None), r"\.metadata': the storage entry .*'lr'.* is malformed"),
    (set_field("lr", offset="0"), r"\.metadata': the storage entry .*'lr'.* is malformed"),
    (set_field("lr", transform_descriptors=[1]), r"\.metadata': the storage entry .*'lr'.* is malformed"),
    (set_tensor("model.w", size=None), r"\.metadata': the metadata of 'model.w' is malformed"),
    (set_tensor("model.w", chunks=None), r"\.metadata': the metadata of 'model.w' is malformed"),
    (set_tensor("model.w", chunks=[5]), r"\.metadata': a chunk of 'model.w' \(5\) lies outside"),
    (lambda md: md.state_dict_metadata.update(lr=3), r"\.metadata': the metadata of 'lr' is malformed: 3"),
    (lambda md: md.storage_data.update({"lr": 3}), r"\.metadata': the storage entry 'lr' is malformed: 3"),
    (set_tensor("model.w", size=torch.Size([4, -5])), r"\.metadata': the metadata of 'model.w' is malformed"),
    (set_tensor("model.w", size=torch.Size([4, 4])), r"\.metadata': a chunk of 'model.w' .* lies outside its tensor"),
    (huge, r"\.metadata': the chunk of 'model.w' at \[0\] is torch.bfloat16\[549755813888\], but its item in "
           r"'__0_0.distcp' has only \d+ bytes"),
])
def test_inconsistent_metadata_is_data_loss_naming_the_file_and_key(dcp_dir, change, message):
    rewrite_metadata(dcp_dir, change)
    with pytest.raises(fastdcp.DataLossError, match=message):
        load_whole(dcp_dir)


def test_compressed_items_are_refused_naming_the_key_and_the_fix(dcp_dir):
    # DCP's ZStandard extension needs the zstandard or pyzstd module, which DCP itself would
    # need to read it too; fastdcp does not read it (the descriptor as DCP writes it).
    lengths = {k.fqn: v.length for k, v in FileSystemReader(str(dcp_dir)).read_metadata().storage_data.items()}
    for key in ("model.w", "lr"):
        # Compressed: fewer bytes than the tensor has.
        rewrite_metadata(dcp_dir, set_field(key, transform_descriptors=["stream.zstd/1"], length=10))
        with pytest.raises(ValueError, match=rf"'{key}' in '.*dcp' was saved through DCP stream extensions "
                                             rf"\['stream.zstd/1'\] \(compression.*install the 'zstandard' or "
                                             rf"'pyzstd' module, load the checkpoint with dcp.load and save it again "
                                             rf"without _extensions"):
            load_whole(dcp_dir)
        rewrite_metadata(dcp_dir, set_field(key, transform_descriptors=None, length=lengths[key]))
    assert same(load_whole(dcp_dir), dcp_whole(str(dcp_dir)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rank_local=st.booleans(), pick=st.integers(0, 100), where=st.floats(0, 1), flip=st.booleans())
def test_damaged_files_are_data_loss_not_crashes(tmp_path_factory, rank_local, pick, where, flip):
    # Any file of a checkpoint cut short, or one of its bytes changed: the load raises fastdcp's
    # errors or (a changed tensor byte, which DCP cannot detect either) succeeds; a cut always fails.
    path = Path(fresh_dir(tmp_path_factory, "damaged"))
    dcp.save(sample_state() | {"raw": io.BytesIO(b"abc"), "e": torch.empty(0, 2)}, checkpoint_id=str(path),
             no_dist=True, use_collectives=not rank_local)
    files = sorted(path.iterdir())
    victim = files[pick % len(files)]
    size = victim.stat().st_size
    at = min(size - 1, int(where * size))
    if flip:
        data = bytearray(victim.read_bytes())
        data[at] ^= 0xFF
        victim.write_bytes(bytes(data))
        try:
            load_whole(path)
        except fastdcp.DataLossError:
            pass  # a changed offset in .metadata may name the data file it now points past
    else:
        os.truncate(victim, at)
        with pytest.raises(fastdcp.DataLossError, match=re.escape(victim.name)):
            load_whole(path)

