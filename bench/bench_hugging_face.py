"""Hugging Face model directories: fastdcp's export and import against safetensors and torch DCP's
Hugging Face path, same state, same run, beside the same-run read and write limits.

Two checkpoints of the same values (256 tensors of 1024 x 1024 float32, 1 GiB, key paths
"layers.{i}.weight"):
  one      written by one rank (fastdcp.torch's CheckpointWriter)
  sharded  DTensors sharded on dim 0 over --ranks ranks (torchrun, gloo, CPU), saved by
           fastdcp's sync checkpointer, and by dcp.save with DCP's HuggingFaceStorageWriter
           (save_distributed=True: each rank writes its shards as safetensors)
Export, to a model directory of --max-shard-size files (model-0000k-of-0000n.safetensors and the
index), as float32 and cast to bfloat16:
  fastdcp      fastdcp.torch.export_hugging_face of the checkpoint (sharded keys assembled a file
               at a time); it fsyncs each file, so it returns durable
  safetensors  safetensors.torch.save_file of the same tensors already in memory, one call per file
               of the same split (what save_pretrained does), the cast included for bf16; no fsync
  dcp          (sharded, float32) consolidate_safetensors_files of DCP's sharded output into the same
               files (torch.distributed.checkpoint._consolidate_hf_safetensors)
Each export and import runs in a fresh process, after os.sync() (no earlier writeback competes),
and reports the time until the call returned, until an os.sync() after it (durable), and its peak
resident growth (VmHWM, reset through /proc/self/clear_refs just before, minus VmRSS then; the
in-memory state of the safetensors row and the templates exist before). Mapped file pages count
as resident.
Import of the float32 directory into a template of empty tensors:
  fastdcp      fastdcp.torch.load_hugging_face(dir, template)
  safetensors  safetensors.torch.load_file of each file, then template[k].copy_(v)
  dcp          dcp.load(template, storage_reader=HuggingFaceStorageReader(dir)), one process
Limits: read, `cat` of the directory's files to /dev/null (one process per file; page cache warm,
as for the imports); write, `dd` of the same bytes from /dev/zero, with and without conv=fsync.

Usage: .venv/bin/python bench/bench_hugging_face.py [--runs 3] [--ranks 4] [--tensors 256]
       [--max-shard-size 256MB] [--dir DIR] [--json PATH]
Figures are medians over --runs runs (after one warm-up)."""

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

SHAPE = (1024, 1024)


def value(i):
    import torch
    return torch.arange(SHAPE[0] * SHAPE[1], dtype=torch.float32).reshape(SHAPE) * 1e-6 + i


def full_state(n):
    return {f"layers.{i}.weight": value(i) for i in range(n)}


def split(n, max_bytes):
    """The files of the split (huggingface_hub's: greedy in order), as lists of key indices."""
    files, size = [[]], 0
    per = SHAPE[0] * SHAPE[1] * 4
    for i in range(n):
        if files[-1] and size + per > max_bytes:
            files.append([])
            size = 0
        files[-1].append(i)
        size += per
    return files


def status(field):
    """A field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} is not in /proc/self/status")


# --- children: one measured operation each ---------------------------------------------------------

def child(args):
    import safetensors.torch
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files
    from fastdcp.torch import export_hugging_face, load_hugging_face
    op, src, out = args.op, args.src, args.out
    n, limit = args.tensors, parse_size(args.max_shard_size)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    state = None
    if op == "safetensors_export":
        state = full_state(n)
    if op.endswith("_import"):
        state = {f"layers.{i}.weight": torch.empty(SHAPE) for i in range(n)}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from VmRSS
    before = status("VmRSS")
    start = time.perf_counter()
    if op == "fastdcp_export":
        export_hugging_face(src, out, max_shard_size=limit, dtype=dtype)
    elif op == "safetensors_export":
        files = split(n, limit)
        weight_map, total = {}, 0
        os.makedirs(out)
        for k, keys in enumerate(files):
            name = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
            part = {f"layers.{i}.weight": state[f"layers.{i}.weight"] for i in keys}
            if dtype is not None:
                part = {key: v.to(dtype) for key, v in part.items()}
            safetensors.torch.save_file(part, os.path.join(out, name), metadata={"format": "pt"})
            weight_map.update({key: name for key in part})
            total += sum(v.nbytes for v in part.values())
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    elif op == "dcp_export":
        mapping = {f"layers.{i}.weight": k + 1 for k, keys in enumerate(split(n, limit)) for i in keys}
        os.makedirs(out)
        consolidate_safetensors_files(src, out, mapping)
    elif op == "fastdcp_import":
        load_hugging_face(src, state)
    elif op == "safetensors_import":
        for f in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
            for key, v in safetensors.torch.load_file(f).items():
                state[key].copy_(v)
    elif op == "dcp_import":
        dcp.load(state, storage_reader=HuggingFaceStorageReader(src))
    seconds = time.perf_counter() - start
    peak = status("VmHWM")
    os.sync()  # fastdcp's export fsyncs its files; the others' bytes are durable only now
    durable = time.perf_counter() - start
    if op.endswith("_import") and args.check:
        for i in range(n):
            if not state[f"layers.{i}.weight"].equal(value(i)):
                raise AssertionError(f"{op}: layers.{i}.weight differs from the saved values")
    print(json.dumps({"seconds": seconds, "durable": durable, "peak_growth": max(0, peak - before)}))


def parse_size(text):
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    for unit, scale in units.items():
        if text.upper().endswith(unit):
            return int(float(text[:-len(unit)]) * scale)
    return int(text)


# --- the sharded save (started by torchrun) ----------------------------------------------------------

def save_worker(args):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import torch.distributed.tensor as dt
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.device_mesh import init_device_mesh
    from fastdcp.torch import make_sync_checkpointer
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    state = {f"layers.{i}.weight": dt.distribute_tensor(value(i), mesh, [dt.Shard(0)], src_data_rank=None)
             for i in range(args.tensors)}
    make_sync_checkpointer().save(os.path.join(args.dir, "fastdcp_sharded"), state)
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(os.path.join(args.dir, "dcp_hf"), save_distributed=True))
    dist.destroy_process_group()


# --- the driver ----------------------------------------------------------------------------------

def run_child(args, op, src, out, dtype="", check=False):
    cmd = [sys.executable, os.path.abspath(__file__), "--op", op, "--src", src, "--out", out, "--dtype", dtype,
           "--tensors", str(args.tensors), "--max-shard-size", args.max_shard_size]
    if check:
        cmd.append("--check")
    os.sync()  # no writeback of an earlier step's files competes with this one
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    if result.returncode:
        raise RuntimeError(f"{op} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def limits(directory, scratch):
    files = [f for f in glob.glob(os.path.join(directory, "*.safetensors"))]
    nbytes = sum(os.path.getsize(f) for f in files)
    start = time.perf_counter()
    procs = [subprocess.Popen(["cat", f], stdout=subprocess.DEVNULL) for f in files]
    for p in procs:
        p.wait()
    read = time.perf_counter() - start
    out = {"read": read, "bytes": nbytes}
    for name, extra in (("write", []), ("write_fsync", ["conv=fsync"])):
        target = os.path.join(scratch, "dd.bin")
        start = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={max(1, nbytes >> 24)}", *extra],
                       check=True, capture_output=True)
        out[name] = time.perf_counter() - start
        os.remove(target)
    return out


def median_rows(rows):
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--tensors", type=int, default=256)
    parser.add_argument("--max-shard-size", default="256MB")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--json", default=None)
    # children
    parser.add_argument("--op", default=None)
    parser.add_argument("--src", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--dtype", default="")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--save-worker", action="store_true")
    args = parser.parse_args()
    if args.op:
        return child(args)
    if args.save_worker:
        return save_worker(args)

    root = tempfile.mkdtemp(prefix="bench_hf_", dir=args.dir)
    report = {}
    try:
        from fastdcp.torch import CheckpointWriter, CheckpointWriterConfig, RankInfo
        CheckpointWriter(CheckpointWriterConfig(), RankInfo(global_rank=0, global_world_size=1)).write(
            os.path.join(root, "fastdcp_one"), full_state(args.tensors))
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={args.ranks}", os.path.abspath(__file__), "--save-worker",
                        "--tensors", str(args.tensors), "--dir", root],
                       check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        dcp_sharded = os.path.join(root, "dcp_hf")
        cases = {
            "one": [("fastdcp", "fastdcp_export", os.path.join(root, "fastdcp_one")),
                    ("safetensors", "safetensors_export", "")],
            "sharded": [("fastdcp", "fastdcp_export", os.path.join(root, "fastdcp_sharded")),
                        ("safetensors", "safetensors_export", ""),
                        ("dcp", "dcp_export", dcp_sharded)],
        }
        for case, systems in cases.items():
            report[case] = {"export": {}}
            for dtype in ("f32", "bf16"):
                for name, op, src in systems:
                    if name == "dcp" and dtype == "bf16":
                        continue  # DCP's consolidation copies bytes as saved: it does not cast
                    rows = []
                    for run in range(args.runs + 1):
                        out = os.path.join(root, f"out_{case}_{name}_{dtype}")
                        shutil.rmtree(out, ignore_errors=True)
                        row = run_child(args, op, src, out, "bf16" if dtype == "bf16" else "")
                        if run:
                            rows.append(row)
                    report[case]["export"][f"{name}_{dtype}"] = median_rows(rows)
        # Every export of the same values wrote the same tensors: a check of the outputs.
        import safetensors.torch
        reference = {}
        for f in glob.glob(os.path.join(root, "out_one_safetensors_f32", "*.safetensors")):
            reference.update(safetensors.torch.load_file(f))
        for out in glob.glob(os.path.join(root, "out_*_f32")):
            loaded = {}
            for f in glob.glob(os.path.join(out, "*.safetensors")):
                loaded.update(safetensors.torch.load_file(f))
            if loaded.keys() != reference.keys() or any(not loaded[k].equal(v) for k, v in reference.items()):
                raise AssertionError(f"{out} differs from safetensors' export")
        directory = os.path.join(root, "out_sharded_fastdcp_f32")
        report["import"] = {}
        for name in ("fastdcp", "safetensors", "dcp"):
            rows = [run_child(args, f"{name}_import", directory, "", check=(run == args.runs))
                    for run in range(args.runs + 1)][1:]
            report["import"][name] = median_rows(rows)
        report["limits"] = median_rows([limits(directory, root) for _ in range(args.runs)])
    finally:
        shutil.rmtree(root, ignore_errors=True)

    gib = report["limits"]["bytes"] / 2**30
    print(f"{args.tensors} tensors of {SHAPE[0]} x {SHAPE[1]} float32 ({gib:.2f} GiB); files of {args.max_shard_size}; "
          f"medians of {args.runs} runs")
    for case in ("one", "sharded"):
        rows = report[case]["export"]
        print(f"\nexport, {case} ({'1 rank' if case == 'one' else f'{args.ranks} ranks'}):  returned s  durable s"
              "  peak growth MiB")
        for key, row in rows.items():
            print(f"  {key:18} {row['seconds']:10.3f} {row['durable']:10.3f} {row['peak_growth'] / 2**20:16.0f}")
        for dtype in ("f32", "bf16"):
            print(f"  durable, fastdcp / safetensors, {dtype}: "
                  f"{rows[f'fastdcp_{dtype}']['durable'] / rows[f'safetensors_{dtype}']['durable']:.2f}")
        if "dcp_f32" in rows:
            print(f"  durable, fastdcp / dcp consolidation, f32: {rows['fastdcp_f32']['durable'] / rows['dcp_f32']['durable']:.2f}")
    print("\nimport into a template:      s    peak growth MiB")
    for key, row in report["import"].items():
        print(f"  {key:18} {row['seconds']:8.3f} {row['peak_growth'] / 2**20:12.0f}")
    lim = report["limits"]
    print(f"\nlimits: read (cat) {lim['read']:.3f} s, write (dd) {lim['write']:.3f} s, "
          f"write with fsync {lim['write_fsync']:.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
