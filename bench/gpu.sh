#!/usr/bin/env bash
# The GPU checks and measurements of the project in one command, on one GPU machine:
#
#   bash bench/gpu.sh RESULTS_DIR
#
# Runs in this working tree with python3 from PATH (a CUDA build of torch installed; nothing is
# installed or downloaded, W&B is off) and writes everything into RESULTS_DIR:
#   pytest.log          python -m pytest -q tests/integration/test_cuda.py, without its quick-benchmark test
#                       (the benchmark parts below run the same code, in full)
#   train.log, train/   a plain configs/fast_gpu.yaml run, cold compile cache: its first step
#                       (compilation), epochs, accuracy, CUDA graphs recorded and skipped
#   bench-fast_gpu/     python -m pipeline.bench --device cuda --seeds $SEEDS --only fast_gpu
#   bench-mnist_lenet/  the same for configs/mnist_lenet.yaml, --quick (150 steps a case)
#   cuda.md             the summary: each part's status and time, and the numbers
#   *.log               each part's whole output
# Every part runs under its own timeout (PYTEST_S, TRAIN_S, BENCH_FAST_S, BENCH_LENET_S
# seconds), and all of them within TOTAL_S (default 390: the script ends within 7 minutes);
# a part that would start with less than 20 s left is skipped, and cuda.md says so.
#
# DATA_ROOT (default data, in the tree): the directory holding MNIST/raw. PYTHON (default
# python3): the interpreter. CI is unset for pytest: a test that needs more GPUs than this
# machine has skips (with CI=true it would fail).
set -euo pipefail

PYTHON="${PYTHON:-python3}"

# First of all: a GPU, or one line and nothing else done.
if ! why=$("$PYTHON" -c '
import sys
try:
    import torch
except Exception as e:
    sys.exit(f"{sys.executable} cannot import torch ({e})")
if not torch.cuda.is_available():
    build = "a CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
    sys.exit(f"torch {torch.__version__} ({build}) finds no GPU")
' 2>&1); then
  echo "error: bench/gpu.sh needs CUDA: ${why##*$'\n'}; run it on a GPU machine whose $PYTHON has a CUDA build of torch" >&2
  exit 1
fi

if [ $# -ne 1 ]; then
  echo "error: usage: bash bench/gpu.sh RESULTS_DIR" >&2
  exit 2
fi
case "$1" in
  /*) RESULTS_DIR="$1" ;;
  *) RESULTS_DIR="$PWD/$1" ;;
esac
cd "$(dirname "$0")/.."

DATA_ROOT="${DATA_ROOT:-data}"
if [ ! -d "$DATA_ROOT/MNIST/raw" ]; then
  echo "error: no MNIST at DATA_ROOT=$DATA_ROOT (no $DATA_ROOT/MNIST/raw); set DATA_ROOT to the directory holding MNIST/raw" >&2
  exit 3
fi
DATA_ROOT="$(cd "$DATA_ROOT" && pwd)"
TOTAL_S="${TOTAL_S:-390}"
SEEDS="${SEEDS:-5}"
mkdir -p "$RESULTS_DIR"
STATUS="$RESULTS_DIR/parts.tsv"
: >"$STATUS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MNIST_ROOT="$DATA_ROOT"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
started=$SECONDS

# run_part NAME CAP_S COMMAND...: COMMAND under min(CAP_S, the time left), its output in
# RESULTS_DIR/NAME.log, its outcome in parts.tsv. SIGINT first, so that pytest and the
# benchmark print what they have; SIGKILL 10 s later.
run_part() {
  local name=$1 cap=$2 left limit t0 rc=0 outcome
  shift 2
  left=$((TOTAL_S - (SECONDS - started)))
  limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    printf '%s\tskipped\t0\tno time left\n' "$name" >>"$STATUS"
    echo "gpu.sh: $name skipped (no time left)"
    return 0
  fi
  echo "gpu.sh: $name (at most $limit s) ..."
  t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$RESULTS_DIR/$name.log" 2>&1 || rc=$?
  if ((rc == 124 || rc == 137)); then
    outcome="timed out after $limit s"
  elif ((rc != 0)); then
    outcome="failed"
  else
    outcome="ok"
  fi
  printf '%s\t%s\t%s\texit %s\n' "$name" "$outcome" "$((SECONDS - t0))" "$rc" >>"$STATUS"
  echo "gpu.sh: $name: $outcome (exit $rc, $((SECONDS - t0)) s)"
}

summary() {
  "$PYTHON" - "$RESULTS_DIR" "$((SECONDS - started))" <<'EOF' || echo "gpu.sh: no summary" >&2
import json, platform, sys
from pathlib import Path

import torch

out, took = Path(sys.argv[1]), sys.argv[2]
lines = [
    "# GPU checks (bench/gpu.sh)",
    "",
    f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}, "
    f"CUDA {torch.version.cuda}, python {platform.python_version()}; {took} s in all.",
    "",
    "| part | outcome | seconds | log |",
    "|---|---|---|---|",
]
parts = [row.split("\t") for row in (out / "parts.tsv").read_text().splitlines() if row]
for name, outcome, seconds, code in parts:
    lines.append(f"| {name} | {outcome} ({code}) | {seconds} | {name}.log |")

def tail(name, n):
    path = out / f"{name}.log"
    return path.read_text(errors="replace").splitlines()[-n:] if path.is_file() else []

for name, outcome, _, _ in parts:
    if outcome != "ok" and name != "pytest":
        lines += ["", f"{name}: {outcome}; the end of {name}.log:", "", "```", *tail(name, 8), "```"]
lines += ["", "## tests/integration/test_cuda.py", "", "```", *tail("pytest", 30), "```"]
lines += ["", "## configs/fast_gpu.yaml, one plain run", ""]
train_log = tail("train", 100000)
lines += [f"- {x}" for x in train_log if x.startswith(("first step", "lenet-ddp", "error"))]
recorded = sum("Recording function" in x for x in train_log)
skipped = [x for x in train_log if "skipping cudagraphs" in x]
lines.append(f"- CUDA graphs: {recorded} recorded, {len(skipped)} skipped")
lines += [f"  - {x}" for x in skipped[:5]]
metrics = out / "train" / "metrics.jsonl"
if metrics.is_file():
    for rec in map(json.loads, metrics.read_text().splitlines()):
        lines.append(
            f"- epoch {rec['epoch']}: test accuracy {rec['test_accuracy']:.2%}, "
            f"{rec['images_per_s']:,.0f} img/s, {rec['epoch_time_s']:.2f} s"
        )
for name in ("bench-fast_gpu", "bench-mnist_lenet"):
    lines += ["", f"## {name}", ""]
    tables = sorted((out / name).glob("*.md")) if (out / name).is_dir() else []
    if tables:
        text = tables[0].read_text()
        lines += [f"From {name}/{tables[0].name}:", "", text[text.find("| case"):].strip()]
    else:  # cut short: the runs it printed
        lines += ["No table (the part did not finish); the runs it finished:", ""]
        lines += [f"- {x}" for x in tail(name, 200) if x.startswith("[")]
(out / "cuda.md").write_text("\n".join(lines) + "\n")
print(f"gpu.sh: wrote {out / 'cuda.md'}")
EOF
}
trap summary EXIT

PYTEST_S="${PYTEST_S:-150}" TRAIN_S="${TRAIN_S:-60}"
BENCH_FAST_S="${BENCH_FAST_S:-150}" BENCH_LENET_S="${BENCH_LENET_S:-50}"

run_part pytest "$PYTEST_S" env -u CI "$PYTHON" -m pytest -q -p no:cacheprovider --durations=0 \
  tests/integration/test_cuda.py --deselect tests/integration/test_cuda.py::test_quick_benchmark_on_cuda

# A cold compile cache, as a first run of the recipe sees it; inductor's CUDA-graph log on.
cache=$(mktemp -d)
run_part train "$TRAIN_S" env TORCHINDUCTOR_CACHE_DIR="$cache" TORCH_LOGS=cudagraphs \
  "$PYTHON" -m pipeline.train \
  --config configs/fast_gpu.yaml "data.root=$DATA_ROOT" data.download=false \
  "train.run_dir=$RESULTS_DIR/train" tracking.mode=disabled
rm -rf "$cache"

run_part bench-fast_gpu "$BENCH_FAST_S" "$PYTHON" -m pipeline.bench --device cuda \
  --seeds "$SEEDS" --only fast_gpu --data-root "$DATA_ROOT" --out "$RESULTS_DIR/bench-fast_gpu"

run_part bench-mnist_lenet "$BENCH_LENET_S" "$PYTHON" -m pipeline.bench --device cuda --quick \
  --only mnist_lenet --data-root "$DATA_ROOT" --out "$RESULTS_DIR/bench-mnist_lenet"

# Exit status 0 only when every part ran and passed.
! grep -qv $'\tok\t' "$STATUS"
