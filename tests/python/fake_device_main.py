"""Whole loads onto a CUDA device (Note [Loading onto a device]) without a GPU: run by
test_checkpoint.py in a process whose fastdcp loads the fake libcudart (FASTDCP_CUDART), in which
device memory is host memory. torch's adapter allocates the "device" memory on the host here, so the
test reads what the native reader copied there: through the whole API, from map_location to the
tensors handed back.

    python fake_device_main.py CHECKPOINT ORACLE (load|fail)
ORACLE: torch.save of the state dict the checkpoint holds. Exits 0 when every check passed."""

import ctypes
import gc
import os
import sys
import weakref

import torch

from fastdcp.torch import CheckpointReader, RankInfo
from fastdcp.torch._adapter import TorchAdapter
from test_torch_staging import leaves, storage_groups

cudart = ctypes.CDLL(os.environ["FASTDCP_CUDART"])  # the process's one fake runtime, shared with fastdcp
made = []  # (nbytes, device_index, address, weakref to the block), in the order the reader asked
fail_at = None


def empty_device(nbytes, device_index):
    """What torch's allocator does for the adapter, with the fake runtime's device memory (host memory
    it tracks, so that its cudaMemcpy checks the copies land in an allocation): a byte tensor over a
    cudaMalloc'ed block, freed when the last tensor over it goes."""
    if len(made) == fail_at:
        raise torch.OutOfMemoryError("fake: CUDA out of memory")
    if nbytes == 0:
        made.append((0, device_index, 0, lambda: None))
        return torch.empty(0, dtype=torch.uint8), 0
    address = ctypes.c_void_p()
    assert cudart.cudaSetDevice(device_index) == 0 and cudart.cudaMalloc(ctypes.byref(address), ctypes.c_size_t(nbytes)) == 0

    class Block(ctypes.c_uint8 * nbytes):  # a Python subclass: weak references allowed
        pass

    block = Block.from_address(address.value)
    weakref.finalize(block, cudart.cudaFree, ctypes.c_void_p(address.value))
    made.append((nbytes, device_index, address.value, weakref.ref(block)))
    return torch.frombuffer(block, dtype=torch.uint8), address.value


TorchAdapter.empty_device = staticmethod(empty_device)
path, oracle_path, mode = sys.argv[1:4]
oracle = torch.load(oracle_path, weights_only=False)
reader = CheckpointReader(RankInfo(global_rank=0, global_world_size=1))

if mode == "load":
    for map_location in ("cuda:1", torch.device("cuda", 1)):
        made.clear()
        loaded, missing = reader.read(path, map_location=map_location)
        assert missing == []
        mine, theirs = list(leaves(loaded)), list(leaves(oracle))
        assert [p for p, _ in mine] == [p for p, _ in theirs]
        for (key, a), (_, b) in zip(mine, theirs):
            if isinstance(b, torch.Tensor):
                assert (a.dtype, a.shape, a.stride(), a.storage_offset()) == (b.dtype, b.shape, b.stride(),
                                                                               b.storage_offset()), key
                assert type(a) is type(b) and a.requires_grad == b.requires_grad, key
                assert torch.equal(a, b), key
            else:
                assert a == b and type(a) is type(b), key
        # Views of one saved storage stay views of one allocation, as torch.load keeps them; every
        # storage is one the framework allocated, on the device asked for, and each was asked once.
        assert storage_groups(loaded) == storage_groups(oracle)
        storages = {t.untyped_storage().data_ptr() for _, t in mine if isinstance(t, torch.Tensor) and t.numel()}
        allocations = {address for n, _, address, _ in made if n}
        assert storages == allocations, (storages, allocations)
        assert len(allocations) == sum(1 for n, _, _, _ in made if n)
        assert {index for _, index, _, _ in made} == {1}
        del loaded, mine
        gc.collect()
        assert all(ref() is None for _, _, _, ref in made), "a device allocation outlived the loaded tensors"
elif mode == "fail":
    fail_at = 1  # the second allocation fails: the first is freed, the error is torch's own
    try:
        reader.read(path, map_location="cuda:0")
    except torch.OutOfMemoryError as error:
        assert "fake: CUDA out of memory" in str(error)
    else:
        raise AssertionError("the allocator's failure did not reach the caller")
    gc.collect()
    assert len(made) == 1 and made[0][3]() is None, "the first allocation outlived the failed load"
else:
    raise SystemExit(f"unknown mode {mode!r}")
print("OK")
