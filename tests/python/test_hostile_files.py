"""Rank files that fastdcp did not write, through every way Python reads a checkpoint: plain
safetensors files (oracle: safetensors.torch) load as flat dicts, and crafted files whose views
would reach outside their storage are refused, never handed to torch."""

import json
import struct

import pytest
import safetensors.torch
import torch

import fastdcp
from fastdcp.torch import CheckpointReader, RankInfo

pytestmark = pytest.mark.usefixtures("tensor_path")

RANK = RankInfo(global_rank=0, global_world_size=1)


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def commit(path, data):
    """Makes `path` a committed one-rank checkpoint of the rank file `data`, the way docs/format.md
    describes: the file under its generation's name and a manifest with its size and header CRC32C."""
    path.mkdir()
    name = "checkpoint_0.g1.safetensors"
    (path / name).write_bytes(data)
    (header_len,) = struct.unpack("<Q", data[:8])
    manifest = {"format": "fastdcp.manifest", "version": 1, "generation": 1, "world_size": 1,
                "ranks": [{"rank": 0, "file": name, "size": len(data), "header_crc32c": crc32c(data[:8 + header_len])}]}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def plain_state():
    return {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "h": torch.ones(2, dtype=torch.bfloat16),
            "e": torch.zeros(0, 3), "s": torch.tensor(7, dtype=torch.int8)}


def same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_plain_safetensors_files_load_every_way(tmp_path):
    file = tmp_path / "written.safetensors"
    safetensors.torch.save_file(plain_state(), str(file))
    expected = safetensors.torch.load_file(str(file))
    path = commit(tmp_path / "ck", file.read_bytes())
    reader = CheckpointReader(RANK)
    for options in [{}, {"mmap": True}, {"direct_io": False}, {"verify": False}]:
        loaded, _ = reader.read(str(path), **options)
        same(dict(sorted(loaded.items())), dict(sorted(expected.items())))
    template = {k: torch.empty_like(v) for k, v in expected.items()}
    out, missing = reader.read(str(path), template, strict=True)
    assert not missing and not reader.last_unexpected_keys and out is template
    same(out, expected)
    report = fastdcp.verify(path)
    assert report["files"] == 1 and report["files_without_checksums"] == 1 and report["chunks"] == 0


def crafted(tensor):
    """A fastdcp rank file of one raw 64-byte storage (zeros) whose tree holds `tensor` at 'x'."""
    data = bytes(64)
    tree = json.dumps({"d": [["x", {"T": tensor}]]})
    header = {"__metadata__": {"fastdcp.version": "1", "fastdcp.chunk_bytes": "4194304",
                               "fastdcp.storages": json.dumps([["__fastdcp__.storage.0", 64]]),
                               "fastdcp.tree": tree, "fastdcp.crc32c": "%08x" % crc32c(data)},
              "__fastdcp__.storage.0": {"dtype": "U8", "shape": [64], "data_offsets": [0, 64]}}
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize("tensor", [
    [0, "F32", [2, 2], [2**59, 1], 0],   # strides whose extent wraps around 2^64
    [0, "F32", [2**59], [1], 0],         # a shape whose size wraps
    [0, "F32", [2**32, 2**32], [1, 1], 0],
    [0, "F32", [2], [-4], 4],
    [0, "F32", [4, 5], [4, 1], 0],       # simply too large
])
def test_views_outside_their_storage_are_refused_every_way(tmp_path, tensor):
    path = commit(tmp_path / "ck", crafted(tensor))
    reader = CheckpointReader(RANK)
    for options in [{}, {"mmap": True}, {"verify": False}]:
        with pytest.raises(RuntimeError, match="does not fit its storage|negative stride"):
            reader.read(str(path), **options)
    with pytest.raises(RuntimeError, match="does not fit its storage|negative stride"):
        reader.read(str(path), {"x": torch.zeros(4)}, strict=True)
    with pytest.raises(RuntimeError, match="does not fit its storage|negative stride"):
        fastdcp.verify(path)


def test_a_view_that_fits_loads_as_torch_views_it(tmp_path):
    path = commit(tmp_path / "ck", crafted([0, "F32", [2, 2], [8, 1], 6]))
    x = CheckpointReader(RANK).read(str(path))[0]["x"]
    assert x.shape == (2, 2) and x.stride() == (8, 1) and x.storage_offset() == 6
    assert torch.equal(x, torch.zeros(2, 2))
