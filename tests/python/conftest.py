import pytest

from fastdcp.torch._adapter import TorchAdapter


@pytest.fixture(scope="module", params=["native", "python"])
def tensor_path(request):
    """Runs a module's tests twice: with fastdcp._torch_C reading and building tensors, and through
    torch's Python API (the path taken when the module is missing or built for another torch)."""
    native = TorchAdapter.native_ops
    if request.param == "native":
        assert native is not None, "fastdcp._torch_C is missing: build with pip install --no-build-isolation ."
    else:
        TorchAdapter.native_ops = None
    yield request.param
    TorchAdapter.native_ops = native


def run_torchrun(script, world: int, args: list[str], report_file) -> tuple[int, dict, str]:
    """Runs `script args` on `world` ranks under torchrun (one thread each) and reads the JSON
    report each rank wrote to report_file(rank). Returns (exit status, reports by rank, details for
    a failure message)."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
         str(script), *map(str, args)],
        env=env, capture_output=True, text=True, timeout=600)
    reports = {}
    for rank in range(world):
        if report_file(rank).exists():
            reports[rank] = json.loads(report_file(rank).read_text())
    details = f"exit {result.returncode}\n{json.dumps(reports, indent=1)}\n{result.stderr[-4000:]}"
    return result.returncode, reports, details
