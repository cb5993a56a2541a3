"""train_demo: a small decoder-only transformer trained on CPU, checkpointed asynchronously by
fastdcp every few steps, then restored from the latest committed checkpoint and verified.

The model (token and position embeddings, pre-norm transformer blocks with a causal mask, an LM
head) learns a copy task: each sequence is a random prefix of ``--alphabet`` tokens followed by
that prefix again, so the loss falls from ln(vocab) towards ln(alphabet)/2 as the model first
learns which tokens occur and then learns to copy. AdamW holds two fp32 moments per parameter,
so the checkpointed state is about 12 bytes per parameter (353 MB with the defaults:
29 M parameters, the LM head tied to the token embedding).

Every ``--every`` steps the state (model, optimizer, step, RNG) is saved with
``fastdcp.torch.make_async_checkpointer``: ``save()`` returns a staging future and a write
future; training waits only for the staging future (the *blocking time*, printed beside the
step time) and goes on while the writer process writes and commits the checkpoint in the
background. When a write commits, its commit time and write throughput are printed.

At the end the latest committed checkpoint is loaded into a freshly initialised model and
optimizer (another seed), every tensor is compared with a snapshot of the trainer's state taken
when that checkpoint was staged, and one more training step from the restored state must give
the same loss (and, where it can be checked, the same parameters) as the original run. PASS/FAIL
lines; the exit status is 1 on any failure.

    python examples/train_demo.py [--steps 30] [--every 5] [--dir DIR] [--d-model 512]
                                  [--layers 8] [--seed 0] ...
"""

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdcp.torch import (
    CheckpointerConfig,
    CheckpointStagerConfig,
    CheckpointWriterConfig,
    make_async_checkpointer,
)


# ------------------------------------------------------------------------------------------------
# Model and data


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP, each residual."""

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.dropout(self.proj(attn.transpose(1, 2).reshape(b, t, d)))
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, seq_len: int, d_model: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied: two state-dict entries, one storage
        self.drop = nn.Dropout(dropout)
        for embedding in (self.tok, self.pos):  # small, as the tied LM head reads them too
            nn.init.normal_(embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(tokens) + self.pos(torch.arange(tokens.shape[1])))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_batch(args) -> torch.Tensor:
    """A random prefix of ``seq_len/2`` tokens from the alphabet, then the prefix again (drawn from
    torch's global RNG, which the checkpoint saves, so a restored run sees the same batches)."""
    half = torch.randint(0, args.alphabet, (args.batch, (args.seq_len + 2) // 2))
    return torch.cat([half, half], dim=1)[:, : args.seq_len + 1]


def build(args, seed: int):
    torch.manual_seed(seed)
    model = TinyLM(args.vocab, args.seq_len, args.d_model, args.layers, args.heads, args.dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, fused=True)  # fused: fast on CPU
    return model, optimizer


def train_step(model, optimizer, args) -> float:
    batch = make_batch(args)
    logits = model(batch[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def training_state(model, optimizer, step: int) -> dict:
    # Everything here is a fastdcp leaf or container as it is: AdamW's state dict is
    # {"state": {int: {"step": tensor, "exp_avg": tensor, "exp_avg_sq": tensor}},
    #  "param_groups": [{"lr": float, "betas": tuple, "eps": float, "foreach": None, ...,
    #                    "params": [int, ...]}]}; no conversion is needed.
    return {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step,
            "rng": torch.get_rng_state()}


# ------------------------------------------------------------------------------------------------
# Helpers


def tensor_bytes(tree) -> int:
    """Bytes of the distinct tensor storages in a state dict."""
    seen, total = set(), 0

    def walk(value):
        nonlocal total
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(tree)
    return total


def differences(expected, actual, path: str = "") -> list[str]:
    """Where two state trees differ: tensors by dtype, shape and exact values, other leaves by ==."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            return [f"{path}: tensor expected, got {type(actual).__name__}"]
        if expected.dtype != actual.dtype or expected.shape != actual.shape:
            return [f"{path}: {expected.dtype}{list(expected.shape)} expected, got {actual.dtype}{list(actual.shape)}"]
        return [] if torch.equal(expected, actual) else [f"{path}: values differ"]
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or list(expected) != list(actual):
            got = list(actual) if isinstance(actual, dict) else type(actual).__name__
            return [f"{path}: keys {list(expected)} expected, got {got}"]
        return [d for key in expected for d in differences(expected[key], actual[key], f"{path}/{key}")]
    if isinstance(expected, (list, tuple)):
        if type(actual) is not type(expected) or len(actual) != len(expected):
            return [f"{path}: {type(expected).__name__} of {len(expected)} expected, got {actual!r:.80}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in differences(e, a, f"{path}[{i}]")]
    if type(expected) is not type(actual) or expected != actual:
        return [f"{path}: {expected!r} expected, got {actual!r}"]
    return []


def rate(nbytes: int, seconds: float) -> str:
    per_second = nbytes / seconds
    return f"{per_second / 1e9:.2f} GB/s" if per_second >= 1e8 else f"{per_second / 1e6:.1f} MB/s"


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps (default %(default)s)")
    parser.add_argument("--every", type=int, default=5, help="save every N steps (default %(default)s)")
    parser.add_argument("--dir", default=None,
                        help="where the checkpoints go, kept afterwards (default: a fresh directory under "
                             "$FASTDCP_DEMO_DIR, else the temp directory, removed at the end)")
    parser.add_argument("--d-model", type=int, default=512, help="model width (default %(default)s)")
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks (default %(default)s)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (default %(default)s)")
    parser.add_argument("--vocab", type=int, default=8192,
                        help="vocabulary (embedding and LM head rows) (default %(default)s)")
    parser.add_argument("--alphabet", type=int, default=64,
                        help="tokens that occur in the data (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=16, help="tokens per sequence (default %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default %(default)s)")
    parser.add_argument("--dropout", type=float, default=0.1,
                        help="dropout (the RNG is checkpointed too) (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the trained model and its data (default %(default)s)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch intra-op threads (default: the usable cores)")
    args = parser.parse_args()
    if args.steps < 1 or not 1 <= args.every <= args.steps:
        parser.error("need --steps >= 1 and 1 <= --every <= --steps")
    if args.d_model % args.heads or args.alphabet > args.vocab or args.seq_len < 2:
        parser.error("need --d-model divisible by --heads, --alphabet <= --vocab and --seq-len >= 2")
    return args


# ------------------------------------------------------------------------------------------------
# The demo


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    own_dir = args.dir is None
    root = tempfile.mkdtemp(prefix="fastdcp-train-demo-", dir=os.environ.get("FASTDCP_DEMO_DIR") or None) \
        if own_dir else os.path.abspath(args.dir)
    os.makedirs(root, exist_ok=True)

    model, optimizer = build(args, args.seed)
    params = sum(p.numel() for p in model.parameters())
    gpu = torch.cuda.is_available()
    if gpu:
        config = CheckpointerConfig(writer_config=CheckpointWriterConfig(overwrite=True))
    else:  # no accelerator: plain (not pinned) host buffers, synchronous copies
        config = CheckpointerConfig(
            staging_config=CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False),
            writer_config=CheckpointWriterConfig(overwrite=True))

    print(f"model: {params / 1e6:.1f} M parameters (d_model {args.d_model}, {args.layers} layers, "
          f"{args.heads} heads, vocab {args.vocab}); AdamW; batch {args.batch} x {args.seq_len} tokens; "
          f"CPU, {torch.get_num_threads()} threads")
    print(f"checkpoints: every {args.every} of {args.steps} steps into {root} "
          f"(async, staging {'pinned, non-blocking' if gpu else 'plain memory, synchronous copies'})")

    ckpt = make_async_checkpointer(config)
    failures: list[str] = []
    try:
        step_ms: list[float] = []
        busy: list[bool] = []  # whether a checkpoint write was in flight during the step
        losses: dict[int, float] = {}
        saves: list[dict] = []   # per save: step, path, futures, timings
        snapshots: dict[int, dict] = {}  # step -> deep copy of the state as staged
        state_bytes = None

        def report_commits(final: bool = False) -> None:
            for save in saves:
                if save.get("reported"):
                    continue
                if final:  # the done-callback runs just after the future's waiters are woken
                    save["callback_ran"].wait()
                elif not save["callback_ran"].is_set():
                    continue
                save["reported"] = True
                error = save["write"].exception()
                if error is not None:
                    print(f"  save @ step {save['step']:4d}: write FAILED: {error}")
                    continue
                commit_s = save["done_at"] - save["t0"]
                write_s = save["done_at"] - save["staged_at"]
                print(f"  save @ step {save['step']:4d}: committed {commit_s * 1e3:8.1f} ms after save() "
                      f"(written in {write_s * 1e3:.1f} ms after staging), {rate(state_bytes, commit_s)}")
                # Older snapshots are no longer needed once a later checkpoint is committed.
                for old in [s for s in snapshots if s < save["step"]]:
                    del snapshots[old]

        print(f"\n{'step':>5} {'loss':>8} {'step ms':>9}   (w: a checkpoint write was in flight)")
        for step in range(1, args.steps + 1):
            writing = any(not s["callback_ran"].is_set() for s in saves)
            t = time.perf_counter()
            model.train()
            losses[step] = train_step(model, optimizer, args)
            step_ms.append((time.perf_counter() - t) * 1e3)
            busy.append(writing or any(not s["callback_ran"].is_set() for s in saves))
            line = f"{step:5d} {losses[step]:8.4f} {step_ms[-1]:9.1f} {'w' if busy[-1] else ' '}"

            if step % args.every == 0:
                state = training_state(model, optimizer, step)
                if state_bytes is None:
                    state_bytes = tensor_bytes(state)
                path = os.path.join(root, f"step_{step:05d}")
                t0 = time.perf_counter()
                staging, write = ckpt.save(path, state)
                staging.result()  # training may change its tensors once staging is done
                staged_at = time.perf_counter()
                save = {"step": step, "path": path, "write": write, "t0": t0, "staged_at": staged_at,
                        "blocked_ms": (staged_at - t0) * 1e3}
                save["callback_ran"] = threading.Event()

                def on_written(_, save=save):
                    save["done_at"] = time.perf_counter()
                    save["callback_ran"].set()

                write.add_done_callback(on_written)
                saves.append(save)
                # The reference for the verification at the end (not part of the timed step).
                snapshots[step] = copy.deepcopy(state)
                line += (f"   save: blocked {save['blocked_ms']:7.1f} ms (median step {median(step_ms):.1f} ms, "
                         f"{state_bytes / 1e6:.0f} MB staged)")
            print(line, flush=True)
            report_commits()

        t = time.perf_counter()
        for save in saves:
            try:
                save["write"].result()
            except Exception:
                pass
        drain_ms = (time.perf_counter() - t) * 1e3
        report_commits(final=True)
        print(f"  (waited {drain_ms:.1f} ms after the last step for the writes in flight)")

        # ---- restore from the latest committed checkpoint ----------------------------------------
        committed = [s for s in saves if s["write"].exception() is None
                     and os.path.exists(os.path.join(s["path"], "manifest.json"))]
        if not committed:
            print("FAIL: no committed checkpoint")
            return 1
        latest = committed[-1]
        step = latest["step"]
        print(f"\nrestoring from {latest['path']} (latest committed, step {step})")

        restored_model, restored_optim = build(args, args.seed + 1)  # different initial weights
        t = time.perf_counter()
        loaded = ckpt.load(latest["path"])
        load_s = time.perf_counter() - t
        restored_model.load_state_dict(loaded["model"])
        restored_optim.load_state_dict(loaded["optim"])
        torch.set_rng_state(loaded["rng"])
        print(f"loaded {state_bytes / 1e6:.0f} MB in {load_s * 1e3:.1f} ms ({rate(state_bytes, load_s)})")

        def check(ok: bool, what: str, detail: list[str] | str = "") -> None:
            print(f"{'PASS' if ok else 'FAIL'}: {what}")
            if not ok:
                failures.append(what)
                for d in ([detail] if isinstance(detail, str) else detail)[:10]:
                    print(f"      {d}")

        check(loaded["step"] == step, f"the checkpoint's step is {step}", f"got {loaded['step']!r}")
        diffs = differences(snapshots[step], loaded)
        check(not diffs, "the loaded state dict equals the trainer's state at that step, every tensor bit for bit",
              diffs)
        restored = training_state(restored_model, restored_optim, step)
        diffs = differences(snapshots[step]["model"], restored["model"]) + \
            differences(snapshots[step]["optim"], restored["optim"])
        check(not diffs, "the fresh model and optimizer, after load_state_dict, equal the trainer's state", diffs)

        # One more step from the restored state: same batch (restored RNG), same loss.
        restored_model.train()
        next_loss = train_step(restored_model, restored_optim, args)
        if step < args.steps:
            reference = losses[step + 1]
            check(next_loss == reference, f"step {step + 1} from the restored state gives the original run's loss "
                  f"({next_loss:.6f})", f"restored {next_loss!r}, original {reference!r}")
        else:  # the checkpoint is of the last step: take that extra step with the trainer too, from
            # the RNG state it had then (building the fresh model above re-seeded the global RNG)
            torch.set_rng_state(snapshots[step]["rng"])
            reference = train_step(model, optimizer, args)
            check(next_loss == reference, f"step {step + 1} from the restored state gives the trainer's loss "
                  f"({next_loss:.6f})", f"restored {next_loss!r}, trainer {reference!r}")
            diffs = differences(model.state_dict(), restored_model.state_dict())
            check(not diffs, f"after step {step + 1}, the restored model's parameters equal the trainer's", diffs)

        # ---- summary -----------------------------------------------------------------------------
        ok_saves = [s for s in saves if "done_at" in s and s["write"].exception() is None]
        blocked = [s["blocked_ms"] for s in saves]
        commit = [(s["done_at"] - s["t0"]) * 1e3 for s in ok_saves]
        step_median = median(step_ms)
        print(f"\nsummary: {len(saves)} saves of {state_bytes / 1e6:.0f} MB ({len(ok_saves)} committed), "
              f"loss {losses[1]:.3f} -> {losses[args.steps]:.3f}")
        quiet = [ms for ms, b in zip(step_ms, busy) if not b]
        loaded_steps = [ms for ms, b in zip(step_ms, busy) if b]
        print(f"  step time:       median {step_median:.1f} ms ({median(quiet):.1f} ms without a write in flight "
              f"({len(quiet)} steps), {median(loaded_steps):.1f} ms with one ({len(loaded_steps)} steps))")
        print(f"  save blocking:   median {median(blocked):.1f} ms, max {max(blocked):.1f} ms "
              f"({median(blocked) / step_median * 100:.1f}% of a median step)")
        if commit:
            print(f"  commit:          median {median(commit):.1f} ms after save(), write throughput "
                  f"{rate(state_bytes, median(commit) / 1e3)}")
        print(f"  load:            {load_s * 1e3:.1f} ms ({rate(state_bytes, load_s)})")
        print(f"train_demo: {'PASS' if not failures else 'FAIL (' + str(len(failures)) + ' checks)'}")
        return 0 if not failures else 1
    finally:
        ckpt.close()
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ntrain_demo: interrupted", file=sys.stderr)
        sys.exit(130)
