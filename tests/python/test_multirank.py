"""Four ranks over gloo, started by torchrun: sync and async saves with DistBarrier and
TCPStoreBarrier, a save in which one rank fails in its writer, and one in which a rank's state
cannot be staged (tests/python/multirank_main.py)."""

from pathlib import Path

from conftest import run_torchrun

WORLD_SIZE = 4


def test_four_ranks_save_load_and_fail_together(tmp_path):
    script = Path(__file__).with_name("multirank_main.py")
    returncode, reports, details = run_torchrun(script, WORLD_SIZE, [tmp_path], lambda rank: tmp_path / f"rank_{rank}.json")
    assert returncode == 0, details
    assert sorted(reports) == list(range(WORLD_SIZE)), details
    for rank, report in reports.items():
        assert report["sync"] == "ok" and report["async"] == "ok", details
        assert report["failed_save"] != "committed (wrong)", details
        assert report["failed_save_seconds"] < 120, details  # the writer timeout is 600 s: nobody waited it out
        assert "no committed checkpoint" in report["failed_load"], details
        assert report["unstaged_save"] != "committed (wrong)", details
        # Its barrier's timeout is 300 s: the failed rank's writer joined it instead of leaving the
        # others to wait that out.
        assert report["unstaged_save_seconds"] < 60, details
