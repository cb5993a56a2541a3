#!/usr/bin/env bash
# scripts/build.sh DIR [cmake args...]: configures (Ninja) and builds fastdcp into DIR.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$1"
shift
cmake -S "$root" -B "$dir" -G Ninja "$@" >/dev/null
cmake --build "$dir" -j "${JOBS:-$(nproc)}"
