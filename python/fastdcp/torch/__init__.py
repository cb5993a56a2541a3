"""Drop-in replacement for torch.distributed.checkpoint._experimental: staging, and the
checkpoint writer and reader (the checkpointers follow)."""

from fastdcp.torch.checkpoint_reader import CheckpointReader
from fastdcp.torch.checkpoint_writer import CheckpointWriter, CheckpointWriterConfig, WriterHook
from fastdcp.torch.staging import CheckpointStager, CheckpointStagerConfig, DefaultStager
from fastdcp.torch.types import STATE_DICT, RankInfo
from fastdcp.torch.utils import wrap_future

__all__ = [
    "CheckpointReader",
    "CheckpointStager",
    "CheckpointStagerConfig",
    "CheckpointWriter",
    "CheckpointWriterConfig",
    "DefaultStager",
    "RankInfo",
    "STATE_DICT",
    "WriterHook",
    "wrap_future",
]
