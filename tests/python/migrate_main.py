"""One rank of test_migration.py's sharded test, under torchrun (gloo, CPU): saves DTensors on a
1-D and (with 4 ranks) a 2-D mesh with dcp.save, and each rank's own state with torch's
_experimental checkpointer, and once more with dcp.save(use_collectives=False), which writes a
metadata file per rank; then loads them with fastdcp on every rank and compares them with the
full tensors and with dcp.load's own load into plain tensors and DTensors, byte for byte."""

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint._experimental.checkpoint_writer import CheckpointWriter as TorchWriter
from torch.distributed.checkpoint._experimental.checkpoint_writer import CheckpointWriterConfig as TorchWriterConfig
from torch.distributed.checkpoint._experimental.types import RankInfo as TorchRankInfo
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from fastdcp.torch import CheckpointReader, RankInfo


def same(a, b):
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def full_state(world):
    """The same on every rank (seeded): what the sharded state adds up to."""
    g = torch.Generator().manual_seed(7)
    return {
        "model": {
            "w_rows": torch.randn(2 * world + 1, 5, generator=g).to(torch.bfloat16),  # uneven Shard(0)
            "w_cols": torch.randn(3, 3 * world - 1, generator=g),  # uneven Shard(1)
            "bias": torch.randint(-9, 9, (7,), generator=g, dtype=torch.int32),  # Replicate
            "grid": torch.randn(2 * world, 2 * world + 1, generator=g).to(torch.float16),  # 2-D mesh
            "flags": torch.rand(world + 2, generator=g) > 0.5,  # bool, Shard(0)
        },
        "optim": {"state": {"0": {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "epoch": 4,
        "name": "run",
    }


def sharded(state, world):
    mesh = init_device_mesh("cpu", (world,))
    m = state["model"]
    out = {
        "w_rows": distribute_tensor(m["w_rows"], mesh, [Shard(0)]),
        "w_cols": distribute_tensor(m["w_cols"], mesh, [Shard(1)]),
        "bias": distribute_tensor(m["bias"], mesh, [Replicate()]),
        "flags": distribute_tensor(m["flags"], mesh, [Shard(0)]),
    }
    if world == 4:
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        out["grid"] = distribute_tensor(m["grid"], mesh2, [Shard(0), Shard(1)])
    else:
        out["grid"] = distribute_tensor(m["grid"], mesh, [Shard(1)])
    return dict(state, model=out)


def main():
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {}
    try:
        expected = full_state(world)
        dcp_path = os.path.join(out_dir, "dcp")
        dcp.save(sharded(expected, world), checkpoint_id=dcp_path)
        # torch's _experimental checkpointer: every rank saves its own state dict.
        mine = {"rank": rank, "t": torch.arange(rank + 2, dtype=torch.float64), "nested": [torch.ones(rank + 1)]}
        TorchWriter(TorchWriterConfig(), TorchRankInfo(rank, world)).write(os.path.join(out_dir, "exp"), mine)
        dist.barrier()

        reader = CheckpointReader(RankInfo(rank, world))
        loaded, missing = reader.read(dcp_path)
        report["dcp_whole"] = same(loaded, expected) and missing == []
        # Into plain tensors: fastdcp's load against dcp.load's own, on the same template.
        template = {k: v for k, v in expected.items()}
        template["model"] = {k: torch.zeros_like(v) for k, v in expected["model"].items()}
        oracle = {k: v for k, v in expected.items()}
        oracle["model"] = {k: torch.zeros_like(v) for k, v in expected["model"].items()}
        dcp.load(oracle, checkpoint_id=dcp_path)
        filled, missing = reader.read(dcp_path, template, strict=True)
        report["dcp_template"] = same(filled, oracle) and same(filled, expected) and missing == []
        report["dcp_in_place"] = filled["model"]["w_rows"] is template["model"]["w_rows"]
        # Into DTensors: each rank's shards, against dcp.load into the same layout.
        zeros = dict(expected, model={k: torch.zeros_like(v) for k, v in expected["model"].items()})
        template, oracle = sharded(zeros, world), sharded(zeros, world)
        dcp.load(oracle, checkpoint_id=dcp_path)
        filled, missing = reader.read(dcp_path, template, strict=True)
        report["dcp_dtensors"] = missing == [] and all(
            filled["model"][k] is template["model"][k] and same(filled["model"][k].to_local(), oracle["model"][k].to_local())
            for k in oracle["model"])
        # Without rank coordination (use_collectives=False) every rank writes its own
        # __<rank>.metadata, with a value of its own: merged by fastdcp, read by dcp.load rank by rank.
        # Here with a file per item, on two threads.
        local_path = os.path.join(out_dir, "dcp_local")
        writer = FileSystemWriter(local_path, single_file_per_rank=False, thread_count=2)
        dcp.save(dict(sharded(expected, world), rank=rank), storage_writer=writer, use_collectives=False)
        dist.barrier()
        loaded, missing = reader.read(local_path)
        report["local_whole"] = same(loaded, dict(expected, rank=rank)) and missing == []
        template, oracle = dict(sharded(zeros, world), rank=-1), dict(sharded(zeros, world), rank=-1)
        dcp.load(oracle, checkpoint_id=local_path)
        filled, missing = reader.read(local_path, template, strict=True)
        report["local_dtensors"] = missing == [] and filled["rank"] == oracle["rank"] == rank and all(
            filled["model"][k] is template["model"][k] and same(filled["model"][k].to_local(), oracle["model"][k].to_local())
            for k in oracle["model"])
        exp_loaded, _ = reader.read(os.path.join(out_dir, "exp"))
        report["experimental"] = same(exp_loaded, mine)
        if rank == 0:
            torch.save(expected, os.path.join(out_dir, "expected.pt"))
    except BaseException:
        report["error"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank_{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
