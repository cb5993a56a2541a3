"""Peer figure for the GPU staging tests: device-to-host staging throughput of PyTorch's own
experimental DefaultStager on the same shapes as tests/gpu/test_gpu_staging.cpp (one 256 MiB
buffer; 1000 small buffers), warm cache, median of 5. Run on a machine with an NVIDIA GPU."""
import statistics
import time

import torch
from torch.distributed.checkpoint._experimental.staging import CheckpointStagerConfig, DefaultStager


def median_seconds(stager, state_dict, runs=5):
    stager.stage(state_dict).result()  # warm the storage cache
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        stager.stage(state_dict).result()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    config = CheckpointStagerConfig(use_pinned_memory=True, use_shared_memory=False,
                                    use_async_staging=True, use_non_blocking_copy=True)
    stager = DefaultStager(config)
    big = {"w": torch.randn(64 << 20, device="cuda")}  # 256 MiB of fp32
    sizes = [4 + (i * 151) % (150 << 10) for i in range(1000)]
    small = {f"t{i}": torch.empty(n, dtype=torch.uint8, device="cuda") for i, n in enumerate(sizes)}
    for name, sd in (("256 MiB", big), ("1000 small", small)):
        nbytes = sum(t.numel() * t.element_size() for t in sd.values())
        s = median_seconds(stager, sd)
        print(f"torch DefaultStager warm {name}: {s * 1e3:.2f} ms, {nbytes / s / 1e9:.2f} GB/s")
    stager.close()


if __name__ == "__main__":
    main()
