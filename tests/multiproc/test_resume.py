"""Exact resume and surviving faults, on real processes (gloo on CPU): a run stopped and resumed
ends bit for bit where the uninterrupted one does (1 and 2 ranks, a rank killed under torchrun,
SIGTERM); a checkpoint resumes on another world size (and another train.grad_accum) with the
same global batches at the same steps, ending where an uninterrupted run does up to the order of
float sums, while what really changes the run is refused with one line; a non-finite loss and a
hanging peer end the job with their documented exit codes."""

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from pipeline.errors import EXIT_CHECKPOINT, EXIT_DISTRIBUTED, EXIT_NONFINITE, EXIT_PREEMPTED
from pipeline.training import checkpoint

from helpers import (
    REPO,
    TINY_ARGS,
    assert_ok,
    child_env,
    final_model,
    free_port,
    max_diff,
    run_pipeline,
    run_ranks,
    train_entry,
    train_here,
)

STEPS_PER_EPOCH = 16  # tiny_mnist: 512 images at a global batch of 32


def _args(tiny_mnist, run_dir, *extra):
    return [
        *TINY_ARGS,
        f"data.root={tiny_mnist}",
        f"train.run_dir={run_dir}",
        "train.epochs=2",
        "optim.schedule=cosine",
        "optim.warmup_epochs=0.5",
        "checkpoint.every_steps=5",
        *extra,
    ]


def _assert_same(a_dir, b_dir):
    a, b = final_model(a_dir), final_model(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def straight(tiny_mnist, tmp_path_factory) -> dict[int, Path]:
    """The uninterrupted runs the interrupted ones must equal, bit for bit, by world size: each
    trained once for the module (a checkpoint's cadence does not change what is trained)."""
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = tmp_path_factory.mktemp("straight") / f"world{nproc}"
        assert_ok(run_ranks(_args(tiny_mnist, runs[nproc]), nproc))
    return runs


@pytest.mark.parametrize("nproc", [1, 2])
def test_stop_and_resume_is_bitwise_identical(tiny_mnist, tmp_path, nproc, straight):
    # Two separate processes reaching the same bits also shows that a run is reproducible.
    resumed = tmp_path / "resumed"
    # Stop mid-epoch 1 at step 11 (one after a periodic checkpoint), then run to the end.
    assert_ok(run_pipeline(_args(tiny_mnist, resumed, "train.max_steps=11"), nproc=nproc))
    proc = run_pipeline(_args(tiny_mnist, resumed), nproc=nproc)
    assert_ok(proc)
    assert "resumed from" in proc.stdout and "global step 11" in proc.stdout
    _assert_same(straight[nproc], resumed)


def test_rank_killed_under_torchrun_restarts_and_resumes(tiny_mnist, tmp_path, straight):
    faulty = tmp_path / "faulty"
    proc = run_pipeline(
        _args(tiny_mnist, faulty),
        nproc=2,
        extra_launcher_args=["--max-restarts=1"],
        timeout=240,
        faults=["--fail-rank", "1", "--fail-step", "13"],
    )
    assert_ok(proc)
    assert "fault: rank 1 exits at step 13" in proc.stderr
    assert f"resumed from {faulty / checkpoint.checkpoint_name(10)}" in proc.stdout
    _assert_same(straight[2], faulty)


# -- another world size ---------------------------------------------------------------------

STOP_AT = 12  # mid-epoch 1


def _losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def control(tiny_mnist, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run with a learning rate 10% lower: what a real difference in
    training looks like, beside the float-order one between world sizes."""
    run_dir = tmp_path_factory.mktemp("control") / "run"
    assert_ok(run_pipeline(_args(tiny_mnist, run_dir, "optim.lr=0.045"), nproc=2))
    return run_dir


@pytest.mark.parametrize(
    "before, after",
    [((2, "train.grad_accum=1"), (1, "train.grad_accum=2")), ((1, "train.grad_accum=1"), (2,))],
    ids=["2 ranks -> 1 rank x 2 micro-steps", "1 rank -> 2 ranks"],
)
def test_a_checkpoint_resumes_on_another_world_size(
    tiny_mnist, tmp_path, straight, control, before, after
):
    run_dir = tmp_path / "run"
    (n0, *extra0), (n1, *extra1) = before, after
    assert_ok(
        run_pipeline(_args(tiny_mnist, run_dir, f"train.max_steps={STOP_AT}", *extra0), nproc=n0)
    )
    resumed = run_pipeline(_args(tiny_mnist, run_dir, *extra1), nproc=n1)
    assert_ok(resumed)
    assert f"global step {STOP_AT})" in resumed.stdout
    assert f"world {n0} -> {n1}" in resumed.stdout

    reference, other_split = straight[2], straight[1]
    ours, theirs = _losses(run_dir), _losses(reference)

    def loss_gap(a: dict) -> float:
        return max(abs(a[s] - theirs[s]) for s in ours)

    # The same optimizer steps, and the same samples in each: the losses agree step by step,
    # as closely as an uninterrupted run on another number of ranks does (float sums in
    # another order drift apart over the steps, more on some CPUs than on others).
    assert sorted(ours) == sorted(theirs)
    float_order = loss_gap(_losses(other_split))
    gap, control_gap = loss_gap(ours), loss_gap(_losses(control))
    assert gap <= max(1e-4, 3 * float_order) < control_gap / 10, (gap, float_order, control_gap)
    # The parameters end equal up to float sums in another order; a control run is far off.
    diff = max_diff(final_model(run_dir), final_model(reference))
    float_diff = max_diff(final_model(other_split), final_model(reference))
    control_diff = max_diff(final_model(control), final_model(reference))
    assert diff <= max(1e-4, 3 * float_diff) < control_diff / 10, (diff, float_diff, control_diff)
    # The epoch summary counts every image once across the change.
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in epochs] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


def test_what_changes_the_run_is_still_refused_with_one_line(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    assert_ok(run_pipeline(_args(tiny_mnist, run_dir, f"train.max_steps={STOP_AT}"), nproc=2))
    proc = train_here(_args(tiny_mnist, run_dir, "train.batch_size=64"))
    assert proc.returncode == EXIT_CHECKPOINT, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "train.batch_size=32" in line and "train.batch_size=64" in line
    assert "Traceback" not in proc.stderr


# -- signals, faults ---------------------------------------------------------------------------


@contextmanager
def _ranks(
    args, logs: Path, world=2, faults: list[str] | None = None
) -> Iterator[list[subprocess.Popen]]:
    """Start `world` training processes the way srun or torchrun's workers see the world.

    Rank r writes to `logs`/rank<r>.out and .err: files, not pipes, which nobody would read
    while the ranks run (a full pipe blocks its writer). Ranks still running when the block
    ends, by an assertion or a timeout, are killed.
    """
    logs.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    try:
        for rank in range(world):
            procs.append(_start_rank(args, rank, world, port, logs, faults))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL ends a stopped (SIGSTOP) process too
            p.wait()


def _start_rank(
    args, rank: int, world: int, port: str, logs: Path, faults: list[str] | None
) -> subprocess.Popen:
    env = child_env(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
    )
    # The child keeps its own copies of the descriptors; ours are closed on leaving the block.
    with open(logs / f"rank{rank}.out", "w") as out, open(logs / f"rank{rank}.err", "w") as err:
        return subprocess.Popen(
            [sys.executable, *train_entry(args, faults)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=err,
        )


def _output(logs: Path, rank: int, stream: str = "out") -> str:
    return (logs / f"rank{rank}.{stream}").read_text()


def _shown(logs: Path) -> str:
    """Every rank's output files (their ends), for assertion messages."""
    return "".join(
        f"\n--- {path}:\n{path.read_text()[-3000:]}" for path in sorted(logs.glob("rank*"))
    )


def _wait_for_training(run_dir, procs, logs: Path, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = run_dir / "steps.jsonl"
        if steps.exists() and steps.read_text().count("\n") >= 2:
            return
        if any(p.poll() is not None for p in procs):
            pytest.fail("training ended before the signal" + _shown(logs))
        time.sleep(0.05)
    pytest.fail("training did not start" + _shown(logs))


def test_sigterm_saves_exits_with_the_documented_code_and_rerun_completes(
    tiny_mnist, tmp_path, straight
):
    run_dir = tmp_path / "run"
    args = _args(tiny_mnist, run_dir, "checkpoint.every_steps=0")
    stopped, rerun = tmp_path / "logs-stopped", tmp_path / "logs-rerun"
    # Slowed to 0.2 s a step, so that the signal lands while the 32 steps are trained.
    with _ranks(args, stopped, faults=["--step-sleep", "0.2"]) as procs:
        _wait_for_training(run_dir, procs, stopped)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    assert codes == [EXIT_PREEMPTED] * 2, _shown(stopped)
    stop = "stop requested (SIGTERM): saved a checkpoint at step"
    assert stop in _output(stopped, 0), _shown(stopped)
    saved = checkpoint.load(checkpoint.list_checkpoints(run_dir)[0])
    assert 0 < saved["global_step"] < 2 * STEPS_PER_EPOCH
    with _ranks(args, rerun) as procs:
        codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], _shown(rerun)
    assert f"global step {saved['global_step']})" in _output(rerun, 0), _shown(rerun)
    _assert_same(straight[2], run_dir)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    proc = train_here(
        _args(
            tiny_mnist,
            run_dir,
            "optim.lr=1e6",
            "optim.schedule=none",
            "optim.warmup_epochs=0",
            "checkpoint.every_steps=1",
        )
    )
    assert proc.returncode == EXIT_NONFINITE, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite at or after step" in errors[0], proc.stderr
    found = checkpoint.list_checkpoints(run_dir)
    assert found, "the checkpoints written before the loss diverged are kept"
    for path in found:
        state = checkpoint.load(path)["model"]
        assert all(torch.isfinite(t).all() for t in state.values()), path
    step = int(errors[0].split("at or after step ")[1].split()[0])
    assert checkpoint.load(found[0])["global_step"] < step


def test_a_hanging_peer_ends_the_job_after_the_collective_timeout(tiny_mnist, tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    args = _args(
        tiny_mnist, run_dir, "train.epochs=200", "dist.timeout_s=5", "checkpoint.every_steps=0"
    )
    with _ranks(args, logs) as procs:  # leaving it kills the stopped rank 1
        _wait_for_training(run_dir, procs, logs)
        procs[1].send_signal(signal.SIGSTOP)  # rank 1 hangs
        started = time.monotonic()
        code = procs[0].wait(timeout=120)
        waited = time.monotonic() - started
    assert code == EXIT_DISTRIBUTED, _shown(logs)
    assert waited < 60, _shown(logs)
    err = _output(logs, 0, "err")
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "rank 0" in errors[0], _shown(logs)
