"""GPU figures: device-to-host staging of fastdcp.torch.DefaultStager and of torch's own
torch.distributed.checkpoint._experimental DefaultStager beside the pinned cudaMemcpy limit, and the
blocking and commit times of both async checkpointers saving GPU tensors. Writes markdown tables.

a. limit: every tensor copied by `.copy_(src, non_blocking=True)` into a preallocated pinned host
   tensor, then torch.cuda.synchronize(); one 1 GiB tensor, one 4 GiB tensor, and 1,000 small
   tensors (4 B to ~150 KiB, as tests/gpu/test_gpu_staging.cpp) copied one by one (per-copy overhead).
b. staging: both DefaultStagers with CheckpointStagerConfig(use_pinned_memory=True,
   use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=True) on the same state
   dicts; time = stage(sd).result(), started with the device idle; the first stage is not timed.
   The last staged result is compared with its source, as soon as its future is done.
c. async saves: a Llama-shaped bf16 state dict on the GPU (~2.3 GB) saved by both
   make_async_checkpointer()s with pinned memory and non-blocking copies (the GPU defaults), through
   bench_async.py's measured loop: one untimed warm-up save, then --save-runs saves; blocking =
   until the staging future is done, commit = until the write future is done, durable = commit
   plus an fsync for torch's writer (it does not sync); the last checkpoint is loaded and checked.

Every figure is the median of --runs warm runs (min and max beside it). After --budget-seconds,
what is left is skipped, with a note. Without CUDA it writes "no NVIDIA GPU found: measurements
skipped" and exits 0.

Usage: python bench/bench_gpu.py --out FILE.md [--runs 5] [--save-runs 3] [--budget-seconds 360]
       [--dir DIR] [--quick]      (--quick: small sizes, 2 runs; bench/gpu_report.sh runs the full one)
"""

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

med = statistics.median
GB = 1e9
MIB = 1 << 20
GIB = 1 << 30
NO_GPU = "no NVIDIA GPU found: measurements skipped"
STAGER_CONFIG = dict(use_pinned_memory=True, use_shared_memory=False, use_async_staging=True,
                     use_non_blocking_copy=True)
SAVE_STAGING = dict(use_pinned_memory=True, use_non_blocking_copy=True)  # shared memory, async: defaults
LIMIT = "pinned cudaMemcpy (limit)"
STAGERS = ("fastdcp.torch DefaultStager", "torch _experimental DefaultStager")
SAVERS = {"fastdcp": "fastdcp AsyncCheckpointer", "torch_exp": "torch _experimental AsyncCheckpointer"}


def size_label(nbytes):
    return f"{nbytes // GIB} GiB" if nbytes >= GIB else f"{nbytes // MIB} MiB"


def small_sizes(count):
    """Byte sizes of test_gpu_staging.cpp's small buffers: 4 B to ~150 KiB, mostly a few KiB."""
    return [4 * (1 + (i * 7919) % (38000 if i % 10 == 0 else 1500)) for i in range(count)]


def staging_cases(quick):
    """(name, factory) pairs; a factory makes its float32 state dict on the GPU when called, so
    that only one case at a time holds device and pinned memory."""
    big, bigger, count = (MIB, 4 * MIB, 50) if quick else (GIB, 4 * GIB, 1000)

    def one(nbytes):
        return lambda: {"w": torch.randn(nbytes // 4, device="cuda")}

    def small():
        return {f"p{i}": torch.randn(n // 4, device="cuda") for i, n in enumerate(small_sizes(count))}

    return [(f"1 x {size_label(big)}", one(big)), (f"1 x {size_label(bigger)}", one(bigger)),
            (f"{count:,} small", small)]


class Report:
    """Markdown lines, rewritten to --out after each section, so a run cut short keeps its figures."""

    def __init__(self, path):
        self.path = path
        self.lines = []

    def add(self, *lines):
        self.lines += lines
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w") as f:
            f.write("\n".join(self.lines) + "\n")


class Budget:
    def __init__(self, seconds):
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds

    def left(self):
        return self.deadline - time.monotonic()

    def skip_note(self, what):
        """None while time is left; otherwise the note that says `what` was skipped."""
        return None if self.left() > 0 else f"{what}: skipped, the {self.seconds:g} s budget is spent"


def timed(fn, runs):
    """fn() once untimed (warm: buffers allocated and cached), then `runs` timed calls, each
    started with the device idle. Returns the times and the last call's result."""
    fn()
    times, result = [], None
    for _ in range(runs):
        result = None  # the previous staged tree is freed outside the clock
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def pinned_copy(sd):
    """The limit: one non-blocking copy per tensor into pinned tensors allocated beforehand."""
    pairs = [(torch.empty(t.shape, dtype=t.dtype, pin_memory=True), t) for t in sd.values()]

    def copy():
        for dst, src in pairs:
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        return {k: dst for k, (dst, _) in zip(sd, pairs)}

    return copy


def check_staged(staged, sd):
    """(bytes equal, pinned count): each staged tensor against its source, compared on the GPU
    (a 4 GiB compare on the CPU takes seconds)."""
    equal = all(staged[k].device.type == "cpu" and torch.equal(staged[k].to(v.device), v) for k, v in sd.items())
    return equal, sum(staged[k].is_pinned() for k in sd)


def measure_staging(fdt, args, budget):
    """Sections a and b: {case: (bytes, tensors, {system: row})}; a row holds the times, whether
    the bytes are equal and how many staged tensors are pinned, or a note."""
    import torch.distributed.checkpoint._experimental.staging as upstream

    modules = {STAGERS[0]: fdt, STAGERS[1]: upstream}
    results = {}
    for case, make in staging_cases(args.quick):
        note = budget.skip_note(case)
        if note:
            results[case] = (None, None, {"every system": {"note": note}})
            continue
        sd = make()
        nbytes = sum(t.numel() * t.element_size() for t in sd.values())
        rows = {}
        for name in (LIMIT, *STAGERS):
            rows[name] = {"note": budget.skip_note(name)}
            if name in modules and modules[name] is None:
                rows[name]["note"] = "skipped: fastdcp is not importable (see the device line)"
            if rows[name]["note"]:
                continue
            stager = None
            try:
                if name == LIMIT:
                    fn = pinned_copy(sd)
                else:
                    m = modules[name]
                    stager = m.DefaultStager(m.CheckpointStagerConfig(**STAGER_CONFIG))
                    fn = stage_and_wait(stager, sd)
                times, staged = timed(fn, args.runs)
                equal, pinned = check_staged(staged, sd)  # at once: the future said the copies are done
                rows[name] = {"times": times, "equal": equal, "pinned": pinned}
                del staged, fn
            except Exception as e:  # noqa: BLE001  (one system's failure must not hide the others)
                rows[name] = {"note": f"failed: {type(e).__name__}: {e}".splitlines()[0][:300]}
            finally:
                if stager is not None:
                    stager.close()
            print(f"  {case:12} {name:36} {row_summary(rows[name], nbytes)}", flush=True)
        results[case] = (nbytes, len(sd), rows)
        del sd
        gc.collect()
        torch.cuda.empty_cache()
    return results


def stage_and_wait(stager, sd):
    return lambda: stager.stage(sd).result()


def ms_span(xs):
    return f"{med(xs) * 1e3:.2f} ({min(xs) * 1e3:.2f}-{max(xs) * 1e3:.2f})"


def row_summary(row, nbytes):
    if row.get("note"):
        return row["note"]
    return f"{ms_span(row['times'])} ms, {nbytes / med(row['times']) / GB:.2f} GB/s, bytes equal: {row['equal']}"


def staging_table(results, runs):
    lines = [f"### Device-to-host staging, warm (ms: median (min-max) of {runs})", "",
             "| case | GB | system | ms | GB/s | of the limit | fastdcp speedup vs torch | bytes equal | pinned |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for case, (nbytes, count, rows) in results.items():
        limit, theirs = rows.get(LIMIT, {}), rows.get(STAGERS[1], {})
        gb = "—" if nbytes is None else f"{nbytes / GB:.3f}"
        for name, row in rows.items():
            if row.get("note"):
                lines.append(f"| {case} | {gb} | {name} | {row['note']} | | | | | |")
                continue
            of_limit = f"{med(limit['times']) / med(row['times']):.2f}" if limit.get("times") else "—"
            speedup = "—"
            if name == STAGERS[0] and theirs.get("times"):
                speedup = f"{med(theirs['times']) / med(row['times']):.2f}x"
            lines.append(f"| {case} | {gb} | {name} | {ms_span(row['times'])} | "
                         f"{nbytes / med(row['times']) / GB:.2f} | {of_limit} | {speedup} | "
                         f"{'yes' if row['equal'] else 'NO'} | {row['pinned']}/{count} |")
    lines += ["", "\"of the limit\": the limit's median time over the system's (1.00: as fast as one pinned "
              "cudaMemcpy per tensor). \"pinned\": staged tensors whose host memory is pinned.", ""]
    return lines


def llama_dims(quick):
    """(layers, hidden, ffn, vocab): ~1.16 G parameters, 2.3 GB in bf16; tiny with --quick."""
    return (2, 64, 176, 1000) if quick else (20, 2048, 5632, 32000)


def measure_saves(args, budget):
    """Section c, through bench_async's measured loop; {system: bench_async result} and the state
    dict's (tensors, bytes). bench_async imports fastdcp, so it is imported only here."""
    import bench_async
    from bench_torch_staging import llama_weights

    sd = {k: v.to("cuda", torch.bfloat16) for k, v in llama_weights(*llama_dims(args.quick)).items()}
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    key_path = ("layers.0.attention.wq.weight",)
    mutate = bench_async.Mutator(sd)  # the training step after each save: add_(1) on every tensor
    root = tempfile.mkdtemp(prefix="bench_gpu_", dir=args.dir)
    results = {}
    try:
        for i, name in enumerate(SAVERS):
            note = budget.skip_note(SAVERS[name])
            if note:
                results[name] = {"note": note}
                continue
            # Measured saves share what is left with the systems still to run.
            share = max(1.0, budget.left() / (len(SAVERS) - i))
            results[name] = bench_async.run_system(name, sd, key_path, mutate, root, args.save_runs, args.step,
                                                   timeout=300, budget=share, staging=SAVE_STAGING)
            r = results[name]
            print(f"  {SAVERS[name]:40} {r.get('error') or 'blocking ' + bench_async.span(r['blocking_s'])}",
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results, len(sd), nbytes


def saves_table(results, count, nbytes, args):
    from bench_async import span  # seconds, median (min-max), as bench_async's own tables

    layers, hidden, ffn, vocab = llama_dims(args.quick)
    lines = [f"### Async save of GPU tensors ({count} bf16 tensors, {nbytes / GB:.2f} GB; s: median (min-max))", "",
             "| system | start-up s | blocking s | commit s | durable s | saves | blocking vs fastdcp | verified |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    ours = results.get("fastdcp", {})
    for name, r in results.items():
        if "note" in r or "error" in r:
            lines.append(f"| {SAVERS[name]} | {r.get('note') or 'failed: ' + r['error']} | | | | | | |")
            continue
        ratio = "1" if name == "fastdcp" else "—"
        if name != "fastdcp" and ours.get("blocking_s"):
            ratio = f"{med(r['blocking_s']) / med(ours['blocking_s']):.1f}x"
        lines.append(f"| {SAVERS[name]} | {r['startup_s']:.2f} | {span(r['blocking_s'])} | {span(r['commit_s'])} | "
                     f"{span(r['durable_s'])} | {len(r['blocking_s'])} | {ratio} | "
                     f"{'yes' if r.get('verified') else 'NO'} |")
    lines += ["", f"Llama-shaped weights ({layers} layers, hidden {hidden}, FFN {ffn}, vocab {vocab}) on the GPU, "
              f"written under {args.dir} ({fs_type(args.dir)}); "
              f"{args.step} s of sleep stands for the training step after each save. Blocking: until the staging "
              "future is done (training may change its tensors); commit: until the write future is done; "
              "durable: commit, plus an fsync of the files for torch's writer, which does not sync.", ""]
    return lines


def fs_type(path):
    """The file system type /proc/mounts gives for `path` (tmpfs would make commits look fast)."""
    path, best = os.path.realpath(path), ("", "unknown file system")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                mount, kind = line.split()[1:3]
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best[0]):
                    best = (mount, kind)
    except OSError:
        pass
    return best[1]


def fastdcp_import():
    """(fastdcp.torch or None, why not)."""
    try:
        import fastdcp.torch as fdt
        return fdt, None
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"


def device_line(fdt, fastdcp_error):
    if fdt is None:
        ours = f"fastdcp not importable ({fastdcp_error})"
    else:
        import fastdcp
        from fastdcp.torch._adapter import _native_ops
        ours = (f"fastdcp from {os.path.dirname(fastdcp.__file__)} (CUDA seen: {fastdcp.cuda_available()}, "
                f"native torch ops: {'yes' if _native_ops() is not None else 'no'})")
    return (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"{os.cpu_count()} CPUs; {ours}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--runs", type=int, default=5, help="timed stages per system and case")
    parser.add_argument("--save-runs", type=int, default=3, help="measured async saves per checkpointer")
    parser.add_argument("--budget-seconds", type=float, default=360,
                        help="after this, measurements not yet started are skipped")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where checkpoints are written")
    parser.add_argument("--step", type=float, default=0.2, help="seconds of 'training' after each save")
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 runs (checks the harness)")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.save_runs, args.step = min(args.runs, 2), min(args.save_runs, 2), min(args.step, 0.05)
    budget = Budget(args.budget_seconds)
    report = Report(args.out)
    report.add("## GPU benchmarks (bench/bench_gpu.py)", "")
    if not torch.cuda.is_available():
        print(NO_GPU)
        report.add(f"{NO_GPU} (torch {torch.__version__}: torch.cuda.is_available() is false).")
        return

    fdt, fastdcp_error = fastdcp_import()
    device = device_line(fdt, fastdcp_error)
    print(f"device: {device}", flush=True)
    report.add(f"Device: {device}. Command: `{' '.join([os.path.basename(sys.executable)] + sys.argv)}`.", "")

    print("staging (sections a and b)", flush=True)
    report.add(*staging_table(measure_staging(fdt, args, budget), args.runs))

    print("async saves (section c)", flush=True)
    note = budget.skip_note("async saves")
    if fdt is None:
        note = f"async saves: skipped, fastdcp is not importable ({fastdcp_error})"
    if note:
        report.add("### Async save of GPU tensors", "", note, "")
    else:
        report.add(*saves_table(*measure_saves(args, budget), args))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
