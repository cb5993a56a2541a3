"""Checkpoint save and load: fastdcp against torch.save/torch.load, safetensors save_file/load_file,
torch.distributed.checkpoint save/load and its _experimental CheckpointWriter/CheckpointReader,
same state dicts, same run, beside the raw disk limit (sequential writes and reads of the same
size by 4 threads in 16 MiB blocks, with O_DIRECT or buffered, whichever is faster in the round).

Every save ends durable (fsync of the files); before every load the files are evicted from the
page cache (posix_fadvise DONTNEED), so loads read the disk, and a load ends when one byte of
every page of every tensor has been read (lazy, memory-mapped loaders pay their reads). Median of
--runs, each round measuring the disk limit and then every system in turn.

Usage: .venv/bin/python bench/bench_checkpoint.py [--runs 3] [--cases 1gib,llama,small] [--dir DIR]
"""

import argparse
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(__file__))
from bench_torch_staging import CASES  # noqa: E402  (the same state dicts as the staging benchmark)

import fastdcp.torch as fdt  # noqa: E402

RANK = fdt.RankInfo(global_rank=0, global_world_size=1)
BLOCK = 16 << 20


def files_under(path):
    if os.path.isfile(path):
        return [path]
    return [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]


def sync_tree(path):
    for f in files_under(path):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    fd = os.open(path if os.path.isdir(path) else os.path.dirname(path), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def evict(path):
    for f in files_under(path):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def raw_disk(path, nbytes, threads=4):
    """Seconds to write `nbytes` (then fsync) with buffered writes and with O_DIRECT, then to read
    them back with O_DIRECT and, after evicting them from the page cache, with buffered reads:
    `threads` threads moving 16 MiB blocks in parallel."""
    blocks = (nbytes + BLOCK - 1) // BLOCK
    buffers = [mmap.mmap(-1, BLOCK) for _ in range(threads)]
    for b in buffers:
        b.write(os.urandom(4096) * (BLOCK // 4096))

    def run(flags, op):
        fd = os.open(path, flags, 0o644)
        counter = iter(range(blocks))
        lock = threading.Lock()

        def work(buf):
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                op(fd, buf, i * BLOCK)

        start = time.perf_counter()
        pool = [threading.Thread(target=work, args=(b,)) for b in buffers]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        if flags & os.O_WRONLY:
            os.fsync(fd)
        elapsed = time.perf_counter() - start
        os.close(fd)
        return elapsed

    def read(fd, b, off):
        os.preadv(fd, [b], off)

    def write(fd, b, off):
        os.pwritev(fd, [b], off)

    create = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    write_buffered = run(create, write)
    os.remove(path)
    os.sync()
    write_direct = run(create | os.O_DIRECT, write)
    read_direct = run(os.O_RDONLY | os.O_DIRECT, read)
    evict(path)
    read_buffered = run(os.O_RDONLY, read)
    os.remove(path)
    os.sync()
    return write_direct, write_buffered, read_direct, read_buffered


def touch(tree):
    """Reads every page of every loaded tensor, so that lazy loaders (memory maps) pay for the disk
    reads they defer: small tensors whole, large ones one element per page. Batched into one
    foreach call per dtype: a Python call per tensor would cost more than the load itself with
    50,000 tensors."""
    by_dtype = {}
    for t in flatten(tree).values():
        if not t.numel():
            continue
        if t.numel() * t.element_size() > (64 << 10):
            t = t.reshape(-1)[:: max(1, 4096 // t.element_size())]
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, views in by_dtype.items():
        if dtype.is_floating_point:
            torch._foreach_norm(views)
        else:
            for v in views:
                v.to(torch.float64 if not v.is_complex() else v.dtype).sum()


def flatten(tree, prefix=""):
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
    elif isinstance(tree, torch.Tensor):
        out[prefix[:-1]] = tree
    return out


def tensors_only(tree):
    """The tensors of a tree in its nesting (what dcp saves and loads in place)."""
    if isinstance(tree, dict):
        return {str(k): tensors_only(v) for k, v in tree.items() if not isinstance(v, (list, float, int, str))}
    return tree


def systems(state, flat):
    """(name, save, [(load name, load)]) for every system. fastdcp's variants: `O_DIRECT` saves
    bypass the page cache (the default writes buffered); `mmap` loads map the file (zero-copy, checksums
    still verified); `in place` loads fill the existing state dict's tensors, as a job resuming
    with its model already built does."""
    def fastdcp_save(path):
        fdt.CheckpointWriter(fdt.CheckpointWriterConfig(overwrite=True), RANK).write(path, state)

    def fastdcp_direct_save(path):
        fdt.CheckpointWriter(fdt.CheckpointWriterConfig(overwrite=True, direct_io=True), RANK).write(path, state)

    def torch_save(path):
        torch.save(state, path)
        sync_tree(path)

    def st_save(path):
        safetensors.torch.save_file(flat, path)
        sync_tree(path)

    dcp_state = tensors_only(state)

    def dcp_save(path):
        dcp.save(dcp_state, checkpoint_id=path)
        sync_tree(path)

    def dcp_load(path):
        target = {k: torch.empty_like(v) for k, v in flatten(dcp_state).items()}
        dcp.load(target, checkpoint_id=path)
        return target

    import torch.distributed.checkpoint._experimental as upstream
    upstream_rank = upstream.RankInfo(global_rank=0, global_world_size=1)

    def upstream_save(path):
        # torch's experimental writer ends with torch.save and no fsync: the harness syncs for it.
        upstream.CheckpointWriter(upstream.CheckpointWriterConfig(), upstream_rank).write(path, state)
        sync_tree(path)

    upstream_reader = upstream.CheckpointReader(upstream_rank)
    reader = fdt.CheckpointReader(RANK)
    return [
        ("fastdcp", fastdcp_save, [
            ("fastdcp", lambda p: reader.read(p)[0]),
            ("fastdcp mmap", lambda p: reader.read(p, mmap=True)[0]),
            ("fastdcp in place", lambda p: reader.read(p, state)[0]),
        ]),
        ("fastdcp O_DIRECT", fastdcp_direct_save, []),
        ("torch _experimental", upstream_save, [("torch _experimental", lambda p: upstream_reader.read(p)[0])]),
        ("torch.save", torch_save, [("torch.load", lambda p: torch.load(p, weights_only=True))]),
        ("safetensors", st_save, [("safetensors", safetensors.torch.load_file)]),
        ("dcp", dcp_save, [("dcp", dcp_load)]),
    ]


DISK = ["disk write direct", "disk write buffered", "disk write", "disk read direct", "disk read buffered",
        "disk read", "touch only"]


def measure_round(state, flat, root, nbytes, rotation):
    """One round: the disk limit, then every system's save and loads, the systems' order rotated by
    `rotation` (so that none always runs right after the disk test); seconds by name."""
    times = {}
    (times["disk write direct"], times["disk write buffered"], times["disk read direct"],
     times["disk read buffered"]) = raw_disk(os.path.join(root, "raw"), nbytes)
    # Each limit is the faster way of doing it in this round: on VMs with a host-side cache,
    # buffered I/O can beat O_DIRECT.
    times["disk write"] = min(times["disk write direct"], times["disk write buffered"])
    times["disk read"] = min(times["disk read direct"], times["disk read buffered"])
    # What a load's touch costs by itself, on memory already in place: part of every load time.
    start = time.perf_counter()
    touch(state)
    times["touch only"] = time.perf_counter() - start
    order = systems(state, flat)
    rotation %= len(order)
    for name, save, loads in order[rotation:] + order[:rotation]:
        path = os.path.join(root, name.replace(".", "_").replace(" ", "_"))
        remove(path)
        if timed(times, f"save {name}", lambda: save(path)):
            for load_name, load in loads:
                evict(path)
                timed(times, f"load {load_name}", lambda: load_and_touch(load, path))
        remove(path)
        os.sync()
    return times


def load_and_touch(load, path):
    loaded = load(path)
    touch(loaded)
    return loaded  # freed by the caller after its clock stops


def timed(times, key, fn):
    """times[key] = seconds of fn() (its result is freed after the clock stops); a failure is recorded as NaN, its message in times["errors"][key]
    (one system failing does not lose the others' figures). True when fn succeeded."""
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001
        times[key] = float("nan")
        times.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        print(f"  {key} failed: {times['errors'][key]}", file=sys.stderr, flush=True)
        return False
    times[key] = time.perf_counter() - start
    del result
    return True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cases", default="1gib,llama,small")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="fastdcp_bench_", dir=args.dir)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, writing under {root}; medians of {args.runs}")
    # Note: the disk of a shared VM drifts by 2x within minutes, so every round measures the disk
    # limit and then every system; a ratio is taken within its round, and its median over rounds
    # is reported beside the median times.
    print(f"{'case':8} {'GB':>5} | {'what':22} {'median s':>8} {'GB/s':>6} {'vs disk':>7} "
          f"{'(min-max)':>11} | fastdcp speedup")
    try:
        for case in args.cases.split(","):
            state = CASES[case]()
            flat = flatten(state)
            nbytes = sum(t.numel() * t.element_size() for t in flat.values())
            gb = nbytes / 1e9
            rounds = [measure_round(state, flat, root, nbytes, r) for r in range(args.runs)]
            keys = DISK + [k for name, _, loads in systems(state, flat)
                           for k in [f"save {name}"] + [f"load {n}" for n, _ in loads]]
            for key in keys:
                limit = "disk write" if key.startswith(("save", "disk write")) else "disk read"
                ratios = [r[limit] / r[key] for r in rounds]
                t = statistics.median(r[key] for r in rounds)
                line = (f"{case:8} {gb:5.2f} | {key:22} {t:8.3f} {gb / t:6.2f} {statistics.median(ratios):7.2f} "
                        f"({min(ratios):.2f}-{max(ratios):.2f}) |")
                ours = "save fastdcp" if key.startswith("save") else "load fastdcp"
                if key.startswith(("save", "load")) and not key.startswith(ours):
                    line += f" {statistics.median(r[key] / r[ours] for r in rounds):5.2f}x"
                print(line, flush=True)
            del state, flat, rounds
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
