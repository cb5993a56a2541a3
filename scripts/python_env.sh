#!/usr/bin/env bash
# Makes the virtual environment .venv (Python 3) where it is missing, installs torch 2.13.0 and
# what the Python package and its tests need, and builds and installs fastdcp into it with pip,
# from the same CMake project (without build isolation, so that the native torch module is built
# for the installed torch; incremental, in build-python/). Used by demo.sh and test.sh. nanobind is
# pinned: its stubgen wrote python/fastdcp/_C.pyi, which test.sh compares (scripts/update_stubs.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 numpy pytest hypothesis safetensors nanobind==3.1.0 "scikit-build-core>=0.10" cmake ninja matplotlib
.venv/bin/pip install -q --no-build-isolation .
