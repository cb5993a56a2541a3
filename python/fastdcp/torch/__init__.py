"""Drop-in replacement for torch.distributed.checkpoint._experimental (staging so far)."""

from fastdcp.torch.staging import CheckpointStager, CheckpointStagerConfig, DefaultStager
from fastdcp.torch.types import STATE_DICT, RankInfo
from fastdcp.torch.utils import wrap_future

__all__ = [
    "CheckpointStager",
    "CheckpointStagerConfig",
    "DefaultStager",
    "RankInfo",
    "STATE_DICT",
    "wrap_future",
]
