#!/usr/bin/env bash
# rho's GPU acceptance, one command: every check a first GPU must pass (kernel build and parity,
# FlashAttention, training and scoring speed against the targets, TP2/DP2 parity with two GPUs),
# each step time-bounded, all figures in OUT_DIR/gpu-acceptance.json. Under 10 minutes on one
# H100/H200; on a CPU it runs the same steps at toy sizes (--dry-run). See docs/train.md.
#
#   bash tests/gpu/run.sh [OUT_DIR]          # default OUT_DIR: gpu-acceptance
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-gpu-acceptance}"
python=${PYTHON:-python}
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: running the dry run (toy sizes, no GPU figure)" >&2
    exec timeout 600 "$python" tests/gpu/acceptance.py --out "$out" --budget 540 --dry-run
fi
exec timeout 600 "$python" tests/gpu/acceptance.py --out "$out" --budget 570
