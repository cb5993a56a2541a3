#!/usr/bin/env bash
# The main job, set-up included: installs what is missing (scripts/setup.sh), makes .venv with
# torch and builds fastdcp into it (scripts/python_env.sh), then
#  1. examples/train_demo.py: trains a small transformer in PyTorch on CPU, checkpointing it
#     asynchronously every few steps, printing each save's blocking time beside the step time and
#     each commit's time and throughput; then restores the latest committed checkpoint into a fresh
#     model and optimizer and verifies it (tensors bit for bit, and the next step's loss);
#  2. examples/staging_demo (C++): the same with a Llama-shaped state in C++: fake training steps,
#     a save every few steps through fastdcp's native AsyncCheckpointer (staged in the background,
#     written by the fastdcp-writer process), then a load of the latest committed checkpoint,
#     verified byte for byte.
# Arguments go to train_demo.py (e.g. --steps 50 --every 10 --d-model 768 --layers 6; --help lists
# them); those after a "--" go to staging_demo instead (e.g. --gb 2 --steps 30 --every 5).
# FASTDCP_DEMO_DIR picks where the checkpoints are written (a fresh directory, removed afterwards).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

train_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do train_args+=("$1"); shift; done
if [ $# -gt 0 ]; then shift; fi  # the "--"

bash scripts/setup.sh
bash scripts/python_env.sh
echo "=== fastdcp demo: training a small transformer on CPU with asynchronous checkpoints ==="
.venv/bin/python examples/train_demo.py "${train_args[@]}"
case " ${train_args[*]} " in *" --help "* | *" -h "*) exit 0 ;; esac
echo
echo "=== fastdcp demo: the C++ staging example ==="
bash scripts/build.sh build-demo -DCMAKE_BUILD_TYPE=Release -DFASTDCP_BUILD_TESTS=OFF -DFASTDCP_BUILD_BENCHMARKS=OFF
exec build-demo/examples/staging_demo "$@"
