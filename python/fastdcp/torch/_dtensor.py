"""DTensors as fastdcp sharded tensors: the boxes of the global tensor that a rank's local tensor
holds (Note [Sharded tensors] in include/fastdcp/tensor/sharded.h). Placements and meshes stay
here; the C++ core sees global shapes, boxes and views of the local tensor only."""

import functools
import itertools

import torch

try:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard
except ImportError:  # a torch built without distributed support has no DTensors
    DTensor = None

__all__ = ["DTensor", "local_boxes", "describe_sharded", "rebuild_sharded"]


def _runs(indices: torch.Tensor) -> list[tuple[int, int]]:
    """(global start, length) of each maximal run of consecutive global indices, in order."""
    if indices.numel() == 0:
        return []
    breaks = (torch.nonzero(indices[1:] - indices[:-1] != 1).flatten() + 1).tolist()
    starts = [0, *breaks]
    ends = [*breaks, indices.numel()]
    return [(g, e - s) for g, s, e in zip(indices[starts].tolist(), starts, ends)]


def _cut(runs: list[tuple[int, int]], start: int, size: int) -> list[tuple[int, int]]:
    """The runs of local positions [start, start + size) of `runs`."""
    out, position = [], 0
    for first, length in runs:
        lo, hi = max(start, position), min(start + size, position + length)
        if lo < hi:
            out.append((first + lo - position, hi - lo))
        position += length
    return out


def _split(runs: list[tuple[int, int]], dim: int, placement, num_chunks: int, index: int):
    """The runs that piece `index` of `num_chunks` holds when `placement` cuts `runs`, as DTensor
    cuts its data: Shard as torch.chunk does (pieces of ceil(total / num_chunks), the last ones
    short or empty: Shard.local_shard_size_and_offset, whose symbolic-shape guards cost 10 us a
    call), _StridedShard by its own split of the indices."""
    total = sum(length for _, length in runs)
    if not isinstance(placement, _StridedShard):
        full = -(-total // num_chunks)
        start = min(full * index, total)
        return _cut(runs, start, min(total, start + full) - start)
    indices = torch.cat([torch.arange(first, first + length) for first, length in runs]) if runs \
        else torch.zeros(0, dtype=torch.int64)
    # _split_tensor cuts along placement.dim: give it the indices along that dim.
    pieces, _ = placement._split_tensor(indices.view([1] * dim + [total]), num_chunks, with_padding=False,
                                        contiguous=False)
    return _runs(pieces[index].reshape(-1))


def local_boxes(global_shape, mesh_shape, coordinate, placements):
    """The boxes of a global tensor that one mesh coordinate holds, and its replica number.

    For each tensor dim, the global indices the local tensor holds along it, in local order, kept
    as runs of consecutive indices: the placements that shard that dim (``Shard(d)``,
    ``_StridedShard(d, split_factor)``) are applied in mesh-dim order, each cutting what the
    previous ones left, with DTensor's rules (torch.chunk's sizes for ``Shard``, and
    ``_StridedShard._split_tensor`` itself on the indices), so that uneven sizes and strided shards
    are cut exactly as DTensor cuts its data. Each maximal run is one interval; the boxes are the
    products of one interval per dim.

    Returns ``(boxes, replica_index, replica_count)``: ``boxes`` is a list of
    ``(global_offset, local_offset, sizes)`` tuples, in row-major order of the intervals (the first
    box starts at the local tensor's origin); empty when the local tensor is empty. The replica
    number is the coordinate among the mesh dims that replicate the tensor, row-major; a
    coordinate of None (a rank outside the mesh) holds nothing.
    Raises ValueError for a ``Partial`` placement."""
    ndim = len(global_shape)
    replica_index, replica_count = 0, 1
    per_dim = [[(0, n)] if n > 0 else [] for n in global_shape]
    for mesh_dim, placement in enumerate(placements):
        size = mesh_shape[mesh_dim]
        if placement.is_partial():
            raise ValueError(f"{placement} placements hold partial sums, not values: reduce it first "
                             "(dtensor.redistribute(placements=[Replicate() or Shard(d)]))")
        if isinstance(placement, (Shard, _StridedShard)):
            if coordinate is not None:
                dim = placement.dim % ndim
                per_dim[dim] = _split(per_dim[dim], dim, placement, size, coordinate[mesh_dim])
        elif isinstance(placement, Replicate):
            replica_index = replica_index * size + (0 if coordinate is None else coordinate[mesh_dim])
            replica_count *= size
        else:
            raise ValueError(f"fastdcp cannot save {placement} placements (only Shard, _StridedShard and Replicate)")
    if coordinate is None:
        return [], 0, 1
    local_starts = []
    for runs in per_dim:
        starts, position = [], 0
        for _, length in runs:
            starts.append(position)
            position += length
        local_starts.append(starts)
    boxes = []
    for choice in itertools.product(*(range(len(runs)) for runs in per_dim)):
        boxes.append((tuple(per_dim[d][i][0] for d, i in enumerate(choice)),
                      tuple(local_starts[d][i] for d, i in enumerate(choice)),
                      tuple(per_dim[d][i][1] for d, i in enumerate(choice))))
    return boxes, replica_index, replica_count


# A model's DTensors share a few shapes and layouts: their boxes are computed once (read only).
_cached_boxes = functools.lru_cache(maxsize=4096)(local_boxes)


@functools.lru_cache(maxsize=256)
def _slice_replicas(mesh) -> tuple[int, int]:
    """(index, count) of this rank among the copies of a sliced mesh's DTensors. A mesh sliced
    from a larger one (FSDP2's "dp" mesh of a ("dp", "tp") mesh) leaves out the root mesh's other
    dims, along which the other slices hold the same values (every rank runs the same program):
    those dims replicate the DTensor as a Replicate placement would, row-major in root order."""
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh  # private in torch 2.13
    coordinate = root.get_coordinate() if root is not mesh else None
    if coordinate is None:
        return 0, 1
    members = set(mesh.mesh.flatten().tolist())
    index, count = 0, 1
    for dim, size in enumerate(root.shape):
        neighbour = list(coordinate)
        neighbour[dim] = (coordinate[dim] + 1) % size
        if size == 1 or int(root.mesh[tuple(neighbour)]) in members:
            continue  # the slice spans this dim
        index, count = index * size + coordinate[dim], count * size
    return index, count


def describe_sharded(dtensor):
    """What the native converter makes a sharded tensor of (Note [Sharded tensors]):
    ``(global_shape, dtype, [(global_offset, view of the local tensor)], replica_index,
    replica_count)``. The views are narrowed from the local tensor, the first at its origin. The
    replica number counts the copies that Replicate placements make and those of the other slices
    of a sliced mesh (_slice_replicas)."""
    mesh = dtensor.device_mesh
    local = dtensor._local_tensor.detach()
    coordinate = mesh.get_coordinate()
    boxes, replica_index, replica_count = _cached_boxes(tuple(dtensor.shape), tuple(mesh.shape),
                                                        None if coordinate is None else tuple(coordinate),
                                                        tuple(dtensor.placements))
    slice_index, slice_count = _slice_replicas(mesh)
    replica_index, replica_count = slice_index * replica_count + replica_index, slice_count * replica_count
    chunks = []
    for global_offset, local_offset, sizes in boxes:
        view = local
        for dim, (start, length) in enumerate(zip(local_offset, sizes)):
            if start != 0 or length != view.shape[dim]:
                view = view.narrow(dim, start, length)
        chunks.append((global_offset, view))
    return tuple(dtensor.shape), dtensor.dtype, chunks, replica_index, replica_count


def local_tensor(dtensor):
    return dtensor._local_tensor


def rebuild_sharded(source, local):
    """A DTensor like ``source`` (mesh, placements, global shape, stride and dtype: its spec) over
    ``local``, the staged copy of its local tensor; None for ``local`` (the rank holds no element)
    gives an empty host tensor of the source's local shape. The spec is reused as it is, rather
    than through ``DTensor.from_local``, which would move a host copy back onto a CUDA mesh's
    device; a host-side DTensor of a CUDA mesh is what ``dtensor.to("cpu")`` gives too."""
    if local is None:
        local = torch.empty_like(source._local_tensor, device="cpu")
    return DTensor(local, source._spec, requires_grad=local.requires_grad)
