"""DTensors as fastdcp sharded tensors: the boxes of the global tensor that a rank's local tensor
holds (Note [Sharded tensors] in include/fastdcp/tensor/sharded.h). Placements and meshes stay
here; the C++ core sees global shapes, boxes and views of the local tensor only."""

import itertools

import torch

try:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard
except ImportError:  # a torch built without distributed support has no DTensors
    DTensor = None

__all__ = ["DTensor", "local_boxes", "describe_sharded", "rebuild_sharded"]


def _runs(indices: torch.Tensor) -> list[tuple[int, int, int]]:
    """(global start, local start, length) of each maximal run of consecutive global indices."""
    if indices.numel() == 0:
        return []
    breaks = (torch.nonzero(indices[1:] - indices[:-1] != 1).flatten() + 1).tolist()
    starts = [0, *breaks]
    ends = [*breaks, indices.numel()]
    first = indices[starts].tolist()
    return [(g, s, e - s) for g, s, e in zip(first, starts, ends)]


def local_boxes(global_shape, mesh_shape, coordinate, placements):
    """The boxes of a global tensor that one mesh coordinate holds, and its replica number.

    For each tensor dim, the global indices the local tensor holds along it, in local order: the
    placements that shard that dim (``Shard(d)``, ``_StridedShard(d, split_factor)``) are applied
    in mesh-dim order, each cutting the indices left by the previous ones with torch's own split
    (``Placement._split_tensor`` on the indices, so that uneven sizes and strided shards are cut
    exactly as DTensor cuts its data). Each maximal run of consecutive global indices is one
    interval; the boxes are the products of one interval per dim.

    Returns ``(boxes, replica_index, replica_count)``: ``boxes`` is a list of
    ``(global_offset, local_offset, sizes)`` tuples, in row-major order of the intervals (the first
    box starts at the local tensor's origin); empty when the local tensor is empty. The replica
    number is the coordinate among the mesh dims that replicate the tensor, row-major; a
    coordinate of None (a rank outside the mesh) holds nothing.
    Raises ValueError for a ``Partial`` placement."""
    ndim = len(global_shape)
    replica_index, replica_count = 0, 1
    indices: dict[int, torch.Tensor] = {}
    for mesh_dim, placement in enumerate(placements):
        size = mesh_shape[mesh_dim]
        if placement.is_partial():
            raise ValueError(f"{placement} placements hold partial sums, not values: reduce it first "
                             "(dtensor.redistribute(placements=[Replicate() or Shard(d)]))")
        if isinstance(placement, (Shard, _StridedShard)):
            if coordinate is None:
                continue
            dim = placement.dim % ndim
            current = indices.get(dim)
            if current is None:
                current = torch.arange(global_shape[dim], dtype=torch.int64)
            # _split_tensor cuts along placement.dim: give it the indices along that dim.
            shaped = current.view([1] * dim + [current.numel()])
            pieces, _ = placement._split_tensor(shaped, size, with_padding=False, contiguous=False)
            indices[dim] = pieces[coordinate[mesh_dim]].reshape(-1)
        elif isinstance(placement, Replicate):
            replica_index = replica_index * size + (0 if coordinate is None else coordinate[mesh_dim])
            replica_count *= size
        else:
            raise ValueError(f"fastdcp cannot save {placement} placements (only Shard, _StridedShard and Replicate)")
    if coordinate is None:
        return [], 0, 1
    per_dim = []
    for dim in range(ndim):
        if dim in indices:
            per_dim.append(_runs(indices[dim]))
        else:
            per_dim.append([(0, 0, global_shape[dim])] if global_shape[dim] > 0 else [])
    boxes = []
    for runs in itertools.product(*per_dim):
        boxes.append((tuple(r[0] for r in runs), tuple(r[1] for r in runs), tuple(r[2] for r in runs)))
    return boxes, replica_index, replica_count


def describe_sharded(dtensor):
    """What the native converter makes a sharded tensor of (Note [Sharded tensors]):
    ``(global_shape, dtype, [(global_offset, view of the local tensor)], replica_index,
    replica_count)``. The views are narrowed from the local tensor, the first at its origin."""
    mesh = dtensor.device_mesh
    local = dtensor._local_tensor.detach()
    boxes, replica_index, replica_count = local_boxes(tuple(dtensor.shape), tuple(mesh.shape),
                                                      mesh.get_coordinate(), dtensor.placements)
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
    """A DTensor like ``source`` (mesh, placements, global shape and stride) over ``local``, the
    staged copy of its local tensor; None for ``local`` (the rank holds no element) gives an empty
    local tensor of the source's local shape."""
    if local is None:
        local = torch.empty_like(source._local_tensor, device="cpu")
    return DTensor.from_local(local, source.device_mesh, source.placements, run_check=False,
                              shape=source.shape, stride=source.stride())
