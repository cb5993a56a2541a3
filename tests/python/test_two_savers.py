"""Two processes saving to one checkpoint path at once, many times (issue 14, item 12): one holds
the path, the other fails at once with a clear error, and whatever reported success is what loads
and verifies. Each process is real: sync saves write in the saving process, async ones in their
writer process, which must hold the lock itself."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import fastdcp
from fastdcp.torch import CheckpointReader, RankInfo

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from two_savers_main import state  # noqa: E402

ROUNDS = 6


def wait_for(paths, processes, timeout=300):
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        for p in processes:
            assert p.poll() is None, f"a saver died: {p.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.005)


@pytest.mark.parametrize("modes", [("sync", "sync"), ("sync", "async")])
def test_two_processes_saving_to_one_path(tmp_path, modes):
    path, control = str(tmp_path / "ckpt"), tmp_path / "control"
    control.mkdir()
    processes = [
        subprocess.Popen([sys.executable, os.path.join(HERE, "two_savers_main.py"), path, str(control), str(i),
                          str(ROUNDS), mode], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE)
        for i, mode in enumerate(modes)]
    losers = 0
    try:
        for r in range(ROUNDS):
            wait_for([control / f"ready_{r}_{i}" for i in range(2)], processes)
            (control / f"go_{r}").touch()
            wait_for([control / f"done_{r}_{i}" for i in range(2)], processes)
            reports = [json.loads((control / f"done_{r}_{i}").read_text()) for i in range(2)]
            succeeded = {rep["seed"] for rep in reports if rep["ok"]}
            assert succeeded, f"round {r}: nobody saved: {reports}"
            for rep in reports:
                if not rep["ok"]:
                    losers += 1
                    assert rep["type"] == "FailedPreconditionError", rep  # a RuntimeError
                    assert "another process is saving" in rep["error"] and path in rep["error"], rep
            fastdcp.verify(path)
            loaded, _ = CheckpointReader(RankInfo(global_rank=0, global_world_size=1)).read(path)
            assert loaded["step"] in succeeded, f"round {r}: loaded {loaded['step']}, reported {reports}"
            assert torch.equal(loaded["w"], state(loaded["step"])["w"])
    finally:
        for p in processes:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
    for p in processes:
        assert p.returncode == 0, p.communicate()[0]
    print(f"{losers} of {ROUNDS} rounds had a loser")
