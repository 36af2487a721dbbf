#!/usr/bin/env bash
# Train on CPU: launch/cpu.sh [--config FILE] [key=value ...]
# NPROC=1 (default) runs one plain process; NPROC=N starts N gloo ranks with torchrun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-1}
args=("$@")
[[ " $* " == *" --config "* ]] || args=(--config configs/cpu.yaml "$@")
if [[ "$NPROC" == 1 ]]; then
  exec "$PYTHON" -m pipeline.train dist.device=cpu "${args[@]}"
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  -m pipeline.train dist.device=cpu "${args[@]}"
