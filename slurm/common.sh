# shellcheck shell=bash
# common.sh - what the batch scripts in this folder share; sourced by them, not run.
#
# lenet_setup CONFIG [section.key=value ...]
#     Checks that it runs in a Slurm job and sets, for the job step:
#       PYTHON       the interpreter (environment, default python3: set it to a venv's python)
#       RUN_DIR      checkpoints and metrics: a train.run_dir=DIR among the overrides, else the
#                    environment's RUN_DIR, else runs/<job name>-<job id> (the job id survives
#                    a requeue, so a requeued job resumes in it)
#       TRAIN        the training arguments: -m pipeline.train --config CONFIG ...
#       TASKS        srun's task options for the nodes this run was given: --ntasks-per-node
#                    on each of them (a requeued job may get fewer nodes than it had, while
#                    srun's default, SLURM_NTASKS, keeps the count it was submitted with)
#       MASTER_ADDR  the first node of the allocation
#       MASTER_PORT  20000 + job id % 10000 unless set: two jobs on one node do not clash
#     and puts the project on PYTHONPATH, so the job may run in another directory (--chdir).
#     Overrides given to sbatch come after train.run_dir=$RUN_DIR, so they win.
#
# lenet_sweep_setup SWEEP.yaml
#     The same for an array task of slurm/sweep.sbatch: RUN_DIR is the run directory of the
#     task's point (SLURM_ARRAY_TASK_ID) and TRAIN runs that point (pipeline.sweep --point).
#
# lenet_run COMMAND...
#     Runs the job step (srun ...) and waits for it, handling the signals that end a job:
#       USR1  the warning before the time limit (#SBATCH --signal=B:USR1@SECONDS): the training
#             processes get SIGTERM through `scancel --signal` (torchrun forwards it to its
#             workers; SIGUSR1 would kill torchrun), save a checkpoint at the next step
#             boundary and exit; the job then requeues itself with `scontrol requeue` and,
#             restarted, resumes from that checkpoint.
#       TERM  the job is ending (scancel, time limit, preemption): the processes got SIGTERM
#             too and checkpoint if they have time; no requeue (Slurm decides).
#     A step that exits 75 (the pipeline's "checkpoint saved, run again to resume") is
#     requeued as well, e.g. after a --signal=USR1@SECONDS sent to the steps directly.
#     Never returns: exits 0 when the step succeeded or the job was requeued, else with the
#     step's status. Slurm logs the signalled step as "STEP ... CANCELLED", and torchrun logs
#     the SIGTERM as an error: both are expected on the way to a requeue.

lenet_log() { echo "[$(date +%T) job ${SLURM_JOB_ID:-?}] $*"; }

lenet_die() {
  echo "error: $*" >&2
  exit 2
}

_lenet_on_warning() {
  LENET_TRAPPED=1
  [ "$LENET_WARNED" = 0 ] || return 0
  LENET_WARNED=1
  if [ -n "$LENET_STEP" ]; then
    lenet_log "warning signal: asking the training processes to save a checkpoint and stop"
    scancel --signal=TERM "$SLURM_JOB_ID" || lenet_log "scancel --signal=TERM failed"
  fi
}

_lenet_on_term() {
  LENET_TRAPPED=1
  LENET_ENDING=1
  lenet_log "SIGTERM: the job is ending; the training processes save a checkpoint if they can"
}

_lenet_python() {
  [ -n "${SLURM_JOB_ID:-}" ] || lenet_die "not inside a Slurm job; submit this script with sbatch"
  PYTHON=${PYTHON:-python3}
  command -v "$PYTHON" >/dev/null ||
    lenet_die "PYTHON=$PYTHON not found on $(hostname); set PYTHON to the interpreter to use"
  export PYTHONPATH="$LENET_DIR${PYTHONPATH:+:$PYTHONPATH}"
}

lenet_setup() {
  _lenet_python
  if [ $# -lt 1 ] || [[ $1 == *=* ]]; then
    lenet_die "usage: sbatch slurm/SCRIPT.sbatch CONFIG.yaml [section.key=value ...]"
  fi
  [ -f "$1" ] || lenet_die "config file $1 not found (relative to $(pwd)); pass its path"
  RUN_DIR=${RUN_DIR:-runs/$SLURM_JOB_NAME-$SLURM_JOB_ID}
  local arg
  for arg in "${@:2}"; do # the overrides win: the log names the directory the run uses
    if [[ $arg == train.run_dir=* ]]; then RUN_DIR=${arg#train.run_dir=}; fi
  done
  # shellcheck disable=SC2034 # used by the batch scripts
  TRAIN=(-m pipeline.train --config "$1" "train.run_dir=$RUN_DIR" "${@:2}")
  _lenet_job
}

# lenet_sweep_setup SWEEP.yaml: the same, for the array task's point of a sweep; RUN_DIR is the
# point's own run directory (pipeline.sweep names it), TRAIN runs that point.
lenet_sweep_setup() {
  _lenet_python
  [ $# -eq 1 ] || lenet_die "usage: sbatch --array=0-N slurm/sweep.sbatch SWEEP.yaml"
  [ -n "${SLURM_ARRAY_TASK_ID:-}" ] ||
    lenet_die "not an array task: submit with python -m pipeline.sweep $1 --slurm"
  RUN_DIR=$("$PYTHON" -m pipeline.sweep "$1" --point "$SLURM_ARRAY_TASK_ID" --print-run-dir) ||
    lenet_die "no point $SLURM_ARRAY_TASK_ID in the sweep $1"
  # shellcheck disable=SC2034 # used by the batch scripts
  TRAIN=(-m pipeline.sweep "$1" --point "$SLURM_ARRAY_TASK_ID")
  _lenet_job
}

_lenet_job() {
  TASKS=()
  if [[ ${SLURM_NTASKS_PER_NODE:-} =~ ^[0-9]+$ ]]; then
    # shellcheck disable=SC2034 # used by the batch scripts
    TASKS=(--nodes="$SLURM_NNODES" --ntasks="$((SLURM_NNODES * SLURM_NTASKS_PER_NODE))"
      --ntasks-per-node="$SLURM_NTASKS_PER_NODE")
  fi

  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
  export MASTER_ADDR MASTER_PORT

  LENET_WARNED=0 LENET_ENDING=0 LENET_TRAPPED=0 LENET_STEP=""
  trap _lenet_on_warning USR1
  trap _lenet_on_term TERM
  lenet_log "$SLURM_JOB_NAME (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_NNODES} node(s)" \
    "$SLURM_JOB_NODELIST; run dir $RUN_DIR; rendezvous $MASTER_ADDR:$MASTER_PORT"
}

lenet_run() {
  local rc=0
  if [ "$LENET_WARNED" = 0 ]; then
    lenet_log "step: $*"
    "$@" &
    LENET_STEP=$!
    while :; do
      LENET_TRAPPED=0
      rc=0
      wait "$LENET_STEP" || rc=$?
      # A trapped signal interrupts `wait` (status > 128) while the step runs on: wait again.
      if [ "$LENET_TRAPPED" = 0 ] || [ "$rc" -le 128 ]; then break; fi
    done
    LENET_STEP=""
    if [ "$rc" = 0 ]; then
      lenet_log "step finished"
      exit 0
    fi
  else
    rc=75 # warned before the step started: nothing to stop
  fi
  if [ "$LENET_ENDING" = 0 ] && { [ "$LENET_WARNED" = 1 ] || [ "$rc" = 75 ]; }; then
    lenet_log "step stopped (exit $rc); requeueing to resume from the newest checkpoint" \
      "in $RUN_DIR"
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    lenet_log "requeue refused (submitted with --no-requeue?); to resume, submit again" \
      "with RUN_DIR=$RUN_DIR"
    exit 75
  fi
  lenet_log "step failed (exit $rc)"
  exit "$rc"
}
