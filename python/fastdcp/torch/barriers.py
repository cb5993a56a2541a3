"""Cross-rank barriers run between the pre_commit and post_commit hooks, as
torch.distributed.checkpoint._experimental.barriers (same names and registry, TCPStoreBarrier with
the same constructor arguments, DistBarrier with an added timeout_secs), with the configured
timeouts enforced, failures that name the missing ranks, and a ``close()`` that releases what a
barrier holds.

Failure semantics (both barriers): a barrier that raises has failed for the checkpoint it guarded;
treat that checkpoint as failed on every rank. ``TCPStoreBarrier`` keeps working afterwards as long
as every rank goes on calling ``execute_barrier`` once per checkpoint (see its docstring);
otherwise close it and build a new one with a fresh ``barrier_prefix``. A ``DistBarrier`` whose
barrier failed should be closed and rebuilt (collectively) before it is used again.
"""

import abc
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist

__all__ = [
    "BARRIER_REGISTRY",
    "Barrier",
    "BarrierConfig",
    "DistBarrier",
    "TCPStoreBarrier",
    "create_barrier_from_config",
    "register_barrier",
]

logger = logging.getLogger(__name__)

BARRIER_REGISTRY: dict[str, type] = {}


def register_barrier(barrier_class: type) -> type:
    """Class decorator: registers ``barrier_class`` under its ``barrier_type`` (if it has one)."""
    if hasattr(barrier_class, "barrier_type"):
        BARRIER_REGISTRY[barrier_class.barrier_type] = barrier_class
    return barrier_class


@dataclass
class BarrierConfig:
    """Which registered barrier to build and the keyword arguments for its constructor, passed
    as given (nothing, e.g. a rank, is injected). ``barrier_type=None`` means no barrier."""

    barrier_type: str | None = None
    barrier_args: dict[str, Any] = field(default_factory=dict)


def create_barrier_from_config(barrier_config: BarrierConfig) -> "Barrier | None":
    """``None`` when no type is configured; ``ValueError`` for an unknown type; otherwise the
    registered class built with ``barrier_args`` (constructor errors, such as ``TypeError`` for
    a wrong argument, propagate)."""
    if barrier_config.barrier_type is None:
        return None
    if barrier_config.barrier_type not in BARRIER_REGISTRY:
        raise ValueError(
            f"Unknown barrier type: {barrier_config.barrier_type}. "
            f"Available types: {list(BARRIER_REGISTRY.keys())}"
        )
    return BARRIER_REGISTRY[barrier_config.barrier_type](**barrier_config.barrier_args)


class Barrier(abc.ABC):
    """A rendezvous of all ranks: ``execute_barrier`` returns on a rank only once every rank has
    called it (or raises)."""

    # __init__ is not abstract (upstream's is): an abstract **kwargs __init__ forces subclasses to
    # override it for nothing and hides their real signature.

    @abc.abstractmethod
    def execute_barrier(self) -> None:
        ...

    def close(self) -> None:
        """Releases what the barrier holds (groups, stores); idempotent. Nothing by default."""


@register_barrier
class DistBarrier(Barrier):
    """A barrier over a dedicated gloo group spanning every rank of the default process group.

    Upstream barriers on the default (training, often NCCL) group without a timeout; a separate
    CPU group keeps the checkpoint barrier out of the training stream, and gloo's
    ``monitored_barrier`` enforces ``timeout_secs`` and names the ranks that did not arrive.
    Constructing it is collective (every rank must construct it, in the same order relative to
    other group creations), since creating a process group is."""

    barrier_type = "dist_barrier"

    def __init__(self, timeout_secs: float = 600.0) -> None:
        if not dist.is_initialized():
            raise AssertionError("DistBarrier requires an initialized process group.")
        self._timeout = timedelta(seconds=timeout_secs)
        # Created here, not on first use: new_group is collective, and execute_barrier may be
        # reached by only some ranks (e.g. the others failed earlier), which would hang them here.
        self._group = dist.new_group(backend="gloo", timeout=self._timeout)

    def execute_barrier(self) -> None:
        if self._group is None:
            raise RuntimeError("DistBarrier is closed.")
        if hasattr(dist, "monitored_barrier"):
            # wait_all_ranks: report every missing rank, not just the first one found.
            dist.monitored_barrier(group=self._group, timeout=self._timeout, wait_all_ranks=True)
        else:
            dist.barrier(group=self._group)

    def close(self) -> None:
        group, self._group = self._group, None
        if group is None or not dist.is_initialized():
            return  # destroying the default group already destroyed ours
        try:
            dist.destroy_process_group(group)
        except ValueError:
            pass  # not in the group map any more: destroyed together with the default group


@register_barrier
class TCPStoreBarrier(Barrier):
    """A barrier on a TCP key-value store hosted by rank 0's process, independent of any process
    group.

    Each call is one generation ``seq`` (0, 1, ... per instance) with keys under
    ``f"{barrier_prefix}{seq}/"``: every rank marks ``rank<r>``, increments ``arrived``, and the
    rank that brings it to ``global_world_size`` sets ``done``, which every rank waits for at most
    ``timeout_secs``. A rank that times out atomically marks the generation abandoned (unless all
    ranks did arrive in the meantime, in which case the barrier succeeded) and raises
    ``TimeoutError`` naming the ranks that arrived and those missing; the ranks still waiting are
    woken and raise too, and a rank that arrives at an abandoned generation raises at once instead
    of waiting for a barrier nobody else is in. So a generation either succeeds on every rank or
    fails on every rank that reaches it.

    ``seq`` advances on every call, success or failure, so that a later barrier never reuses the
    keys of a failed generation. Ranks therefore stay in step as long as each calls
    ``execute_barrier`` once per checkpoint, failed ones included (a rank behind catches up through
    the abandoned generations, failing fast on each). A rank that skipped a call stays one
    generation behind for good: after a failure that left ranks out of step, close the barrier and
    build a new one with a fresh ``barrier_prefix``.

    Keys of generations before the last successful one are deleted (at the start of the next
    call), so the store does not grow with the number of checkpoints. ``barrier_prefix`` must be
    unique per barrier on the store."""

    barrier_type = "tcp_store"

    # Added to the arrival counter to abandon a generation: far above any world size, so that
    # the counter never equals the world size afterwards, whatever arrives later.
    _ABANDONED = 1 << 40
    # Values of the generation's "done" key; only one of them is ever written, by whoever decides
    # the generation's outcome on the arrival counter.
    _SUCCEEDED = "ok"
    _ABANDONED_MARK = "abandoned"

    def __init__(
        self,
        global_rank: int,
        global_world_size: int,
        barrier_prefix: str,
        timeout_barrier_init_secs: int,
        use_checkpoint_barrier_tcpstore_libuv: bool,
        tcpstore_port: int,
        master_address: str,
        timeout_secs: int,
    ):
        if not 0 <= global_rank < global_world_size:
            raise ValueError(
                f"TCPStoreBarrier needs 0 <= global_rank < global_world_size, got "
                f"global_rank={global_rank}, global_world_size={global_world_size}"
            )
        logger.info(
            "TCPStoreBarrier master_address=%s tcpstore_port=%s rank=%s world_size=%s "
            "barrier_prefix=%s timeout_barrier_init_secs=%s libuv=%s timeout_secs=%s",
            master_address, tcpstore_port, global_rank, global_world_size, barrier_prefix,
            timeout_barrier_init_secs, use_checkpoint_barrier_tcpstore_libuv, timeout_secs,
        )
        self._global_rank = global_rank
        self._global_world_size = global_world_size
        self._barrier_prefix = barrier_prefix
        self._timeout_secs = timeout_secs
        self._seq = 0
        self._last_succeeded = -1
        # Generations below this have had their keys deleted.
        self._first_kept_seq = 0
        self._store_timeout = timedelta(seconds=timeout_barrier_init_secs)
        self.store: dist.TCPStore | None = dist.TCPStore(
            master_address,
            int(tcpstore_port),
            world_size=global_world_size,
            timeout=self._store_timeout,
            is_master=(global_rank == 0),
            use_libuv=use_checkpoint_barrier_tcpstore_libuv,
        )

    def _prefix(self, seq: int) -> str:
        return f"{self._barrier_prefix}{seq}"

    def execute_barrier(self) -> None:
        store = self.store
        if store is None:
            raise RuntimeError("TCPStoreBarrier is closed.")
        deadline = time.monotonic() + self._timeout_secs
        seq = self._seq
        self._seq += 1  # before anything can raise: a failed generation is never reused
        prefix = self._prefix(seq)
        rank, world_size = self._global_rank, self._global_world_size
        logger.info("Executing barrier %s (timeout %ss)", prefix, self._timeout_secs)

        # Cleanup happens here rather than after the previous barrier, so that passing a barrier
        # ends with as few store operations as possible (rank 0 may close the store right after).
        self._delete_old_generations()
        store.set(f"rank{rank}", str(seq))  # upstream's diagnostic: the generation each rank joined
        # Marked before counting, so that a timeout report sees every counted rank.
        store.set(f"{prefix}/rank{rank}", "1")
        arrived = store.add(f"{prefix}/arrived", 1)
        if arrived == world_size:
            store.set(f"{prefix}/done", self._SUCCEEDED)
        elif arrived > world_size:
            raise TimeoutError(f"{self._describe(prefix)}: rank {rank} arrived after the barrier "
                               f"was abandoned by a rank that timed out")
        else:
            self._wait_done(store, prefix, deadline)
        self._last_succeeded = seq
        if rank != 0:
            self._acknowledge(store, prefix)

    def _wait_done(self, store: "dist.TCPStore", prefix: str, deadline: float) -> None:
        done = f"{prefix}/done"
        # get() blocks until the key exists, bounded by the client's timeout: one round trip that
        # both waits and reads the outcome. A zero timeout may mean "the default": never pass one.
        store.set_timeout(timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
        try:
            outcome = store.get(done)
        except dist.DistStoreError:
            # The store rounds timeouts to milliseconds: allow for it before deciding that the
            # error is something else than our timeout (a lost server, say).
            if time.monotonic() < deadline - 0.1:
                raise
            outcome = None
        finally:
            store.set_timeout(self._store_timeout)
        if outcome is None:
            if self._abandon(store, prefix):
                return  # everyone arrived just as we gave up: the barrier did succeed
            raise TimeoutError(f"{self._describe(prefix)} timed out after {self._timeout_secs}s")
        if outcome != self._SUCCEEDED.encode():
            raise TimeoutError(f"{self._describe(prefix)}: abandoned by a rank that timed out")

    def _acknowledge(self, store: "dist.TCPStore", prefix: str) -> None:
        # Tells rank 0's close() that this rank no longer needs the server for this barrier.
        try:
            store.add(f"{prefix}/left", 1)
        except dist.DistError as error:
            # The barrier did succeed; only rank 0 went away (crashed or closed past its wait).
            logger.warning("TCPStoreBarrier %r: could not acknowledge leaving: %s", prefix, error)

    def _describe(self, prefix: str) -> str:
        world = range(self._global_world_size)
        arrived = [r for r in world if self.store.check([f"{prefix}/rank{r}"])]
        missing = [r for r in world if r not in arrived]
        return (f"TCPStoreBarrier {prefix!r} (rank {self._global_rank}): {len(arrived)} of "
                f"{self._global_world_size} ranks arrived (arrived: {arrived}, missing: {missing})")

    def _abandon(self, store: "dist.TCPStore", prefix: str) -> bool:
        """Atomically either finds every rank arrived (True) or marks the generation abandoned so
        that it can never complete (False)."""
        key = f"{prefix}/arrived"
        while True:
            current = store.add(key, 0)
            if current == self._global_world_size:
                return True
            if current > self._global_world_size:
                return False  # already abandoned by another rank
            # compare_set, not add: a plain add could race with the last arrival and abandon a
            # generation that some rank has already passed.
            desired = str(current + self._ABANDONED)
            if store.compare_set(key, str(current), desired) == desired.encode():
                # Wakes the ranks still waiting, so that they fail now rather than at their timeout.
                store.set(f"{prefix}/done", self._ABANDONED_MARK)
                return False

    def _delete_old_generations(self) -> None:
        # Generation _last_succeeded succeeded, so every rank arrived at it and therefore had left
        # all earlier generations (each rank runs them in order): nobody reads their keys again.
        store = self.store
        for old in range(self._first_kept_seq, self._last_succeeded):
            prefix = self._prefix(old)
            store.delete_key(f"{prefix}/rank{self._global_rank}")
            if self._global_rank == 0:
                for name in ("arrived", "done", "left"):
                    store.delete_key(f"{prefix}/{name}")
        self._first_kept_seq = max(self._first_kept_seq, self._last_succeeded)

    def close(self) -> None:
        """Drops this rank's client; on rank 0 that stops the store server, so rank 0 first waits
        (at most ``timeout_secs``) until every other rank has left the last successful barrier.
        Keys of the last generations are left in place. Idempotent."""
        store, self.store = self.store, None
        if store is None or self._global_rank != 0 or self._last_succeeded < 0:
            return
        left = f"{self._prefix(self._last_succeeded)}/left"
        deadline = time.monotonic() + self._timeout_secs
        try:
            while store.add(left, 0) < self._global_world_size - 1:
                if time.monotonic() >= deadline:
                    logger.warning("TCPStoreBarrier: closing before every rank left %r", left)
                    break
                time.sleep(0.005)
        except dist.DistError as error:
            logger.warning("TCPStoreBarrier: store failed while closing: %s", error)
