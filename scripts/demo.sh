#!/usr/bin/env bash
# The main job: builds fastdcp and runs the demo, which stages a model-sized state dict
# asynchronously while "training", verifies the staged copy, writes it as a committed checkpoint,
# loads it back and verifies that, printing blocking time and throughput. Arguments go to the demo
# (e.g. --gb 3 --steps 30 --every 5); FASTDCP_DEMO_DIR picks where the checkpoint is written.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
bash scripts/build.sh build-demo -DCMAKE_BUILD_TYPE=Release -DFASTDCP_BUILD_TESTS=OFF -DFASTDCP_BUILD_BENCHMARKS=OFF
exec build-demo/examples/staging_demo "$@"
