"""One of two processes that save to one checkpoint path at the same moments
(tests/python/test_two_savers.py).

Usage: python two_savers_main.py PATH CONTROL_DIR ID ROUNDS MODE

MODE "sync" saves with fastdcp.torch's CheckpointWriter in this process; "async" with the async
checkpointer, whose writer process does the writing. Round r: writes CONTROL_DIR/ready_<r>_<ID>,
waits for CONTROL_DIR/go_<r>, saves state(seed) with overwrite, and reports the outcome in
CONTROL_DIR/done_<r>_<ID> as JSON: {"seed": ..., "ok": bool, "type": ..., "error": ...}."""

import json
import os
import sys
import time

import torch

from fastdcp.torch import (
    CheckpointerConfig,
    CheckpointStagerConfig,
    CheckpointWriter,
    CheckpointWriterConfig,
    RankInfo,
    make_async_checkpointer,
)

RANK = RankInfo(global_rank=0, global_world_size=1)


def state(seed: int) -> dict:
    """16 MiB that tell every seed apart, and the seed."""
    return {"w": torch.arange(4 << 20, dtype=torch.int32) * 7 + seed, "step": seed}


def overwriting_writer(rank_info):
    return CheckpointWriter(CheckpointWriterConfig(overwrite=True), rank_info)


def wait_for(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.001)


def main() -> None:
    path, control, ident, rounds, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    if mode == "async":
        staging = CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False)
        checkpointer = make_async_checkpointer(CheckpointerConfig(staging_config=staging),
                                               checkpoint_writer_init_fn=overwriting_writer)
        save = lambda tree: checkpointer.save(path, tree)[1].result(timeout=300)  # noqa: E731
    else:
        writer = CheckpointWriter(CheckpointWriterConfig(overwrite=True), RANK)
        save = lambda tree: writer.write(path, tree)  # noqa: E731
    for r in range(rounds):
        seed = 1000 * (r + 1) + ident
        tree = state(seed)
        open(os.path.join(control, f"ready_{r}_{ident}"), "w").close()
        wait_for(os.path.join(control, f"go_{r}"))
        report = {"seed": seed, "ok": True}
        try:
            save(tree)
        except Exception as e:  # noqa: BLE001 - reported to the test, which judges it
            report.update(ok=False, type=type(e).__name__, error=str(e))
        with open(os.path.join(control, f"done_{r}_{ident}.tmp"), "w") as f:
            json.dump(report, f)
        os.rename(os.path.join(control, f"done_{r}_{ident}.tmp"), os.path.join(control, f"done_{r}_{ident}"))
    if mode == "async":
        checkpointer.close()


if __name__ == "__main__":
    main()
