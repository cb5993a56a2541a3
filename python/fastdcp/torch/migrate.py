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
anything is called. Every field of the metadata is checked for its type and range, chunks must
tile their tensor, and byte ranges must lie in a regular file of the checkpoint's directory before
anything is allocated or read, so a damaged or hostile ``.metadata`` fails with ``DataLossError``
naming the file and the key. DCP's pickles of values may name ``io.BytesIO`` and ``bytes``
(``_VALUE_GLOBALS``): they alone are allowed beyond ``weights_only``'s types, for values only.

Note [Rank-local DCP metadata]
``dcp.save(..., use_collectives=False)`` (and FileSystemWriter without rank coordination) has
every rank write its own ``__<rank>.metadata`` naming only what that rank saved, and no
``.metadata``; dcp.load then has each rank read its own file, so it loads only at the world size
and layout that saved. fastdcp merges the files into one global view instead, so that the
checkpoint loads whole, into any template and at any world size: a key must be the same kind of
item, dtype and global size in every file that lists it, and must nest the same way; chunks that
several ranks saved (replicated or plain tensors) are the same chunk, taken from the reading
rank's own file where it has one (as dcp.load would), else from the lowest rank's; the same goes
for values. Anything else (differing sizes, overlapping chunks, chunks that leave a gap) is
``DataLossError`` naming the files: they come from different saves.
"""

import io
import json
import os
import pickle
import re
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from fastdcp import DataLossError
from fastdcp.torch._adapter import _DTYPES as _SAFETENSORS_DTYPES  # fastdcp's dtype names are safetensors'

__all__ = ["DCP", "EXPERIMENTAL", "FASTDCP", "UnsafeCheckpointError", "checkpoint_format", "read_state_dict",
           "world_size"]

FASTDCP, DCP, EXPERIMENTAL = "fastdcp", "dcp", "torch_experimental"

_RANK_FILE = re.compile(r"checkpoint_(\d+)\.pt$")
_RANK_METADATA = re.compile(r"__(\d+)\.metadata$")  # DCP saves without rank coordination


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
    if any(_RANK_METADATA.match(n) for n in names):
        return DCP
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


def read_state_dict(path: str, fmt: str, rank: int = 0, *, mmap: bool = False,
                    device: torch.device | None = None) -> dict:
    """The whole state dict of a DCP checkpoint (any rank gets all of it, tensors whole), or rank
    ``rank``'s of an _experimental one, its tensors on ``device`` (None: the CPU)."""
    path = str(path)
    if fmt == DCP:
        return _read_dcp(path, rank, device)
    if fmt == EXPERIMENTAL:
        return _read_experimental(path, rank, mmap, device)
    raise ValueError(f"read_state_dict: {fmt!r} is not a format of torch's (use {DCP!r} or {EXPERIMENTAL!r})")


def _torch_load(stream, where: str, map_location: Any = "cpu", **kwargs) -> Any:
    """torch.load(weights_only=True), its failures naming ``where``."""
    try:
        return torch.load(stream, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{where}: torch.load(weights_only=True) refused it (fastdcp never unpickles checkpoints "
            f"unrestricted; if you trust the file, allow the type with torch.serialization.add_safe_globals): "
            f"{error}") from error
    except (RuntimeError, EOFError, ValueError, KeyError) as error:
        raise DataLossError(f"{where}: not a readable torch.save stream (truncated or damaged): {error}") from error


# ---- torch's _experimental checkpointer -----------------------------------------------------

def _read_experimental(path: str, rank: int, mmap: bool, device: torch.device | None) -> dict:
    file = os.path.join(path, f"checkpoint_{rank}.pt")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no rank file '{file}': the _experimental checkpoint at '{path}' has the files "
                                f"of ranks {_saved_ranks(path)}, and each rank loads its own; load it with the "
                                f"world size that saved it")
    with open(file, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch.save's default format; only it can be mapped
    return _torch_load(file, f"'{file}'", map_location=device or "cpu", mmap=mmap and zipped)


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


def _unpickle_metadata(name: str):
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(name, "rb") as f:
            metadata = _MetadataUnpickler(f, name).load()
    except (UnsafeCheckpointError, OSError):
        raise
    except Exception as error:  # any malformed pickle
        raise DataLossError(f"'{name}' is not a readable DCP metadata pickle: {error!r}") from error
    ok = (isinstance(metadata, Metadata) and isinstance(getattr(metadata, "state_dict_metadata", None), dict)
          and isinstance(getattr(metadata, "storage_data", None), dict)
          and isinstance(getattr(metadata, "planner_data", None), (dict, type(None))))
    if not ok:
        raise DataLossError(f"'{name}' is not DCP metadata of the file-system writer (torch.distributed.checkpoint"
                            f".FileSystemWriter): it unpickled to {type(metadata).__name__} with unexpected contents")
    return metadata


class _Chunk(NamedTuple):
    offsets: tuple
    sizes: tuple
    info: Any  # filesystem._StorageInfo, checked
    file: str  # the metadata file that lists it


class _TensorItem(NamedTuple):
    dtype: torch.dtype
    size: tuple
    chunks: list  # of _Chunk
    file: str  # the first metadata file that lists it


class _BytesItem(NamedTuple):
    info: Any
    file: str


def _show(value: Any) -> str:
    """A metadata object for a message: its fields (a dataclass's repr fails on the fields that a
    hostile pickle left out)."""
    return repr(vars(value)) if hasattr(value, "__dict__") else repr(value)


def _int_tuple(value: Any) -> tuple | None:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        return None
    return tuple(value)


def _checked_items(name: str, metadata) -> tuple[dict, dict]:
    """The items of one metadata file, every field checked for its type and range: a key's
    tensor (dtype, global size, chunks inside it, each with its storage entry) or value; and the
    key paths (planner data). Anything else is DataLossError naming the file and the key."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, MetadataIndex,
                                                       TensorStorageMetadata)

    storage = {}
    for index, info in metadata.storage_data.items():
        fqn = getattr(index, "fqn", None)
        offset = getattr(index, "offset", None)
        descriptors = getattr(info, "transform_descriptors", None)
        ok = (isinstance(index, MetadataIndex) and isinstance(fqn, str) and isinstance(info, _StorageInfo)
              and (offset is None or _int_tuple(offset) is not None)
              and isinstance(getattr(info, "relative_path", None), str)
              and type(getattr(info, "offset", None)) is int and type(getattr(info, "length", None)) is int
              and (descriptors is None or (isinstance(descriptors, (list, tuple))
                                           and all(isinstance(d, str) for d in descriptors))))
        if not ok:
            raise DataLossError(f"'{name}': the storage entry {_show(index)} is malformed: {_show(info)}")
        storage[(fqn, None if offset is None else tuple(offset))] = info

    def entry(key: str, offsets: tuple | None):
        info = storage.get((key, offsets))
        if info is None:
            at = "" if offsets is None else f" at {list(offsets)}"
            raise DataLossError(f"'{name}' has no storage entry for '{key}'{at}")
        return info

    items: dict = {}
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(key, str):
            raise DataLossError(f"'{name}': the key {key!r} is not a string")
        if isinstance(md, BytesStorageMetadata):
            items[key] = _BytesItem(entry(key, None), name)
            continue
        dtype = getattr(getattr(md, "properties", None), "dtype", None)
        size = _int_tuple(getattr(md, "size", None))
        chunks = getattr(md, "chunks", None)
        if not isinstance(md, TensorStorageMetadata) or not isinstance(dtype, torch.dtype) or size is None \
                or not isinstance(chunks, list):
            raise DataLossError(f"'{name}': the metadata of '{key}' is malformed: {_show(md)}")
        checked = []
        for chunk in chunks:
            offsets, sizes = _int_tuple(getattr(chunk, "offsets", None)), _int_tuple(getattr(chunk, "sizes", None))
            if offsets is None or sizes is None or len(offsets) != len(size) or len(sizes) != len(size) or any(
                    o + s > d for o, s, d in zip(offsets, sizes, size)):
                raise DataLossError(f"'{name}': a chunk of '{key}' ({_show(chunk)}) lies outside its tensor of size "
                                    f"{list(size)}")
            checked.append(_Chunk(offsets, sizes, entry(key, offsets), name))
        items[key] = _TensorItem(dtype, size, checked, name)
    mappings = metadata.planner_data or {}
    for key, key_path in mappings.items():
        if not isinstance(key_path, tuple) or not key_path or not all(isinstance(p, (str, int)) for p in key_path):
            raise DataLossError(f"'{name}': the key path of '{key}' is {key_path!r}")
    return items, mappings


def _rank_metadata_files(path: str) -> list[tuple[int, str]]:
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted((int(m.group(1)), m.group(0)) for m in map(_RANK_METADATA.match, names) if m)


def _read_metadata(path: str, rank: int) -> tuple[dict, dict]:
    """The checkpoint's items and key paths: from its global ``.metadata`` or, where the save ran
    without rank coordination, merged from every rank's ``__<r>.metadata`` (Note [Rank-local DCP
    metadata])."""
    name = os.path.join(path, ".metadata")
    if os.path.isfile(name) or not _rank_metadata_files(path):
        return _checked_items(name, _unpickle_metadata(name))
    files = _rank_metadata_files(path)
    # This rank's own file first: its copy of a value or chunk that several ranks saved wins.
    files.sort(key=lambda rank_name: (rank_name[0] != rank, rank_name[0]))
    items: dict = {}
    mappings: dict = {}
    for _, file in files:
        name = os.path.join(path, file)
        mine, paths = _checked_items(name, _unpickle_metadata(name))
        for key, key_path in paths.items():
            if mappings.setdefault(key, key_path) != key_path:
                raise DataLossError(f"'{name}' nests '{key}' as {key_path!r}, another rank's metadata as "
                                    f"{mappings[key]!r}: the rank metadata files belong to different saves")
        for key, item in mine.items():
            have = items.setdefault(key, item)
            if have is item:
                continue
            if type(have) is not type(item) or (isinstance(item, _TensorItem) and (
                    have.dtype != item.dtype or have.size != item.size)):
                def what(x):
                    return "a value" if isinstance(x, _BytesItem) else f"a tensor {x.dtype}{list(x.size)}"
                raise DataLossError(f"'{key}' is {what(have)} in '{have.file}' and {what(item)} in '{name}': the rank "
                                    f"metadata files belong to different saves")
            if isinstance(item, _TensorItem):
                known = {c.offsets: c for c in have.chunks}
                for chunk in item.chunks:
                    other = known.get(chunk.offsets)
                    if other is None:
                        have.chunks.append(chunk)
                        known[chunk.offsets] = chunk
                    elif other.sizes != chunk.sizes:
                        raise DataLossError(f"'{key}': the chunk at {list(chunk.offsets)} has sizes "
                                            f"{list(other.sizes)} in '{other.file}' and {list(chunk.sizes)} in "
                                            f"'{name}': the rank metadata files belong to different saves")
    return items, mappings


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
            if os.path.basename(relative) != relative or relative in ("", ".", ".."):
                raise DataLossError(f"the DCP metadata in '{self._path}' names the data file '{relative}' outside "
                                    f"the checkpoint directory (for '{key}')")
            try:
                fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise FileNotFoundError(f"DCP data file '{full}' (holding '{key}') does not exist") from None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise DataLossError(f"DCP data file '{full}' (holding '{key}') is not a regular file")
            self._files[relative] = (fd, st.st_size, full)
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
        if not ok or end - begin != _nbytes(dtype, sizes) or data + end > size or begin < 0:
            raise DataLossError(f"{where}: the safetensors file has {entry!r} for it, the metadata says {dtype}"
                                f"{list(sizes)} at offsets {list(offsets)}")
        tensor = torch.empty(sizes, dtype=dtype)
        if tensor.nbytes and _FileSlice(fd, data + begin, tensor.nbytes).readinto(
                tensor.view(-1).view(torch.uint8).numpy()) != tensor.nbytes:
            raise DataLossError(f"{where}: the file ended early")
        return tensor

    def close(self) -> None:
        for fd, _, _ in self._files.values():
            os.close(fd)
        self._files.clear()


# What DCP's pickles of values name beyond weights_only's default types: io.BytesIO (bytes and a
# position), and bytes itself, the way protocol 2 pickles b"". Neither runs anything.
_VALUE_GLOBALS = [io.BytesIO, bytes]
_VALUE_GLOBALS_LOCK = threading.Lock()


def _refuse_extensions(files: _DcpFiles, info, key: str) -> None:
    if info.transform_descriptors:
        raise ValueError(
            f"'{key}' in '{files._path}' was saved through DCP stream extensions {list(info.transform_descriptors)} "
            f"(compression: FileSystemWriter(_extensions=[ZStandard()])), which fastdcp does not read; to migrate "
            f"it, install the 'zstandard' or 'pyzstd' module, load the checkpoint with dcp.load and save it again "
            f"without _extensions (or with fastdcp)")


def _load_item(files: _DcpFiles, info, key: str, *, value: bool = False) -> Any:
    """One saved item: a torch.save stream in a byte range of a .distcp file; a value (a
    BytesStorageMetadata item) may name ``_VALUE_GLOBALS``."""
    _refuse_extensions(files, info, key)
    data, where = files.read(info, key)
    if not value:
        return _torch_load(data, where)
    # torch keeps its allowances process-wide: these are allowed only while loading, under a
    # lock, and left as the caller had them.
    with _VALUE_GLOBALS_LOCK:
        missing = [g for g in _VALUE_GLOBALS if g not in torch.serialization.get_safe_globals()]
        with torch.serialization.safe_globals(missing):
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


def _numel(sizes) -> int:
    n = 1
    for d in sizes:
        n *= d
    return n


def _nbytes(dtype: torch.dtype, sizes) -> int:
    return _numel(sizes) * dtype.itemsize


def _check_tiling(key: str, item: _TensorItem) -> None:
    """The chunks of a tensor cover each of its elements exactly once: their sizes add up to the
    tensor's, and no two overlap. Overlaps are counted on the grid of the chunks' boundaries (a
    cell per run between two boundaries in each dimension: the cost follows the chunks, not the
    elements), or pair by pair where that grid would be large (hostile metadata)."""
    files = sorted({c.file for c in item.chunks}) or [item.file]
    numel = _numel(item.size)
    covered = sum(_numel(c.sizes) for c in item.chunks)
    if covered != numel:
        raise DataLossError(f"'{key}' in {', '.join(map(repr, files))}: its chunks cover {covered} of its {numel} "
                            f"elements")
    chunks = [c for c in item.chunks if _numel(c.sizes)]
    if len(chunks) < 2:
        return
    bounds = [sorted({0, d} | {c.offsets[i] for c in chunks} | {c.offsets[i] + c.sizes[i] for c in chunks})
              for i, d in enumerate(item.size)]

    def overlap(a: _Chunk, b: _Chunk) -> bool:
        return all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes))

    if _numel(len(b) - 1 for b in bounds) <= 1 << 22:  # the chunks of real saves: few distinct bounds
        index = [{b: n for n, b in enumerate(dim)} for dim in bounds]
        grid = torch.zeros([len(b) - 1 for b in bounds], dtype=torch.int32)
        for c in chunks:
            grid[tuple(slice(at[o], at[o + s]) for at, o, s in zip(index, c.offsets, c.sizes))] += 1
        if not bool((grid > 1).any()):
            return
    pair = next(((a, b) for i, a in enumerate(chunks) for b in chunks[i + 1:] if overlap(a, b)), None)
    if pair is not None:
        a, b = pair
        where = f"'{a.file}'" if a.file == b.file else f"'{a.file}' and '{b.file}'"
        raise DataLossError(f"{where}: the chunks of '{key}' at {list(a.offsets)} of size {list(a.sizes)} and at "
                            f"{list(b.offsets)} of size {list(b.sizes)} overlap, so they cannot tile it")


def _full_tensor(files: _DcpFiles, key: str, item: _TensorItem) -> torch.Tensor:
    """One tensor, assembled from its saved chunks (one per shard of a DTensor or ShardedTensor
    save, after DCP's deduplication of replicas)."""
    dtype, size = item.dtype, item.size
    _check_tiling(key, item)
    for chunk in item.chunks:  # before allocating: the checkpoint's files hold every byte promised
        _refuse_extensions(files, chunk.info, key)  # compressed items are shorter than their tensors
        files.read(chunk.info, key)
        if _nbytes(dtype, chunk.sizes) > chunk.info.length:
            raise DataLossError(f"'{chunk.file}': the chunk of '{key}' at {list(chunk.offsets)} is {dtype}"
                                f"{list(chunk.sizes)}, but its item in '{chunk.info.relative_path}' has only "
                                f"{chunk.info.length} bytes")
    full = torch.empty(size, dtype=dtype)  # as dcp.load gives it: contiguous, owning only its elements
    chunks = [c for c in item.chunks if _numel(c.sizes)] or item.chunks[:1]
    if len(chunks) == 1 and chunks[0].sizes == size:
        tensor = _chunk_tensor(files, chunks[0].info, key, dtype, size, chunks[0].offsets)
        return tensor if tensor.stride() == full.stride() and tensor.untyped_storage().nbytes() == tensor.nbytes \
            else full.copy_(tensor)
    for chunk in chunks:
        target = full
        for dim, (o, s) in enumerate(zip(chunk.offsets, chunk.sizes)):
            target = target.narrow(dim, o, s)
        target.copy_(_chunk_tensor(files, chunk.info, key, dtype, chunk.sizes, chunk.offsets))
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


def _read_dcp(path: str, rank: int, device: torch.device | None = None) -> dict:
    items, mappings = _read_metadata(path, rank)

    def load(entry) -> Any:
        key, item = entry
        if isinstance(item, _TensorItem):
            # DCP stores each tensor on its own: moved one by one, nothing shared is split.
            tensor = _full_tensor(files, key, item)
            return tensor if device is None else tensor.to(device)
        return _load_item(files, item.info, key, value=True)

    files = _DcpFiles(path)
    state: dict = {}
    entries = list(items.items())
    # Large items load on a few threads: their reads (preadv) and copies run without the GIL. Small
    # ones are mostly unpickling, which holds it: measured slower on threads.
    tensor_bytes = sum(_nbytes(item.dtype, item.size) for _, item in entries if isinstance(item, _TensorItem))
    workers = min(8, os.cpu_count() or 1) if tensor_bytes >= len(entries) << 20 else 1
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastdcp-migrate")
    try:
        for (key, _), value in zip(entries, pool.map(load, entries) if workers > 1 else map(load, entries)):
            _set_at(state, mappings.get(key, (key,)), value)
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


def _bytes_io_leaves(tree: Any, path: tuple = ()):
    """(key path, value) of every io.BytesIO in dicts and lists."""
    if isinstance(tree, io.BytesIO):
        yield path, tree
    elif isinstance(tree, (dict, list)):
        for key, value in (tree.items() if isinstance(tree, dict) else enumerate(tree)):
            yield from _bytes_io_leaves(value, path + (key,))


def _parent(tree: Any, path: tuple) -> Any:
    """The dict or list that holds ``path``'s value in ``tree``, or None where it has none."""
    node = tree
    for step in path[:-1]:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return None
    last = path[-1]
    held = (isinstance(node, dict) and last in node) or (isinstance(node, list) and isinstance(last, int)
                                                          and 0 <= last < len(node))
    return node if held else None


def bytes_io_as_bytes(tree: Any) -> None:
    """Replaces, in place, each io.BytesIO value (which DCP saves, fastdcp's trees do not hold) with
    its bytes."""
    for path, value in list(_bytes_io_leaves(tree)):
        _parent(tree, path)[path[-1]] = value.getvalue()


def stand_in_for_bytes_io(source: Any, template: Any):
    """Lets a template load take io.BytesIO values, which fastdcp's matching does not hold: the
    source's become their bytes and the template's None (take what the checkpoint holds) for the
    load; the returned function, called with the loaded tree (None when the load failed), puts
    the source's io.BytesIO where the load put their bytes, as dcp.load sets them, and gives the
    template back its own where nothing replaced them."""
    loaded, given = list(_bytes_io_leaves(source)), list(_bytes_io_leaves(template))
    bytes_io_as_bytes(source)
    for path, _ in given:
        _parent(template, path)[path[-1]] = None

    def restore(out: Any) -> None:
        for path, value in loaded if out is not None else ():
            parent = _parent(out, path)
            if parent is not None:
                parent[path[-1]] = value
        for path, value in given:
            parent = _parent(template, path)
            if parent is not None and parent[path[-1]] is None:
                parent[path[-1]] = value

    return restore

