"""The whole performance comparison in one command: staging, save, load and async checkpointing
(blocking and durable commit) of fastdcp and of every peer, beside the same-run hardware limits,
across state-dict sizes and tensor counts; writes the tables into docs/benchmarks.md (between the
report markers), PNG plots into docs/plots/ and the raw figures into bench/results/report.json.

Systems, by operation (the harnesses are the other bench/ scripts, imported, not copied):
  staging       fastdcp DefaultStager, torch _experimental DefaultStager (both synchronous, CPU
                configuration); limit: all-core memcpy of the same bytes
  save / load   fastdcp CheckpointWriter/Reader (also O_DIRECT saves, mmap and in-place loads),
                torch _experimental CheckpointWriter/Reader, torch.save/load, safetensors,
                torch.distributed.checkpoint save/load; every save durable (fsync), every load from
                disk (page cache evicted); limits: 4-thread O_DIRECT and buffered sequential
                write/read of the same bytes (bench_checkpoint.py)
  async         fastdcp AsyncCheckpointer (copy-on-write on and off), torch _experimental
                AsyncCheckpointer, dcp.async_save with thread and process executors: the time
                training is blocked per save, and the time to a durable commit; limits: memcpy
                (what a copy before release costs) and a dd O_DIRECT write (bench_async.py)

Sweeps: by bytes (100 MB to the largest state dict that fits this machine, 100 tensors) and by
tensor count (1 to 100,000 tensors, 100 MB). Every point runs each operation in a process of its
own, so that memory or process-wide state one measurement leaves behind cannot reach the next.
Every figure is the median of --runs measurements (min and max beside it).

Usage: bash scripts/report.sh [--runs 3] [--max-gb G] [--dir DIR] [--quick] [--out DIR]
  (scripts/report.sh installs what is needed and runs .venv/bin/python bench/report.py)
  --quick: tiny sizes, 2 runs, a few minutes: checks that the harness works (the tests run it);
  its output goes to --out (default: a temporary directory), never into docs/.
"""

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BEGIN = "<!-- report:begin -->"
END = "<!-- report:end -->"
MB, GB = 1e6, 1e9
KINDS = ("staging", "saveload", "async")

# Operation -> (title, the limit rows shown beside it)
OPS = {
    "staging": ("Staging (copy into reusable host buffers)", ["memcpy, all cores"]),
    "save": ("Save, durable", ["disk write, O_DIRECT", "disk write, buffered + fsync"]),
    "load": ("Load from disk, every page read", ["disk read, O_DIRECT", "disk read, buffered"]),
    "async blocking": ("Async save: training blocked", ["memcpy, all cores"]),
    "async commit": ("Async save: durable commit", ["disk write, O_DIRECT (dd)"]),
}
# The fastdcp row each operation's summary compares with the best peer.
OURS = {"staging": "fastdcp", "save": "fastdcp", "load": "fastdcp", "async blocking": "fastdcp AsyncCheckpointer",
        "async commit": "fastdcp AsyncCheckpointer"}


# ---------------------------------------------------------------------------------------------
# The plan


def memory_total():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))


def largest_that_fits(directory):
    """The largest state dict this machine can run every peer on: torch.load and the shared-memory
    stagers hold two or three copies next to the original and the writer processes, so a sixth of
    the memory; the disk holds the raw-disk file plus two checkpoints, so a quarter of its free space."""
    return min(memory_total() / 6, shutil.disk_usage(directory).free / 4)


def plan(args):
    """The sweep points, each {"bytes", "tensors", "sweeps"}: the bytes sweep at a fixed tensor
    count and the tensor-count sweep at fixed bytes share one point."""
    if args.quick:
        sizes, size_count = [1 * MB, 4 * MB], 10
        counts, count_bytes = [10, 1000], 1 * MB
    else:
        largest = largest_that_fits(args.dir)
        if args.max_gb:
            largest = min(largest, args.max_gb * GB)
        largest = int(largest / (100 * MB)) * 100 * MB
        if largest < 100 * MB:
            sys.exit(f"report.py: even 100 MB does not fit here ({memory_total() / GB:.1f} GB of memory, "
                     f"{shutil.disk_usage(args.dir).free / GB:.1f} GB free in {args.dir}): see largest_that_fits")
        sizes = sorted({s for s in (100 * MB, 400 * MB, 1600 * MB) if s < largest} | {largest})
        size_count = 100
        counts, count_bytes = [1, 10, 100, 1000, 10_000, 100_000], 100 * MB
    points = {}
    for nbytes in sizes:
        points.setdefault((int(nbytes), size_count), set()).add("bytes")
    for count in counts:
        points.setdefault((int(count_bytes), count), set()).add("tensors")
    return [{"bytes": b, "tensors": t, "sweeps": sorted(s)} for (b, t), s in sorted(points.items())]


def point_key(p):
    return f"{p['bytes']}B_{p['tensors']}t"


def fmt_bytes(n):
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / MB:.0f} MB"


def describe(p):
    return f"{fmt_bytes(p['bytes'])} in {p['tensors']:,} tensors"


def estimated_seconds(kind, p):
    """A rough cost model for the progress bar's time estimate (seconds on a 2-core VM)."""
    per_gb, per_100k, fixed = {"staging": (4, 10, 3), "saveload": (90, 120, 5), "async": (45, 120, 40)}[kind]
    return per_gb * p["bytes"] / GB + per_100k * p["tensors"] / 1e5 + fixed


# ---------------------------------------------------------------------------------------------
# Measurements (each in a process of its own: see main)


def state_dict(nbytes, count):
    import torch
    each = max(1, nbytes // 4 // count)
    return {f"t{i}": torch.rand(each) for i in range(count)}


def error_of(e):
    return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}


def measure_staging(sd, nbytes, runs):
    import torch.distributed.checkpoint._experimental as upstream

    import fastdcp.torch as fdt
    from bench_async import memcpy_limit
    from bench_torch_staging import CPU, warm_times

    res = {"limits": {"memcpy, all cores": memcpy_limit(nbytes, runs)}, "ops": {"staging": {}}}
    for name, module in (("fastdcp", fdt), ("torch _experimental", upstream)):
        stager = module.DefaultStager(module.CheckpointStagerConfig(use_async_staging=False, **CPU))
        try:
            res["ops"]["staging"][name] = warm_times(lambda: stager.stage(sd), runs)
        except Exception as e:  # noqa: BLE001
            res["ops"]["staging"][name] = error_of(e)
        finally:
            stager.close()
    return res


def measure_save_load(sd, nbytes, runs, root):
    from bench_checkpoint import flatten, measure_round

    rounds = [measure_round(sd, flatten(sd), root, nbytes, r) for r in range(runs)]
    limits = {"disk write, O_DIRECT": "disk write direct", "disk write, buffered + fsync": "disk write buffered",
              "disk read, O_DIRECT": "disk read direct", "disk read, buffered": "disk read buffered"}
    res = {"limits": {label: [r[key] for r in rounds] for label, key in limits.items()},
           "ops": {"save": {}, "load": {}}}
    for key in rounds[0]:
        op, _, name = key.partition(" ")
        if op not in ("save", "load"):
            continue
        errors = [r.get("errors", {}).get(key) for r in rounds]
        failed = next((e for e in errors if e), None)
        res["ops"][op][name] = {"error": failed} if failed else [r[key] for r in rounds]
    return res


def measure_async(sd, nbytes, runs, root, args):
    import torch.distributed as dist

    from bench_async import ALL_SYSTEMS, Mutator, disk_limit, init_one_rank_group, label, memcpy_limit
    from bench_async import run_system_with_fallback

    init_one_rank_group()  # dcp's process executor needs a process group
    res = {"limits": {"memcpy, all cores": memcpy_limit(nbytes, runs),
                      "disk write, O_DIRECT (dd)": [disk_limit(root, nbytes)]},
           "ops": {"async blocking": {}, "async commit": {}}}
    mutate = Mutator(sd)
    for name in ALL_SYSTEMS:
        results = run_system_with_fallback(name, sd, ("t0",), mutate, root, runs, args.step, args.timeout,
                                           args.budget)
        for key, r in results.items():
            for op, field in (("async blocking", "blocking_s"), ("async commit", "durable_s")):
                res["ops"][op][label(key)] = {"error": r["error"]} if "error" in r else r[field]
    res["limits"]["disk write, O_DIRECT (dd)"].append(disk_limit(root, nbytes))
    dist.destroy_process_group()
    return res


def run_task(kind, nbytes, count, args, out):
    sys.path.insert(0, HERE)
    sd = state_dict(nbytes, count)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    root = tempfile.mkdtemp(prefix=f"report_{kind}_", dir=args.dir)
    try:
        if kind == "staging":
            res = measure_staging(sd, nbytes, args.runs)
        elif kind == "saveload":
            res = measure_save_load(sd, nbytes, args.runs, root)
        else:
            res = measure_async(sd, nbytes, args.runs, root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res["bytes"] = nbytes
    with open(out, "w") as f:
        json.dump(res, f)


# ---------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A progress bar on stderr, weighted by each task's estimated cost; one line per task where
    stderr is not a terminal (CI logs)."""

    def __init__(self, weights):
        self.weights, self.done, self.started = weights, 0.0, time.time()
        self.tty = sys.stderr.isatty()

    def show(self, index, text):
        total = sum(self.weights)
        elapsed = time.time() - self.started
        eta = elapsed * (total - self.done) / self.done if self.done else sum(self.weights)
        filled = int(30 * self.done / total)
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] {100 * self.done / total:3.0f}% "
                f"task {index + 1}/{len(self.weights)}: {text}  {elapsed / 60:.1f} min, ~{eta / 60:.0f} min left")
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def advance(self, index):
        self.done += self.weights[index]

    def close(self):
        if self.tty:
            sys.stderr.write("\n")


# ---------------------------------------------------------------------------------------------
# Tables and plots


def times_of(cell):
    """The times of a measured cell without its failed runs (NaN); [] for a failed or missing one."""
    return [x for x in cell if x == x] if isinstance(cell, list) else []


def fmt_seconds(x):
    return f"{x:.3g}" if x >= 0.001 else f"{x:.2g}"


def fmt_cell(cell, runs):
    """median (min–max); ", n=k" when fewer than `runs` runs were measured."""
    if cell is None:
        return ""
    if isinstance(cell, dict):
        return f"failed: {cell['error'].replace('|', '/')}"
    xs = times_of(cell)
    if not xs:
        return "failed"
    fewer = f"n={len(xs)}" if len(xs) < runs else ""
    if len(xs) == 1:
        return f"{fmt_seconds(xs[0])} ({fewer})" if fewer else fmt_seconds(xs[0])
    return (f"{fmt_seconds(statistics.median(xs))} ({fmt_seconds(min(xs))}–{fmt_seconds(max(xs))}"
            f"{', ' + fewer if fewer else ''})")


def median_of(cell):
    xs = times_of(cell)
    return statistics.median(xs) if xs else None


def rows_of(results, points, op):
    """[(row name, is_limit, {point key: cell})] for one operation: the systems in the order they
    were first measured, then the limits."""
    systems, limits = {}, {}
    for p in points:
        r = results.get(point_key(p), {})
        for name, cell in r.get("ops", {}).get(op, {}).items():
            systems.setdefault(name, {})[point_key(p)] = cell
        for name in OPS[op][1]:
            if name in r.get("limits", {}):
                limits.setdefault(name, {})[point_key(p)] = r["limits"][name]
    return [(n, False, c) for n, c in systems.items()] + [(n, True, c) for n, c in limits.items()]


def sweep_points(points, sweep):
    return [p for p in points if sweep in p["sweeps"]]


def sweep_header(sweep, p):
    return fmt_bytes(p["bytes"]) if sweep == "bytes" else f"{p['tensors']:,} tensors"


def table(results, points, op, sweep, runs):
    pts = sweep_points(points, sweep)
    lines = [f"| {OPS[op][0]}, seconds | " + " | ".join(sweep_header(sweep, p) for p in pts) + " |",
             "| --- |" + " --- |" * len(pts)]
    for name, is_limit, cells in rows_of(results, pts, op):
        shown = f"*{name} (limit)*" if is_limit else name
        lines.append(f"| {shown} | " + " | ".join(fmt_cell(cells.get(point_key(p)), runs) for p in pts) + " |")
    return "\n".join(lines)


def summary(results, points):
    """fastdcp against the best peer and the limit at the largest point and the most tensors."""
    largest = max(points, key=lambda p: (p["bytes"], -p["tensors"]))
    most = max(points, key=lambda p: (p["tensors"], p["bytes"]))
    lines = ["| operation | state dict | fastdcp s | best peer | peer s | peer / fastdcp | limit s | "
             "limit / fastdcp |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for op in OPS:
        for p in (largest, most):
            rows = rows_of(results, [p], op)
            key = point_key(p)
            ours = median_of(next((c.get(key) for n, lim, c in rows if n == OURS[op]), None))
            peers = [(median_of(c.get(key)), n) for n, lim, c in rows if not lim and not n.startswith("fastdcp")]
            peers = sorted((t, n) for t, n in peers if t is not None)
            limit = min((t for t in (median_of(c.get(key)) for n, lim, c in rows if lim) if t is not None),
                        default=None)
            if ours is None:
                continue
            peer_t, peer = peers[0] if peers else (None, "—")
            lines.append(
                f"| {OPS[op][0]} | {describe(p)} | {fmt_seconds(ours)} | {peer} | "
                f"{fmt_seconds(peer_t) if peer_t else '—'} | {f'{peer_t / ours:.1f}x' if peer_t else '—'} | "
                f"{fmt_seconds(limit) if limit else '—'} | {f'{limit / ours:.2f}' if limit else '—'} |")
    return "\n".join(lines)


def color_for(name):
    """One color per system family in every panel: fastdcp's default blue, its variants lighter."""
    families = [("fastdcp AsyncCheckpointer, copy", "#8fb3de"), ("fastdcp O_DIRECT", "#8fb3de"),
                ("fastdcp mmap", "#8fb3de"), ("fastdcp in place", "#17becf"), ("fastdcp", "#1f77b4"),
                ("torch _experimental", "#ff7f0e"), ("torch.", "#2ca02c"), ("safetensors", "#9467bd"),
                ("dcp.async_save (process)", "#8c564b"), ("dcp", "#d62728")]
    return next(color for prefix, color in families if name.startswith(prefix))


def plot(results, points, sweep, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sweep_points(points, sweep)
    xs_of = (lambda p: p["bytes"] / GB) if sweep == "bytes" else (lambda p: p["tensors"])
    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    for ax, op in zip(axes.flat, OPS):
        for name, is_limit, cells in rows_of(results, pts, op):
            data = [(xs_of(p), times_of(cells.get(point_key(p)))) for p in pts]
            data = [(x, ts) for x, ts in data if ts]
            if not data:
                continue
            x = [d[0] for d in data]
            med = [statistics.median(ts) for _, ts in data]
            err = [[m - min(ts) for m, (_, ts) in zip(med, data)], [max(ts) - m for m, (_, ts) in zip(med, data)]]
            if is_limit:
                ax.plot(x, med, linestyle="--", color="black" if "O_DIRECT" in name or "memcpy" in name else "gray",
                        label=f"{name} (limit)")
                continue
            ax.errorbar(x, med, yerr=err, marker="o", markersize=4, capsize=3, color=color_for(name),
                        linewidth=2.5 if name == OURS[op] else 1.2, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(OPS[op][0])
        ax.set_xlabel("state dict, GB" if sweep == "bytes" else "tensors")
        ax.set_ylabel("seconds (median; bars: min-max)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes.flat[-1].axis("off")
    p0 = pts[0]
    axes.flat[-1].text(0.0, 0.5, ("Cost by bytes, " + f"{p0['tensors']:,} tensors" if sweep == "bytes" else
                                  f"Cost by tensor count, {fmt_bytes(p0['bytes'])}") +
                       "\nfastdcp's default drawn thick; dashed: same-run hardware limits", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def markdown(report, plots_rel):
    results, points = report["results"], report["points"]
    m = report["machine"]
    out = [
        BEGIN,
        "## Report: every system across sizes and tensor counts",
        "",
        f"Generated by `{report['command']}` on {report['date']} in {report['wall_s'] / 60:.0f} minutes"
        f"{' (tasks that failed measured again with `--resume`)' if report.get('resumed') else ''} "
        f"({m['cpus']} CPUs, {m['memory_gb']:.0f} GB memory, torch {m['torch']}, writing to {m['dir']}). "
        f"Every cell: median of {report['runs']} runs (min–max), seconds; lower is better. Limits are "
        "measured in the same run on the same bytes. An async system whose warm-up save took longer "
        f"than {report.get('budget_s', 30):.0f} s (--budget) over the runs is measured fewer times (n in "
        "its cells). The section is rewritten by the script; the "
        "hand-written sections below it explain the method and the figures of each part. Raw figures: "
        "`bench/results/report.json`.",
        "",
        f"![cost by bytes]({plots_rel}report_bytes.png)",
        "",
        f"![cost by tensor count]({plots_rel}report_tensors.png)",
        "",
        "### Summary: fastdcp, the best peer and the limit",
        "",
        "\"limit / fastdcp\" is the fraction of the hardware limit fastdcp reaches (1 = at the limit; "
        "above 1 for async blocking and staging means fastdcp blocks less than a copy would take).",
        "",
        summary(results, points),
        "",
    ]
    for sweep, title in (("bytes", "Cost by bytes"), ("tensors", "Cost by tensor count")):
        pts = sweep_points(points, sweep)
        fixed = (f"{pts[0]['tensors']:,} tensors of equal size" if sweep == "bytes"
                 else f"{fmt_bytes(pts[0]['bytes'])} split into equal tensors")
        out += [f"### {title} ({fixed})", ""]
        for op in OPS:
            out += [table(results, points, op, sweep, report["runs"]), ""]
    failed = [(point_key(p), kind, results[point_key(p)][kind]["task_error"]) for p in points
              for kind in KINDS if "task_error" in results.get(point_key(p), {}).get(kind, {})]
    if failed:
        out += ["Tasks that failed as a whole (their log: `bench/results/report.log`):", ""]
        out += [f"- {k} {kind}: {e}" for k, kind, e in failed] + [""]
    out.append(END)
    return "\n".join(out)


def write_section(path, section):
    """Replaces the report section of `path` (between the markers), or puts it after the title."""
    text = open(path).read() if os.path.exists(path) else "# fastdcp benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        title, _, body = text.partition("\n")
        text = f"{title}\n\n{section}\n{body}"
    with open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------


def outputs(args):
    """(markdown, plots directory, plots as linked from the markdown, json, log) paths."""
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        return (os.path.join(args.out, "report.md"), args.out, "", os.path.join(args.out, "report.json"),
                os.path.join(args.out, "report.log"))
    return (os.path.join(REPO, "docs", "benchmarks.md"), os.path.join(REPO, "docs", "plots"), "plots/",
            os.path.join(HERE, "results", "report.json"), os.path.join(HERE, "results", "report.log"))


# The operation a task's results hold, by task kind: a task is done when its point has them.
FIRST_OP = {"staging": "staging", "saveload": "save", "async": "async blocking"}


def measure(args, log_path, previous=None):
    """Runs every task in a process of its own, or, given an earlier report (--resume), only the
    tasks it lacks or that failed there; the report (see render)."""
    import torch
    if previous:
        report = previous
        report["resumed"] = report.get("resumed", 0) + 1
    else:
        report = {"command": " ".join(["bash scripts/report.sh", *sys.argv[1:]]),
                  "date": time.strftime("%Y-%m-%d %H:%M"), "runs": args.runs, "budget_s": args.budget, "step_s": args.step,
                  "points": plan(args), "results": {},
                  "wall_s": 0.0, "machine": {"cpus": os.cpu_count(), "memory_gb": memory_total() / GB,
                                             "torch": torch.__version__, "dir": args.dir}}
    points = report["points"]

    def done(p, kind):
        entry = report["results"].get(point_key(p), {})
        return FIRST_OP[kind] in entry.get("ops", {}) and "task_error" not in entry.get(kind, {})

    tasks = [(p, kind) for p in points for kind in KINDS if not done(p, kind)]
    progress = Progress([estimated_seconds(kind, p) for p, kind in tasks])
    forwarded = ["--runs", str(args.runs), "--dir", args.dir, "--step", str(args.step), "--budget",
                 str(args.budget), "--timeout", str(args.timeout)]
    started = time.time()
    print(f"fastdcp report: {len(tasks)} tasks ({len(points)} points x {len(KINDS)} operations"
          f"{', the rest measured before' if previous else ''}), {report['runs']} runs each; log in {log_path}",
          flush=True)
    with open(log_path, "a" if previous else "w") as log, tempfile.TemporaryDirectory(prefix="report_", dir=args.dir) as scratch:
        for i, (p, kind) in enumerate(tasks):
            progress.show(i, f"{kind} on {describe(p)}")
            out = os.path.join(scratch, f"{point_key(p)}_{kind}.json")
            log.write(f"\n=== {kind} on {describe(p)} ===\n")
            log.flush()
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *forwarded, "--task", kind,
                                   str(p["bytes"]), str(p["tensors"]), out], stdout=log, stderr=subprocess.STDOUT)
            entry = report["results"].setdefault(point_key(p), {"limits": {}, "ops": {}})
            try:
                with open(out) as f:
                    res = json.load(f)
                entry["limits"].update(res["limits"])
                entry["ops"].update(res["ops"])
                entry.pop(kind, None)  # a failure of an earlier run, measured again
            except (OSError, ValueError):
                entry.setdefault(kind, {})["task_error"] = f"exited with status {proc.returncode}"
                progress.close()
                print(f"{kind} on {describe(p)}: the task exited with status {proc.returncode} (see {log_path})",
                      flush=True)
            progress.advance(i)
    progress.close()
    report["wall_s"] += time.time() - started
    return report


def render(report, args):
    md_path, plots_dir, plots_rel, json_path, _ = outputs(args)
    os.makedirs(plots_dir, exist_ok=True)
    for sweep in ("bytes", "tensors"):
        plot(report["results"], report["points"], sweep, os.path.join(plots_dir, f"report_{sweep}.png"))
    section = markdown(report, plots_rel)
    if args.out:
        with open(md_path, "w") as f:
            f.write("# fastdcp performance report\n\n" + section + "\n")
    else:
        write_section(md_path, section)
    print(summary(report["results"], report["points"]))
    print(f"\nmeasured in {report['wall_s'] / 60:.1f} min; tables in {md_path}, plots in {plots_dir}, "
          f"raw figures in {args.render or json_path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="measurements per figure (median, min, max)")
    parser.add_argument("--max-gb", type=float, default=None, help="cap on the largest state dict")
    parser.add_argument("--dir", default=os.path.join(REPO, "build-report"),
                        help="where checkpoints are written (a directory on the disk to measure)")
    parser.add_argument("--out", default=None, help="write report.md, the plots and report.json here "
                                                     "instead of docs/ and bench/results/")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 runs: checks the harness")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="measure nothing: write the tables and plots from an earlier run's report.json")
    parser.add_argument("--resume", metavar="JSON", default=None,
                        help="measure only what an earlier run's report.json lacks or failed, keeping the rest")
    parser.add_argument("--step", type=float, default=0.2, help="seconds of 'training' after each async save")
    parser.add_argument("--budget", type=float, default=30, help="seconds of measured async saves per system")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds before one save counts as hung (torch's experimental writer process "
                             "hangs at 100,000 tensors with the file_system sharing strategy: it runs out "
                             "of memory maps, vm.max_map_count)")
    parser.add_argument("--task", nargs=4, metavar=("KIND", "BYTES", "TENSORS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: at least 1 run is needed")
    if args.max_gb is not None and args.max_gb < 0.1:
        parser.error(f"--max-gb {args.max_gb:g}: the bytes sweep starts at 100 MB, so the cap must be at least 0.1")
    for option, path in (("--render", args.render), ("--resume", args.resume)):
        if path and not os.path.isfile(path):
            parser.error(f"{option} {path}: no such file (the report.json of an earlier run)")
    if args.quick:
        args.runs, args.step = min(args.runs, 2), 0.02
        if args.out is None:
            args.out = tempfile.mkdtemp(prefix="fastdcp_report_")
    os.makedirs(args.dir, exist_ok=True)
    if args.task:
        kind, nbytes, count, out = args.task
        run_task(kind, int(nbytes), int(count), args, out)
        return
    if importlib.util.find_spec("matplotlib") is None:  # checked before an hour of measuring, not after
        sys.exit("report.py: matplotlib is missing; run bash scripts/report.sh, which installs it")

    if args.render:
        with open(args.render) as f:
            report = json.load(f)
    else:
        _, _, _, json_path, log_path = outputs(args)
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
        previous = None
        if args.resume:
            with open(args.resume) as f:
                previous = json.load(f)
            # The figures measured again must be comparable with those kept.
            args.runs = previous["runs"]
            args.budget = previous.get("budget_s", args.budget)
            args.step = previous.get("step_s", args.step)
        report = measure(args, log_path, previous)
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    render(report, args)


if __name__ == "__main__":
    main()
