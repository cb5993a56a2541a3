"""Hugging Face model directories: a fastdcp checkpoint exported as one (``model.safetensors``, or
``model-0000k-of-0000n.safetensors`` shards with ``model.safetensors.index.json``), and one loaded
into a state dict in place or as a flat dict. The work is fastdcp's C++ (Note [Hugging Face model
directories] in include/fastdcp/interop/hugging_face.h); this module converts arguments."""

from typing import Any, NamedTuple

import torch

from fastdcp import _C
from fastdcp.torch._adapter import TorchAdapter
from fastdcp.torch.types import STATE_DICT

__all__ = ["HuggingFaceLoadResult", "export_hugging_face", "load_hugging_face"]


class HuggingFaceLoadResult(NamedTuple):
    """What ``load_hugging_face`` into a template found, as ``nn.Module.load_state_dict`` names it."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _dtype_name(dtype: "torch.dtype | str | None") -> str:
    if dtype is None:
        return ""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return str(dtype)


def export_hugging_face(checkpoint: str, out: str, *, max_shard_size: "int | str" = "5GB",
                        dtype: "torch.dtype | str | None" = None, prefix: str = "", strip_prefix: bool = False,
                        overwrite: bool = False, rank: int = 0, verify: bool = True,
                        io_threads: int = 0) -> dict[str, Any]:
    """Writes the committed checkpoint at ``checkpoint`` as a Hugging Face model directory ``out``.

    ``max_shard_size``: bytes, or "5GB" / "2GiB" (as transformers' ``save_pretrained``); a tensor
    larger than that gets a file of its own. ``dtype`` casts floating tensors (bf16, f16, f32,
    f64). ``prefix`` exports only key paths that start with it, without it if ``strip_prefix``.
    ``rank`` picks one rank's part of a checkpoint of several ranks. A non-empty ``out`` is
    refused unless ``overwrite``, which replaces only model*.safetensors and their index.
    Returns ``files``, ``index_file`` ("" for one file), ``total_size``, ``tensors``,
    ``skipped`` (key path, why) for values that are not exported (tied weights included: a key
    whose tensor is an earlier key's is written once, under the first name) and
    ``peak_sharded_bytes``: sharded tensors are assembled one file at a time, and this is the most
    they held at once."""
    if strip_prefix and not prefix:
        raise ValueError("strip_prefix needs a prefix")
    return _C.export_hugging_face(str(checkpoint), str(out), max_shard_size=str(max_shard_size),
                                  dtype=_dtype_name(dtype), prefix=prefix, strip_prefix=strip_prefix,
                                  overwrite=overwrite, rank=rank, verify=verify, io_threads=io_threads)


def load_hugging_face(path: str, state_dict: STATE_DICT | None = None, *, strict: bool = True, cast: bool = False,
                      dtype: "torch.dtype | str | None" = None, strip_prefix: str = "", add_prefix: str = "",
                      io_threads: int = 0) -> "STATE_DICT | HuggingFaceLoadResult":
    """Loads a Hugging Face model directory (or its index file, or one safetensors file).

    Without ``state_dict``: a flat dict of the stored names, floating tensors as ``dtype`` if
    given. With one (``model.state_dict()``): fills its tensors in place, reading only their bytes,
    and returns ``HuggingFaceLoadResult(missing_keys, unexpected_keys)``; with ``strict`` (the
    default, as ``load_state_dict``) either list non-empty is a ``RuntimeError`` raised before
    anything changes. ``cast`` allows floating tensors stored as another floating dtype (bf16
    weights into an f32 model). Stored names lose ``strip_prefix`` and gain ``add_prefix`` before
    they are matched against the template's key paths. Pickle files (pytorch_model.bin) are not
    read."""
    io = _C.CheckpointIO(TorchAdapter(), 0, 1)
    if state_dict is None:
        return io.read_hugging_face(str(path), dtype=_dtype_name(dtype), strip_prefix=strip_prefix,
                                    add_prefix=add_prefix, io_threads=io_threads)
    if dtype is not None:
        raise ValueError("dtype applies to loads without a state_dict; a template's tensors keep their dtype "
                         "(pass cast=True to convert into them)")
    result = io.load_hugging_face(str(path), state_dict, strict=strict, cast=cast, strip_prefix=strip_prefix,
                                  add_prefix=add_prefix, io_threads=io_threads)
    return HuggingFaceLoadResult(result.missing_keys, result.unexpected_keys)
