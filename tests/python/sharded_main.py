"""One rank of the DTensor / FSDP2 checkpoint tests, started by torchrun (tests/python/test_sharded.py).

Usage: torchrun --nproc_per_node N sharded_main.py PHASE DIR

Phases (the oracle is always the full tensor, made from a seed on every rank, or the uninterrupted
run's full tensors):
  boxes     the boxes of DTensors on random shapes, meshes and placements hold exactly the values of
            full_tensor() at their slices, and all ranks' boxes cover each element once per replica;
            staged copies are DTensors like the source over the staged local tensor; Partial
            placements and DTensors on a device fastdcp does not handle are refused by key.
  save      saves a state dict of DTensors (1-D and 2-D meshes, Shard, Replicate, _StridedShard,
            uneven sizes) with the sync and the async checkpointer, in DIR/sync and DIR/async.
  load      loads both at this world size into DTensor templates of other placements, into plain
            tensors, and with no template; a template of another global shape is refused by key.
  fsdp_save  trains a small model wrapped with fully_shard and AdamW for a few steps, saves model and
            optimizer state (sync and async), then the same with FSDP2 over tensor parallelism on a
            2-D mesh (sync), and resumes the first over tensor parallelism; records the full states
            and the next step's losses (DIR/reference.pt).
  fsdp_resume  builds the FSDP2 model at this world size, loads each checkpoint, and checks
            parameters, moments, step and the next step's loss against the reference.
Each rank writes DIR/<phase>_rank_<r>.json ({"ok": bool, "error": traceback}); exit status 0 when
all its checks passed."""

import json
import os
import random
import sys
import traceback

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor import distribute_tensor as _distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from fastdcp.torch import (
    CheckpointerConfig,
    CheckpointProcess,
    CheckpointProcessConfig,
    CheckpointStagerConfig,
    DefaultStager,
    RankInfo,
    make_async_checkpointer,
    make_sync_checkpointer,
)
from fastdcp.torch._dtensor import describe_sharded
from fastdcp.torch.builder import default_subprocess_init_fn

def distribute_tensor(full, mesh, placements):
    """DTensor's own cut of `full`, which every rank holds (uneven strided shards included)."""
    return _distribute_tensor(full, mesh, placements, src_data_rank=None)


CPU_STAGING = CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False)


def mesh_of(shape) -> DeviceMesh:
    """A mesh over the first prod(shape) ranks (every rank must call this)."""
    n = 1
    for s in shape:
        n *= s
    return DeviceMesh("cpu", torch.arange(n).view(shape))


def full_of(name: str, shape, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, name)) * 7919)
    return torch.randn(shape, generator=g).to(dtype)


# What `save` writes: key -> (global shape, dtype, mesh shape, placements).
SAVED = {
    "s0": ((10, 6), torch.float32, (4,), [Shard(0)]),
    "s1_uneven": ((5, 7), torch.float32, (4,), [Shard(1)]),
    "rep": ((3, 4), torch.bfloat16, (4,), [Replicate()]),
    "mesh2d_sr": ((9, 4), torch.float64, (2, 2), [Shard(0), Replicate()]),
    "mesh2d_ss": ((6, 10), torch.float32, (2, 2), [Shard(0), Shard(1)]),
    "mesh2d_rs": ((7, 3, 2), torch.float32, (2, 2), [Replicate(), Shard(0)]),
    "strided": ((8, 3), torch.float32, (2, 2), [_StridedShard(0, split_factor=2), Shard(0)]),
    "strided_uneven": ((11, 2), torch.float32, (2, 2), [_StridedShard(0, split_factor=2), Shard(0)]),
    "small": ((2,), torch.int64, (4,), [Shard(0)]),  # ranks 2 and 3 hold nothing
}


def saved_state(world: int) -> dict:
    """The saved state at `world` ranks: meshes of more ranks than that are shrunk to a 1-D mesh."""
    out = {}
    for key, (shape, dtype, mesh_shape, placements) in SAVED.items():
        if len(mesh_shape) == 2 and world < 4:
            mesh_shape, placements = (world,), [placements[-1] if not isinstance(placements[-1], Replicate) else Shard(0)]
        elif len(mesh_shape) == 1:
            mesh_shape = (world,)
        out[key] = distribute_tensor(full_of(key, shape, dtype), mesh_of(mesh_shape), placements)
    out["plain"] = torch.arange(12.0).view(3, 4)
    out["meta"] = {"step": 7, "name": "sharded"}
    return out


def other_layouts(world: int):
    """Template placements unlike the saved ones, per world size: (mesh shape, placements)."""
    layouts = [((world,), [Shard(1)]), ((world,), [Replicate()]), ((world,), [Shard(0)])]
    if world == 4:
        layouts += [((2, 2), [Shard(1), Shard(0)]), ((2, 2), [_StridedShard(1, split_factor=2), Shard(1)]),
                    ((2, 2), [Replicate(), Shard(1)])]
    return layouts


def check_boxes(dt: DTensor, full: torch.Tensor, what: str) -> None:
    """Every box holds the full tensor's values at its slices; all ranks' boxes cover every
    element replica_count times, with distinct replica numbers."""
    shape, dtype, chunks, replica_index, replica_count = describe_sharded(dt)
    assert shape == tuple(full.shape) and dtype == full.dtype, what
    for offset, view in chunks:
        slices = tuple(slice(o, o + s) for o, s in zip(offset, view.shape))
        assert view.numel() > 0, what
        assert torch.equal(view, full[slices]), (what, offset, tuple(view.shape))
        assert view.untyped_storage().data_ptr() == dt.to_local().untyped_storage().data_ptr(), what
    if chunks:
        assert chunks[0][1].data_ptr() == dt.to_local().data_ptr(), what  # the first at the local origin
    boxes = [(offset, tuple(view.shape)) for offset, view in chunks]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (boxes, replica_index, replica_count, dt.device_mesh.get_coordinate() is not None))
    count = torch.zeros(full.shape, dtype=torch.int64)
    seen = {}
    replica_count = max(total for _, _, total, in_mesh in gathered if in_mesh)
    for rank_boxes, index, total, in_mesh in gathered:
        if not in_mesh:
            assert not rank_boxes, what  # a rank outside the mesh holds nothing
            continue
        assert total == replica_count, what
        for offset, sizes in rank_boxes:
            count[tuple(slice(o, o + s) for o, s in zip(offset, sizes))] += 1
            seen.setdefault((offset, sizes), set()).add(index)
    assert bool((count == replica_count).all()), (what, count)
    for key, indices in seen.items():
        assert indices == set(range(replica_count)), (what, key, indices)


class TorchObjectsWriter:
    """A writer process's writer that is not fastdcp's: it asks for torch objects."""

    def __init__(self, rank_info):
        pass

    def write(self, path, state_dict, **kwargs):
        pass


def phase_boxes(out: str, report: dict) -> None:
    world = dist.get_world_size()
    rng = random.Random(15)
    mesh_shapes = [(2,), (3,), (4,), (2, 2)]
    meshes = {shape: mesh_of(shape) for shape in mesh_shapes}
    stager = DefaultStager(CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False,
                                                  use_async_staging=False))
    cases = strided = 0
    for case in range(40):
        mesh_shape = mesh_shapes[case % len(mesh_shapes)]
        ndim = rng.randint(1, 3)
        shape = tuple(rng.randint(0 if case % 13 == 0 else 1, 9) for _ in range(ndim))
        placements = []
        for _ in mesh_shape:
            kind = rng.choice(["shard", "replicate"] + (["strided"] if len(mesh_shape) == 2 else []))
            if kind == "shard":
                placements.append(Shard(rng.randrange(ndim)))
            elif kind == "replicate":
                placements.append(Replicate())
            else:
                placements.append("strided")
        if "strided" in placements:
            # As FSDP2 over TP makes them: _StridedShard(d, sf = the later mesh dim's size), Shard(d).
            dim = rng.randrange(ndim)
            placements = [_StridedShard(dim, split_factor=mesh_shape[1]), Shard(dim)]
        full = full_of(f"case{case}", shape)
        dt = distribute_tensor(full, meshes[mesh_shape], placements)
        what = f"case {case}: shape {shape}, mesh {mesh_shape}, {placements}"
        if dt.device_mesh.get_coordinate() is not None:  # ranks outside the mesh hold nothing
            assert torch.equal(dt.full_tensor(), full), what
        check_boxes(dt, full, what)
        # A staged copy is a DTensor of the same mesh and placements over the staged local tensor.
        staged = stager.stage({"t": dt})["t"]
        assert isinstance(staged, DTensor), what
        assert staged.device_mesh == dt.device_mesh and staged.placements == dt.placements, what
        assert staged.shape == dt.shape and staged.stride() == dt.stride(), what
        assert torch.equal(staged.to_local(), dt.to_local()), what
        if dt.to_local().numel():
            assert staged.to_local().data_ptr() != dt.to_local().data_ptr(), what
        cases += 1
        strided += any(isinstance(p, _StridedShard) for p in placements)
    report["box_cases"], report["strided_cases"] = cases, strided
    # Meshes sliced from a larger one (FSDP2 over TP): the other slices hold copies.
    root = DeviceMesh("cpu", torch.arange(world).view(2, world // 2), mesh_dim_names=("dp", "tp"))
    for i, (sliced, placements) in enumerate(((root["dp"], [Shard(0)]), (root["tp"], [Shard(1)]),
                                              (root["tp"], [Replicate()]))):
        full = full_of(f"slice{i}", (5, 3))
        check_boxes(distribute_tensor(full, sliced, placements), full, f"slice {i}: {sliced}, {placements}")
        report["slice_cases"] = i + 1

    # The staged tree crosses to the writer process as a Value with the DTensors as sharded leaves;
    # a writer that asks for torch objects there (not fastdcp's) cannot have them without a mesh.
    process = CheckpointProcess(RankInfo(dist.get_rank(), world), CheckpointProcessConfig(),
                                default_subprocess_init_fn, (), TorchObjectsWriter, {})
    staged = stager.stage({"model": {"w": distribute_tensor(torch.ones(8), meshes[(world,)], [Shard(0)])}})
    try:
        process.write(staged, f"{out}/torch_objects").result(timeout=120)
        raise AssertionError("a sharded leaf became a torch object without its mesh (wrong)")
    except ValueError as error:
        assert "'model.w'" in str(error) and "device mesh" in str(error), str(error)
    process.close()
    stager.close()

    # Refusals, by key, before anything is written.
    partial = DTensor.from_local(torch.ones(4), meshes[(world,)], [Partial()], run_check=False)
    checkpointer = make_sync_checkpointer()
    for state, expected in (({"model": {"w": partial}}, "reduce it first"),
                            ({"model": {"w": DTensor.from_local(torch.empty(1, device="meta"), meshes[(world,)],
                                                                [Shard(0)], run_check=False)}},
                             "meta tensors")):
        try:
            checkpointer.save(f"{out}/refused", state)
            raise AssertionError(f"saved {state} (wrong)")
        except ValueError as error:
            assert "'model.w'" in str(error) and expected in str(error), str(error)
    report["refusals"] = "ok"


def phase_save(out: str, report: dict) -> None:
    world = dist.get_world_size()
    state = saved_state(world)
    sync = make_sync_checkpointer()
    sync.save(f"{out}/sync", state)
    checkpointer = make_async_checkpointer(CheckpointerConfig(staging_config=CPU_STAGING))
    try:
        staging, write = checkpointer.save(f"{out}/async", state)
        staging.result()
        write.result(timeout=120)
    finally:
        checkpointer.close()
    if dist.get_rank() == 0:
        # The same values saved unsharded by one rank (a consolidated checkpoint): every rank of any
        # world size loads its boxes from it.
        whole = {key: full_of(key, shape, dtype) for key, (shape, dtype, _, _) in SAVED.items()}
        whole.update(plain=state["plain"], meta=state["meta"])
        make_sync_checkpointer(CheckpointerConfig(), RankInfo(global_rank=0, global_world_size=1)).save(
            f"{out}/whole", whole)
    dist.barrier()
    report["saved"] = sorted(state)


def check_full(loaded: dict, what: str) -> None:
    for key, (shape, dtype, _, _) in SAVED.items():
        value = loaded[key]
        assert type(value) is torch.Tensor, (what, key, type(value))
        assert torch.equal(value, full_of(key, shape, dtype)), (what, key)
    assert torch.equal(loaded["plain"], torch.arange(12.0).view(3, 4)), what
    assert loaded["meta"] == {"step": 7, "name": "sharded"}, what


def phase_load(out: str, report: dict) -> None:
    world = dist.get_world_size()
    sync = make_sync_checkpointer()
    layouts = other_layouts(world)
    meshes = {shape: mesh_of(shape) for shape, _ in layouts}
    for name in ("sync", "async", "whole"):
        path = f"{out}/{name}"
        check_full(sync.load(path), f"{name}, no template")
        plain = {key: torch.full(shape, -1, dtype=dtype) for key, (shape, dtype, _, _) in SAVED.items()}
        plain.update(plain=torch.zeros(3, 4), meta=None)
        loaded = sync.load(path, state_dict=plain)
        check_full(loaded, f"{name}, plain tensors")
        for i, (mesh_shape, placements) in enumerate(layouts):
            template = {}
            for key, (shape, dtype, _, _) in SAVED.items():
                # Every layout on every key: shift which layout each key gets.
                layout_shape, layout_placements = layouts[(i + len(template)) % len(layouts)]
                if any(isinstance(p, (Shard, _StridedShard)) and p.dim >= len(shape) for p in layout_placements):
                    layout_shape, layout_placements = mesh_shape, [Shard(0)] * len(mesh_shape)
                template[key] = distribute_tensor(torch.full(shape, -1, dtype=dtype), meshes[layout_shape],
                                                  layout_placements)
            objects = {key: value for key, value in template.items()}
            loaded = sync.load(path, state_dict=template)
            for key, (shape, dtype, _, _) in SAVED.items():
                assert loaded[key] is objects[key], (name, key)  # the template's DTensor, filled in place
                expected = distribute_tensor(full_of(key, shape, dtype), loaded[key].device_mesh,
                                             loaded[key].placements).to_local()
                assert torch.equal(loaded[key].to_local(), expected), (name, key, loaded[key].placements)
    # A template of another global shape (or dtype) is refused by key.
    for wrong in (torch.zeros(10, 7), torch.zeros(10, 6, dtype=torch.float64)):
        template = {"s0": distribute_tensor(wrong, mesh_of((world,)), [Shard(0)])}
        try:
            sync.load(f"{out}/sync", state_dict=template)
            raise AssertionError("loaded into a template of another shape or dtype (wrong)")
        except ValueError as error:
            assert "s0" in str(error), str(error)
    report["loaded"] = world


# FSDP2 end to end ------------------------------------------------------------------------------

GLOBAL_BATCH = 12  # divisible by 4, 3 and 2: every world size trains on the same global batch
TRAIN_STEPS = 3


def fsdp_model(tp: bool = False):
    """The model (same initial values everywhere) and AdamW, and this rank's (index, count) among
    the data-parallel ranks. With `tp`, FSDP2 over tensor parallelism on a (2, world / 2) mesh:
    the column-parallel weights are then _StridedShard(0, sf=2), Shard(0)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 13),
                                torch.nn.ReLU(), torch.nn.Linear(13, 4))
    dp_mesh, dp = None, (dist.get_rank(), dist.get_world_size())
    if tp:
        world = dist.get_world_size()
        mesh = DeviceMesh("cpu", torch.arange(world).view(2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        dp_mesh, dp = mesh["dp"], (mesh.get_local_rank("dp"), 2)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, dp


def fsdp_step(model, optimizer, step: int, dp) -> float:
    """One step on this data-parallel rank's slice of the global batch; returns the global mean
    loss (tensor-parallel peers compute the same loss, and count alike)."""
    (dp_rank, dp_size), world = dp, dist.get_world_size()
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g)
    per_rank = GLOBAL_BATCH // dp_size
    part = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    loss = torch.nn.functional.mse_loss(model(x[part]), y[part])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / world


def full_state(model, optimizer) -> dict:
    """Parameters and AdamW moments as full tensors, by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t.clone()  # noqa: E731
    out = {f"param.{k}": full(v) for k, v in model_sd.items()}
    for name, state in optim_sd["state"].items():
        for k, v in state.items():
            out[f"optim.{name}.{k}"] = full(v)
    return out


def train_and_reference(tp: bool):
    """The model after TRAIN_STEPS steps, and the reference: its full state, the next step's loss
    and the full state after that step (the model is left after TRAIN_STEPS steps' state only in
    the returned state dicts, saved before the next step)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer, dp = fsdp_model(tp)
    for step in range(TRAIN_STEPS):
        fsdp_step(model, optimizer, step, dp)
    return model, optimizer, dp, get_state_dict(model, optimizer)


def next_step_reference(model, optimizer, dp) -> dict:
    reference = full_state(model, optimizer)
    reference["next_loss"] = fsdp_step(model, optimizer, TRAIN_STEPS, dp)
    reference["after_next"] = full_state(model, optimizer)
    return reference


def phase_fsdp_save(out: str, report: dict) -> None:
    model, optimizer, dp, (model_sd, optim_sd) = train_and_reference(tp=False)
    assert any(isinstance(v, DTensor) for v in model_sd.values())
    sync = make_sync_checkpointer()
    sync.save(f"{out}/fsdp_sync", {"model": model_sd, "optim": optim_sd})
    # The async checkpointer saves the raw module and optimizer state dicts.
    checkpointer = make_async_checkpointer(CheckpointerConfig(staging_config=CPU_STAGING))
    try:
        _, write = checkpointer.save(f"{out}/fsdp_async", {"model": model.state_dict(),
                                                           "optim": optimizer.state_dict()})
        write.result(timeout=120)
    finally:
        checkpointer.close()
    references = {"fsdp": next_step_reference(model, optimizer, dp)}
    # FSDP2 over tensor parallelism: strided shards, resumed later by FSDP2 alone.
    model, optimizer, dp, (model_sd, optim_sd) = train_and_reference(tp=True)
    assert any(isinstance(p, _StridedShard) for v in model_sd.values() for p in v.placements)
    sync.save(f"{out}/tp_sync", {"model": model_sd, "optim": optim_sd})
    references["tp"] = next_step_reference(model, optimizer, dp)
    # The reverse: FSDP2's checkpoint resumed by FSDP2 over tensor parallelism.
    report["fsdp_into_tp"] = resume(out, "fsdp_sync", references["fsdp"], tp=True)
    if dist.get_rank() == 0:
        torch.save(references, f"{out}/reference.pt")
    report["next_loss"] = {name: r["next_loss"] for name, r in references.items()}


def assert_state_equal(actual: dict, expected: dict, what: str, exact: bool) -> None:
    assert sorted(actual) == sorted(k for k in expected if k not in ("next_loss", "after_next")), what
    for key, value in actual.items():
        if exact:
            assert torch.equal(value, expected[key]), (what, key)
        else:
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=f"{what}: {key}")


def resume(out: str, name: str, reference: dict, tp: bool = False, raw: bool = False) -> float:
    """Builds the model (over tensor parallelism with `tp`), loads checkpoint `name` into it (its
    module and optimizer state dicts with `raw`, else get_state_dict's), checks the loaded state
    and the next step against `reference`; returns the next step's loss."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optimizer, dp = fsdp_model(tp)  # other initial values than the saved ones: step 0
    model_sd, optim_sd = get_state_dict(model, optimizer)  # initializes AdamW's state
    if raw:
        template = {"model": model.state_dict(), "optim": optimizer.state_dict()}
        loaded = make_sync_checkpointer().load(f"{out}/{name}", state_dict=template)
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optim"])
    else:
        loaded = make_sync_checkpointer().load(f"{out}/{name}", state_dict={"model": model_sd, "optim": optim_sd})
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    assert_state_equal(full_state(model, optimizer), reference, name, exact=True)
    loss = fsdp_step(model, optimizer, TRAIN_STEPS, dp)
    # Tensor-parallel matmuls sum in another order than whole ones.
    tolerance = 1e-6 if not tp and "tp" not in name else 1e-5
    assert abs(loss - reference["next_loss"]) <= tolerance * max(1.0, abs(loss)), (name, loss, reference["next_loss"])
    assert_state_equal(full_state(model, optimizer), reference["after_next"], name, exact=False)
    return loss


def phase_fsdp_resume(out: str, report: dict) -> None:
    references = torch.load(f"{out}/reference.pt", weights_only=True)
    report["fsdp_sync"] = resume(out, "fsdp_sync", references["fsdp"])
    report["fsdp_async"] = resume(out, "fsdp_async", references["fsdp"], raw=True)
    report["tp_sync"] = resume(out, "tp_sync", references["tp"])


PHASES = {"boxes": phase_boxes, "save": phase_save, "load": phase_load, "fsdp_save": phase_fsdp_save,
          "fsdp_resume": phase_fsdp_resume}


def main() -> int:
    phase, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {"rank": rank, "world_size": dist.get_world_size()}
    try:
        PHASES[phase](out, report)
        report["ok"] = True
    except Exception:  # noqa: BLE001 - reported to the test
        report["ok"] = False
        report["error"] = traceback.format_exc()
    with open(os.path.join(out, f"{phase}_rank_{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
