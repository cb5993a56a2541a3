"""Converting a checkpoint of torch's (DCP or _experimental; fastdcp.torch.migrate) into a fastdcp
checkpoint: ``convert(src, dst)``, and ``python -m fastdcp.torch.convert SRC DST [--overwrite]``,
which the ``fastdcp convert`` command runs (docs/cli.md).

A DCP checkpoint is global: it becomes a one-rank fastdcp checkpoint with whole tensors. An
_experimental checkpoint holds one state dict per rank: each ``checkpoint_<r>.pt`` becomes rank
r's file, so that every rank loads what it saved. A fastdcp checkpoint is copied rank by rank."""

import json
import os
import sys
import threading

from fastdcp.torch import migrate
from fastdcp.torch.checkpoint_reader import CheckpointReader
from fastdcp.torch.checkpoint_writer import CheckpointWriter, CheckpointWriterConfig
from fastdcp.torch.types import RankInfo

__all__ = ["convert", "main"]


def _world_size(src: str, fmt: str) -> int:
    if fmt != migrate.FASTDCP:
        return migrate.world_size(src, fmt)
    try:
        with open(os.path.join(src, "manifest.json"), encoding="utf-8") as f:
            return int(json.load(f)["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1  # the reader names what is wrong


def convert(src: str, dst: str, *, overwrite: bool = False) -> dict:
    """Writes the checkpoint at ``src`` (DCP, _experimental or fastdcp) as a fastdcp checkpoint at
    ``dst`` and returns ``{"format", "world_size", "bytes_written"}``. A committed checkpoint at
    ``dst`` is replaced only with ``overwrite``. Loads ``src`` whole, one rank's state dict at a
    time per rank (all ranks of an _experimental checkpoint at once, each on its own thread)."""
    src, dst = str(src), str(dst)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"convert: the source and the destination are both '{src}'")
    fmt = migrate.checkpoint_format(src)
    world = _world_size(src, fmt)
    config = CheckpointWriterConfig(overwrite=overwrite)
    written = [0] * world
    errors: list[BaseException | None] = [None] * world

    def convert_rank(rank: int) -> None:
        try:
            info = RankInfo(rank, world)
            writer = CheckpointWriter(config, info)
            try:
                state, _ = CheckpointReader(info).read(src)
            except BaseException as error:
                if world > 1:  # the other ranks' saves fail now, not at the barrier timeout
                    try:
                        writer._abandon(dst, f"rank {rank} could not read '{src}': {error}")
                    except Exception:
                        pass  # this rank's own error is the one to report
                raise
            migrate.bytes_io_as_bytes(state)  # a fastdcp checkpoint holds bytes, not io.BytesIO
            writer.write(dst, state)
            written[rank] = writer._last_stats.bytes_written
        except BaseException as error:  # reported below, on the caller's thread
            errors[rank] = error

    # The ranks commit together (Note [Commit protocol]): rank 0 waits for every rank's vote.
    threads = [threading.Thread(target=convert_rank, args=(r,), name=f"fastdcp-convert-{r}") for r in range(1, world)]
    for t in threads:
        t.start()
    convert_rank(0)
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return {"format": fmt, "world_size": world, "bytes_written": sum(written)}


_NAMES = {migrate.DCP: "DCP", migrate.EXPERIMENTAL: "torch _experimental", migrate.FASTDCP: "fastdcp"}


def main(argv: list[str] | None = None) -> int:
    """Exit status as the fastdcp command's: 0 done, 1 a missing, damaged or refused checkpoint,
    2 bad usage."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="fastdcp convert", description="Converts a torch DCP or _experimental checkpoint (or a fastdcp one) "
        "into a fastdcp checkpoint.")
    parser.add_argument("SRC", help="the checkpoint directory to read")
    parser.add_argument("DST", help="the fastdcp checkpoint directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a committed checkpoint at DST")
    args = parser.parse_args(argv)  # bad usage: status 2
    try:
        report = convert(args.SRC, args.DST, overwrite=args.overwrite)
    except (OSError, RuntimeError, ValueError, MemoryError) as error:
        print(f"fastdcp convert: {error}", file=sys.stderr)
        return 1
    ranks = report["world_size"]
    print(f"{args.SRC} ({_NAMES[report['format']]}) -> {args.DST}: fastdcp checkpoint, {ranks} rank"
          f"{'' if ranks == 1 else 's'}, {report['bytes_written']} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
