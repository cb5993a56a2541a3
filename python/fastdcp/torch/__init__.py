"""Drop-in replacement for torch.distributed.checkpoint._experimental: staging, the checkpoint
writer and reader, the writer process, barriers, checkpointers and their builders."""

from fastdcp.torch.barriers import (
    Barrier,
    BarrierConfig,
    DistBarrier,
    TCPStoreBarrier,
    create_barrier_from_config,
)
from fastdcp.torch.builder import make_async_checkpointer, make_sync_checkpointer
from fastdcp.torch.checkpoint_process import (
    CheckpointProcess,
    CheckpointProcessConfig,
    RequestType,
    WorkerRequest,
    WorkerResponse,
)
from fastdcp.torch.checkpoint_reader import CheckpointReader
from fastdcp.torch.checkpoint_writer import CheckpointWriter, CheckpointWriterConfig, WriterHook
from fastdcp.torch.checkpointer import AsyncCheckpointer, Checkpointer, SyncCheckpointer
from fastdcp.torch.config import CheckpointerConfig
from fastdcp.torch.hugging_face import HuggingFaceLoadResult, export_hugging_face, load_hugging_face
from fastdcp.torch.staging import CheckpointStager, CheckpointStagerConfig, DefaultStager
from fastdcp.torch.types import STATE_DICT, RankInfo
from fastdcp.torch.utils import wrap_future

__all__ = [
    "AsyncCheckpointer",
    "Barrier",
    "BarrierConfig",
    "CheckpointProcess",
    "CheckpointProcessConfig",
    "CheckpointReader",
    "CheckpointStager",
    "CheckpointStagerConfig",
    "CheckpointWriter",
    "CheckpointWriterConfig",
    "Checkpointer",
    "CheckpointerConfig",
    "DefaultStager",
    "DistBarrier",
    "HuggingFaceLoadResult",
    "RankInfo",
    "RequestType",
    "STATE_DICT",
    "SyncCheckpointer",
    "TCPStoreBarrier",
    "WorkerRequest",
    "WorkerResponse",
    "WriterHook",
    "create_barrier_from_config",
    "export_hugging_face",
    "load_hugging_face",
    "make_async_checkpointer",
    "make_sync_checkpointer",
    "wrap_future",
]
