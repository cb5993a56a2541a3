"""One rank of the multi-rank checkpoint test, started by torchrun (tests/python/test_multirank.py).

Usage: torchrun --nproc_per_node N multirank_main.py OUT_DIR

Each rank saves a state dict of its own, with the sync checkpointer over DistBarrier and with the
async checkpointer over a TCPStoreBarrier made in its writer process; loads back its own part;
then a save in which rank 1 fails in pre_commit must fail on every rank, promptly, committing
nothing. Each rank writes a JSON report to OUT_DIR/rank_<r>.json; the exit status is 0 when all
its checks passed."""

import json
import os
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist

from fastdcp.torch import (
    BarrierConfig,
    CheckpointerConfig,
    CheckpointStagerConfig,
    CheckpointWriter,
    CheckpointWriterConfig,
    RankInfo,
    WriterHook,
    make_async_checkpointer,
    make_sync_checkpointer,
)

FAILING_RANK = 1
UNSTAGED_BARRIER_TIMEOUT = 300  # the test requires the unstaged save to fail long before this


def tcp_store_barrier(rank: int, world: int, prefix: str, timeout_secs: float) -> BarrierConfig:
    """A TCPStoreBarrier, made in each rank's writer process, on a port rank 0 picks."""
    port = [0]
    if rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port[0] = s.getsockname()[1]
    dist.broadcast_object_list(port, src=0)
    return BarrierConfig("tcp_store", dict(
        global_rank=rank, global_world_size=world, barrier_prefix=prefix,
        timeout_barrier_init_secs=120, use_checkpoint_barrier_tcpstore_libuv=True, tcpstore_port=port[0],
        master_address="127.0.0.1", timeout_secs=timeout_secs))


class FailOnRank(WriterHook):
    """pre_commit raises on one rank: the save must fail everywhere."""

    def __init__(self, rank: int):
        self.rank = rank

    def pre_commit(self, path, **kwargs):
        if self.rank == FAILING_RANK:
            raise RuntimeError(f"rank {self.rank} refuses to commit {path}")

    def post_commit(self, path, **kwargs):
        pass


def failing_writer(rank_info: RankInfo, config=None, barrier_config=None):
    return CheckpointWriter(config or CheckpointWriterConfig(), rank_info, commit_hook=FailOnRank(rank_info.global_rank))


def rank_state(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + rank)
    weight = torch.randn(128, 256, generator=g)
    return {"model": {"weight": weight, "weight_t": weight.t(), "rank": torch.tensor([rank])},
            "step": step, "tag": f"rank{rank}"}


def check_loaded(loaded: dict, expected: dict) -> None:
    assert loaded["step"] == expected["step"] and loaded["tag"] == expected["tag"], (loaded["step"], loaded["tag"])
    assert torch.equal(loaded["model"]["weight"], expected["model"]["weight"])
    assert torch.equal(loaded["model"]["rank"], expected["model"]["rank"])
    assert loaded["model"]["weight_t"].data_ptr() == loaded["model"]["weight"].data_ptr()


def save_expecting_failure(checkpointer, path: str, state: dict, report: dict, key: str,
                           expected: str | None) -> None:
    """Saves; records in report[key] how the write ended and in report[key + "_seconds"] when it
    failed; checks that its error contains `expected` (when given)."""
    started = time.monotonic()
    _, write = checkpointer.save(path, state)
    try:
        write.result(timeout=300)
        report[key] = "committed (wrong)"
    except Exception as error:  # noqa: BLE001 - the message is the check
        report[key] = str(error).splitlines()[-1]
        report[key + "_seconds"] = time.monotonic() - started
        if expected is not None:
            assert expected in str(error), str(error)


def main() -> int:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {"rank": rank, "world_size": world}
    cpu = CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False)
    try:
        # Sync, DistBarrier on its own gloo group.
        sync = make_sync_checkpointer(CheckpointerConfig(
            barrier_config=BarrierConfig("dist_barrier", {"timeout_secs": 60})))
        sync.save(f"{out}/sync", rank_state(rank, 1))
        check_loaded(sync.load(f"{out}/sync"), rank_state(rank, 1))
        report["sync"] = "ok"

        # Async, three saves in a row, a TCPStoreBarrier in each rank's writer process.
        barrier = tcp_store_barrier(rank, world, "multirank", timeout_secs=120)
        checkpointer = make_async_checkpointer(CheckpointerConfig(staging_config=cpu, barrier_config=barrier))
        try:
            writes = []
            for step in (2, 3, 4):
                staging, write = checkpointer.save(f"{out}/async_{step}", rank_state(rank, step))
                staging.result()
                writes.append(write)
            for write in writes:
                write.result(timeout=300)
            for step in (2, 3, 4):
                check_loaded(checkpointer.load(f"{out}/async_{step}"), rank_state(rank, step))
        finally:
            checkpointer.close()
        report["async"] = "ok"

        # One rank fails in pre_commit: every rank's save fails, well within the timeout.
        failing = make_async_checkpointer(CheckpointerConfig(staging_config=cpu),
                                          checkpoint_writer_init_fn=failing_writer)
        try:
            expected = f"rank {FAILING_RANK} failed" if rank != FAILING_RANK else "refuses to commit"
            save_expecting_failure(failing, f"{out}/failed", rank_state(rank, 5), report, "failed_save", expected)
        finally:
            failing.close()
        # One rank's state cannot even be staged (a str that is not valid Unicode): the save never
        # reaches its writer, which votes against it and joins the TCPStoreBarrier the other ranks'
        # writers wait in, so every rank fails at once, well before the barrier's timeout.
        barrier = tcp_store_barrier(rank, world, "unstaged", timeout_secs=UNSTAGED_BARRIER_TIMEOUT)
        plain = make_async_checkpointer(CheckpointerConfig(staging_config=cpu, barrier_config=barrier))
        try:
            state = rank_state(rank, 6)
            if rank == FAILING_RANK:
                state["bad"] = "\udcff"
            expected = f"rank {FAILING_RANK} failed" if rank != FAILING_RANK else None
            save_expecting_failure(plain, f"{out}/unstaged", state, report, "unstaged_save", expected)
        finally:
            plain.close()
        dist.barrier()
        try:
            sync.load(f"{out}/failed")
            report["failed_load"] = "loaded (wrong)"
        except RuntimeError as error:
            report["failed_load"] = str(error)
            assert "no committed checkpoint" in str(error)
        ok = True
    except Exception:  # noqa: BLE001 - reported to the test
        report["error"] = traceback.format_exc()
        ok = False
    with open(os.path.join(out, f"rank_{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
