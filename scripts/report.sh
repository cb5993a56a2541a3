#!/usr/bin/env bash
# The performance report: staging, save, load and async checkpointing of fastdcp and of every peer
# (torch's _experimental stager and checkpointers, torch.distributed.checkpoint, torch.save,
# safetensors) beside the same-run hardware limits, across state-dict sizes and tensor counts.
# Rewrites the report section of docs/benchmarks.md and the plots in docs/plots/ (bench/report.py
# says how; about 45 minutes on a 2-core VM). Installs what it needs first, as the other scripts.
#   bash scripts/report.sh                 # the whole report
#   bash scripts/report.sh --quick         # tiny sizes, a few minutes: checks the harness
#   bash scripts/report.sh --max-gb 2      # caps the largest state dict (default: what fits)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
bash scripts/python_env.sh
exec .venv/bin/python bench/report.py "$@"
