"""Errors that say what happened (issue 14): the exception type a caller catches, on the sync path,
across the writer process and across ranks, and messages that name the key, the option and the fix."""

import concurrent.futures
import errno
import glob
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
import re

import numpy as np
import pytest
import torch

import fastdcp
from fastdcp.torch import (
    BarrierConfig,
    CheckpointerConfig,
    CheckpointProcessConfig,
    CheckpointReader,
    CheckpointStagerConfig,
    CheckpointWriter,
    CheckpointWriterConfig,
    RankInfo,
    make_async_checkpointer,
    make_sync_checkpointer,
)

RANK = RankInfo(global_rank=0, global_world_size=1)
CPU = CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False)


def state(megabytes: int = 1) -> dict:
    return {"model": {"w": torch.arange(megabytes * 2**18, dtype=torch.float32)}, "step": 3}


def save_async(path, state_dict, **writer_config):
    checkpointer = make_async_checkpointer(CheckpointerConfig(
        staging_config=CPU, writer_config=CheckpointWriterConfig(**writer_config)))
    try:
        _, write = checkpointer.save(str(path), state_dict)
        write.result(timeout=120)
    finally:
        checkpointer.close()


# --- a full disk: OSError with errno ENOSPC, sync and async -----------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs (mounting needs root and a kernel that allows it)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount an 8 MB tmpfs to fill: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_full_disk_is_an_oserror_with_enospc(small_disk, mode):
    big = state(megabytes=16)
    with pytest.raises(OSError) as raised:
        if mode == "sync":
            make_sync_checkpointer().save(str(small_disk / "ck"), big)
        else:
            save_async(small_disk / "ck", big)
    assert raised.value.errno == errno.ENOSPC, repr(raised.value)
    assert "Unexpected response" not in str(raised.value)
    assert "disk is full" in str(raised.value)
    # Nothing was committed, and what fits still saves there.
    assert not (small_disk / "ck" / "manifest.json").exists()
    make_sync_checkpointer().save(str(small_disk / "small"), state(megabytes=1))


# --- a damaged checkpoint: fastdcp.DataLossError everywhere ------------------------------------------
def damage(path, how):
    (data_file,) = glob.glob(os.path.join(path, "*.safetensors"))
    if how == "manifest":
        with open(os.path.join(path, "manifest.json"), "r+b") as f:
            f.seek(3)
            f.write(b"\x00garbage")
        return
    with open(data_file, "r+b") as f:
        if how == "data":
            f.seek(-5, os.SEEK_END)
            f.write(b"\xff")
        elif how == "header":
            f.seek(20)
            f.write(b"#")
        elif how == "truncated":
            f.truncate(os.path.getsize(data_file) - 100)


@pytest.mark.parametrize("how", ["data", "header", "truncated", "manifest"])
def test_a_damaged_checkpoint_is_one_error_type_everywhere(tmp_path, how):
    assert issubclass(fastdcp.DataLossError, RuntimeError)  # what torch.load raises for a damaged file
    path = str(tmp_path / "ck")
    make_sync_checkpointer().save(path, state())
    damage(path, how)
    loads = {
        "sync load": lambda: make_sync_checkpointer().load(path),
        "load into": lambda: make_sync_checkpointer().load(path, state()),
        "async load": lambda: make_async_checkpointer(CheckpointerConfig(staging_config=CPU)).load(path),
        "numpy load": lambda: fastdcp.load(path),
        "verify": lambda: fastdcp.verify(path),
    }
    for name, call in loads.items():
        with pytest.raises(fastdcp.DataLossError, match="corrupt|truncated|does not match|bytes; the manifest"):
            call()
            pytest.fail(f"{name} loaded a damaged checkpoint")


# --- errors from the writer process keep their type ----------------------------------------------------
def test_writer_process_errors_keep_their_type_and_say_the_python_option(tmp_path):
    save_async(tmp_path / "ck", state())
    with pytest.raises(RuntimeError) as raised:
        save_async(tmp_path / "ck", state())
    message = str(raised.value)
    assert message.startswith(f"'{tmp_path / 'ck'}' already holds a committed checkpoint"), message
    assert "pass CheckpointWriterConfig(overwrite=True) to replace it" in message
    assert "Traceback" not in message and "Unexpected response" not in message
    # The writer process's traceback is kept, as a note.
    assert any("checkpoint writer process" in note for note in raised.value.__notes__)


def test_a_bad_value_is_a_value_error_naming_the_key(tmp_path):
    for save_with in (lambda s: make_sync_checkpointer().save(str(tmp_path / "a"), s),
                      lambda s: save_async(tmp_path / "b", s)):
        with pytest.raises(ValueError, match=r"'opt\.state\[1\]' \(a object\)"):
            save_with({"opt": {"state": [1, object()]}})


@pytest.mark.parametrize("init_fn, init_args, timeout, code, says", [
    (os._exit, (3,), 30, fastdcp.ErrorCode.UNAVAILABLE, "exited with status 3"),  # a RuntimeError
    (time.sleep, (30,), 1, fastdcp.ErrorCode.DEADLINE_EXCEEDED, "initialize"),  # a TimeoutError
])
def test_a_writer_process_that_dies_or_does_not_start_in_time(tmp_path, init_fn, init_args, timeout, code, says):
    checkpointer = make_async_checkpointer(
        CheckpointerConfig(staging_config=CPU, process_config=CheckpointProcessConfig(subprocess_init_timeout_secs=timeout)),
        subprocess_init_fn=init_fn, subprocess_init_args=init_args)
    try:
        _, write = checkpointer.save(str(tmp_path / "ck"), state())
        error = raised_by(lambda: write.result(timeout=60), code)
        assert says in str(error)
    finally:
        checkpointer.close()


# --- messages that name the thing and the fix ------------------------------------------------------------
def test_overwrite_refusal_names_the_option_of_each_api(tmp_path):
    make_sync_checkpointer().save(str(tmp_path / "t"), state())
    with pytest.raises(RuntimeError, match=r"pass CheckpointWriterConfig\(overwrite=True\) to replace it"):
        make_sync_checkpointer().save(str(tmp_path / "t"), state())
    fastdcp.save(tmp_path / "n", {"a": np.zeros(3)})
    with pytest.raises(RuntimeError, match=r"pass overwrite=True to replace it"):
        fastdcp.save(tmp_path / "n", {"a": np.zeros(3)})


@pytest.mark.usefixtures("tensor_path")
@pytest.mark.parametrize("value, expected", [
    (2**100, r"cannot save the value at 'model\.extra\.big': the int 1267650600228229401496703205376 exceeds 64 bits"),
    (-2**63 - 1, r"'model\.extra\.big': the int -9223372036854775809 exceeds 64 bits"),
    (torch.empty(3, 4, device="meta"), r"tensor at 'model\.extra\.big': meta tensors have no data"),
    (torch.empty(0, device="meta"), r"tensor at 'model\.extra\.big': meta tensors have no data"),
    (torch.eye(3).to_sparse(), r"tensor at 'model\.extra\.big': torch\.sparse_coo tensors .*\.to_dense\(\)"),
    (torch.eye(3).to_sparse_csr(), r"tensor at 'model\.extra\.big': torch\.sparse_csr tensors .*\.to_dense\(\)"),
])
def test_values_that_cannot_be_saved_name_the_key_and_the_reason(tmp_path, value, expected):
    with pytest.raises(ValueError, match=expected):
        make_sync_checkpointer().save(str(tmp_path / "ck"), {"model": {"w": torch.ones(2), "extra": {"big": value}}})
    assert not (tmp_path / "ck" / "manifest.json").exists()


def test_ints_at_the_64_bit_limits_save(tmp_path):
    values = {"lo": -2**63, "hi": 2**63 - 1}
    make_sync_checkpointer().save(str(tmp_path / "ck"), values)
    assert make_sync_checkpointer().load(str(tmp_path / "ck")) == values


def two_rank_checkpoint(path):
    """Ranks 0 and 1 of a 2-rank save, as threads (rank 0 commits once rank 1 voted)."""
    errors = []

    def write(rank):
        try:
            CheckpointWriter(CheckpointWriterConfig(write_barrier_timeout_secs=60),
                             RankInfo(global_rank=rank, global_world_size=2)).write(path, {"rank": torch.tensor([rank])})
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_world_size_mismatch_says_how_to_read_one_rank(tmp_path):
    path = str(tmp_path / "ck")
    two_rank_checkpoint(path)
    with pytest.raises(ValueError) as raised:
        make_sync_checkpointer().load(path)
    message = str(raised.value)
    assert "written by 2 ranks" in message
    assert "CheckpointReader(RankInfo(global_rank=r, global_world_size=2)).read(path)" in message, message
    assert "fastdcp inspect PATH --rank r" in message
    # What it says works: rank 1's part, read on its own.
    loaded = CheckpointReader(RankInfo(global_rank=1, global_world_size=2)).read(path)[0]
    assert torch.equal(loaded["rank"], torch.tensor([1]))


# --- one rank that cannot save fails every rank at once, sync as async ----------------------------------
FAILING_RANK = 1
WRITE_TIMEOUT = 30  # seconds: the other ranks must fail long before it


def _sync_rank(rank, world_size, port, out, results):
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        for name, barrier in (("no barrier", BarrierConfig()),
                              ("dist barrier", BarrierConfig("dist_barrier", {"timeout_secs": WRITE_TIMEOUT}))):
            checkpointer = make_sync_checkpointer(CheckpointerConfig(
                barrier_config=barrier,
                writer_config=CheckpointWriterConfig(write_barrier_timeout_secs=WRITE_TIMEOUT)))
            payload = {"w": torch.full((1000,), float(rank))}
            if rank == FAILING_RANK:
                payload["bad"] = object()
            dist.barrier()  # every rank starts its save together
            started = time.monotonic()
            try:
                checkpointer.save(f"{out}/{name.replace(' ', '_')}", payload)
                results.put((rank, name, "committed", 0.0, ""))
            except Exception as error:  # noqa: BLE001 - the type and message are the check
                results.put((rank, name, type(error).__name__, time.monotonic() - started, str(error)))
            checkpointer.close()
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, "crash", "crash", 0.0, traceback.format_exc()))
    results.close()
    results.join_thread()
    os._exit(0)


def test_sync_rank_that_cannot_save_fails_every_rank_at_once(tmp_path):
    world_size = 3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_sync_rank, args=(r, world_size, port, str(tmp_path), results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes = {}
    try:
        deadline = time.monotonic() + 4 * WRITE_TIMEOUT + 60
        while len(outcomes) < 2 * world_size and time.monotonic() < deadline:
            try:
                rank, name, kind, seconds, message = results.get(timeout=5)
            except Exception:  # noqa: BLE001 - queue.Empty: keep waiting until the deadline
                continue
            assert name != "crash", message
            outcomes[(rank, name)] = (kind, seconds, message)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    assert len(outcomes) == 2 * world_size, outcomes
    for (rank, name), (kind, seconds, message) in outcomes.items():
        details = f"rank {rank}, {name}: {kind} after {seconds:.1f}s: {message}"
        if rank == FAILING_RANK:
            # fastdcp.InvalidArgumentError, a ValueError
            assert kind == "InvalidArgumentError" and "cannot save the value at 'bad'" in message, details
        else:
            assert kind == "CancelledError", details  # fastdcp.CancelledError, a RuntimeError too
            assert f"rank {FAILING_RANK} failed: cannot save the value at 'bad'" in message, details
        assert seconds < 10, details  # not the write_barrier_timeout_secs of 30 s
    for name in ("no_barrier", "dist_barrier"):
        assert not (tmp_path / name / "manifest.json").exists()


# --- out of address space (ulimit -v): what could not be had, how big, and the fix -------------------
ADDRESS_SPACE_SCRIPT = """
import resource, sys, numpy as np, fastdcp
big = {"w": np.ones(2**24, dtype=np.float32)}  # 64 MiB, allocated before the limit
small = {"v": np.arange(1000, dtype=np.int64)}
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 2**22, vm + 2**22))  # 4 MiB more: not one 8 MiB thread stack
fastdcp.save(sys.argv[1], small)  # fewer threads write it
assert np.array_equal(fastdcp.load(sys.argv[1])["v"], small["v"])
print("saved")
try:
    fastdcp.Stager().stage(big)
except MemoryError as error:
    print("MemoryError:", error)
"""


def test_out_of_address_space_says_what_and_how_to_fix(tmp_path):
    result = subprocess.run([sys.executable, "-c", ADDRESS_SPACE_SCRIPT, str(tmp_path / "ck")],
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "saved" in result.stdout, output
    assert "Resource temporarily unavailable" not in result.stdout, output  # no bare errno as the error
    # The staging buffer: its size, and the limit to raise.
    assert "MemoryError: cannot map 67108864 bytes of host memory" in result.stdout, output
    assert "the address-space limit (ulimit -v) is" in result.stdout and "ulimit -v unlimited" in result.stdout, output
    # Threads that could not start: which, the stack each reserves, and the fix (as warnings).
    assert re.search(r"thread: Resource temporarily unavailable\. Each thread reserves \d+ MiB of address space", result.stderr), output


# --- one exception type per error code (issue 16), raised by the C++ core ------------------------------
from fastdcp import ErrorCode, _C  # noqa: E402
from fastdcp._adapters import NumpyAdapter  # noqa: E402

EXPECTED_TYPES = {  # code: (type, the built-ins it is also)
    ErrorCode.INVALID_ARGUMENT: (fastdcp.InvalidArgumentError, (ValueError,)),
    ErrorCode.FAILED_PRECONDITION: (fastdcp.FailedPreconditionError, (RuntimeError,)),
    ErrorCode.RESOURCE_EXHAUSTED: (fastdcp.ResourceExhaustedError, (MemoryError,)),
    ErrorCode.UNAVAILABLE: (fastdcp.UnavailableError, (RuntimeError,)),
    ErrorCode.CUDA_ERROR: (fastdcp.CudaError, (RuntimeError,)),
    ErrorCode.IO_ERROR: (fastdcp.IoError, (OSError,)),
    ErrorCode.NOT_FOUND: (fastdcp.NotFoundError, (FileNotFoundError,)),
    ErrorCode.ALREADY_EXISTS: (fastdcp.AlreadyExistsError, (FileExistsError, RuntimeError)),
    ErrorCode.DATA_LOSS: (fastdcp.DataLossError, (RuntimeError,)),
    ErrorCode.CANCELLED: (fastdcp.CancelledError, (concurrent.futures.CancelledError, RuntimeError)),
    ErrorCode.DEADLINE_EXCEEDED: (fastdcp.DeadlineExceededError, (TimeoutError,)),
    ErrorCode.INTERNAL: (fastdcp.InternalError, (RuntimeError,)),
}


def test_every_error_code_has_one_type_that_is_the_builtin_a_caller_catches():
    assert set(EXPECTED_TYPES) == set(ErrorCode)
    for code, (error_type, builtins) in EXPECTED_TYPES.items():
        assert error_type.code == code and issubclass(error_type, fastdcp.Error), error_type
        assert all(issubclass(error_type, builtin) for builtin in builtins), error_type
        assert error_type.__module__ == "fastdcp.errors" and getattr(fastdcp.errors, error_type.__name__) is error_type
    assert issubclass(fastdcp.ChecksumError, fastdcp.DataLossError)


def raised_by(call, code, error_type=None):
    """The exception `call` raises: of the type of `code` (or `error_type`), with `code`."""
    with pytest.raises(fastdcp.Error) as raised:
        call()
    error = raised.value
    assert type(error) is (error_type or EXPECTED_TYPES[code][0]), repr(error)
    assert error.code == code
    return error


def native_write(path, tree, rank=0, world_size=1, barrier_timeout_s=60.0):
    options = _C.WriteOptions(barrier_timeout_s=barrier_timeout_s)
    return _C.CheckpointIO(NumpyAdapter(), rank, world_size).write(str(path), tree, options)


def test_invalid_argument_from_an_unsaveable_value(tmp_path):
    error = raised_by(lambda: fastdcp.save(tmp_path / "ck", {"x": object()}), ErrorCode.INVALID_ARGUMENT)
    assert "cannot save the value at 'x'" in str(error)
    raised_by(lambda: setattr(_C.WriteOptions(), "io_engine", "carrier pigeon"), ErrorCode.INVALID_ARGUMENT)


def test_failed_precondition_from_a_directory_without_a_checkpoint(tmp_path):
    error = raised_by(lambda: fastdcp.load(tmp_path), ErrorCode.FAILED_PRECONDITION)
    assert "holds no committed checkpoint" in str(error)


def test_resource_exhausted_from_a_memory_budget():
    with fastdcp.Stager(memory_budget_bytes=1 << 20) as stager:
        error = raised_by(lambda: stager.stage({"w": np.zeros(1 << 20)}), ErrorCode.RESOURCE_EXHAUSTED)
    assert "budget" in str(error)


def test_unavailable_from_a_rank_whose_commit_never_comes(tmp_path):
    # Rank 1 of 2 writes its part; rank 0 never commits within the timeout.
    error = raised_by(lambda: native_write(tmp_path / "ck", {"a": np.ones(3)}, rank=1, world_size=2,
                                           barrier_timeout_s=0.2), ErrorCode.UNAVAILABLE)
    assert "rank 0 did not commit" in str(error)


def test_io_errors_keep_errno_and_take_its_oserror_subclass(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    error = raised_by(lambda: fastdcp.save(tmp_path / "file" / "ck", {"a": np.ones(3)}), ErrorCode.IO_ERROR,
                      fastdcp.errors.IoNotADirectoryError)
    assert isinstance(error, NotADirectoryError) and isinstance(error, fastdcp.IoError)
    assert error.errno == errno.ENOTDIR and str(tmp_path / "file") in str(error)
    # An errno without a subclass of its own: the IoError itself.
    error = raised_by(lambda: fastdcp.save(tmp_path / ("n" * 300), {"a": np.ones(3)}), ErrorCode.IO_ERROR)
    assert error.errno == errno.ENAMETOOLONG


def test_not_found_from_a_missing_checkpoint(tmp_path):
    error = raised_by(lambda: fastdcp.load(tmp_path / "missing"), ErrorCode.NOT_FOUND)
    assert isinstance(error, FileNotFoundError) and str(tmp_path / "missing") in str(error)


@pytest.mark.parametrize("how", ["data", "header", "truncated"])
def test_data_loss_says_whether_a_checksum_found_it(tmp_path, how):
    path = str(tmp_path / "ck")
    fastdcp.save(path, {"w": np.arange(1 << 16, dtype=np.float32)})
    damage(path, how)
    expected = fastdcp.DataLossError if how == "truncated" else fastdcp.ChecksumError
    raised_by(lambda: fastdcp.load(path), ErrorCode.DATA_LOSS, expected)
    raised_by(lambda: fastdcp.verify(path), ErrorCode.DATA_LOSS, expected)


def test_cancelled_from_a_save_another_rank_abandoned(tmp_path):
    path = str(tmp_path / "ck")
    options = _C.WriteOptions(barrier_timeout_s=60.0)
    # Rank 1 votes against the save (and waits for rank 0's decision); rank 0's write then fails.
    voter = threading.Thread(target=_C.CheckpointIO(NumpyAdapter(), 1, 2).abandon,
                             args=(path, "rank 1 ran out of patience", options))
    voter.start()
    error = raised_by(lambda: native_write(path, {"a": np.ones(3)}, rank=0, world_size=2), ErrorCode.CANCELLED)
    voter.join(60)
    assert "rank 1 ran out of patience" in str(error) and not os.path.exists(os.path.join(path, "manifest.json"))


@pytest.mark.parametrize("code", [ErrorCode.ALREADY_EXISTS, ErrorCode.CUDA_ERROR, ErrorCode.INTERNAL])
def test_codes_no_python_call_reaches_map_too(code):
    # No call from Python raises these without a GPU or a broken store: a test-only binding throws
    # the C++ error itself.
    raised_by(lambda: _C._raise_error(code, "what happened", errno.EEXIST if code == ErrorCode.ALREADY_EXISTS else 0),
              code)


def test_error_types_survive_pickling_as_the_writer_process_sends_them(tmp_path):
    import pickle

    (tmp_path / "file").write_bytes(b"")
    for call in (lambda: fastdcp.save(tmp_path / "file" / "ck", {"a": np.ones(3)}),
                 lambda: fastdcp.load(tmp_path / "missing"),
                 lambda: _C._raise_error(ErrorCode.CANCELLED, "gone")):
        with pytest.raises(fastdcp.Error) as raised:
            call()
        copy = pickle.loads(pickle.dumps(raised.value))
        assert type(copy) is type(raised.value) and str(copy) == str(raised.value)
        assert getattr(copy, "errno", None) == getattr(raised.value, "errno", None)
