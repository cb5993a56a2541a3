#!/usr/bin/env bash
# The GPU report, one command: on a machine with an NVIDIA GPU it builds and runs the real-GPU C++
# tests (tests/gpu, Release), builds the Python package, and runs bench/bench_gpu.py (device-to-host
# staging of fastdcp and of torch's DefaultStager beside the pinned cudaMemcpy limit; blocking and
# commit times of async saves of GPU tensors), and writes the test summary and the figures into ONE
# markdown file. Without a GPU it says "no NVIDIA GPU found", builds and measures nothing, exits 0.
#
# Usage: bash bench/gpu_report.sh [REPORT.md]     (default bench/results/gpu_report.md)
#        bash bench/gpu_report.sh --fetch-deps    (before a run on the device machine; see below)
#
# On this workplace's GPU machine (the device tool), which has nvcc (so a host g++), CMake, ninja, a python3
# with torch (CUDA), nanobind and scikit-build-core, but no internet and perhaps not the C++
# libraries fastdcp builds against (simdjson, nlohmann-json, GoogleTest; ISA-L, liburing optional):
#   1. here, once:  bash bench/gpu_report.sh --fetch-deps
#      (apt-get download of those Debian packages, about 1 MB, unpacked into build-gpu-deps/, which
#      git ignores; built for an older glibc than that machine's, so they run there)
#   2. run:  command  bash bench/gpu_report.sh $OUT/gpu_report.md
#            carry    ["build-gpu-deps"]         timeout_s  600
#      The report comes back as $OUT/gpu_report.md (and is printed at the end). No wheels need to be
#      carried: the Python packages used are in that machine's image, and fastdcp itself is built
#      there, for its Python and its torch. Where fastdcp cannot be built there (libraries missing,
#      no compiler), the report says why, and bench_gpu.py still measures the cudaMemcpy limit and
#      torch's stager (the fastdcp rows and the async saves are skipped).
#
# Time on a 16-core H200 machine: the test build and the package build run at once (a few minutes),
# then the tests, then the benchmark, whose budget is what is left (at most 360 s). Each step runs
# under `timeout`, the whole under FASTDCP_GPU_REPORT_SECONDS (default 540, inside the 600 s a call
# may run). Environment: PYTHON (default .venv/bin/python where it exists, else python3); JOBS
# (compile jobs of each of the two builds, default nproc); FASTDCP_GPU_BUILD_DIR (default
# build-gpu); FASTDCP_GPU_DEPS (default build-gpu-deps); FASTDCP_GPU_REPORT_FORCE=1 runs every step
# without a GPU too (the tests skip, the benchmark says it found none): a check of this script.
# CUDA_VISIBLE_DEVICES="" (or -1) hides the GPUs from this script, as from CUDA.
set -uo pipefail  # not -e: a failed step is reported and the later steps still run

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
deps="$(realpath -m "${FASTDCP_GPU_DEPS:-$root/build-gpu-deps}")"
# Debian 12 package names: the libraries, their headers and CMake files.
deb_packages=(libsimdjson14 libsimdjson-dev nlohmann-json3-dev libgtest-dev libgmock-dev libisal2 libisal-dev
              liburing2 liburing-dev)

if [[ "${1:-}" == "--fetch-deps" ]]; then
  set -e
  rm -rf "$deps"
  mkdir -p "$deps/debs"
  (cd "$deps/debs" && apt-get download "${deb_packages[@]}")  # `apt-get update` first if it finds none
  for deb in "$deps"/debs/*.deb; do dpkg -x "$deb" "$deps"; done
  rm -rf "$deps/debs" "$deps/usr/share/doc" "$deps/usr/share/man"
  echo "gpu_report: unpacked ${deb_packages[*]} into $deps ($(du -sh "$deps" | cut -f1)); carry it to the GPU machine"
  exit 0
fi

out="$(realpath -m "${1:-$root/bench/results/gpu_report.md}")"
cd "$root" || exit 1
mkdir -p "$(dirname "$out")"
: > "$out"
start=$SECONDS
deadline=$((start + ${FASTDCP_GPU_REPORT_SECONDS:-540}))
build="$(realpath -m "${FASTDCP_GPU_BUILD_DIR:-build-gpu}")"
site="$build/site"  # the Python package, installed with --target
jobs="${JOBS:-$(nproc)}"
if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=python3
fi

report() { printf '%s\n' "$@" >> "$out"; }
# Seconds for a step: at most $1, and never past the deadline (at least 1: `timeout 0` never ends).
cap() {
  local left=$((deadline - SECONDS))
  ((left < $1)) || left=$1
  ((left > 1)) || left=1
  echo "$left"
}
log_tail() {  # $1: title, $2: log file; its last lines, for a step that failed
  report "" "$1 (last lines of $2):" "" '```text'
  tail -n 40 "$2" 2>/dev/null >> "$out"
  report '```'
}

# The GPUs nvidia-smi lists, else the device nodes; nothing when CUDA_VISIBLE_DEVICES hides them.
gpus() {
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" && ( -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == "-1" ) ]]; then
    return
  fi
  local listed=""
  if command -v nvidia-smi >/dev/null 2>&1; then
    listed="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
  fi
  if [[ -n "$listed" ]]; then
    echo "$listed"
  else
    compgen -G "/dev/nvidia[0-9]*" | sed 's/^/device node /'
  fi
}

report "# fastdcp GPU report" "" "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, by \`bash bench/gpu_report.sh\`." ""
gpu_list="$(gpus)"
if [[ -z "$gpu_list" ]]; then
  message="no NVIDIA GPU found: measurements skipped (nvidia-smi lists none, no /dev/nvidia[0-9]*, or CUDA_VISIBLE_DEVICES hides them)"
  echo "gpu_report: $message"
  report "$message"
  if [[ "${FASTDCP_GPU_REPORT_FORCE:-0}" != 1 ]]; then
    echo "gpu_report: wrote $out"
    exit 0
  fi
  report "" "FASTDCP_GPU_REPORT_FORCE=1: every step runs anyway." ""
else
  report "GPU: $gpu_list" ""
fi

# The carried libraries, where they are: CMake finds them by prefix, the programs by library path.
if [[ -d "$deps/usr" ]]; then
  export CMAKE_PREFIX_PATH="$deps/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
  for dir in "$deps"/usr/lib/*-linux-gnu; do
    export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
  libraries="from $deps (--fetch-deps)"
else
  libraries="the system's ($deps not found)"
fi
report "Python: $py ($("$py" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda)' 2>&1 | tail -n 1)); C++ libraries: $libraries; build directory $build." ""
mkdir -p "$build"

# The C++ library and test_gpu only (the other tests and programs are not needed here).
build_tests() {
  local end=$((SECONDS + $1)) generator=()
  command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
  timeout -k 10 "$1" cmake -S "$root" -B "$build/cpp" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DFASTDCP_BUILD_TESTS=ON -DFASTDCP_BUILD_BENCHMARKS=OFF -DFASTDCP_BUILD_EXAMPLES=OFF -DFASTDCP_BUILD_CLI=OFF \
    -DFASTDCP_WITH_MPI=OFF || return
  timeout -k 10 "$((end - SECONDS > 1 ? end - SECONDS : 1))" cmake --build "$build/cpp" -j "$jobs" --target test_gpu
}

# The package for this Python and its torch (so fastdcp._torch_C is built too), installed into $site.
build_package() {
  rm -rf "$site"
  CMAKE_BUILD_PARALLEL_LEVEL="$jobs" timeout -k 10 "$1" "$py" -m pip install --no-build-isolation --no-deps \
    --no-index --no-cache-dir --disable-pip-version-check --target "$site" \
    --config-settings=build-dir="$build/python" "$root"
}

# A libcudart for the C++ tests where the dynamic loader would not find one (e.g. only torch's own).
if [[ -z "${FASTDCP_CUDART:-}" ]] && ! ldconfig -p 2>/dev/null | grep -q 'libcudart\.so' &&
   [[ ! -e /usr/local/cuda/lib64/libcudart.so ]]; then
  cudart="$("$py" - <<'PY' 2>/dev/null
import glob, os, site
roots = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
roots += glob.glob("/usr/local/cuda*/") + [os.path.join(p, "nvidia") for p in site.getsitepackages()]
found = [f for r in roots for f in sorted(glob.glob(os.path.join(r, "**", "libcudart.so.*"), recursive=True))]
print(found[0] if found else "")
PY
)"
  [[ -n "$cudart" ]] && export FASTDCP_CUDART="$cudart"
fi

echo "gpu_report: building test_gpu and the Python package at once ($jobs jobs each; logs in $build)"
step_start=$SECONDS
builds_cap=$(cap $((deadline - SECONDS - 240)))  # 240 s are kept for the tests and the benchmark
build_tests "$builds_cap" > "$build/tests-build.log" 2>&1 &
tests_build_pid=$!
build_package "$builds_cap" > "$build/package-build.log" 2>&1 &
package_pid=$!
wait "$tests_build_pid"
tests_build_rc=$?
wait "$package_pid"
package_rc=$?
builds_s=$((SECONDS - step_start))

report "## C++ GPU tests (tests/gpu/run_gpu_tests.sh, test_gpu built in Release)" ""
if ((tests_build_rc != 0)); then
  tests_rc=$tests_build_rc
  report "Build FAILED (exit $tests_build_rc; both builds took $builds_s s): the tests did not run."
  log_tail "Build" "$build/tests-build.log"
else
  echo "gpu_report: running the GPU tests${FASTDCP_CUDART:+ (FASTDCP_CUDART=$FASTDCP_CUDART)}"
  step_start=$SECONDS
  timeout -k 10 "$(cap 180)" bash tests/gpu/run_gpu_tests.sh "$build/cpp" > "$build/tests.log" 2>&1
  tests_rc=$?
  status="passed"
  ((tests_rc == 0)) || status="FAILED (exit $tests_rc)"
  grep -q '^run_gpu_tests: NO' "$build/tests.log" && status="$status, skipped: no usable GPU"
  report "Tests $status in $((SECONDS - step_start)) s (builds: $builds_s s)${FASTDCP_CUDART:+; FASTDCP_CUDART=$FASTDCP_CUDART}." \
    "" '```text'
  grep -E '^\[gpu\]|^\[ *(PASSED|FAILED|SKIPPED) *\]|^\[==========\]|^run_gpu_tests:' "$build/tests.log" >> "$out"
  report '```'
  ((tests_rc == 0)) || log_tail "Test output" "$build/tests.log"
fi
report ""

report "## Python package" ""
if ((package_rc == 0)); then
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  report "Built and installed into $site (pip install --no-build-isolation --target)."
else
  report "Build FAILED (exit $package_rc): the benchmark runs without fastdcp if no other copy is importable."
  log_tail "Package build" "$build/package-build.log"
fi
report ""

left=$((deadline - SECONDS - 30))  # what the benchmark may spend, leaving time to finish the report
budget=$((left < 360 ? left : 360))
if ((budget < 30)); then
  bench_rc=1
  report "## GPU benchmarks (bench/bench_gpu.py)" "" "Skipped: the ${FASTDCP_GPU_REPORT_SECONDS:-540} s of this report are spent."
else
  echo "gpu_report: running bench/bench_gpu.py (budget $budget s)"
  timeout -k 10 "$((budget + 25))" "$py" bench/bench_gpu.py --out "$build/bench.md" --budget-seconds "$budget" \
    --dir "$build" 2>&1 | tee "$build/bench.log"
  bench_rc=${PIPESTATUS[0]}
  cat "$build/bench.md" >> "$out" 2>/dev/null || report "## GPU benchmarks (bench/bench_gpu.py)" "" "No figures."
  ((bench_rc == 0)) || log_tail "Benchmark FAILED (exit $bench_rc)" "$build/bench.log"
fi

failed=()
((tests_rc == 0)) || failed+=("GPU tests")
((package_rc == 0)) || failed+=("Python package")
((bench_rc == 0)) || failed+=("benchmark")
report "" "## Summary" "" "Finished in $((SECONDS - start)) s; ${failed[*]:-no step} failed."
cat "$out"
echo "gpu_report: wrote $out"
((${#failed[@]} == 0))
