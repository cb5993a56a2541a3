"""The GPU report's two scripts, bench/gpu_report.sh and bench/bench_gpu.py: their no-GPU path
everywhere (CUDA_VISIBLE_DEVICES="" hides any GPU from both), and a quick run of the benchmark
where CUDA is available."""

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "bench", "bench_gpu.py")
REPORT = os.path.join(REPO, "bench", "gpu_report.sh")
NO_GPU = "no NVIDIA GPU found"


def run(args, env=None, timeout=120):
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def hidden_gpus():
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_bench_gpu_without_cuda_writes_the_statement(tmp_path):
    out = tmp_path / "bench.md"
    result = run([sys.executable, BENCH, "--out", str(out)], env=hidden_gpus())
    assert result.returncode == 0, result.stderr
    assert f"{NO_GPU}: measurements skipped" in result.stdout
    assert f"{NO_GPU}: measurements skipped" in out.read_text()


def test_gpu_report_script_is_valid_bash():
    result = run(["bash", "-n", REPORT])
    assert result.returncode == 0, result.stderr


def test_gpu_report_without_gpu_says_so_and_exits_0(tmp_path):
    out = tmp_path / "sub" / "report.md"  # its folder is made
    result = run(["bash", REPORT, str(out)], env=hidden_gpus())
    assert result.returncode == 0, result.stdout + result.stderr
    assert NO_GPU in result.stdout
    text = out.read_text()
    assert text.startswith("# fastdcp GPU report")
    assert f"{NO_GPU}: measurements skipped" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is false)")
def test_bench_gpu_quick_on_gpu(tmp_path):
    out = tmp_path / "bench.md"
    result = run([sys.executable, BENCH, "--quick", "--out", str(out), "--dir", str(tmp_path)], timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    text = out.read_text()
    for row in ("pinned cudaMemcpy (limit)", "fastdcp.torch DefaultStager", "torch _experimental DefaultStager",
                "fastdcp AsyncCheckpointer", "torch _experimental AsyncCheckpointer"):
        assert f"| {row} |" in text, row
    assert "| NO |" not in text and "failed" not in text and "skipped" not in text, text
    assert not [p for p in os.listdir(tmp_path) if p.startswith("bench_gpu_")], "checkpoints left behind"
