#!/usr/bin/env bash
# The GPU measurements and checks of the project in one command, on one GPU machine:
#
#   bash bench/gpu.sh RESULTS_DIR     # at most 450 s of parts (TOTAL_S), then the summary
#   bash bench/gpu.sh --plan          # the parts, in order, with their time caps (no GPU needed)
#
# From a runner that copies this working tree to a GPU machine and returns a folder $OUT (data/
# is git-ignored, so the MNIST files travel by name), the exact call is:
#
#   carry=["data/MNIST/raw"]   command: bash bench/gpu.sh "$OUT"   timeout_s=480
#
# It runs in this working tree with python3 from PATH (a CUDA build of torch; nothing is
# installed or downloaded, W&B is off) and reads MNIST from DATA_ROOT (default data: the
# directory holding MNIST/raw). The parts, most valuable first (`--plan` lists them):
#   bench-fast_gpu  configs/fast_gpu.yaml's pipeline: img/s and train time to 98% and 99% test
#                   accuracy, mean of SEEDS (5) seeds, compilation apart; one compile cache for
#                   all seeds, so the first seed's first step is the cold compile
#   train           a plain configs/fast_gpu.yaml run from a cold compile cache, inductor's
#                   CUDA-graph log on: the graphs recorded and any skipped
#   pytest          tests/integration/test_cuda.py on this machine's torch (its quick
#                   benchmark test left out: the bench parts run the same code)
#   bench-baseline  the classic-data-path baseline of configs/fast_gpu.yaml, one quick run
#   torchrun        torchrun --nproc_per_node=1 -m pipeline.train --config mnist_lenet
# Each part runs under its own cap (FAST_S, TRAIN_S, PYTEST_S, BASELINE_S, TORCHRUN_S), all
# within TOTAL_S; a part that would start with less than 20 s left is skipped. RESULTS_DIR then
# holds three files: cuda.md (the summary: each part's outcome and time, the key numbers,
# times to accuracy in ms), cuda.json (the same numbers, full precision) and gpu-logs.tar.gz
# (every part's log and results, without checkpoints or compile caches). CI is unset for pytest:
# a test that needs more GPUs than this machine has skips. Exit 0 only when every part passed.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
SEEDS="${SEEDS:-5}"
FAST_S="${FAST_S:-170}" TRAIN_S="${TRAIN_S:-75}" PYTEST_S="${PYTEST_S:-125}"
BASELINE_S="${BASELINE_S:-35}" TORCHRUN_S="${TORCHRUN_S:-45}"
TOTAL_S="${TOTAL_S:-$((FAST_S + TRAIN_S + PYTEST_S + BASELINE_S + TORCHRUN_S))}"

if [ "${1:-}" = "--plan" ]; then
  printf 'bench/gpu.sh: these parts, in this order, each under its cap; %s s in all (TOTAL_S)\n' \
    "$TOTAL_S"
  printf '  %-15s %4s s  %s\n' \
    bench-fast_gpu "$FAST_S" "configs/fast_gpu.yaml: img/s, time to 98%/99% (mean of $SEEDS seeds)" \
    train "$TRAIN_S" "a plain configs/fast_gpu.yaml run, cold compile cache, CUDA-graph log" \
    pytest "$PYTEST_S" "tests/integration/test_cuda.py" \
    bench-baseline "$BASELINE_S" "the baseline of configs/fast_gpu.yaml, one quick run" \
    torchrun "$TORCHRUN_S" "torchrun --nproc_per_node=1 -m pipeline.train --config mnist_lenet"
  exit 0
fi

# Then a GPU, or one line and nothing else done.
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
  echo "error: usage: bash bench/gpu.sh RESULTS_DIR (or --plan)" >&2
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
WORK="$RESULTS_DIR/work"  # the parts' outputs, packed into gpu-logs.tar.gz at the end
mkdir -p "$WORK"
STATUS="$WORK/parts.tsv"
: >"$STATUS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MNIST_ROOT="$DATA_ROOT"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
DATA_ARGS=("data.root=$DATA_ROOT" data.download=false tracking.mode=disabled)
started=$SECONDS

# run_part NAME CAP_S COMMAND...: COMMAND under min(CAP_S, the time left), its output in
# WORK/NAME.log, its outcome in parts.tsv. SIGINT first, so that pytest and the benchmark
# print what they have; SIGKILL 10 s later.
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
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1 || rc=$?
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

# cuda.md and cuda.json from what the parts left in WORK, then WORK packed (without
# checkpoints) into gpu-logs.tar.gz.
finish() {
  "$PYTHON" - "$WORK" "$RESULTS_DIR" "$((SECONDS - started))" <<'EOF' || echo "gpu.sh: no summary" >&2
import json, platform, statistics, sys
from pathlib import Path

import torch

work, out, took = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])


def log(name, n=None):
    path = work / f"{name}.log"
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return lines if n is None else lines[-n:]


def bench(name):
    """The one record of a bench part's JSON, or None where the part wrote none."""
    found = sorted((work / name).glob("*.json")) if (work / name).is_dir() else []
    return json.loads(found[0].read_text())["records"][0] if found else None


def jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def run(name):
    """A training part's run directory: its summary and its epochs."""
    summary = work / name / "summary.json"
    epochs = [
        {k: r.get(k) for k in ("epoch", "test_accuracy", "val_accuracy", "images_per_s", "epoch_time_s")}
        for r in jsonl(work / name / "metrics.jsonl")
    ]
    return {
        "summary": json.loads(summary.read_text()) if summary.is_file() else None,
        "epochs": epochs,
        "lines": [x for x in log(name) if x.startswith(("first step", "lenet-ddp", "error"))],
    }


parts = [row.split("\t") for row in (work / "parts.tsv").read_text().splitlines() if row]
result = {
    "gpu": f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}",
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "python": platform.python_version(),
    "seconds": took,
    "parts": [dict(zip(("name", "outcome", "seconds", "exit"), p, strict=True)) for p in parts],
}
fast, base = bench("bench-fast_gpu"), bench("bench-baseline")
if fast:
    firsts = fast["first_step_s_runs"]
    result["fast_gpu"] = {
        "images_per_s": fast["images_per_s"],
        "images_per_s_runs": fast["images_per_s_runs"],
        "time_to_98_s": fast["time_to"]["98%"],
        "time_to_99_s": fast["time_to"]["99%"],
        "seeds": fast["seeds"],
        "evaluations": len(fast["eval_s"]),
        "first_step_cold_s": firsts[0],
        "first_step_warm_s": statistics.median(firsts[1:]) if len(firsts) > 1 else None,
        "accuracy_by_epoch": fast["accuracy"],
        "vs_baseline": fast["images_per_s"] / base["images_per_s"] if base else None,
    }
if base:
    result["baseline"] = {"images_per_s": base["images_per_s"], "steps": base["steps"]}
train = run("train")
graphs = log("train")
train["cuda_graphs_recorded"] = sum("Recording function" in x for x in graphs)
train["cuda_graphs_skipped"] = [x for x in graphs if "skipping cudagraphs" in x]
result["train"], result["torchrun"] = train, run("torchrun")
result["pytest"] = log("pytest", 1)
(out / "cuda.json").write_text(json.dumps(result, indent=1) + "\n")


def ms(v):
    return "not reached" if v is None else f"{v:.3f} s"


lines = [
    "# GPU checks (bench/gpu.sh)",
    "",
    f"{result['gpu']}, torch {result['torch']}, CUDA {result['cuda']}, python "
    f"{result['python']}; {took} s in all. Every number is in cuda.json; every log in "
    "gpu-logs.tar.gz.",
    "",
    "| part | outcome | seconds |",
    "|---|---|---|",
    *[f"| {p['name']} | {p['outcome']} ({p['exit']}) | {p['seconds']} |" for p in result["parts"]],
]
for name, outcome, _, _ in parts:
    if outcome != "ok" and name != "pytest":
        lines += ["", f"{name}: {outcome}; the end of {name}.log:", "", "```", *log(name, 8), "```"]
lines += ["", "## configs/fast_gpu.yaml, the pipeline (bench-fast_gpu)", ""]
f = result.get("fast_gpu")
if f:
    warm = f["first_step_warm_s"]
    lines += [
        f"- {f['images_per_s']:,.0f} train img/s (median over seeds {f['seeds']}; each: "
        + ", ".join(f"{v:,.0f}" for v in f["images_per_s_runs"]) + ")",
        f"- train time to 98% test accuracy: {ms(f['time_to_98_s'])}; to 99%: "
        f"{ms(f['time_to_99_s'])} (mean accuracy of the seeds, {f['evaluations']} evaluations; "
        "compilation and evaluation excluded)",
        f"- first step (compilation): {f['first_step_cold_s']:.2f} s cold (seed 0)"
        + (f", {warm:.2f} s with the compile cache filled (median of the others)" if warm else ""),
        "- test accuracy by epoch: " + " ".join(f"{a:.2%}" for a in f["accuracy_by_epoch"]),
    ]
    if f["vs_baseline"]:
        lines.append(f"- {f['vs_baseline']:.1f}x the baseline's img/s ({base['images_per_s']:,.0f})")
else:
    lines += ["No result (the part did not finish); the runs it finished:", ""]
    lines += [f"- {x}" for x in log("bench-fast_gpu") if x.startswith("[")]
lines += ["", "## configs/fast_gpu.yaml, one plain run (train)", ""]
lines += [f"- {x}" for x in train["lines"]]
lines.append(
    f"- CUDA graphs: {train['cuda_graphs_recorded']} recorded, "
    f"{len(train['cuda_graphs_skipped'])} skipped"
)
lines += [f"  - {x}" for x in train["cuda_graphs_skipped"][:5]]
for e in train["epochs"]:
    lines.append(
        f"- epoch {e['epoch']}: test accuracy {e['test_accuracy']:.2%}, "
        f"{e['images_per_s']:,.0f} img/s, {e['epoch_time_s']:.3f} s"
    )
lines += ["", "## tests/integration/test_cuda.py (pytest)", "", "```", *log("pytest", 30), "```"]
lines += ["", "## torchrun --nproc_per_node=1 -m pipeline.train --config mnist_lenet", ""]
s = result["torchrun"]["summary"]
lines += [f"- {x}" for x in result["torchrun"]["lines"]]
if s:
    lines.append(
        f"- test accuracy {s['test_accuracy']:.2%} ({s['test_of']}), {s['epochs']} epochs, "
        f"train time {s['train_time_s']:.1f} s"
    )
(out / "cuda.md").write_text("\n".join(lines) + "\n")
print(f"gpu.sh: wrote {out / 'cuda.md'} and {out / 'cuda.json'}")
EOF
  tar -czf "$RESULTS_DIR/gpu-logs.tar.gz" --exclude='*.pt' -C "$WORK" . && rm -rf "$WORK"
}
trap finish EXIT

run_part bench-fast_gpu "$FAST_S" "$PYTHON" -m pipeline.bench --device cuda --seeds "$SEEDS" \
  --only '^pipeline fast_gpu.yaml w1$' --data-root "$DATA_ROOT" --out "$WORK/bench-fast_gpu"

# A cold compile cache, as a first run of the recipe sees it; inductor's CUDA-graph log on.
cache=$(mktemp -d)
run_part train "$TRAIN_S" env TORCHINDUCTOR_CACHE_DIR="$cache" TORCH_LOGS=cudagraphs \
  "$PYTHON" -m pipeline.train --config configs/fast_gpu.yaml "${DATA_ARGS[@]}" \
  "train.run_dir=$WORK/train"
rm -rf "$cache"

run_part pytest "$PYTEST_S" env -u CI "$PYTHON" -m pytest -q -p no:cacheprovider --durations=0 \
  tests/integration/test_cuda.py --deselect tests/integration/test_cuda.py::test_quick_benchmark_on_cuda

run_part bench-baseline "$BASELINE_S" "$PYTHON" -m pipeline.bench --device cuda --quick \
  --only '^baseline fast_gpu.yaml w1$' --data-root "$DATA_ROOT" --out "$WORK/bench-baseline"

# torchrun is `python -m torch.distributed.run`: the same program, from this PYTHON.
run_part torchrun "$TORCHRUN_S" "$PYTHON" -m torch.distributed.run --nproc_per_node=1 \
  -m pipeline.train --config mnist_lenet "${DATA_ARGS[@]}" "train.run_dir=$WORK/torchrun"

# Exit status 0 only when every part ran and passed.
! grep -qv $'\tok\t' "$STATUS"
