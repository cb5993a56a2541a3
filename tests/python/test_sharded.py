"""DTensor and FSDP2 state under torchrun (gloo, CPU): boxes against DTensor itself, saves on 4
ranks loaded at 4, 2, 3 (uneven), 1 and saves on 2 loaded at 4, with the sync and async
checkpointers, and a one-rank unsharded save of the same values, into DTensor templates of other
layouts, plain tensors and no template; an FSDP2
model with AdamW, alone and over tensor parallelism, resumed by FSDP2 at other world sizes (tests/python/sharded_main.py)."""

from pathlib import Path

import pytest

from conftest import run_torchrun

SCRIPT = Path(__file__).with_name("sharded_main.py")


def torchrun(phase: str, world: int, out: Path) -> dict:
    """Runs one phase on `world` ranks; returns the ranks' reports, failing with all of them."""
    returncode, reports, details = run_torchrun(SCRIPT, world, [phase, out], lambda rank: out / f"{phase}_rank_{rank}.json")
    details = f"{phase} on {world} ranks: {details}"
    assert returncode == 0, details
    assert sorted(reports) == list(range(world)), details
    assert all(report["ok"] for report in reports.values()), details
    return reports


def test_dtensor_boxes_staging_and_refusals(tmp_path):
    reports = torchrun("boxes", 4, tmp_path)
    assert all(r["box_cases"] == 40 and r["strided_cases"] >= 3 and r["slice_cases"] == 3 and r["refusals"] == "ok"
               for r in reports.values())


@pytest.fixture(scope="module")
def saved_on_four(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_4")
    torchrun("save", 4, out)
    return out


@pytest.mark.parametrize("world", [4, 2, 3, 1])
def test_load_saved_on_four_ranks(saved_on_four, world):
    torchrun("load", world, saved_on_four)


def test_load_saved_on_two_ranks_at_four(tmp_path):
    torchrun("save", 2, tmp_path)
    torchrun("load", 4, tmp_path)


@pytest.fixture(scope="module")
def fsdp_on_four(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_4")
    reports = torchrun("fsdp_save", 4, out)
    assert all("fsdp_into_tp" in r for r in reports.values())  # FSDP2's checkpoint resumed over TP
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_resume_at_other_world_sizes(fsdp_on_four, world):
    reports = torchrun("fsdp_resume", world, fsdp_on_four)
    assert all("fsdp_sync" in r and "fsdp_async" in r and "tp_sync" in r for r in reports.values())
