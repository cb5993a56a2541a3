"""Asynchronous checkpoint saves: fastdcp.torch's AsyncCheckpointer against torch's own
torch.distributed.checkpoint._experimental AsyncCheckpointer and torch.distributed.checkpoint's
async_save (thread and process executors), on the same state dicts in the same run, beside the
same-run hardware limits: an all-core memcpy of the same bytes (the staging limit) and an O_DIRECT
sequential write of the same size with dd (the commit limit).

Each system is built once (its writer process start-up is timed apart, as "start-up"), warmed by
one save, and then saves --runs times in a loop that mimics training:

    t0 = now; futures = save(path, state_dict)
    wait for staging                 -> blocking time: training may change its tensors from here
    mutate every tensor (add_ 1)     -> step after save: with copy-on-write staging it may wait
    sleep --step seconds                for chunks not yet copied
    wait for the write               -> commit time: the write future's completion (its own clock)
    mutate every tensor again        -> step, idle: the same step with nothing in flight

A system whose warm-up save took longer than --budget / --runs seconds gets fewer measured saves
(budget // warm-up, at least 1; the table marks it "n=..."), so that the slowest systems on the
50,000-tensor case keep the run's length bounded. Every case runs in a process of its own (started
by this script), so that memory or process-wide state a system leaves behind cannot reach the next
case. A system that fails with "Too many open files" (torch's default "file_descriptor" sharing
strategy holds one descriptor per shared storage) is measured again with the "file_system" strategy.

Both experimental checkpointers get CheckpointStagerConfig(use_pinned_memory=False,
use_non_blocking_copy=False): the CPU configuration (shared memory and async staging on, their
defaults). async_save's default stager copies synchronously on the caller's thread and it returns a
plain Future, so its blocking time is the time until async_save returns. Its process executor
needs an initialized process group even with no_dist=True (it asks dist.get_rank()), so each case
process starts a 1-rank gloo group when that system is selected.

"durable" is the commit time for systems that fsync on their own (fastdcp, dcp); torch's
experimental writer ends with torch.save and no fsync, so for it the harness fsyncs the file as
soon as the write future completes and adds that time.

Memory: the process tree (this process and every descendant, e.g. writer processes) is sampled
every 50 ms (VmRSS and Pss), and every process's peak resident set (VmHWM, reset through
/proc/<pid>/clear_refs before the measured saves) is read at the end. "peak RSS" is the sum of
those per-process peaks (shared memory mapped by two processes counts twice: an upper bound);
"peak PSS" is the largest sampled sum of Pss (shared pages split between their users). Both
include the state dict itself.

Usage: .venv/bin/python bench/bench_async.py [--runs 5] [--budget 60] [--cases 1gib,llama,small]
       [--small-tensors 50000] [--small-floats 1024]
       [--dir DIR] [--step 0.5] [--systems fastdcp,torch_exp,dcp_thread,dcp_process] [--json PATH]
       [--quick]   (--quick: tiny state dicts, 2 saves, under 2 minutes; its JSON goes to DIR)
"""

import argparse
import gc
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import Future

import torch
import torch.distributed as dist

from bench_checkpoint import sync_tree  # noqa: E402  (fsyncs a checkpoint's files and directory)
from bench_torch_staging import llama_weights, tensors  # noqa: E402

GB = 1e9
ALL_SYSTEMS = ("fastdcp", "fastdcp_copy", "torch_exp", "dcp_thread", "dcp_process")
FS_SUFFIX = "_file_system"
LABELS = {
    "fastdcp": "fastdcp AsyncCheckpointer",
    "fastdcp_copy": "fastdcp AsyncCheckpointer, copy-on-write off",
    "torch_exp": "torch _experimental AsyncCheckpointer",
    "dcp_thread": "dcp.async_save (thread)",
    "dcp_process": "dcp.async_save (process)",
}


# ---------------------------------------------------------------------------------------------
# State dicts


def case_1gib(quick):
    n = 16
    each = (1 << 30) // 4 // n if not quick else (1 << 20) // 4
    return {f"w{i}": torch.randn(each) for i in range(n)}, ("w0",)


def case_llama(quick):
    """Llama-shaped float32 weights (about 1.29 GB: vocab 32000, hidden 1024, FFN 2816, 20 layers)
    and an optimizer-like part: an int64 step per parameter and Python floats in param_groups."""
    if quick:
        layers, hidden, ffn, vocab = 2, 64, 176, 1000
    else:
        layers, hidden, ffn, vocab = 20, 1024, 2816, 32000
    w = llama_weights(layers, hidden, ffn, vocab)
    state = {str(i): {"step": torch.tensor(100, dtype=torch.int64)} for i in range(len(w))}
    groups = [{"lr": 3e-4, "weight_decay": 0.1, "eps": 1e-8, "params": list(range(len(w)))}]
    return ({"model": w, "optimizer": {"state": state, "param_groups": groups}},
            ("model", "layers.0.attention.wq.weight"))


def case_small(quick, n=50_000, floats=1024):
    n = n if not quick else 500
    return {f"t{i}": torch.randn(floats) for i in range(n)}, ("t0",)


CASES = {"1gib": case_1gib, "llama": case_llama, "small": case_small}


def get_path(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def template_for(path, like):
    """A nested dict holding only the checked tensor, for dcp.load."""
    out = torch.empty_like(like)
    for k in reversed(path):
        out = {k: out}
    return out


class Mutator:
    """add_(1) on every tensor, one foreach call per dtype (a Python call per tensor would cost
    more than the step with 50,000 tensors)."""

    def __init__(self, state):
        self.groups = {}
        for t in tensors(state):
            self.groups.setdefault(t.dtype, []).append(t)

    def __call__(self):
        with torch.no_grad():
            for group in self.groups.values():
                torch._foreach_add_(group, 1)


# ---------------------------------------------------------------------------------------------
# Process-tree memory


def _read_status(pid, keys):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _read_pss(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(root):
    parent = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            parent[int(name)] = int(stat[stat.rfind(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    out, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def reset_peak(pid):
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


class TreeMemory:
    """Samples this process tree's RSS and PSS every `interval` s on a background thread; the
    tree is rescanned every 2 s (writer processes may start or restart)."""

    def __init__(self, interval=0.05):
        self.interval = interval
        self.root = os.getpid()
        self._stop = threading.Event()
        self.peak_rss = self.peak_pss = 0
        self.samples = 0
        self.seen = set()

    def __enter__(self):
        self.pids = [self.root] + descendants(self.root)
        self.reset_ok = all(reset_peak(p) for p in self.pids)
        self.seen.update(self.pids)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        last_scan = time.monotonic()
        while not self._stop.wait(self.interval):
            if time.monotonic() - last_scan > 2.0:
                pids = [self.root] + descendants(self.root)
                for p in pids:
                    if p not in self.seen:
                        reset_peak(p)  # a new process: its own peak starts now anyway
                        self.seen.add(p)
                self.pids = pids
                last_scan = time.monotonic()
            rss = sum(_read_status(p, ("VmRSS",)).get("VmRSS", 0) for p in self.pids)
            pss = sum(_read_pss(p) for p in self.pids)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.samples += 1

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        pids = [self.root] + descendants(self.root)
        hwm = {p: _read_status(p, ("VmHWM",)).get("VmHWM", 0) for p in pids}
        self.result = {
            "peak_rss_sum_of_hwm_gb": sum(hwm.values()) / GB,
            "parent_hwm_gb": hwm.get(self.root, 0) / GB,
            "children_hwm_gb": {str(p): v / GB for p, v in hwm.items() if p != self.root},
            "sampled_peak_rss_gb": self.peak_rss / GB,
            "sampled_peak_pss_gb": self.peak_pss / GB,
            "samples": self.samples,
            "peak_reset_ok": self.reset_ok,
        }
        return False


def current_rss_gb():
    return _read_status(os.getpid(), ("VmRSS",)).get("VmRSS", 0) / GB


# ---------------------------------------------------------------------------------------------
# Hardware limits


def memcpy_limit(nbytes, runs):
    """All-core copy of `nbytes` between two preallocated, touched buffers (torch's copy_ splits
    a large copy over its intra-op threads)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    dst.copy_(src)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    del src, dst
    return times


def disk_limit(directory, nbytes):
    """Seconds for dd to write `nbytes` (rounded up to 8 MiB) with O_DIRECT, then fsync."""
    path = os.path.join(directory, "dd_limit.bin")
    count = max(1, -(-nbytes // (8 << 20)))
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=8M", f"count={count}", "oflag=direct",
                    "conv=fsync"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t
    os.remove(path)
    return elapsed


# ---------------------------------------------------------------------------------------------
# Systems: each exposes start() -> None, save(path, sd) -> (staging_future, write_future),
# load_check(path, key_path, like) -> tensor, close(), and `fsyncs` (does its commit fsync?)


def remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def done_future(value=None):
    f = Future()
    f.set_result(value)
    return f


class ExperimentalSystem:
    """fastdcp.torch or torch.distributed.checkpoint._experimental: the same API."""

    def __init__(self, module, fsyncs, **staging):
        self.module = module
        self.fsyncs = fsyncs
        self.staging = staging  # CheckpointStagerConfig fields over the CPU configuration
        self.checkpointer = None

    def start(self):
        m = self.module
        staging = {"use_pinned_memory": False, "use_non_blocking_copy": False, **self.staging}
        config = m.CheckpointerConfig(staging_config=m.CheckpointStagerConfig(**staging))
        self.checkpointer = m.make_async_checkpointer(config)
        process = getattr(self.checkpointer, "_process", None) or getattr(self.checkpointer, "_checkpoint_process")
        process.process_creation_future.result(timeout=120)

    def save(self, path, sd):
        return self.checkpointer.save(path, sd)

    def load_check(self, path, key_path, like):
        return get_path(self.checkpointer.load(path), key_path)

    def close(self):
        if self.checkpointer is not None:
            self.checkpointer.close()
            self.checkpointer = None


class DcpSystem:
    """torch.distributed.checkpoint.async_save(no_dist=True), thread or process executor."""

    fsyncs = True  # FileSystemWriter(sync_files=True), the default

    def __init__(self, process):
        import torch.distributed.checkpoint as dcp
        self.dcp = dcp
        self.process = process

    def start(self):
        if self.process:
            # The first process-based async_save starts one daemon writer process for the whole
            # program (a module global); start it here so that its start-up is timed apart. It
            # needs an initialized process group (the benchmark's 1-rank gloo group).
            from torch.distributed.checkpoint import _async_process_executor as ape
            if ape._CHECKPOINT_PROCESS is None:
                ape._CHECKPOINT_PROCESS = ape._AsyncCheckpointProcess(ape._ProcessGroupInitInfo(None))

    def save(self, path, sd):
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse
        kind = AsyncCheckpointerType.PROCESS if self.process else AsyncCheckpointerType.THREAD
        result = self.dcp.async_save(sd, checkpoint_id=path, no_dist=True, async_checkpointer_type=kind)
        if isinstance(result, AsyncSaveResponse):
            return result.staging_completion, result.upload_completion
        return done_future(), result  # staged synchronously: done when async_save returns

    def load_check(self, path, key_path, like):
        template = template_for(key_path, like)
        self.dcp.load(template, checkpoint_id=path, no_dist=True)
        return get_path(template, key_path)

    def close(self):
        if self.process:
            from torch.distributed.checkpoint import _async_process_executor as ape
            proc = ape._CHECKPOINT_PROCESS
            if proc is not None:
                ape._CHECKPOINT_PROCESS = None
                try:
                    proc._send(ape._CheckpointSaveProcessControlOpts.TERMINATE)
                    proc._save_process.join(timeout=30)
                finally:
                    if proc._save_process.is_alive():
                        proc._save_process.terminate()


def make_system(name, **staging):
    """`staging`: CheckpointStagerConfig fields for the experimental checkpointers (GPU runs pin)."""
    if name in ("fastdcp", "fastdcp_copy"):
        import fastdcp.torch as m
        return ExperimentalSystem(m, fsyncs=True, use_copy_on_write=name == "fastdcp", **staging)
    if name == "torch_exp":
        import torch.distributed.checkpoint._experimental as m
        return ExperimentalSystem(m, fsyncs=False, **staging)
    if name == "dcp_thread":
        return DcpSystem(process=False)
    if name == "dcp_process":
        return DcpSystem(process=True)
    raise ValueError(name)


def close_with_timeout(system, timeout):
    """close() on a helper thread; a close that hangs (a dead or stuck worker) is abandoned and
    the writer processes this benchmark started are killed, by pid."""
    error = []

    def run():
        try:
            system.close()
        except BaseException as e:  # noqa: BLE001
            error.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for pid in descendants(os.getpid()):
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        return f"close() did not return within {timeout} s; its worker processes were killed"
    return f"close() failed: {error[0]!r}" if error else None


# ---------------------------------------------------------------------------------------------
# One system on one case


def timed_save(system, path, sd, timeout):
    """save(); returns (futures, t0, timing dict filled by callbacks: commit and durable times on
    their own clocks, and an event set once both are known)."""
    timing = {"event": threading.Event()}
    t0 = time.perf_counter()
    staging, write = system.save(path, sd)

    def on_write(f):
        timing["commit"] = time.perf_counter() - t0
        try:
            if f.exception() is None and not system.fsyncs:
                sync_tree(path)
            timing["durable"] = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001
            timing["fsync_error"] = repr(e)
        finally:
            timing["event"].set()

    write.add_done_callback(on_write)
    return staging, write, t0, timing


def wait_write(write, timing, timeout):
    write.result(timeout=timeout)  # raises the write's own error
    if not timing["event"].wait(timeout):
        raise TimeoutError("durability callback did not finish")
    if "fsync_error" in timing:
        raise RuntimeError(f"fsync after the write failed: {timing['fsync_error']}")


def _measure(system, out, sd, key_path, mutate, root, runs, step, timeout, budget):
    """Start-up, warm-up, the measured saves and the check; its own frame, so that the futures
    and staged trees it held are gone once it returns or raises."""
    name = out["system"]
    t = time.perf_counter()
    system.start()
    out["startup_s"] = time.perf_counter() - t

    # Warm-up: caches, buffers, a first write (not timed).
    path = os.path.join(root, f"{name}_warm")
    t = time.perf_counter()
    staging, write, _, timing = timed_save(system, path, sd, timeout)
    staging.result(timeout=timeout)
    wait_write(write, timing, timeout)
    out["warm_save_s"] = time.perf_counter() - t
    remove(path)
    runs = max(1, min(runs, int(budget // max(out["warm_save_s"], 1e-3))))

    with TreeMemory() as mem:
        for i in range(runs):
            path = os.path.join(root, f"{name}_{i}")
            staging, write, t0, timing = timed_save(system, path, sd, timeout)
            staging.result(timeout=timeout)
            out["blocking_s"].append(time.perf_counter() - t0)
            if i == runs - 1:
                # What this save must hold, on the CPU where loads put it (a GPU tensor is copied).
                expected = get_path(sd, key_path).to("cpu", copy=True)
            t = time.perf_counter()
            mutate()  # the first step after the save: with copy-on-write staging, it may wait for copies
            out["update_s"].append(time.perf_counter() - t)
            time.sleep(step)
            wait_write(write, timing, timeout)
            t = time.perf_counter()
            mutate()  # the same step with nothing in flight: what the step after the save is compared with
            out["update_idle_s"].append(time.perf_counter() - t)
            out["commit_s"].append(timing["commit"])
            out["durable_s"].append(timing["durable"])
            if i < runs - 1:
                remove(path)
    out["memory"] = mem.result

    loaded = system.load_check(path, key_path, expected)
    out["verified"] = bool(torch.equal(loaded, expected))
    if not out["verified"]:
        raise RuntimeError("verification failed: the loaded tensor differs from the saved one")


def open_fds():
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def run_system(name, sd, key_path, mutate, root, runs, step, timeout, budget, sharing=None, staging=None):
    """One system on one case; a failure is recorded in the result, never raised. `sharing`: a
    torch.multiprocessing sharing strategy to use for this system only; `staging`: see make_system."""
    import torch.multiprocessing as tmp
    out = {"system": name, "blocking_s": [], "update_s": [], "update_idle_s": [], "commit_s": [], "durable_s": []}
    if sharing:
        out["sharing_strategy"] = sharing
    previous = tmp.get_sharing_strategy()
    gc.collect()
    out["rss_before_gb"] = current_rss_gb()
    out["fds_before"] = open_fds()
    system = None
    try:
        if sharing:
            tmp.set_sharing_strategy(sharing)
        system = make_system(name, **(staging or {}))
        _measure(system, out, sd, key_path, mutate, root, runs, step, timeout, budget)
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        out["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        out["traceback"] = traceback.format_exc()
        print(f"  {name} failed: {out['traceback']}", file=sys.stderr)
    finally:
        # Drop the failure's traceback (its frames hold staged tensors, and with them, for torch's
        # shared memory, one open descriptor per storage) before anything else needs a descriptor.
        e = None  # noqa: F841
        if system is not None:
            problem = close_with_timeout(system, 120)
            if problem:
                out.setdefault("close_error", problem)
        system = None
        gc.collect()
        tmp.set_sharing_strategy(previous)
        if "error" in out:
            # Storages pickled for a send that then failed leave their duplicated descriptors
            # registered with multiprocessing's resource sharer, waiting for a receiver that will
            # never ask: release them, so that later systems start with descriptors to spare.
            out["fds_after_failure"] = open_fds()
            from multiprocessing import resource_sharer
            try:
                resource_sharer.stop(timeout=10)
            except OSError as error:
                out.setdefault("cleanup_error", repr(error))
        out["fds_after"] = open_fds()
        out["rss_after_gb"] = current_rss_gb()
        try:
            for leftover in os.listdir(root):
                if leftover.startswith(name):
                    remove(os.path.join(root, leftover))
        except OSError as error:
            out.setdefault("cleanup_error", repr(error))
    return out


def file_system_sharing_fits(sd):
    """(fits, storages, limit): torch's file_system sharing strategy maps one file per shared
    storage, in this process and in the receiving one. Past vm.max_map_count, mmap fails and so do
    thread starts (their stacks are maps too), which then hang: such a run is not started."""
    with open("/proc/sys/vm/max_map_count") as f:
        limit = int(f.read())
    with open("/proc/self/maps") as f:
        used = sum(1 for _ in f)
    storages = len({t.untyped_storage().data_ptr() for t in tensors(sd)})
    return storages + used < 0.9 * limit, storages, limit


def run_system_with_fallback(name, sd, key_path, mutate, root, runs, step, timeout, budget):
    """run_system, printing a line per result; a system that ran out of file descriptors is measured
    again with the file_system sharing strategy (under the key name + FS_SUFFIX). {key: result}."""
    results = {}
    attempts = [(name, None)]
    while attempts:
        key, sharing = attempts.pop()
        t = time.perf_counter()
        r = run_system(name, sd, key_path, mutate, root, runs, step, timeout, budget, sharing)
        results[key] = r
        status = r.get("error") or (f"{len(r['blocking_s'])} saves, blocking {span(r['blocking_s'])}, "
                                    f"durable {span(r['durable_s'])}, verified {r.get('verified')}")
        print(f"  {key:15} {time.perf_counter() - t:6.1f} s wall: {status}", flush=True)
        # The error may surface as its consequence (the writer process died of it): look at the cause too.
        if sharing is None and "Too many open files" in r.get("error", "") + r.get("traceback", ""):
            # torch's default sharing strategy keeps one descriptor open per shared storage; the
            # file_system strategy keeps none. Measure that configuration too, where it can work.
            fits, storages, limit = file_system_sharing_fits(sd)
            if fits:
                attempts.append((name + FS_SUFFIX, "file_system"))
            else:
                results[name + FS_SUFFIX] = {
                    "system": name, "sharing_strategy": "file_system",
                    "error": f"not run: one memory map per storage ({storages:,}) in two processes, "
                             f"beyond vm.max_map_count ({limit:,})"}
                print(f"  {name + FS_SUFFIX:15} {results[name + FS_SUFFIX]['error']}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# Report


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def span(xs, digits=3):
    if not xs:
        return "—"
    return f"{med(xs):.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def label(key):
    if key.endswith(FS_SUFFIX):
        return LABELS[key[:-len(FS_SUFFIX)]] + ", file_system sharing"
    return LABELS[key]


def table(case, res, runs):
    lines = [
        f"### {case}: {res['tensors']:,} tensors, {res['bytes'] / GB:.2f} GB",
        "",
        "| system | start-up s | blocking s (median, min-max) | step after save s | step, idle s | commit s | "
        "durable s | peak RSS GB | peak PSS GB | blocking ratio vs fastdcp | commit ratio vs fastdcp |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ours = res["systems"].get("fastdcp", {})
    ours_ok = "error" not in ours and ours.get("blocking_s")
    for name, r in res["systems"].items():
        if "error" in r:
            lines.append(f"| {label(name)} | {r.get('startup_s', float('nan')):.2f} | failed: {r['error']} "
                         f"| | | | | | | | |")
            continue
        m = r["memory"]
        fewer = f" (n={len(r['blocking_s'])})" if len(r["blocking_s"]) < runs else ""
        if ours_ok and name != "fastdcp":
            b = f"{med(r['blocking_s']) / med(ours['blocking_s']):.1f}x"
            c = f"{med(r['durable_s']) / med(ours['durable_s']):.2f}x"
        else:
            b = c = "1" if name == "fastdcp" else "—"
        lines.append(
            f"| {label(name)}{fewer} | {r['startup_s']:.2f} | {span(r['blocking_s'])} | {span(r['update_s'])} | "
            f"{span(r['update_idle_s'])} | {span(r['commit_s'])} | "
            f"{span(r['durable_s'])} | {m['peak_rss_sum_of_hwm_gb']:.2f} | {m['sampled_peak_pss_gb']:.2f} "
            f"| {b} | {c} |")
    lines.append(f"| memcpy, all cores (staging limit) | | {span(res['memcpy_s'])} | | | | | | | | |")
    lines.append(f"| dd O_DIRECT write + fsync (commit limit) | | | | | {span(res['disk_s'])} | | | | | |")
    lines.append("")
    lines.append(f"State dict {res['bytes'] / GB:.2f} GB; process RSS before the systems ran: "
                 f"{res['rss_baseline_gb']:.2f} GB. Commit ratios compare durable times. \"step after save\": the "
                 "training step (add_ on every tensor) right after the staging future, which with "
                 "copy-on-write staging waits for chunks not yet copied and competes with the writer for "
                 "the cores; \"step, idle\": the same step once the write is done.")
    return "\n".join(lines)


def init_one_rank_group():
    """A 1-rank gloo process group (dcp's process executor needs one)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def gil_probe(sd, root, timeout, quiet_s=None):
    """How long fastdcp holds the GIL during one async save (after a warm-up save): a Python thread
    ticks with sys.setswitchinterval(1e-4) while the main thread saves and waits; a gap between
    ticks over 50 us in which the ticker blocked counts as a stall, less the time it waited for a
    CPU (/proc/thread-self/sched and schedstat). The same ticker over an idle stretch of the same
    length shows what is left of the machine's noise."""
    system = make_system("fastdcp")
    system.start()
    try:
        timed_path = os.path.join(root, "gil_probe")
        system.save(timed_path + "_warm", sd)[1].result(timeout)

        def ticking(body):
            stalls, stop = [], threading.Event()

            def tick():
                # A gap in which this thread blocked (a voluntary context switch: the GIL's wait),
                # less the time it then waited for a CPU, is a stall; preemption and page faults
                # of a loaded machine are not.
                sched = os.open("/proc/thread-self/sched", os.O_RDONLY)
                stat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)

                def sample():
                    text = os.pread(sched, 4096, 0).decode()
                    waits = int(text.split("nr_voluntary_switches")[1].split(":")[1].split()[0])
                    return time.perf_counter(), int(os.pread(stat, 100, 0).split()[1]) * 1e-9, waits

                last = sample()
                while not stop.is_set():
                    now = sample()
                    stall = now[0] - last[0] - (now[1] - last[1])
                    if now[2] > last[2] and stall > 5e-5:
                        stalls.append(stall)
                    last = now
                os.close(sched)
                os.close(stat)

            old = sys.getswitchinterval()
            sys.setswitchinterval(1e-4)
            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
            started = time.perf_counter()
            try:
                body()
            finally:
                stop.set()
                ticker.join()
                sys.setswitchinterval(old)
            return {"seconds": time.perf_counter() - started, "stalls": len(stalls),
                    "longest_stall_ms": 1e3 * max(stalls, default=0.0), "total_stall_ms": 1e3 * sum(stalls)}

        call = []

        def save():
            started = time.perf_counter()
            staged, written = system.save(timed_path, sd)
            call.append(time.perf_counter() - started)
            staged.result(timeout)
            written.result(timeout)

        out = {"save": ticking(save)}
        # save() on the calling thread: an upper bound of the GIL held there (it releases it inside).
        out["save_call_ms"] = 1e3 * call[0]
        out["idle"] = ticking(lambda: time.sleep(quiet_s or out["save"]["seconds"]))
    finally:
        system.close()
    print(f"GIL probe (fastdcp async save): save() returned in {out['save_call_ms']:.2f} ms; "
          f"longest stall {out['save']['longest_stall_ms']:.2f} ms, total "
          f"{out['save']['total_stall_ms']:.2f} ms over {out['save']['seconds']:.2f} s; idle ticker: longest "
          f"{out['idle']['longest_stall_ms']:.2f} ms, total {out['idle']['total_stall_ms']:.2f} ms", flush=True)
    return out


def run_case(case, args, root):
    """One case, in its own process (see main): the hardware limits, then every system."""
    systems = args.systems.split(",")
    if "dcp_process" in systems:
        init_one_rank_group()
    sd, key_path = (case_small(args.quick, args.small_tensors, args.small_floats) if case == "small"
                    else CASES[case](args.quick))
    ts = list(tensors(sd))
    nbytes = sum(t.numel() * t.element_size() for t in ts)
    mutate = Mutator(sd)
    res = {"tensors": len(ts), "bytes": nbytes, "check_tensor": ".".join(key_path), "systems": {}}
    print(f"\n{case}: {len(ts):,} tensors, {nbytes / GB:.2f} GB", flush=True)
    res["memcpy_s"] = memcpy_limit(nbytes, 5)
    res["disk_s"] = [disk_limit(root, nbytes)]
    gc.collect()
    res["rss_baseline_gb"] = current_rss_gb()
    for name in systems:
        res["systems"].update(run_system_with_fallback(name, sd, key_path, mutate, root, args.runs, args.step,
                                                       args.timeout, args.budget))
    res["disk_s"].append(disk_limit(root, nbytes))
    if args.gil:
        res["gil"] = gil_probe(sd, root, args.timeout)
    if dist.is_initialized():
        dist.destroy_process_group()
    return res


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="measured saves per system")
    parser.add_argument("--budget", type=float, default=60,
                        help="seconds of measured saves per system and case: a system whose warm-up save "
                             "took longer than budget/runs gets fewer measured saves (at least 1)")
    parser.add_argument("--cases", default="1gib,llama,small")
    parser.add_argument("--systems", default=",".join(ALL_SYSTEMS))
    parser.add_argument("--small-tensors", type=int, default=50_000, help="tensors in the small case")
    parser.add_argument("--small-floats", type=int, default=1024, help="float32 elements per small-case tensor")
    parser.add_argument("--dir", default="/work/bench_tmp", help="where checkpoints are written")
    parser.add_argument("--step", type=float, default=0.5, help="seconds of 'training' after each stage")
    parser.add_argument("--json", default=None, help="raw results (default bench/results/async.json; "
                                                       "with --quick, <dir>/async_quick.json)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before one save counts as hung")
    parser.add_argument("--quick", action="store_true", help="tiny state dicts, 2 saves (CI)")
    parser.add_argument("--gil", action="store_true", help="also probe the GIL held during one fastdcp save")
    parser.add_argument("--case-process", nargs=2, metavar=("CASE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.runs = min(args.runs, 2)
        args.step = min(args.step, 0.05)
    if args.json is None:
        args.json = (os.path.join(args.dir, "async_quick.json") if args.quick
                     else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "async.json"))
    for s in args.systems.split(","):
        if s not in ALL_SYSTEMS:
            parser.error(f"unknown system {s!r}; choose from {','.join(ALL_SYSTEMS)}")
    for c in args.cases.split(","):
        if c not in CASES:
            parser.error(f"unknown case {c!r}; choose from {','.join(CASES)}")

    if args.case_process:
        case, out = args.case_process
        res = run_case(case, args, os.path.dirname(out))
        with open(out, "w") as f:
            json.dump(res, f)
        return

    os.makedirs(args.dir, exist_ok=True)
    root = os.path.join(args.dir, f"bench_async_{os.getpid()}")
    os.makedirs(root)
    started = time.time()
    report = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "runs": args.runs,
              "budget_s": args.budget, "step_s": args.step, "dir": args.dir, "quick": args.quick,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cases": {}}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, writing under "
          f"{root}; up to {args.runs} measured saves per system ({args.budget:.0f} s budget), step {args.step} s")
    # Every case runs in a process of its own: memory one system leaves behind (or a process-wide
    # setting, such as dcp's single writer process) cannot leak into the next case's figures, and
    # a case that crashes is reported without losing the others.
    forwarded = ["--runs", str(args.runs), "--budget", str(args.budget), "--systems", args.systems,
                 "--step", str(args.step), "--timeout", str(args.timeout), "--dir", args.dir,
                 "--small-tensors", str(args.small_tensors), "--small-floats", str(args.small_floats)]
    if args.quick:
        forwarded.append("--quick")
    if args.gil:
        forwarded.append("--gil")
    try:
        for case in args.cases.split(","):
            out = os.path.join(root, f"{case}.json")
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *forwarded, "--case-process", case, out])
            try:
                with open(out) as f:
                    report["cases"][case] = json.load(f)
            except (OSError, ValueError):
                report["cases"][case] = {"error": f"case process exited with status {proc.returncode}"}
                print(f"{case}: case process exited with status {proc.returncode}", flush=True)
    finally:
        report["wall_s"] = time.time() - started
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)

    print()
    for case, res in report["cases"].items():
        if "error" in res:
            print(f"### {case}: failed: {res['error']}\n")
            continue
        print(table(case, res, args.runs))
        print()
    floors = []
    for case, res in report["cases"].items():
        ours = res.get("systems", {}).get("fastdcp", {})
        if "error" in ours or not ours.get("blocking_s"):
            continue
        for name, r in res["systems"].items():
            if not name.startswith("fastdcp") and "error" not in r:
                ratio = med(r["blocking_s"]) / med(ours["blocking_s"])
                floors.append(f"{case}/{name}: {ratio:.1f}x {'meets' if ratio >= 5 else 'MISSES'} the 5x floor")
    print("Blocking-time floor (fastdcp at most 1/5 of each torch checkpointer):")
    for line in floors:
        print("  " + line)
    print(f"\nwall {report['wall_s']:.0f} s; raw numbers in {args.json}")


if __name__ == "__main__":
    main()
