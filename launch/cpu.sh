#!/usr/bin/env bash
# Train on CPU: launch/cpu.sh [--config FILE] [section.key=value ...], options in any order.
# NPROC=1 (default) runs one plain process; NPROC=N starts N gloo ranks with torchrun.
# Without --config, configs/cpu.yaml. Paths are from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-1}
config=configs/cpu.yaml  # unless the arguments name one
for arg in "$@"; do
  if [[ "$arg" == --config || "$arg" == --config=* ]]; then config=""; fi
done
if [[ "$NPROC" == 1 ]]; then
  exec "$PYTHON" -m pipeline.train ${config:+--config "$config"} dist.device=cpu "$@"
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  -m pipeline.train ${config:+--config "$config"} dist.device=cpu "$@"
