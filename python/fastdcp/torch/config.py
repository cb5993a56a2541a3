"""Checkpointer configuration, as torch.distributed.checkpoint._experimental.config."""

from dataclasses import dataclass, field

from fastdcp.torch.barriers import BarrierConfig
from fastdcp.torch.checkpoint_process import CheckpointProcessConfig
from fastdcp.torch.checkpoint_writer import CheckpointWriterConfig
from fastdcp.torch.staging import CheckpointStagerConfig

__all__ = ["CheckpointerConfig"]


@dataclass
class CheckpointerConfig:
    """What the builders wire together. fastdcp's async builder honours ``writer_config`` and
    ``barrier_config`` too (upstream ignores both); ``max_pending_saves`` is how many async saves
    may be staged or writing at once (Note [Saves in flight])."""

    writer_config: CheckpointWriterConfig = field(default_factory=CheckpointWriterConfig)
    barrier_config: BarrierConfig = field(default_factory=BarrierConfig)
    staging_config: CheckpointStagerConfig = field(default_factory=CheckpointStagerConfig)
    process_config: CheckpointProcessConfig = field(default_factory=CheckpointProcessConfig)
    max_pending_saves: int = 2
