"""The framework-neutral API: numpy arrays in plain Python containers."""

import numpy as np
import pytest

import fastdcp


def test_views_stay_views_of_one_buffer_and_values_match():
    base = np.arange(100, dtype=np.float32).reshape(10, 10)
    tree = {"base": base, "inner": base[2:8, 2:8], "t": base.T, "meta": [1, "x", None]}
    with fastdcp.Stager() as stager:
        staged = stager.stage(tree)
    for key in ("base", "inner", "t"):
        np.testing.assert_array_equal(staged[key], tree[key])
        assert staged[key].strides == tree[key].strides
        assert not np.shares_memory(staged[key], base)
    assert np.shares_memory(staged["inner"], staged["base"])
    assert staged["meta"] == [1, "x", None]


def test_cache_reuse_is_pointer_equal():
    a = np.ones(1000)
    with fastdcp.Stager() as stager:
        first = stager.stage({"a": a})
        a += 1
        second = stager.stage({"a": a})
        assert first["a"].__array_interface__["data"][0] == second["a"].__array_interface__["data"][0]
        np.testing.assert_array_equal(second["a"], a)


def test_shared_memory_staging():
    with fastdcp.Stager(use_shared_memory=True) as stager:
        staged = stager.stage({"a": np.arange(10)})
        assert stager.stats().shared_bytes > 0
    np.testing.assert_array_equal(staged["a"], np.arange(10))


def test_negative_strides_are_rejected_with_advice():
    with fastdcp.Stager() as stager, pytest.raises(ValueError, match="ascontiguousarray"):
        stager.stage({"a": np.arange(10)[::-1]})


def test_budget_exceeded_is_a_memory_error():
    with fastdcp.Stager(memory_budget_bytes=1 << 20) as stager, pytest.raises(MemoryError, match="budget"):
        stager.stage({"a": np.zeros(1 << 20)})


class Producer:
    """A minimal DLPack producer that is not a numpy array."""

    def __init__(self, array, device=(1, 0)):
        self._array, self._device = array, device

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._device


def test_any_dlpack_producer_is_staged_as_numpy():
    import torch

    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    tree = {"torch": base[:, ::3], "producer": Producer(np.arange(12, dtype=np.int16).reshape(3, 4).T)}
    with fastdcp.Stager() as stager:
        staged = stager.stage(tree)
        base += 1  # staged copies are independent of the sources
    np.testing.assert_array_equal(staged["torch"], (base - 1)[:, ::3].numpy())
    assert staged["torch"].strides == (40, 12)
    np.testing.assert_array_equal(staged["producer"], np.arange(12, dtype=np.int16).reshape(3, 4).T)


def test_dlpack_producer_on_a_device_is_a_clear_error():
    with fastdcp.Stager() as stager, pytest.raises(ValueError, match=r"Producer on DLPack device \(2, 0\).*fastdcp.torch"):
        stager.stage({"x": Producer(np.zeros(3), device=(2, 0))})
