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
