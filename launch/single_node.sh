#!/usr/bin/env bash
# Train on every GPU of this node: launch/single_node.sh [--config FILE] [key=value ...]
# NPROC overrides the process count (default: the number of GPUs, or 1 without any).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
args=("$@")
[[ " $* " == *" --config "* ]] || args=(--config configs/mnist_lenet.yaml "$@")
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  -m pipeline.train "${args[@]}"
