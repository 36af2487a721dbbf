#!/usr/bin/env bash
# Train on CPU: launch/cpu.sh [--config FILE] [section.key=value ...], options in any order.
# NPROC=1 (default) runs one plain process; NPROC=N starts N gloo ranks (torchrun's launcher,
# through `pipeline.train --nproc-per-node`). Without --config, configs/cpu.yaml. Paths are
# from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-1}
config=configs/cpu.yaml  # unless the arguments name one
for arg in "$@"; do
  if [[ "$arg" == --config || "$arg" == --config=* ]]; then config=""; fi
done
exec "$PYTHON" -m pipeline.train --nproc-per-node="$NPROC" ${config:+--config "$config"} \
  dist.device=cpu "$@"
