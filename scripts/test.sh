#!/usr/bin/env bash
# Runs every test: the whole suite in Release, the Python suite, again under AddressSanitizer +
# UndefinedBehaviorSanitizer, the concurrent components (staging, memory, common, checkpoint) under
# ThreadSanitizer, and bounded libFuzzer runs on the checkpoint metadata parsers and the whole reader.
# The CUDA code paths are tested against a fake CUDA runtime built by the tests; the real-GPU
# tests (label gpu) skip without a GPU. The Release suite includes the 4-rank MPI test (label mpi,
# built where MPI is found); the sanitizer and fuzzing builds leave MPI out (-DFASTDCP_WITH_MPI=OFF:
# Open MPI is not instrumented). Set FASTDCP_QUICK=1 to skip the sanitizer builds.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh

run_suite() {  # run_suite NAME BUILD_DIR CTEST_ARGS... -- CMAKE_ARGS...
  local name="$1" dir="$2"
  shift 2
  local ctest_args=()
  while [ "$1" != "--" ]; do ctest_args+=("$1"); shift; done
  shift
  echo "=== fastdcp tests: $name ==="
  bash scripts/build.sh "$dir" -DFASTDCP_BUILD_BENCHMARKS=OFF -DFASTDCP_BUILD_EXAMPLES=OFF "$@"
  (cd "$dir" && ctest --output-on-failure "${ctest_args[@]}")
}

# The Python package, built by pip from the same CMake project into a virtual environment
# (scripts/python_env.sh), and its pytest suite (against torch 2.13.0, the CPU build).
python_suite() {
  echo "=== fastdcp tests: python ==="
  bash scripts/python_env.sh
  # The checked-in type stubs of the native module match its bindings.
  bash scripts/update_stubs.sh --check
  # The differential test's C++ leg runs a program of the release build above, and the map_location
  # tests load its fake CUDA runtime.
  (cd tests/python && FASTDCP_CPP_API_ROUND_TRIP="$root/build/tests/test_cpp_api_round_trip" \
    FASTDCP_FAKE_CUDART="$root/build/tests/libfake_cudart.so" \
    ../../.venv/bin/python -m pytest -q -p no:cacheprovider .)
}

# The release build also compiles the benchmarks and examples, so that CI keeps them building.
run_suite release build -- -DCMAKE_BUILD_TYPE=Release -DFASTDCP_BUILD_BENCHMARKS=ON -DFASTDCP_BUILD_EXAMPLES=ON
python_suite
if [ "${FASTDCP_QUICK:-0}" != "1" ]; then
  # The sanitizer runs use only the fake CUDA runtime: the real libcudart is not instrumented.
  export FASTDCP_DISABLE_CUDA=1
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ASAN_OPTIONS=detect_leaks=1 \
    run_suite "address+undefined sanitizers" build-asan -LE gpu -- \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DFASTDCP_SANITIZE=address;undefined" -DFASTDCP_WITH_MPI=OFF
  TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
    run_suite "thread sanitizer" build-tsan -L "tensor|staging|memory|common|io|storage|checkpoint" -- \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFASTDCP_SANITIZE=thread -DFASTDCP_WITH_MPI=OFF
  # libFuzzer (clang) on the checkpoint header and manifest parsers, for a bounded time.
  echo "=== fastdcp tests: fuzzing the checkpoint metadata parsers (${FASTDCP_FUZZ_SECONDS:-60} s) ==="
  bash scripts/build.sh build-fuzz -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DFASTDCP_BUILD_FUZZERS=ON -DFASTDCP_BUILD_TESTS=OFF -DFASTDCP_BUILD_BENCHMARKS=OFF \
    -DFASTDCP_BUILD_EXAMPLES=OFF -DFASTDCP_BUILD_CLI=OFF -DFASTDCP_WITH_MPI=OFF
  rm -rf build-fuzz/corpus && cp -r fuzz/corpus build-fuzz/corpus
  # Progress lines (NEW/REDUCE/pulse) are dropped; findings and the final stats are shown.
  (cd build-fuzz && ./fuzz/fuzz_checkpoint_metadata -max_total_time="${FASTDCP_FUZZ_SECONDS:-60}" \
    -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 corpus 2>&1 | grep -vE '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)')
  # The whole reader: rank files loaded every way and verified (fuzz/README.md).
  echo "=== fastdcp tests: fuzzing the whole reader (${FASTDCP_FUZZ_SECONDS:-60} s) ==="
  rm -rf build-fuzz/corpus_reader && cp -r fuzz/corpus_reader build-fuzz/corpus_reader
  (cd build-fuzz && ./fuzz/fuzz_reader -max_total_time="${FASTDCP_FUZZ_SECONDS:-60}" -max_len=200000 \
    -rss_limit_mb=4096 -timeout=30 -print_final_stats=1 corpus_reader 2>&1 |
    grep -vE '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)')
fi
echo "fastdcp: all test suites passed"
