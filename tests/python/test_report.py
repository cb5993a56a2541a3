"""The performance report (bench/report.py): --quick runs every system through the real harness and
writes the tables and plots; the report section of docs/benchmarks.md is replaced in place."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import report  # noqa: E402

SYSTEMS = {
    "staging": ["fastdcp", "torch _experimental", "*memcpy, all cores (limit)*"],
    "save": ["fastdcp", "fastdcp O_DIRECT", "torch _experimental", "torch.save", "safetensors", "dcp",
             "*disk write, O_DIRECT (limit)*"],
    "load": ["fastdcp", "fastdcp mmap", "fastdcp in place", "torch _experimental", "torch.load", "safetensors",
             "dcp", "*disk read, O_DIRECT (limit)*"],
    "async blocking": ["fastdcp AsyncCheckpointer", "fastdcp AsyncCheckpointer, copy-on-write off",
                       "torch _experimental AsyncCheckpointer", "dcp.async_save (thread)",
                       "dcp.async_save (process)", "*memcpy, all cores (limit)*"],
    "async commit": ["fastdcp AsyncCheckpointer", "torch _experimental AsyncCheckpointer",
                     "dcp.async_save (process)", "*disk write, O_DIRECT (dd) (limit)*"],
}


def tables(markdown):
    """{table title: {row name: [cells]}} of every markdown table."""
    out, current = {}, None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if current is None:
            current = out.setdefault(cells[0], {})
        elif cells[0] != "---":
            current[cells[0]] = cells[1:]
    return out


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "report.py"), "--quick", "--out", str(out),
                           "--dir", str(out / "scratch")], capture_output=True, text=True, timeout=1200)
    log = (out / "report.log").read_text() if (out / "report.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-5000:]
    return out


def test_quick_report_measures_every_system_at_every_point(quick_report):
    found = tables((quick_report / "report.md").read_text())
    raw = json.loads((quick_report / "report.json").read_text())
    points = raw["points"]
    for op, rows in SYSTEMS.items():
        title = report.OPS[op][0] + ", seconds"
        assert title in found, f"no table for {op}"
        for row in rows:
            cells = found[title].get(row)
            assert cells, f"{op}: no row {row!r} in {sorted(found[title])}"
            assert all(c and not c.startswith("failed") for c in cells), f"{op}/{row}: {cells}"
    for p in points:
        results = raw["results"][report.point_key(p)]
        for op in report.OPS:
            for name, cell in results["ops"][op].items():
                assert isinstance(cell, list) and len(cell) >= 1, f"{op}/{name} at {p}: {cell}"
                assert all(t > 0 for t in cell), f"{op}/{name} at {p}: {cell}"
    sweeps = {s for p in points for s in p["sweeps"]}
    assert sweeps == {"bytes", "tensors"}
    assert "Summary" in (quick_report / "report.md").read_text()


def test_quick_report_writes_both_plots(quick_report):
    for sweep in ("bytes", "tensors"):
        png = (quick_report / f"report_{sweep}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(png) > 20_000, "a plot that small has no curves"


def test_section_is_replaced_between_markers_and_the_rest_kept(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Title\n\nintro\n\n{report.BEGIN}\nold figures\n{report.END}\n\n## Hand-written\nkept\n")
    report.write_section(str(doc), f"{report.BEGIN}\nnew figures\n{report.END}")
    text = doc.read_text()
    assert "old figures" not in text and "new figures" in text
    assert text.startswith("# Title\n\nintro\n\n") and text.endswith("## Hand-written\nkept\n")
    assert text.count(report.BEGIN) == 1


def test_render_rewrites_the_tables_from_raw_figures_without_measuring(quick_report, tmp_path):
    out = tmp_path / "again"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "report.py"), "--render",
                           str(quick_report / "report.json"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tables((out / "report.md").read_text()) == tables((quick_report / "report.md").read_text())


def test_resume_measures_only_what_failed_and_keeps_the_rest(quick_report, tmp_path):
    raw = json.loads((quick_report / "report.json").read_text())
    key = report.point_key(raw["points"][0])
    del raw["results"][key]["ops"]["staging"]
    raw["results"][key]["staging"] = {"task_error": "exited with status -9"}
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(raw))
    out = tmp_path / "resumed"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "report.py"), "--resume", str(earlier), "--out",
                           str(out), "--dir", str(tmp_path / "scratch")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 tasks" in proc.stdout
    resumed = json.loads((out / "report.json").read_text())
    entry = resumed["results"][key]
    assert "staging" in entry["ops"] and "task_error" not in entry.get("staging", {})
    assert all(len(cell) == raw["runs"] for cell in entry["ops"]["staging"].values())
    assert entry["ops"]["save"] == raw["results"][key]["ops"]["save"], "figures measured before were kept"
    assert resumed["resumed"] == 1


def test_a_task_that_failed_as_a_whole_is_listed(quick_report, tmp_path):
    raw = json.loads((quick_report / "report.json").read_text())
    key = report.point_key(raw["points"][0])
    del raw["results"][key]["ops"]["async blocking"], raw["results"][key]["ops"]["async commit"]
    raw["results"][key]["async"] = {"task_error": "exited with status -9"}
    earlier = tmp_path / "failed.json"
    earlier.write_text(json.dumps(raw))
    out = tmp_path / "rendered"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "report.py"), "--render", str(earlier), "--out",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"- {key} async: exited with status -9" in (out / "report.md").read_text()


@pytest.mark.parametrize("arguments, message", [
    (["--max-gb", "0.05"], "--max-gb 0.05: the bytes sweep starts at 100 MB"),
    (["--runs", "0"], "--runs 0: at least 1 run is needed"),
    (["--render", "/nonexistent/report.json"], "--render /nonexistent/report.json: no such file"),
    (["--resume", "/nonexistent/report.json"], "--resume /nonexistent/report.json: no such file"),
])
def test_bad_options_are_named_before_anything_is_measured(tmp_path, arguments, message):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "report.py"), *arguments, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "report.json").exists()


def test_plan_spans_100_mb_to_the_cap_and_1_to_100000_tensors(tmp_path):
    class Args:
        quick, max_gb, dir = False, 2.0, str(tmp_path)
    points = report.plan(Args)
    by_bytes = sorted(p["bytes"] for p in points if "bytes" in p["sweeps"])
    counts = sorted(p["tensors"] for p in points if "tensors" in p["sweeps"])
    assert by_bytes[0] == 100 * report.MB and by_bytes[-1] == 2 * report.GB
    assert counts[0] == 1 and counts[-1] == 100_000
