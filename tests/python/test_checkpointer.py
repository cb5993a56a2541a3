"""Checkpointers, the writer process and the builders of fastdcp.torch (issue 5)."""

import mmap
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import Future

import pytest
import torch

import fastdcp.torch as fdt
from fastdcp.torch import (
    AsyncCheckpointer,
    CheckpointerConfig,
    CheckpointProcessConfig,
    CheckpointStagerConfig,
    CheckpointWriter,
    CheckpointWriterConfig,
    WriterHook,
    make_async_checkpointer,
    make_sync_checkpointer,
)

CPU_STAGING = CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False)


def cpu_config(**kwargs) -> CheckpointerConfig:
    return CheckpointerConfig(staging_config=CPU_STAGING, **kwargs)


def model_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(256, 512, generator=g)
    return {
        "model": {"weight": weight, "weight_t": weight.t(), "bias": torch.randn(512, generator=g)},
        "optim": {"step": seed, "lr": 0.1 * seed, "state": [torch.randn(1000, generator=g), None, ("adam", b"\x01")]},
    }


def in_own_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` in an anonymous private mapping of its own (which the tensor keeps)."""
    pages = mmap.mmap(-1, tensor.nbytes, flags=mmap.MAP_PRIVATE)
    out = torch.frombuffer(pages, dtype=tensor.dtype).view(tensor.shape)
    out.copy_(tensor)
    return out


def assert_same(loaded: dict, expected: dict) -> None:
    assert torch.equal(loaded["model"]["weight"], expected["model"]["weight"])
    assert torch.equal(loaded["model"]["bias"], expected["model"]["bias"])
    assert loaded["model"]["weight_t"].data_ptr() == loaded["model"]["weight"].data_ptr()  # still a view
    assert loaded["optim"]["step"] == expected["optim"]["step"]
    assert torch.equal(loaded["optim"]["state"][0], expected["optim"]["state"][0])
    assert loaded["optim"]["state"][1:] == expected["optim"]["state"][1:]


# --- hooks and init functions run in the writer process: module level, so spawn can find them ---
class SlowHook(WriterHook):
    """Holds the write in pre_commit for `seconds`, and records post_commit's kwargs in a file."""

    def __init__(self, seconds: float = 0.0, record: str | None = None):
        self.seconds = seconds
        self.record = record

    def pre_commit(self, path, **kwargs):
        time.sleep(kwargs.get("sleep", self.seconds))

    def post_commit(self, path, **kwargs):
        if self.record:
            with open(self.record, "a") as f:
                f.write(f"{path} {sorted(kwargs.items())}\n")


def writer_with_hook(rank_info, seconds=0.0, record=None, overwrite=False):
    return CheckpointWriter(CheckpointWriterConfig(overwrite=overwrite), rank_info,
                            commit_hook=SlowHook(seconds, record))


class RecordingWriter:
    """A custom writer (upstream's checkpoint_writer_init_fn may build any): records what it got."""

    def __init__(self, rank_info, record):
        self.record = record

    def write(self, path, state_dict, **kwargs):
        weight = state_dict["model"]["weight"]
        with open(self.record, "w") as f:
            f.write(f"{type(weight).__name__} {tuple(weight.shape)} {float(weight.sum()):.4f} "
                    f"{state_dict['optim']['step']} {sorted(kwargs)}")

    def close(self):
        pass


def recording_writer(rank_info, record):
    return RecordingWriter(rank_info, record)


def sleeping_init(seconds):
    time.sleep(seconds)


def failing_init():
    raise ValueError("init refused by the test")


def async_checkpointer(tmp_path, *, hook_seconds=0.0, record=None, process_config=None, overwrite=False,
                       max_pending_saves=2, **kwargs) -> AsyncCheckpointer:
    config = cpu_config(max_pending_saves=max_pending_saves)
    if process_config is not None:
        config.process_config = process_config
    return make_async_checkpointer(
        config, checkpoint_writer_init_fn=writer_with_hook,
        checkpoint_writer_init_args={"seconds": hook_seconds, "record": record, "overwrite": overwrite}, **kwargs)


# --- API ---------------------------------------------------------------------------------------
def test_every_upstream_name_exists():
    import torch.distributed.checkpoint._experimental as upstream
    from torch.distributed.checkpoint._experimental import barriers, checkpoint_process

    names = set(upstream.__all__) | {"DistBarrier"} | {
        n for n in ("CheckpointProcess", "CheckpointProcessConfig", "RequestType", "WorkerRequest", "WorkerResponse")
        if hasattr(checkpoint_process, n)}
    assert hasattr(barriers, "DistBarrier")
    missing = sorted(n for n in names if not hasattr(fdt, n))
    assert missing == []


def test_upstream_defaults_fail_without_an_accelerator_as_upstream():
    if torch.cuda.is_available():
        pytest.skip("the CPU-only default failure needs a host without CUDA")
    with pytest.raises(AssertionError, match="use_non_blocking_copy"):
        make_async_checkpointer()


# --- sync ---------------------------------------------------------------------------------------
def test_sync_checkpointer_round_trip_and_strict_load(tmp_path):
    checkpointer = make_sync_checkpointer(cpu_config())
    state = model_state(1)
    assert checkpointer.save(str(tmp_path / "c"), state) is None
    assert_same(checkpointer.load(str(tmp_path / "c")), state)
    template = {"model": {"weight": torch.zeros(256, 512)}, "extra": torch.zeros(3)}
    with pytest.raises(RuntimeError, match="Missing from the checkpoint: extra") as missing:  # upstream's type
        checkpointer.load(str(tmp_path / "c"), template, strict=True)
    assert "model.bias" in str(missing.value)  # in the checkpoint, not in the template: named too
    assert torch.count_nonzero(template["model"]["weight"]) == 0  # strict checks before it changes anything
    checkpointer.close()


# --- async ------------------------------------------------------------------------------------------
def test_async_save_returns_staging_and_write_futures_and_loads_back(tmp_path):
    checkpointer = async_checkpointer(tmp_path)
    try:
        state = model_state(2)
        staging, write = checkpointer.save(str(tmp_path / "a"), state)
        assert isinstance(staging, Future) and isinstance(write, Future)
        assert staging.result(timeout=60) is None
        assert write.result(timeout=120) is None
        assert_same(checkpointer.load(str(tmp_path / "a")), state)
    finally:
        checkpointer.close()
    assert checkpointer._process.pid == 0


@pytest.mark.parametrize("seconds", [-1, -0.5, float("nan"), float("-inf")])
@pytest.mark.parametrize("option", ["subprocess_init_timeout_secs", "subprocess_shutdown_timeout_secs",
                                    "subprocess_write_timeout_secs", "write_barrier_timeout_secs"])
def test_a_timeout_that_is_negative_or_nan_is_a_value_error_naming_it(option, seconds):
    # Before: NaN and -inf overflowed the cast to milliseconds, and a negative timeout expired at once.
    if option == "write_barrier_timeout_secs":
        config = cpu_config(writer_config=CheckpointWriterConfig(**{option: seconds}))
        named = "barrier_timeout_s"  # as the writer's options spell it
        with pytest.raises(ValueError, match=named):
            make_sync_checkpointer(config).save("/nonexistent/never-written", {"x": 1})
    else:
        config = cpu_config(process_config=CheckpointProcessConfig(**{option: seconds}))
        named = f"CheckpointProcessConfig.{option}"
    with pytest.raises(ValueError, match=named) as raised:
        make_async_checkpointer(config)
    assert "seconds >= 0" in str(raised.value)


def test_an_infinite_timeout_means_no_limit(tmp_path):
    century = 100 * 365 * 24 * 3600.0
    assert fdt.checkpoint_writer._native_options(
        CheckpointWriterConfig(write_barrier_timeout_secs=float("inf"))).barrier_timeout_s == century
    config = cpu_config(process_config=CheckpointProcessConfig(subprocess_write_timeout_secs=float("inf")))
    checkpointer = make_async_checkpointer(config)
    try:
        checkpointer.save(str(tmp_path / "ckpt"), {"x": torch.arange(4)})[1].result(timeout=60)
        assert torch.equal(checkpointer.load(str(tmp_path / "ckpt"))["x"], torch.arange(4))
    finally:
        checkpointer.close()


@pytest.mark.parametrize("copy_on_write", [True, False])
def test_training_may_write_its_tensors_once_the_staging_future_is_done(tmp_path, copy_on_write):
    # With copy-on-write staging the tensors are released before they are copied
    # (Note [Copy-on-write staging]); writes made then must not reach the checkpoint.
    staging_config = CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False,
                                            use_copy_on_write=copy_on_write)
    checkpointer = make_async_checkpointer(CheckpointerConfig(staging_config=staging_config))
    stager = checkpointer._stager
    available, why_not = stager.copy_on_write_available()
    if copy_on_write and not available:
        pytest.skip(f"copy-on-write staging unavailable here: {why_not}")
    try:
        # 64 MiB, each tensor in pages of its own: nothing else (malloc's bookkeeping, another thread)
        # writes them before the release, so the count below is exact.
        params = {f"layer{i}": in_own_pages(torch.randn(1024, 1024)) for i in range(16)}
        expected = {k: v.clone() for k, v in params.items()}
        for step in range(3):
            staging, write = checkpointer.save(str(tmp_path / f"s{step}"), {"model": params, "step": step})
            staging.result(timeout=60)
            for tensor in params.values():  # the optimizer step
                tensor.mul_(-1.0).add_(step + 1.0)
            write.result(timeout=120)
            loaded = checkpointer.load(str(tmp_path / f"s{step}"))
            assert loaded["step"] == step
            for key, tensor in expected.items():
                assert torch.equal(loaded["model"][key], tensor), (step, key)
            expected = {k: v.clone() for k, v in params.items()}
        # Every staged byte was copied after the release (Note [Counting copies after release]).
        assert stager.stats().bytes_copied_after_release == (3 * 64 << 20 if copy_on_write else 0)
    finally:
        checkpointer.close()


def test_overlapping_saves_to_different_paths_keep_their_own_contents(tmp_path):
    # Each write holds in pre_commit, so the next saves stage while earlier ones are in flight:
    # their leased buffers must not be overwritten (Note [Staging leases]).
    checkpointer = async_checkpointer(tmp_path, hook_seconds=0.5, max_pending_saves=3)
    try:
        state = model_state(0)
        expected, writes = [], []
        for i in range(5):
            state["model"]["weight"].fill_(float(i))
            state["optim"]["step"] = i
            staging, write = checkpointer.save(str(tmp_path / f"s{i}"), state)
            staging.result(timeout=60)
            expected.append({"weight": state["model"]["weight"].clone(), "step": i})
            writes.append(write)
        for write in writes:
            write.result(timeout=120)
        for i, want in enumerate(expected):
            loaded = checkpointer.load(str(tmp_path / f"s{i}"))
            assert torch.equal(loaded["model"]["weight"], want["weight"]), i
            assert loaded["optim"]["step"] == i
        assert checkpointer._stager.stats().leased_skips > 0
    finally:
        checkpointer.close()


def test_a_custom_writer_gets_torch_tensors_over_the_shared_buffers(tmp_path):
    record = tmp_path / "record.txt"
    checkpointer = make_async_checkpointer(cpu_config(), checkpoint_writer_init_fn=recording_writer,
                                           checkpoint_writer_init_args={"record": str(record)})
    try:
        state = model_state(14)
        checkpointer.save(str(tmp_path / "custom"), state, tag=1)[1].result(timeout=120)
        weight = state["model"]["weight"]
        assert record.read_text() == f"Tensor (256, 512) {float(weight.sum()):.4f} 14 ['tag']"
    finally:
        checkpointer.close()


def test_writer_kwargs_reach_the_hooks_and_stage_options_the_stager(tmp_path):
    record = tmp_path / "record.txt"
    checkpointer = async_checkpointer(tmp_path, record=str(record))
    try:
        _, write = checkpointer.save(str(tmp_path / "k"), model_state(3), step_tag="s3", sleep=0)
        write.result(timeout=120)
        assert "('step_tag', 's3')" in record.read_text()
        with pytest.raises(TypeError, match="bogus"):
            checkpointer.save(str(tmp_path / "k2"), model_state(3), stage_options={"bogus": 1})
    finally:
        checkpointer.close()


class CloningStager(fdt.CheckpointStager):
    """A stager that is not fastdcp's: it clones on a thread of its own and returns a future, or
    raises the error it was given."""

    def __init__(self, probe):
        from concurrent.futures import ThreadPoolExecutor
        self.pool, self.probe, self.seen = ThreadPoolExecutor(1), probe, []

    def stage(self, state_dict, fail=None):
        self.seen.append(self.probe())
        if fail is not None:
            return self.pool.submit(lambda: (_ for _ in ()).throw(fail))
        def clone():
            weight = state_dict["model"]["weight"].clone()
            return {"model": {"weight": weight, "weight_t": weight.t(), "bias": state_dict["model"]["bias"].clone()},
                    "optim": state_dict["optim"]}

        return self.pool.submit(clone)

    def close(self):
        self.pool.shutdown()


def test_a_stager_that_is_not_fastdcps_stages_each_save_after_the_previous_write(tmp_path):
    process = fdt.CheckpointProcess(fdt.RankInfo(0, 1), CheckpointProcessConfig(), fdt.builder.default_subprocess_init_fn,
                                    (), writer_with_hook, {"seconds": 0.5})
    stager = CloningStager(lambda: (tmp_path / "x1" / "manifest.json").exists())
    checkpointer = AsyncCheckpointer(stager, process, fdt.CheckpointReader(fdt.RankInfo(0, 1)))
    try:
        first, second = model_state(21), model_state(22)
        _, write1 = checkpointer.save(str(tmp_path / "x1"), first)
        staging2, write2 = checkpointer.save(str(tmp_path / "x2"), second)
        assert staging2.result(timeout=60) is None and write2.result(timeout=120) is None
        assert_same(checkpointer.load(str(tmp_path / "x1")), first)
        assert_same(checkpointer.load(str(tmp_path / "x2")), second)
        staging3, write3 = checkpointer.save(str(tmp_path / "x3"), first, stage_options={"fail": KeyError("lost")})
        for future in (staging3, write3):  # the stager's own error, on both futures
            with pytest.raises(KeyError, match="lost"):
                future.result(timeout=120)
        # Such a stager reuses its buffers: each save staged once the previous one was committed.
        assert stager.seen == [False, True, True]
    finally:
        checkpointer.close()


def test_a_failed_write_fails_once_and_later_saves_work(tmp_path):
    checkpointer = async_checkpointer(tmp_path)
    try:
        (tmp_path / "not_a_dir").write_text("a file where the checkpoint directory should be")
        _, failed = checkpointer.save(str(tmp_path / "not_a_dir"), model_state(4))
        with pytest.raises(NotADirectoryError, match="not_a_dir"):  # as a sync save: OSError, errno intact
            failed.result(timeout=120)
        state = model_state(5)
        staging, write = checkpointer.save(str(tmp_path / "ok"), state)  # does not re-raise the failure
        write.result(timeout=120)
        assert_same(checkpointer.load(str(tmp_path / "ok")), state)
        assert checkpointer._process.restarts == 0  # the worker kept serving
    finally:
        checkpointer.close()


def test_load_waits_for_a_pending_save_to_the_same_path(tmp_path):
    checkpointer = async_checkpointer(tmp_path, hook_seconds=1.0)
    try:
        state = model_state(6)
        checkpointer._process.process_creation_future.result(timeout=120)
        _, write = checkpointer.save(str(tmp_path / "w"), state)
        loaded = checkpointer.load(str(tmp_path / "w"))  # would find no committed checkpoint without waiting
        assert write.done()
        assert_same(loaded, state)
    finally:
        checkpointer.close()


def test_a_killed_worker_fails_its_write_and_the_next_save_restarts_it(tmp_path):
    checkpointer = async_checkpointer(tmp_path, hook_seconds=3.0)
    try:
        first = model_state(7)
        checkpointer.save(str(tmp_path / "good"), first, sleep=0)[1].result(timeout=120)
        _, doomed = checkpointer.save(str(tmp_path / "doomed"), model_state(8))
        time.sleep(1.0)  # the worker is inside pre_commit now
        os.kill(checkpointer._process.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="SIGKILL"):
            doomed.result(timeout=60)
        with pytest.raises(RuntimeError, match="no committed checkpoint"):
            checkpointer.load(str(tmp_path / "doomed"))
        second = model_state(9)
        checkpointer.save(str(tmp_path / "after"), second, sleep=0)[1].result(timeout=120)
        assert checkpointer._process.restarts == 1
        assert_same(checkpointer.load(str(tmp_path / "after")), second)
        assert_same(checkpointer.load(str(tmp_path / "good")), first)
    finally:
        checkpointer.close()


def test_a_hung_write_times_out_and_the_worker_is_replaced(tmp_path):
    config = CheckpointProcessConfig(subprocess_write_timeout_secs=5)  # also bounds the next, real write
    checkpointer = async_checkpointer(tmp_path, hook_seconds=60, process_config=config)
    try:
        _, hung = checkpointer.save(str(tmp_path / "hung"), model_state(10))
        checkpointer._process.process_creation_future.result(timeout=120)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="subprocess_write_timeout_secs=5"):
            hung.result(timeout=60)
        assert time.monotonic() - started < 40
        state = model_state(11)
        checkpointer.save(str(tmp_path / "next"), state, sleep=0)[1].result(timeout=120)
        assert_same(checkpointer.load(str(tmp_path / "next")), state)
    finally:
        checkpointer.close()


def test_init_timeout_and_init_failure_are_reported_on_the_write_future(tmp_path):
    config = CheckpointProcessConfig(subprocess_init_timeout_secs=1)
    slow = async_checkpointer(tmp_path, process_config=config, subprocess_init_fn=sleeping_init,
                              subprocess_init_args=(30,))
    try:
        with pytest.raises(TimeoutError, match="Timed out after 1s waiting for checkpoint subprocess to initialize"):
            slow._process.process_creation_future.result(timeout=120)
        assert slow._process.pid == 0  # the late worker was not left running
    finally:
        slow.close()
    failing = async_checkpointer(tmp_path, subprocess_init_fn=failing_init)
    try:
        _, write = failing.save(str(tmp_path / "never"), model_state(12))
        with pytest.raises(ValueError, match="init refused by the test"):  # the init function's own error
            write.result(timeout=120)
    finally:
        failing.close()


def test_close_ends_the_worker_and_is_idempotent(tmp_path):
    checkpointer = async_checkpointer(tmp_path)
    checkpointer._process.process_creation_future.result(timeout=120)
    worker = checkpointer._process.pid
    os.kill(worker, 0)  # running
    checkpointer.close()
    checkpointer.close()
    assert checkpointer._process.pid == 0
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)  # ended and reaped
    with pytest.raises(RuntimeError, match="after close"):
        checkpointer.save(str(tmp_path / "late"), model_state(13))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_two_hundred_async_saves_keep_rss_flat(tmp_path):
    checkpointer = async_checkpointer(tmp_path, overwrite=True)
    try:
        state = {"w": torch.randn(1024, 1024), "small": [torch.randn(64) for _ in range(50)], "step": 0}
        baseline = None
        for i in range(200):
            state["step"] = i
            state["w"].add_(1.0)
            staging, write = checkpointer.save(str(tmp_path / "rss"), state)
            staging.result(timeout=60)
            if i == 20:
                write.result(timeout=120)
                baseline = _rss_bytes()
        write.result(timeout=120)
        grown = _rss_bytes() - baseline
        assert grown < 0.01 * baseline, f"RSS grew by {grown} bytes from {baseline}"
        loaded = checkpointer.load(str(tmp_path / "rss"))
        assert loaded["step"] == 199 and torch.equal(loaded["w"], state["w"])
    finally:
        checkpointer.close()


# Note [The GIL at exit]: a script may end while fastdcp's threads still hold Python objects.
EXIT_WHILE_A_CALLBACK_RUNS = textwrap.dedent("""
    import time
    import torch
    from fastdcp.torch import CheckpointStagerConfig, DefaultStager
    stager = DefaultStager(CheckpointStagerConfig(use_non_blocking_copy=False))
    future = stager.stage({"w": torch.arange(4.0)})
    future.add_done_callback(lambda f: time.sleep(0.5))  # still running when the script ends
    future.result()
    print("exiting")
""")
EXIT_RIGHT_AFTER_STAGING = textwrap.dedent("""
    import torch
    from fastdcp.torch import CheckpointStagerConfig, DefaultStager
    stager = DefaultStager(CheckpointStagerConfig(use_non_blocking_copy=False))
    stager.stage(torch.nn.Linear(64, 64).state_dict()).result()
    print("exiting")
""")


def run_script(script):
    env = {**os.environ, "FASTDCP_DISABLE_CUDA": "1"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)


def test_a_script_that_ends_while_a_staged_futures_callback_runs_ends_cleanly():
    # The callback finishes and everything it held is freed: nothing aborts, nothing leaks.
    done = run_script(EXIT_WHILE_A_CALLBACK_RUNS)
    assert done.returncode == 0 and done.stdout.strip() == "exiting", done.stderr
    assert "terminate called" not in done.stderr and "leaked" not in done.stderr, done.stderr


def test_a_script_that_ends_right_after_staging_never_aborts():
    # The notifier drops its references as the interpreter exits; under load that used to take the
    # GIL during finalization and abort about one run in three.
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for _ in range(8):
            done = run_script(EXIT_RIGHT_AFTER_STAGING)
            assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr
    finally:
        for process in busy:
            process.kill()
            process.wait()
