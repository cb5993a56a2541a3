"""Checkpoints in the stores a path names (issue 16, item 3): "mem://..." lives in this process,
"shm://..." in the node's shared memory, plain paths on disk; the Python APIs pass them through."""

import os
import shutil
import uuid

import numpy as np
import pytest
import torch

import fastdcp
from fastdcp.torch import CheckpointerConfig, CheckpointStagerConfig, make_async_checkpointer, make_sync_checkpointer

CPU = CheckpointerConfig(staging_config=CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False))


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(1024, 1536, generator=g)  # 6 MiB: more than one checksum chunk
    return {"model": {"weight": weight, "weight_t": weight.t(), "bias": torch.randn(77, generator=g).bfloat16()},
            "step": seed}


def assert_state(loaded: dict, seed: int) -> None:
    want = state(seed)
    assert torch.equal(loaded["model"]["weight"], want["model"]["weight"])
    assert torch.equal(loaded["model"]["bias"], want["model"]["bias"])
    assert loaded["model"]["weight_t"].data_ptr() == loaded["model"]["weight"].data_ptr()
    assert loaded["step"] == seed


@pytest.fixture
def shm_path():
    name = f"pytest_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    yield f"shm://{name}/step10"
    shutil.rmtree(f"/dev/shm/fastdcp/{name}", ignore_errors=True)


def mem_path() -> str:
    return f"mem://job_{uuid.uuid4().hex[:8]}/step10"


def test_plain_save_and_load_in_memory_never_touch_the_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a "mem:" directory here would mean the spec was taken for a path
    path = mem_path()
    arrays = {"a": np.arange(1000, dtype=np.float32).reshape(10, 100), "b": {"c": np.ones(7, dtype=np.int16)}, "n": 3}
    fastdcp.save(path, arrays)
    loaded = fastdcp.load(path)
    np.testing.assert_array_equal(loaded["a"], arrays["a"])
    np.testing.assert_array_equal(loaded["b"]["c"], arrays["b"]["c"])
    assert loaded["n"] == 3
    assert fastdcp.verify(path)["files"] == 1
    with pytest.raises(Exception, match="already holds a committed checkpoint"):
        fastdcp.save(path, arrays)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["mem", "shm", "file"])
def test_sync_checkpointer_saves_and_loads_in_every_store(kind, tmp_path, shm_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a spec taken for a relative path would land
    path = {"mem": mem_path(), "shm": shm_path, "file": str(tmp_path / "ckpt")}[kind]
    checkpointer = make_sync_checkpointer(CPU)
    checkpointer.save(path, state(1))
    assert_state(checkpointer.load(path), 1)
    target = state(5)
    assert_state(checkpointer.load(path, target), 1)
    checkpointer.close()
    assert os.listdir(tmp_path) == (["ckpt"] if kind == "file" else [])
    if kind == "shm":
        assert "manifest.json" in os.listdir("/dev/shm/fastdcp/" + shm_path[len("shm://"):])


def test_async_checkpointer_writes_shared_memory_from_its_writer_process(shm_path):
    checkpointer = make_async_checkpointer(CPU)
    try:
        staged, written = checkpointer.save(shm_path, state(2))
        staged.result(timeout=120)
        written.result(timeout=120)
        assert_state(checkpointer.load(shm_path), 2)
        name = shm_path[len("shm://"):]
        assert "manifest.json" in os.listdir(f"/dev/shm/fastdcp/{name}")
    finally:
        checkpointer.close()


def test_an_unknown_scheme_names_the_path_and_the_known_ones():
    with pytest.raises(ValueError, match=r"s3://bucket/x.*known: file://, mem://, shm://"):
        fastdcp.save("s3://bucket/x", {"a": np.zeros(3)})
    with pytest.raises(ValueError, match="s3://bucket/x"):
        fastdcp.load("s3://bucket/x")
