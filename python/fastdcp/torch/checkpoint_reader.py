"""Reading one rank's part of a checkpoint, as torch.distributed.checkpoint._experimental
.checkpoint_reader: whole, or into a template whose tensors are filled in place."""

import logging
from typing import Any

import torch

from fastdcp import _C
from fastdcp.torch import migrate
from fastdcp.torch._adapter import TorchAdapter
from fastdcp.torch.types import STATE_DICT, RankInfo

__all__ = ["CheckpointReader"]

logger = logging.getLogger(__name__)


def _load_device(map_location: Any) -> torch.device:
    """map_location as the one device a whole load goes to (Note [Loading onto a device])."""
    if map_location is None:
        return torch.device("cpu")
    if isinstance(map_location, dict) or callable(map_location):
        raise TypeError(f"map_location: fastdcp loads a checkpoint onto one device, given as a device ('cpu', "
                        f"'cuda:0', torch.device('cuda', 1)), not a {type(map_location).__name__}")
    device = torch.device(map_location)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"map_location={map_location!r}: fastdcp loads onto the CPU or a CUDA device; "
                         f"load onto the CPU and move the tensors with .to('{device}')")
    if device.type == "cuda" and device.index is None:  # as torch.load: the current device
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


class CheckpointReader:
    """``read(path)`` loads this rank's state dict; ``read(path, state_dict)`` fills the
    template's tensors in place (CPU, GPU, non-contiguous) and returns it with the missing keys.

    ``map_location`` (whole loads): "cpu" (the default) or a CUDA device ("cuda", "cuda:1",
    ``torch.device``); the native reader copies each saved storage once into memory from torch's
    allocator on that device, so views of one storage stay views of one (Note [Loading onto a
    device]). torch.load's dict and callable forms are refused: a fastdcp checkpoint does not record
    where its tensors were. A template's tensors are filled where they are, whatever map_location says.

    fastdcp extras (keywords): ``strict`` refuses, before changing anything, a template whose keys
    differ from the checkpoint's; ``verify`` (default True) checks every chunk's checksum;
    ``mmap`` (whole loads) maps the file instead of reading it; ``direct_io`` (whole loads, default
    True) reads with O_DIRECT where the file system allows it, False through the page cache;
    ``io_engine`` (whole loads) as in ``CheckpointWriterConfig``.

    ``path`` may also hold a checkpoint of torch's (fastdcp.torch.migrate): DCP's (``.metadata``
    and ``*.distcp``; every rank reads the whole state dict, tensors whole) or the _experimental
    checkpointer's (``checkpoint_<rank>.pt``); it loads with the same semantics, through the same
    matching (``verify``, ``direct_io``, ``io_engine`` and ``io_threads`` do not apply)."""

    def __init__(self, rank_info: RankInfo):
        self._rank_info = rank_info
        self._io = _C.CheckpointIO(TorchAdapter(), rank_info.global_rank, rank_info.global_world_size)
        self.last_unexpected_keys: list[str] = []

    def read(self, path: str, state_dict: STATE_DICT | None = None, *, map_location=None, strict: bool = False,
             verify: bool = True, mmap: bool = False, io_threads: int = 0, direct_io: bool = True,
             io_engine: str = "threads", **kwargs: Any) -> tuple[STATE_DICT, list[str]]:
        path = str(path)
        fmt = migrate.checkpoint_format(path)
        # map_location places a whole load; a template's tensors stay where they are.
        device = _load_device(map_location) if state_dict is None else None
        # A template takes only what it names: a mapped file reads only those pages.
        source = None if fmt == migrate.FASTDCP else migrate.read_state_dict(
            path, fmt, self._rank_info.global_rank, mmap=mmap or state_dict is not None,
            device=None if device is None or device.type == "cpu" else device)
        options = _C.ReadOptions(verify_checksums=verify, use_mmap=mmap, io_threads=io_threads, direct_io=direct_io,
                                 io_engine=io_engine, device=str(device or "cpu"))
        if state_dict is None:
            return (source if source is not None else self._io.read(path, options)), []
        # CUDA tensors of the template are filled by the native reader (Note [Loading into device tensors]).
        if source is None:
            result = self._io.read_into(path, state_dict, options, strict=strict)
        else:
            migrate.adopt_key_types(source, state_dict)
            restore = migrate.stand_in_for_bytes_io(source, state_dict)
            result = None
            try:
                result = self._io.load_into(source, state_dict, strict=strict, source_name=path)
            finally:
                restore(None if result is None else result.state_dict)
        out, missing = result.state_dict, result.missing_keys
        self.last_unexpected_keys = result.unexpected_keys
        if missing:
            shown = ", ".join(missing[:10]) + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
            logger.warning("keys missing from checkpoint %s: %s", path, shown)
        return out, missing
