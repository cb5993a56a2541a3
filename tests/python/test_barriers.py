"""fastdcp.torch.barriers: the registry and config factory (upstream's behaviour), DistBarrier on
its own gloo group, and TCPStoreBarrier's enforced timeout, failure and cleanup semantics.

TCPStoreBarrier ranks run as threads of this process, one barrier instance each (rank 0's hosts
the store server); DistBarrier needs real process groups, hence spawned processes."""

import multiprocessing
import os
import socket
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch.distributed as dist

from fastdcp.torch import barriers

BARRIER_REGISTRY = barriers.BARRIER_REGISTRY
Barrier = barriers.Barrier
BarrierConfig = barriers.BarrierConfig
DistBarrier = barriers.DistBarrier
TCPStoreBarrier = barriers.TCPStoreBarrier
create_barrier_from_config = barriers.create_barrier_from_config
register_barrier = barriers.register_barrier


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tcp_args(rank: int, world_size: int, port: int, prefix: str = "test_barrier",
             timeout_secs: float = 20, libuv: bool = True) -> dict:
    return dict(
        global_rank=rank,
        global_world_size=world_size,
        barrier_prefix=prefix,
        timeout_barrier_init_secs=20,
        use_checkpoint_barrier_tcpstore_libuv=libuv,
        tcpstore_port=port,
        master_address="127.0.0.1",
        timeout_secs=timeout_secs,
    )


def make_tcp_barriers(world_size: int, port: int | None = None, **kwargs) -> list:
    """One TCPStoreBarrier per rank, built concurrently: rank 0's store server waits in its
    constructor until every other rank has connected."""
    port = free_port() if port is None else port
    with ThreadPoolExecutor(world_size) as pool:
        futures = [pool.submit(TCPStoreBarrier, **tcp_args(r, world_size, port, **kwargs))
                   for r in range(world_size)]
        return [f.result(timeout=30) for f in futures]


def run_ranks(fn, world_size: int, timeout: float = 30) -> list:
    """Runs ``fn(rank)`` on one thread per rank; returns the results, re-raising the first error."""
    with ThreadPoolExecutor(world_size) as pool:
        futures = [pool.submit(fn, r) for r in range(world_size)]
        return [f.result(timeout=timeout) for f in futures]


# --- registry and config ----------------------------------------------------------------------


def test_registry_holds_upstream_types():
    assert BARRIER_REGISTRY["dist_barrier"] is DistBarrier
    assert BARRIER_REGISTRY["tcp_store"] is TCPStoreBarrier


def test_register_barrier_uses_barrier_type_and_returns_class():
    class Typed(Barrier):
        barrier_type = "test_typed"

        def execute_barrier(self) -> None:
            pass

    class Untyped:
        pass

    try:
        assert register_barrier(Typed) is Typed
        assert BARRIER_REGISTRY["test_typed"] is Typed
        before = dict(BARRIER_REGISTRY)
        assert register_barrier(Untyped) is Untyped
        assert BARRIER_REGISTRY == before
    finally:
        BARRIER_REGISTRY.pop("test_typed", None)


def test_config_defaults():
    a, b = BarrierConfig(), BarrierConfig()
    assert a.barrier_type is None and a.barrier_args == {}
    assert a.barrier_args is not b.barrier_args


def test_create_without_type_returns_none():
    assert create_barrier_from_config(BarrierConfig()) is None
    assert create_barrier_from_config(BarrierConfig(barrier_args={"x": 1})) is None


def test_create_unknown_type_lists_available_types():
    with pytest.raises(ValueError) as info:
        create_barrier_from_config(BarrierConfig(barrier_type="nope"))
    message = str(info.value)
    assert message.startswith("Unknown barrier type: nope. Available types: [")
    assert "'dist_barrier'" in message and "'tcp_store'" in message


def test_create_constructs_registered_class_with_args():
    @register_barrier
    class Recording(Barrier):
        barrier_type = "test_recording"

        def __init__(self, a, b=2):
            self.args = (a, b)

        def execute_barrier(self) -> None:
            pass

    try:
        barrier = create_barrier_from_config(
            BarrierConfig(barrier_type="test_recording", barrier_args={"a": 1, "b": 3}))
        assert isinstance(barrier, Recording) and barrier.args == (1, 3)
    finally:
        BARRIER_REGISTRY.pop("test_recording", None)

    barrier = create_barrier_from_config(
        BarrierConfig(barrier_type="tcp_store", barrier_args=tcp_args(0, 1, free_port())))
    try:
        assert isinstance(barrier, TCPStoreBarrier)
        barrier.execute_barrier()  # world size 1: passes at once
    finally:
        barrier.close()


def test_create_with_bad_argument_raises_type_error():
    for barrier_type in ("tcp_store", "dist_barrier"):
        with pytest.raises(TypeError):
            create_barrier_from_config(
                BarrierConfig(barrier_type=barrier_type, barrier_args={"bogus": 1}))


def test_barrier_base_class():
    with pytest.raises(TypeError):
        Barrier()

    class Minimal(Barrier):  # no __init__ needed, unlike upstream
        def execute_barrier(self) -> None:
            pass

    barrier = Minimal()
    barrier.execute_barrier()
    assert barrier.close() is None


# --- DistBarrier without a process group -------------------------------------------------------


def test_dist_barrier_requires_process_group():
    assert not dist.is_initialized()
    message = r"^DistBarrier requires an initialized process group\.$"
    with pytest.raises(AssertionError, match=message):
        DistBarrier()
    with pytest.raises(AssertionError, match="requires an initialized process group"):
        create_barrier_from_config(BarrierConfig(barrier_type="dist_barrier"))


# --- TCPStoreBarrier ---------------------------------------------------------------------------


def test_tcp_store_invalid_rank_raises_value_error():
    for rank, world_size in [(2, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match=f"global_rank={rank}, global_world_size={world_size}"):
            TCPStoreBarrier(**tcp_args(rank, world_size, free_port()))


def test_tcp_store_libuv_flag_is_used():
    for libuv in (True, False):
        barrier = TCPStoreBarrier(**tcp_args(0, 1, free_port(), libuv=libuv))
        try:
            assert barrier.store.libuvBackend is libuv
            barrier.execute_barrier()
        finally:
            barrier.close()


@pytest.mark.parametrize("libuv", [True, False])
def test_tcp_store_barrier_nobody_leaves_before_last_arrival(libuv):
    world_size, rounds = 3, 5
    barriers_ = make_tcp_barriers(world_size, libuv=libuv)
    arrivals = [[0.0] * world_size for _ in range(rounds)]
    departures = [[0.0] * world_size for _ in range(rounds)]

    def rank_main(rank):
        barrier = barriers_[rank]
        for i in range(rounds):
            # A different rank arrives last each round, well after the others.
            time.sleep(0.1 if (i + rank) % world_size == 0 else 0.0)
            arrivals[i][rank] = time.monotonic()
            barrier.execute_barrier()
            departures[i][rank] = time.monotonic()
        # Closed at once, with no join first: rank 0's close must wait for the others to be done
        # with the server its store hosts.
        barrier.close()

    run_ranks(rank_main, world_size)
    for i in range(rounds):
        assert max(arrivals[i]) <= min(departures[i]), f"round {i}"
        assert max(departures[i]) - max(arrivals[i]) < 1.0


def test_tcp_store_timeout_is_enforced_and_names_missing_ranks():
    rank0, rank1 = make_tcp_barriers(2, timeout_secs=1)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            rank0.execute_barrier()
        elapsed = time.monotonic() - start
        assert 0.9 <= elapsed < 3
        message = str(info.value)
        assert "'test_barrier0'" in message and "timed out after 1s" in message
        assert "1 of 2 ranks arrived" in message
        assert "arrived: [0]" in message and "missing: [1]" in message
    finally:
        rank1.close()
        rank0.close()


def test_tcp_store_failed_generation_is_not_reused_and_ranks_catch_up():
    rank0, rank1 = make_tcp_barriers(2, timeout_secs=1)
    try:
        with pytest.raises(TimeoutError):
            rank0.execute_barrier()  # generation 0: rank 1 never came
        # Rank 1 reaches generation 0 late: it fails at once instead of waiting out its timeout,
        # since rank 0 has abandoned that generation.
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="abandoned"):
            rank1.execute_barrier()
        assert time.monotonic() - start < 0.5
        # Both are now at generation 1, which works.
        run_ranks(lambda r: [rank0, rank1][r].execute_barrier(), 2)
        assert rank0.store.get("rank0") == b"1" and rank0.store.get("rank1") == b"1"
    finally:
        rank1.close()
        rank0.close()


def test_tcp_store_timeout_wakes_ranks_still_waiting():
    port = free_port()
    barriers_ = make_tcp_barriers(3, port=port, timeout_secs=1)
    barriers_[1]._timeout_secs = 30  # rank 1 would wait far longer on its own
    try:
        def rank_main(rank):
            start = time.monotonic()
            with pytest.raises(TimeoutError) as info:
                barriers_[rank].execute_barrier()
            return time.monotonic() - start, str(info.value)

        (t0, m0), (t1, m1) = run_ranks(rank_main, 2)  # rank 2 never arrives
        assert t0 < 3 and t1 < 3
        assert "2 of 3 ranks arrived" in m0 and "missing: [2]" in m0
        assert "abandoned" in m1
    finally:
        for barrier in reversed(barriers_):
            barrier.close()


def test_tcp_store_new_prefix_after_close_on_same_port():
    port = free_port()
    rank0, rank1 = make_tcp_barriers(2, port=port, timeout_secs=1)
    with pytest.raises(TimeoutError):
        rank0.execute_barrier()
    rank1.close()
    rank0.close()
    rank0.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        rank0.execute_barrier()

    fresh = make_tcp_barriers(2, port=port, prefix="retry_barrier")
    try:
        for _ in range(2):
            run_ranks(lambda r: fresh[r].execute_barrier(), 2)
    finally:
        for barrier in reversed(fresh):
            barrier.close()


def test_tcp_store_deletes_keys_of_old_generations():
    world_size = 2
    barriers_ = make_tcp_barriers(world_size, prefix="gc")
    store = barriers_[0].store

    def generation_keys(seq):
        names = ["arrived", "done", "left"] + [f"rank{r}" for r in range(world_size)]
        return [f"gc{seq}/{name}" for name in names]

    def run(rounds):
        def rank_main(rank):
            for _ in range(rounds):
                barriers_[rank].execute_barrier()
        run_ranks(rank_main, world_size)

    try:
        run(5)  # generations 0..4
        # Cleanup runs at the start of a barrier, for generations before the last successful one.
        for seq in range(3):
            for key in generation_keys(seq):
                assert not store.check([key]), key
        for seq in (3, 4):
            assert store.check([f"gc{seq}/arrived"]) and store.check([f"gc{seq}/done"])
        keys_after_5 = store.num_keys()
        run(5)
        assert store.num_keys() == keys_after_5  # does not grow with the number of barriers
    finally:
        for barrier in reversed(barriers_):
            barrier.close()


# --- DistBarrier on real process groups --------------------------------------------------------


def _dist_worker(rank, world_size, port, scenario, results, rank0_done):
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
        if scenario == "ok":
            barrier = DistBarrier(timeout_secs=30)
            assert barrier._group is not dist.group.WORLD
            for _ in range(3):
                barrier.execute_barrier()
            barrier.close()
            barrier.close()
            results.put((rank, "ok", ""))
        else:  # "timeout": only rank 0 enters the barrier
            barrier = DistBarrier(timeout_secs=2)  # every rank: creating the group is collective
            if rank == 0:
                start = time.monotonic()
                try:
                    barrier.execute_barrier()
                    results.put((rank, "no error", ""))
                except Exception as error:
                    results.put((rank, type(error).__name__,
                                 f"{time.monotonic() - start:.2f}|{error}"))
                finally:
                    rank0_done.set()
            else:
                rank0_done.wait(20)
                results.put((rank, "waited", ""))
            barrier.close()
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, "crash", traceback.format_exc()))
        raise
    # Skips the interpreter teardown, which takes seconds with torch loaded; the queue's feeder
    # thread is flushed first so that the result is not lost.
    results.close()
    results.join_thread()
    os._exit(0)


def _run_dist(scenario, world_size=2):
    ctx = multiprocessing.get_context("spawn")
    results, rank0_done = ctx.Queue(), ctx.Event()
    port = free_port()
    procs = [ctx.Process(target=_dist_worker,
                         args=(r, world_size, port, scenario, results, rank0_done))
             for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(30)
        outcomes = {}
        while len(outcomes) < world_size and not results.empty():
            rank, kind, detail = results.get(timeout=1)
            outcomes[rank] = (kind, detail)
        return [p.exitcode for p in procs], outcomes
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


def test_dist_barrier_on_gloo_group():
    exitcodes, outcomes = _run_dist("ok")
    assert exitcodes == [0, 0], outcomes
    assert outcomes == {0: ("ok", ""), 1: ("ok", "")}


def test_dist_barrier_timeout_names_missing_rank():
    exitcodes, outcomes = _run_dist("timeout")
    assert exitcodes == [0, 0], outcomes
    kind, detail = outcomes[0]
    assert kind == "RuntimeError", outcomes
    elapsed, message = detail.split("|", 1)
    assert float(elapsed) < 5
    assert "1" in message and "monitoredBarrier" in message, message
    assert outcomes[1] == ("waited", "")
