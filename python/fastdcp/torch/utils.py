"""Helpers shared by the checkpointing modules."""

from concurrent.futures import Future
from typing import Any


def wrap_future(original_result: Any) -> Future[None]:
    """A future that completes with ``None`` when ``original_result`` (a future or a plain value)
    does, carrying over its exception; never the staged value itself."""
    masked: Future[None] = Future()
    if isinstance(original_result, Future):

        def on_complete(done: Future[Any]) -> None:
            try:
                done.result()
                masked.set_result(None)
            except Exception as error:  # CancelledError included, as upstream
                masked.set_exception(error)

        original_result.add_done_callback(on_complete)
    else:
        masked.set_result(None)
    return masked
