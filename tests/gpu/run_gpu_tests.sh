#!/usr/bin/env bash
# Runs the real-GPU tests (test_gpu) from a build directory and exits with their status.
# Usage: tests/gpu/run_gpu_tests.sh [BUILD_DIR] [extra gtest flags...]   (BUILD_DIR defaults to build)
set -u

build_dir="${1:-build}"
shift || true

binary=""
for candidate in "$build_dir/tests/test_gpu" "$build_dir/test_gpu"; do
  if [[ -x "$candidate" ]]; then
    binary="$candidate"
    break
  fi
done
if [[ -z "$binary" ]]; then
  echo "run_gpu_tests: no test_gpu in $build_dir (build it: cmake --build $build_dir --target test_gpu)" >&2
  exit 2
fi

# nvidia-smi may be missing inside containers that still see the GPU, so device nodes count too.
gpus=""
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus="$(nvidia-smi -L 2>/dev/null | grep -i '^GPU' || true)"
fi
if [[ -z "$gpus" ]] && ! compgen -G "/dev/nvidia[0-9]*" >/dev/null; then
  echo "run_gpu_tests: NO GPU FOUND (no nvidia-smi device, no /dev/nvidia*): the GPU tests will be skipped"
elif [[ -n "$gpus" ]]; then
  echo "run_gpu_tests: GPUs found:"
  echo "$gpus"
fi

output="$(mktemp)"
trap 'rm -f "$output"' EXIT
"$binary" --gtest_color=no "$@" 2>&1 | tee "$output"
status=${PIPESTATUS[0]}

# The tests skip themselves when CUDA is unusable (no driver, no runtime, no device); say so plainly.
if grep -q '^\[  SKIPPED \]' "$output" && ! grep -q '^\[       OK \]' "$output"; then
  echo "run_gpu_tests: NO USABLE GPU: every GPU test was skipped (see the skip reasons above)"
fi
exit "$status"
