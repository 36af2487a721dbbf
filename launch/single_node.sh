#!/usr/bin/env bash
# Train on every GPU of this node: launch/single_node.sh [--config FILE] [section.key=value ...],
# options in any order. Without --config, configs/mnist_lenet.yaml. Paths are from the
# repository root. NPROC overrides the process count (default: the number of GPUs, or 1 without
# any, which then trains on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
config=configs/mnist_lenet.yaml  # unless the arguments name one
for arg in "$@"; do
  if [[ "$arg" == --config || "$arg" == --config=* ]]; then config=""; fi
done
exec "$PYTHON" -m pipeline.train --nproc-per-node="$NPROC" ${config:+--config "$config"} "$@"
