#!/usr/bin/env bash
# Builds bench_staging (Release) into build-bench, runs it with 5 repetitions, writes the JSON to
# bench/results/staging.json and prints the medians with the two headline ratios.
# Extra arguments go to the benchmark, e.g. --benchmark_filter=1x1GiB. JOBS sets build parallelism.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${root}/build-bench"
results="${root}/bench/results"
json="${results}/staging.json"

cmake -S "${root}" -B "${build}" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTDCP_BUILD_TESTS=OFF
cmake --build "${build}" -j "${JOBS:-2}" --target bench_staging

mkdir -p "${results}"
"${build}/bench/bench_staging" \
  --benchmark_repetitions=5 \
  --benchmark_report_aggregates_only=true \
  --benchmark_out="${json}" \
  --benchmark_out_format=json \
  "$@"

python3 - "${json}" <<'PY'
import json
import re
import sys

with open(sys.argv[1]) as f:
    report = json.load(f)

scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
medians = {}  # "stage_warm/1x1GiB" -> (ms, GB/s)
for b in report["benchmarks"]:
    if b.get("aggregate_name") != "median":
        continue
    name = re.sub(r"/(iterations:\d+|real_time)", "", b["run_name"])
    ms = b["real_time"] * scale[b["time_unit"]]
    medians[name] = (ms, b.get("bytes_per_second", 0.0) / 1e9)

ctx = report["context"]
print(f"\nmedians over {ctx.get('num_cpus', '?')} CPUs (copy threads: {ctx.get('copy_threads', '?')}), "
      f"from {sys.argv[1]}")
print(f"{'benchmark':<36} {'ms':>10} {'GB/s':>8}")
for name, (ms, gbps) in medians.items():
    print(f"{name:<36} {ms:>10.2f} {gbps:>8.2f}")

def ratio(label, a, b):
    if a in medians and b in medians:
        print(f"{label:<58} {medians[a][0] / medians[b][0]:6.2f}x")

print()
ratio("stage_warm 1x1GiB time / memcpy_all_threads 1x1GiB time",
      "stage_warm/1x1GiB", "memcpy_all_threads/1x1GiB")
ratio("stage_warm 100000x4KiB time / one 400 MB memcpy time",
      "stage_warm/100000x4KiB", "memcpy_flat_1thread/100000x4KiB")
PY
