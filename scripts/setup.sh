#!/usr/bin/env bash
# Installs what fastdcp needs to build and test, where it is missing: a C++20 compiler, CMake,
# Ninja, GoogleTest, Google Benchmark, nlohmann-json, ISA-L, liburing, simdjson, CLI11, clang 14 with
# libFuzzer, and OpenMPI (for the optional MPI barrier and its multi-rank test).
# Idempotent; needs root (or sudo) only to install.
set -euo pipefail

need_apt=()
command -v g++ >/dev/null || need_apt+=(g++)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v ninja >/dev/null || need_apt+=(ninja-build)
[ -f /usr/include/gtest/gtest.h ] || need_apt+=(libgtest-dev)
[ -f /usr/include/gmock/gmock.h ] || need_apt+=(libgmock-dev)
[ -f /usr/include/benchmark/benchmark.h ] || need_apt+=(libbenchmark-dev)
[ -f /usr/include/nlohmann/json.hpp ] || need_apt+=(nlohmann-json3-dev)
[ -f /usr/include/isa-l/crc.h ] || need_apt+=(libisal-dev)
[ -f /usr/include/liburing.h ] || need_apt+=(liburing-dev)
[ -f /usr/include/simdjson.h ] || need_apt+=(libsimdjson-dev)
[ -f /usr/include/CLI/CLI.hpp ] || need_apt+=(libcli11-dev)
command -v mpirun >/dev/null || need_apt+=(openmpi-bin)
[ -f /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] || need_apt+=(libopenmpi-dev)
command -v clang++-14 >/dev/null || need_apt+=(clang-14)
[ -e /usr/lib/llvm-14/lib/clang/14.0.6/lib/linux/libclang_rt.fuzzer-x86_64.a ] || need_apt+=(libclang-rt-14-dev)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "fastdcp setup: installing ${need_apt[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
