"""Reading the checkpoints torch writes, so that a job can resume from what it already has:
torch.distributed.checkpoint (DCP: ``.metadata`` + ``*.distcp``, from ``dcp.save`` with the
file-system writer, its tensors as torch.save streams or, with ``serialization_format=SAFETENSORS``,
in a safetensors file appended to each data file) and the ``_experimental`` checkpointer
(``checkpoint_<rank>.pt``).

``fastdcp.torch``'s load (the checkpointers' ``load`` and ``CheckpointReader.read``) recognises
these directories and loads them with fastdcp's semantics; ``fastdcp convert`` (``convert.py``)
rewrites them as fastdcp checkpoints.

Note [Reading other formats safely]
A checkpoint may come from anywhere, and unrestricted pickle runs whatever a file asks it to.
Nothing here uses it: tensor streams and the ``_experimental`` files are read with
``torch.load(weights_only=True)``, and DCP's ``.metadata`` pickle with an unpickler that resolves
only the classes DCP's metadata is made of (``_METADATA_GLOBALS``, torch's dtypes, and torch's
layout lookup); any other global is refused with ``UnsafeCheckpointError`` naming it, before
anything is called. Byte ranges are checked against the file before they are read, so a damaged
or hostile ``.metadata`` fails with ``DataLossError`` naming the file and the key.
"""

import io
import json
import os
import pickle
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from fastdcp import DataLossError
from fastdcp.torch._adapter import _DTYPES as _SAFETENSORS_DTYPES  # fastdcp's dtype names are safetensors'

__all__ = ["DCP", "EXPERIMENTAL", "FASTDCP", "UnsafeCheckpointError", "checkpoint_format", "read_state_dict",
           "world_size"]

FASTDCP, DCP, EXPERIMENTAL = "fastdcp", "dcp", "torch_experimental"

_RANK_FILE = re.compile(r"checkpoint_(\d+)\.pt$")


class UnsafeCheckpointError(DataLossError, pickle.UnpicklingError):
    """A pickle in a checkpoint asks for something fastdcp will not run: a global outside DCP's
    metadata classes, or a value ``torch.load(weights_only=True)`` refuses. A ``DataLossError``
    (a ``RuntimeError``) and a ``pickle.UnpicklingError``, what ``torch.load`` raises then."""


def checkpoint_format(path: str) -> str:
    """FASTDCP, DCP or EXPERIMENTAL, by the files in ``path``; FASTDCP when none matches, so that
    fastdcp's reader reports what is missing."""
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return FASTDCP
    if os.path.isfile(os.path.join(path, ".metadata")):
        return DCP
    try:
        names = os.listdir(path)
    except OSError:
        return FASTDCP
    return EXPERIMENTAL if any(_RANK_FILE.match(n) for n in names) else FASTDCP


def world_size(path: str, fmt: str) -> int:
    """How many ranks' state dicts a DCP or _experimental checkpoint holds: 1 for DCP, whose state
    dict is global; the number of rank files for _experimental."""
    if fmt == DCP:
        return 1
    ranks = _saved_ranks(path)
    if ranks != list(range(len(ranks))):
        raise FileNotFoundError(f"'{path}' has the rank files of ranks {ranks}: ranks "
                                f"{sorted(set(range(max(ranks) + 1)) - set(ranks))} are missing")
    return len(ranks)


def _saved_ranks(path: str) -> list[int]:
    return sorted(int(m.group(1)) for m in map(_RANK_FILE.match, os.listdir(path)) if m)


def read_state_dict(path: str, fmt: str, rank: int = 0, *, mmap: bool = False) -> dict:
    """The whole state dict of a DCP checkpoint (any rank gets all of it, tensors whole), or rank
    ``rank``'s of an _experimental one, as CPU tensors."""
    path = str(path)
    if fmt == DCP:
        return _read_dcp(path)
    if fmt == EXPERIMENTAL:
        return _read_experimental(path, rank, mmap)
    raise ValueError(f"read_state_dict: {fmt!r} is not a format of torch's (use {DCP!r} or {EXPERIMENTAL!r})")


def _torch_load(stream, where: str, **kwargs) -> Any:
    """torch.load(weights_only=True), its failures naming ``where``."""
    try:
        return torch.load(stream, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{where}: torch.load(weights_only=True) refused it (fastdcp never unpickles checkpoints "
            f"unrestricted; if you trust the file, allow the type with torch.serialization.add_safe_globals): "
            f"{error}") from error
    except (RuntimeError, EOFError, ValueError, KeyError) as error:
        raise DataLossError(f"{where}: not a readable torch.save stream (truncated or damaged): {error}") from error


# ---- torch's _experimental checkpointer -----------------------------------------------------

def _read_experimental(path: str, rank: int, mmap: bool) -> dict:
    file = os.path.join(path, f"checkpoint_{rank}.pt")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no rank file '{file}': the _experimental checkpoint at '{path}' has the files "
                                f"of ranks {_saved_ranks(path)}, and each rank loads its own; load it with the "
                                f"world size that saved it")
    with open(file, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch.save's default format; only it can be mapped
    return _torch_load(file, f"'{file}'", mmap=mmap and zipped)


# ---- DCP ---------------------------------------------------------------------------------------

# Every global a DCP .metadata pickle names (torch 2.13's FileSystemWriter), and nothing else.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "_MEM_FORMAT_ENCODING", "MetadataIndex", "StorageMeta")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by name: torch.strided
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, name: str):
        super().__init__(file)
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        # torch's dtypes, looked up in the module's own namespace: getattr could import submodules.
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
            return vars(torch)[name]
        raise UnsafeCheckpointError(
            f"'{self._name}' asks to unpickle {module}.{name}, which is not one of DCP's metadata classes; "
            f"fastdcp refuses it (the file is damaged, hostile, or was written by a custom DCP planner)")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"'{self._name}' holds a persistent id, which DCP's metadata never does")


def _read_metadata(path: str):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

    name = os.path.join(path, ".metadata")
    with open(name, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f, name).load()
        except UnsafeCheckpointError:
            raise
        except Exception as error:  # any malformed pickle
            raise DataLossError(f"'{name}' is not a readable DCP metadata pickle: {error!r}") from error
    ok = (isinstance(metadata, Metadata) and isinstance(metadata.state_dict_metadata, dict)
          and isinstance(metadata.storage_data, dict)
          and all(isinstance(k, MetadataIndex) and isinstance(v, _StorageInfo) for k, v in metadata.storage_data.items())
          and (metadata.planner_data is None or isinstance(metadata.planner_data, dict)))
    if not ok:
        raise DataLossError(f"'{name}' is not DCP metadata of the file-system writer (torch.distributed.checkpoint"
                            f".FileSystemWriter): it unpickled to {type(metadata).__name__} with unexpected contents")
    return name, metadata


class _FileSlice(io.RawIOBase):
    """Bytes [begin, begin + length) of an open file as a seekable stream. torch.load reads each
    record with readinto, here one pread straight into the tensor's memory, with the GIL released."""

    def __init__(self, fd: int, begin: int, length: int):
        super().__init__()
        self._fd, self._begin, self._length, self._pos = fd, begin, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._length - self._pos))
        done = 0
        while done < n:
            got = os.preadv(self._fd, [view[done:n]], self._begin + self._pos + done)
            if got == 0:
                break  # the file shrank under us: torch.load reports the short record
            done += got
        self._pos += done
        return done


class _DcpFiles:
    """The .distcp files of one checkpoint, opened once each; reads byte ranges checked against
    the file's size."""

    def __init__(self, path: str):
        self._path = path
        self._files: dict[str, tuple[int, int, str]] = {}  # relative path -> (fd, size, full path)
        self._headers: dict[tuple[str, int], tuple] = {}  # safetensors blobs: (header, sharding, data start)
        self._lock = threading.Lock()  # items load on several threads

    def _open(self, relative: str, key: str) -> tuple[int, int, str]:
        with self._lock:
            return self._open_locked(relative, key)

    def _open_locked(self, relative: str, key: str) -> tuple[int, int, str]:
        if relative not in self._files:
            full = os.path.join(self._path, relative)
            if os.path.basename(relative) != relative:
                raise DataLossError(f"'{self._path}/.metadata' names the data file '{relative}' outside the "
                                    f"checkpoint directory (for '{key}')")
            try:
                fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise FileNotFoundError(f"DCP data file '{full}' (holding '{key}') does not exist") from None
            self._files[relative] = (fd, os.fstat(fd).st_size, full)
        return self._files[relative]

    def read(self, info, key: str) -> tuple[_FileSlice, str]:
        fd, size, full = self._open(info.relative_path, key)
        begin, length = int(info.offset), int(info.length)
        where = f"'{full}', bytes {begin} to {begin + length} ('{key}')"
        if begin < 0 or length < 0 or begin + length > size:
            raise DataLossError(f"{where}: outside the file, which has {size} bytes (truncated, or the "
                                f".metadata belongs to another save)")
        return _FileSlice(fd, begin, length), where

    def is_torch_save(self, info, key: str) -> bool:
        """Whether the item is a torch.save stream (a zip file), rather than the raw bytes of DCP's
        safetensors serialization."""
        stream, _ = self.read(info, key)
        magic = bytearray(4)
        return stream.readinto(magic) == 4 and magic == b"PK\x03\x04"

    def safetensors_tensor(self, info, key: str, dtype: torch.dtype, sizes: tuple, offsets: tuple) -> torch.Tensor:
        """A chunk that FileSystemWriter(serialization_format=SAFETENSORS) wrote: every tensor item
        of a file points at the safetensors file appended after its torch.save'd values, which
        names each chunk by its key (and its offsets in __metadata__)."""
        fd, size, full = self._open(info.relative_path, key)
        blob = int(info.offset)
        where = f"'{full}', the safetensors data at byte {blob} ('{key}')"
        cache = self._headers.get((info.relative_path, blob))
        if cache is None:
            head = os.pread(fd, 8, blob)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > 100_000_000 or blob + 8 + n > size:
                raise DataLossError(f"{where}: neither a torch.save stream nor a safetensors header")
            try:
                header = json.loads(os.pread(fd, n, blob + 8))
                sharding = json.loads(header.get("__metadata__", {}).get("DCP_SHARDING_INFO", "{}"))
            except (ValueError, AttributeError) as error:
                raise DataLossError(f"{where}: a broken safetensors header: {error}") from error
            cache = self._headers[(info.relative_path, blob)] = (header, sharding, blob + 8 + n)
        header, sharding, data = cache
        entry = header.get(key)
        try:
            saved = sharding.get(key, {}).get("saved_offsets", list(offsets))
            begin, end = (int(x) for x in entry["data_offsets"])
            ok = (_SAFETENSORS_DTYPES.get(entry["dtype"]) == dtype and tuple(entry["shape"]) == tuple(sizes)
                  and tuple(saved) == tuple(offsets))
        except (TypeError, KeyError, ValueError, AttributeError):
            ok = False
        tensor = torch.empty(sizes, dtype=dtype)
        if not ok or end - begin != tensor.nbytes or data + end > size or begin < 0:
            raise DataLossError(f"{where}: the safetensors file has {entry!r} for it, the metadata says {dtype}"
                                f"{list(sizes)} at offsets {list(offsets)}")
        if tensor.nbytes and _FileSlice(fd, data + begin, tensor.nbytes).readinto(
                tensor.view(-1).view(torch.uint8).numpy()) != tensor.nbytes:
            raise DataLossError(f"{where}: the file ended early")
        return tensor

    def close(self) -> None:
        for fd, _, _ in self._files.values():
            os.close(fd)
        self._files.clear()


def _load_item(files: _DcpFiles, info, key: str) -> Any:
    """One saved item: a torch.save stream in a byte range of a .distcp file."""
    if info.transform_descriptors:
        raise ValueError(f"'{key}' in '{files._path}' was saved through DCP stream extensions "
                         f"{list(info.transform_descriptors)} (e.g. compression), which fastdcp does not read; "
                         f"load it with dcp.load and save it again without extensions")
    data, where = files.read(info, key)
    return _torch_load(data, where)


def _chunk_tensor(files: _DcpFiles, info, key: str, dtype: torch.dtype, sizes, offsets) -> torch.Tensor:
    if not info.transform_descriptors and not files.is_torch_save(info, key):
        return files.safetensors_tensor(info, key, dtype, tuple(sizes), tuple(offsets))
    tensor = _load_item(files, info, key)
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tuple(tensor.shape) != tuple(sizes):
        got = f"{tensor.dtype}{list(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise DataLossError(f"'{files._path}': the chunk of '{key}' holds {got}, the metadata says "
                            f"{dtype}{list(sizes)}")
    return tensor


def _full_tensor(files: _DcpFiles, key: str, md, storage: dict) -> torch.Tensor:
    """One tensor, assembled from its saved chunks (one per shard of a DTensor or ShardedTensor
    save, after DCP's deduplication of replicas)."""
    dtype, size = md.properties.dtype, tuple(md.size)
    chunks = []
    for chunk in md.chunks:
        offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
        if len(offsets) != len(size) or len(sizes) != len(size) or any(
                o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, sizes, size)):
            raise DataLossError(f"'{files._path}/.metadata': a chunk of '{key}' at {list(offsets)} of size "
                                f"{list(sizes)} lies outside its tensor of size {list(size)}")
        info = storage.get((key, offsets))
        if info is None:
            raise DataLossError(f"'{files._path}/.metadata' has no storage entry for the chunk of '{key}' at "
                                f"{list(offsets)}")
        chunks.append((offsets, sizes, info))
    numel = 1
    for d in size:
        numel *= d
    covered = sum(torch.Size(sizes).numel() for _, sizes, _ in chunks)
    if covered != numel:
        raise DataLossError(f"'{files._path}/.metadata': the chunks of '{key}' cover {covered} of its {numel} "
                            f"elements")
    full = torch.empty(size, dtype=dtype)  # as dcp.load gives it: contiguous, owning only its elements
    if len(chunks) == 1:
        tensor = _chunk_tensor(files, chunks[0][2], key, dtype, size, chunks[0][0])
        return tensor if tensor.stride() == full.stride() and tensor.untyped_storage().nbytes() == tensor.nbytes \
            else full.copy_(tensor)
    for offsets, sizes, info in chunks:
        target = full
        for dim, (o, s) in enumerate(zip(offsets, sizes)):
            target = target.narrow(dim, o, s)
        target.copy_(_chunk_tensor(files, info, key, dtype, sizes, offsets))
    return full


def _set_at(root: dict, path: tuple, value: Any) -> None:
    """Puts ``value`` at ``path`` (dict keys: str, list indices: int), making dicts and lists on
    the way, as dcp.load rebuilds a state dict from its flattened keys."""
    node: Any = root
    for step, following in zip(path, path[1:] + (None,)):
        fresh = value if following is None else ({} if isinstance(following, str) else [])
        if isinstance(node, list):
            if not isinstance(step, int) or step < 0:
                raise DataLossError(f"DCP key path {path!r}: {step!r} indexes a list")
            node.extend([None] * (step + 1 - len(node)))
            if following is None or node[step] is None:
                node[step] = fresh
            node = node[step]
        else:
            if following is None:
                node[step] = value
            else:
                node = node.setdefault(step, fresh)
        if following is not None and not isinstance(node, (dict, list)):
            raise DataLossError(f"DCP key path {path!r}: {step!r} holds a value, not a container")


def _read_dcp(path: str) -> dict:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    name, metadata = _read_metadata(path)
    storage = {(index.fqn, None if index.offset is None else tuple(index.offset)): info
               for index, info in metadata.storage_data.items()}
    mappings = metadata.planner_data or {}
    def load(item) -> Any:
        key, md = item
        if isinstance(md, TensorStorageMetadata):
            return _full_tensor(files, key, md, storage)
        if isinstance(md, BytesStorageMetadata):
            info = storage.get((key, None))
            if info is None:
                raise DataLossError(f"'{name}' has no storage entry for '{key}'")
            return _load_item(files, info, key)
        raise DataLossError(f"'{name}': '{key}' has metadata of type {type(md).__name__}")

    files = _DcpFiles(path)
    state: dict = {}
    items = list(metadata.state_dict_metadata.items())
    # Large items load on a few threads: their reads (preadv) and copies run without the GIL. Small
    # ones are mostly unpickling, which holds it: measured slower on threads.
    tensor_bytes = sum(md.size.numel() * md.properties.dtype.itemsize for _, md in items
                       if isinstance(md, TensorStorageMetadata))
    workers = min(8, os.cpu_count() or 1) if tensor_bytes >= len(items) << 20 else 1
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastdcp-migrate")
    try:
        for (key, _), value in zip(items, pool.map(load, items) if workers > 1 else map(load, items)):
            key_path = mappings.get(key, (key,))
            if not isinstance(key_path, tuple) or not key_path or not all(isinstance(p, (str, int)) for p in key_path):
                raise DataLossError(f"'{name}': the key path of '{key}' is {key_path!r}")
            _set_at(state, key_path, value)
    finally:
        pool.shutdown(cancel_futures=True)
        files.close()
    return state


def adopt_key_types(source: Any, template: Any) -> None:
    """DCP stores dict keys as strings ("state.0.exp_avg"): where ``template`` has an int key whose
    string ``source`` has instead (an optimizer's state), the source takes the int, as dcp.load
    fills such a template. Changes ``source`` in place."""
    stack = [(source, template)]
    while stack:
        s, t = stack.pop()
        if isinstance(s, dict) and isinstance(t, dict):
            for key in list(t):
                if isinstance(key, int) and key not in s and str(key) in s:
                    s[key] = s.pop(str(key))
                if key in s:
                    stack.append((s[key], t[key]))
        elif isinstance(s, (list, tuple)) and isinstance(t, (list, tuple)):
            stack.extend(zip(s, t))
