"""Rank identity and the state-dict type, as in torch.distributed.checkpoint._experimental.types."""

from dataclasses import dataclass
from typing import Any, TypeAlias

STATE_DICT: TypeAlias = dict[str, Any]


@dataclass
class RankInfo:
    """The rank of this process and the number of ranks."""

    global_rank: int
    global_world_size: int
