"""Sharded (DTensor) state on several ranks: fastdcp.torch's checkpointers against
torch.distributed.checkpoint (dcp.save, dcp.async_save, dcp.load), same state, same run, beside the
same-run read limit.

The state is FSDP2-shaped: DTensors sharded on dim 0 over a 1-D mesh of all ranks (what
fully_shard makes of every parameter and Adam moment). Two cases:
  1gb    256 DTensors of 1024 x 1024 float32 (1 GiB in all)
  small  5,000 DTensors of 64 x 16 float32 (4 KiB each, 20 MB in all)

Saves run on --save-ranks ranks (torchrun, gloo, CPU). Per system and run, every rank times its own
save and the slowest rank's time counts:
  blocking  until training may change its tensors again (fastdcp async: save() and the staging
            future; dcp.async_save: until it returns; sync saves: the whole save)
  durable   until the checkpoint is committed (the write future, or the call's return)
Loads run on each of --load-worlds rank counts into DTensor templates sharded over that many ranks
(uneven where the world does not divide 1024): fastdcp's load of its checkpoint and dcp.load of
DCP's checkpoint of the same contents. Both are checked against the saved values. The read limit
is `cat` of the checkpoint's files to /dev/null with one process per file, in the same run (the page
cache holds them, as it does for the loads).

Usage: .venv/bin/python bench/bench_sharded.py [--cases 1gb,small] [--runs 3] [--save-ranks 4]
       [--load-worlds 4,2,3] [--dir DIR] [--json PATH]
Figures are medians over --runs runs."""

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {"1gb": (256, (1024, 1024)), "small": (5000, (64, 16))}


# --- one rank (started by torchrun) --------------------------------------------------------------

def global_value(case, index, shape):
    """The saved values of tensor `index`: cheap to recompute on any rank for the check."""
    import torch
    return torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(shape) * 1e-6 + index


def state_dict(case, mesh, empty=False):
    """The saved state (each rank cuts its shard from the same values, no communication), or an
    empty template of it sharded over `mesh`."""
    import torch.distributed.tensor as dt
    count, shape = CASES[case]
    if empty:
        return {f"layers.{i}.weight": dt.zeros(*shape, device_mesh=mesh, placements=[dt.Shard(0)]) for i in range(count)}
    return {f"layers.{i}.weight": dt.distribute_tensor(global_value(case, i, shape), mesh, [dt.Shard(0)],
                                                       src_data_rank=None) for i in range(count)}


def check(state, case):
    for i, (key, value) in enumerate(state.items()):
        expected = global_value(case, i, CASES[case][1])
        if not value.full_tensor().equal(expected):
            raise AssertionError(f"{key}: the loaded values differ from the saved ones")


def slowest(seconds):
    import torch
    import torch.distributed as dist
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def worker_save(args, rank, world, mesh):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from fastdcp.torch import CheckpointerConfig, CheckpointStagerConfig, make_async_checkpointer, make_sync_checkpointer
    state = state_dict(args.case, mesh)
    cpu = CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False)
    results = {}

    def measure(name, save, runs):
        rows = []
        for run in range(runs + 1):  # the first is a warm-up
            path = os.path.join(args.dir, f"{name}_{run}")
            dist.barrier()
            start = time.perf_counter()
            wait = save(path)
            blocking = time.perf_counter() - start
            wait()
            durable = time.perf_counter() - start
            if run:
                rows.append((slowest(blocking), slowest(durable)))
            dist.barrier()
            if rank == 0 and run < runs:
                shutil.rmtree(path, ignore_errors=True)
        results[name] = {"blocking": statistics.median(r[0] for r in rows),
                         "durable": statistics.median(r[1] for r in rows)}

    sync = make_sync_checkpointer()  # the default barrier: torchrun's TCPStore
    measure("fastdcp_sync", lambda p: (sync.save(p, state), lambda: None)[1], args.runs)
    checkpointer = make_async_checkpointer(CheckpointerConfig(staging_config=cpu))
    try:
        def fastdcp_async(path):
            staging, write = checkpointer.save(path, state)
            staging.result()
            return lambda: write.result(timeout=600)
        measure("fastdcp_async", fastdcp_async, args.runs)
    finally:
        checkpointer.close()
    measure("dcp_save", lambda p: (dcp.save(state, checkpoint_id=p), lambda: None)[1], args.runs)

    def dcp_async(path):
        future = dcp.async_save(state, checkpoint_id=path)
        return lambda: future.result()
    measure("dcp_async_save", dcp_async, args.runs)
    return results


def read_limit(path):
    files = [f for f in glob.glob(os.path.join(path, "*")) if os.path.isfile(f)]
    start = time.perf_counter()
    procs = [subprocess.Popen(["cat", f], stdout=subprocess.DEVNULL) for f in files]
    for p in procs:
        p.wait()
    return time.perf_counter() - start, sum(os.path.getsize(f) for f in files)


def worker_load(args, rank, world, mesh):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from fastdcp.torch import make_sync_checkpointer
    results = {}
    reader = make_sync_checkpointer()
    for name, load in (("fastdcp", lambda t: reader.load(os.path.join(args.dir, f"fastdcp_sync_{args.runs}"),
                                                         state_dict=t)),
                       ("dcp", lambda t: dcp.load(t, checkpoint_id=os.path.join(args.dir, f"dcp_save_{args.runs}")))):
        times = []
        for run in range(args.runs + 1):
            template = state_dict(args.case, mesh, empty=True)
            dist.barrier()
            start = time.perf_counter()
            load(template)
            elapsed = slowest(time.perf_counter() - start)
            if run:
                times.append(elapsed)
            if run == args.runs:
                check(template, args.case)
        results[name] = statistics.median(times)
    if rank == 0:
        seconds, nbytes = read_limit(os.path.join(args.dir, f"fastdcp_sync_{args.runs}"))
        results["read_limit"] = seconds
        results["bytes"] = nbytes
    return results


def worker(args):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    results = (worker_save if args.worker == "save" else worker_load)(args, rank, world, mesh)
    if rank == 0:
        with open(args.report, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


# --- the driver ----------------------------------------------------------------------------------

def torchrun(ranks, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           os.path.abspath(__file__), *extra]
    subprocess.run(cmd, env=env, check=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="1gb,small")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--save-ranks", type=int, default=4)
    parser.add_argument("--load-worlds", default="4,2,3")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", choices=["save", "load"], default=None)
    parser.add_argument("--case", default=None)
    parser.add_argument("--report", default=None)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    report = {}
    for case in args.cases.split(","):
        root = tempfile.mkdtemp(prefix=f"bench_sharded_{case}_", dir=args.dir)
        try:
            out = os.path.join(root, "report.json")
            common = ["--case", case, "--runs", str(args.runs), "--dir", root, "--report", out]
            torchrun(args.save_ranks, "--worker", "save", *common)
            with open(out) as f:
                report[case] = {"save": json.load(f), "load": {}}
            for world in map(int, args.load_worlds.split(",")):
                torchrun(world, "--worker", "load", *common)
                with open(out) as f:
                    report[case]["load"][world] = json.load(f)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{args.save_ranks} ranks save; medians of {args.runs} runs; the slowest rank's time counts")
    for case, r in report.items():
        s = r["save"]
        print(f"\n{case}: save            blocking s   durable s")
        for name, row in s.items():
            print(f"  {name:16} {row['blocking']:10.3f} {row['durable']:11.3f}")
        print(f"  fastdcp async blocking / dcp.async_save blocking: "
              f"{s['fastdcp_async']['blocking'] / s['dcp_async_save']['blocking']:.3f}")
        print(f"{case}: load     fastdcp s  dcp.load s  speed-up  read limit s")
        for world, row in r["load"].items():
            print(f"  {args.save_ranks} -> {world}  {row['fastdcp']:10.3f} {row['dcp']:11.3f} "
                  f"{row['dcp'] / row['fastdcp']:8.2f}x {row['read_limit']:12.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
