"""fastdcp.torch.DefaultStager against torch's own experimental DefaultStager, same state dicts,
same run: one 1 GiB tensor, a Llama-shaped state dict (weights and two Adam moments, ~290 tensors
each, ~3.3 GB), and 50,000 tensors of 4 KiB. Warm cache (the first stage of each stager is not
timed), sync and async (stage + result()), median of --runs. Also a single-thread memcpy of the
same total bytes (numpy.copyto of one flat buffer) as the hardware reference.

Usage: .venv/bin/python bench/bench_torch_staging.py [--runs 5] [--cases 1gib,llama,small]
"""

import argparse
import gc
import statistics
import time

import numpy as np
import torch
import torch.distributed.checkpoint._experimental.staging as upstream

import fastdcp.torch as fdt

CPU = dict(use_pinned_memory=False, use_shared_memory=False, use_non_blocking_copy=False)


def llama_weights(layers, hidden, ffn, vocab):
    """The float32 weights of a Llama-shaped model, by parameter name."""
    weights = {"tok_embeddings.weight": torch.randn(vocab, hidden), "output.weight": torch.randn(vocab, hidden),
               "norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"layers.{i}."
        for name in ("wq", "wk", "wv", "wo"):
            weights[p + f"attention.{name}.weight"] = torch.randn(hidden, hidden)
        weights[p + "feed_forward.w1.weight"] = torch.randn(ffn, hidden)
        weights[p + "feed_forward.w2.weight"] = torch.randn(hidden, ffn)
        weights[p + "feed_forward.w3.weight"] = torch.randn(ffn, hidden)
        weights[p + "attention_norm.weight"] = torch.ones(hidden)
        weights[p + "ffn_norm.weight"] = torch.ones(hidden)
    return weights


def llama_state_dict(layers=32, hidden=768, ffn=2048, vocab=32000):
    weights = llama_weights(layers, hidden, ffn, vocab)
    state = {i: {"exp_avg": torch.randn_like(w), "exp_avg_sq": torch.rand_like(w), "step": torch.tensor(10.0)}
             for i, w in enumerate(weights.values())}
    return {"model": weights, "optimizer": {"state": state, "param_groups": [{"lr": 3e-4, "params": list(state)}]}}


CASES = {
    "1gib": lambda: {"w": torch.randn(1 << 28)},
    "llama": llama_state_dict,
    "small": lambda: {f"t{i}": torch.randn(1024) for i in range(50000)},
}


def tensors(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from tensors(v)
    elif isinstance(tree, torch.Tensor):
        yield tree


def warm_times(fn, runs):
    """Seconds of `runs` calls of fn after an untimed first one."""
    fn()  # warm: buffers allocated and cached
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        del result  # freeing the staged tree is not part of staging
    return times


def median_time(fn, runs):
    return statistics.median(warm_times(fn, runs))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cases", default="1gib,llama,small")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.runs} warm runs")
    print(f"{'case':6} {'tensors':>8} {'GB':>6} | {'memcpy':>8} | {'mode':5} {'fastdcp':>9} {'torch':>9} "
          f"{'fastdcp GB/s':>12} {'vs torch':>9} {'vs memcpy':>9}")
    for case in args.cases.split(","):
        sd = CASES[case]()
        ts = list(tensors(sd))
        nbytes = sum(t.untyped_storage().nbytes() for t in ts)
        flat_src = np.ones(nbytes, dtype=np.uint8)
        flat_dst = np.empty_like(flat_src)
        memcpy = median_time(lambda: np.copyto(flat_dst, flat_src), args.runs)
        del flat_src, flat_dst
        for mode in ("sync", "async"):
            is_async = mode == "async"
            ours = fdt.DefaultStager(fdt.CheckpointStagerConfig(use_async_staging=is_async, **CPU))
            theirs = upstream.DefaultStager(upstream.CheckpointStagerConfig(use_async_staging=is_async, **CPU))
            results = {}
            for name, stager in (("fastdcp", ours), ("torch", theirs)):
                run = (lambda s=stager: s.stage(sd).result()) if is_async else (lambda s=stager: s.stage(sd))
                results[name] = median_time(run, args.runs)
                stager.close()
            del ours, theirs
            gc.collect()
            f, t = results["fastdcp"], results["torch"]
            print(f"{case:6} {len(ts):>8} {nbytes / 1e9:>6.2f} | {memcpy * 1e3:>6.1f}ms | {mode:5} {f * 1e3:>7.1f}ms "
                  f"{t * 1e3:>7.1f}ms {nbytes / f / 1e9:>12.2f} {t / f:>8.2f}x {memcpy / f:>8.2f}x", flush=True)
        del sd, ts
        gc.collect()


if __name__ == "__main__":
    main()
