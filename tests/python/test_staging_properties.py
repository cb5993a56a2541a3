"""Property test: on random nested state dicts with random views of shared bases, fastdcp.torch's
stager agrees with torch's own, value by value and storage by storage."""

import pytest
import torch
import torch.distributed.checkpoint._experimental.staging as upstream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdcp.torch import CheckpointStagerConfig, DefaultStager
from test_torch_staging import CPU, assert_same_staging

pytestmark = pytest.mark.usefixtures("tensor_path")

DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.bool, torch.complex64]


@st.composite
def views(draw, bases):
    """A random view of one of `bases`: slices with steps, transposes, or the base itself."""
    base = draw(st.sampled_from(bases))
    view = base
    for dim in range(base.dim()):
        size = view.shape[dim]
        start = draw(st.integers(0, max(size - 1, 0)))
        stop = draw(st.integers(start, size))
        step = draw(st.integers(1, 3))
        view = view.narrow(dim, start, stop - start)[(slice(None),) * dim + (slice(None, None, step),)]
    if view.dim() == 2 and draw(st.booleans()):
        view = view.t()
    return view


@st.composite
def state_dicts(draw):
    bases = []
    for _ in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 6), min_size=1, max_size=2))
        bases.append((torch.rand(shape) * 100).to(dtype))
    leaf = st.one_of(views(bases), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=3), st.none())
    tree = st.recursive(
        leaf,
        lambda children: st.one_of(
            st.dictionaries(st.one_of(st.text(max_size=4), st.integers(0, 9)), children, max_size=4),
            st.lists(children, max_size=4),
            st.tuples(children, children),
        ),
        max_leaves=12,
    )
    return {"root": draw(tree)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state_dicts())
def test_random_state_dicts_stage_like_torch(sd):
    with DefaultStager(CheckpointStagerConfig(**CPU)) as stager:
        mine = stager.stage(sd)
        again = stager.stage(sd)  # warm cache: same answer
    reference = upstream.DefaultStager(upstream.CheckpointStagerConfig(**CPU)).stage(sd)
    assert_same_staging(mine, reference, sd)
    assert_same_staging(again, reference, sd)
