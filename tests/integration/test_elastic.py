"""torchrun elastic membership changes, with real agents on this machine: two `torchrun
--nnodes=1:2` agents of one process each meet at a c10d rendezvous on 127.0.0.1. A node lost
mid-epoch leaves a world of 1 that continues from the newest checkpoint; a node lost after the
last checkpoint does not hold the survivor in torchrun's exit barrier; a node joining a world
of 1 makes it a world of 2. The commands are those of the README's "Elastic runs and faults"."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (
    REPO,
    TINY_ARGS,
    child_env,
    free_port,
    read_jsonl,
    train_entry,
    wait_for_steps,
)

# Short rendezvous timings for one machine (the README gives cluster values): a lost node is
# noticed after 3 missed heartbeats of 2 s, and a round closes 3 s after its last join.
RDZV_CONF = "last_call_timeout=3,keep_alive_interval=2,keep_alive_max_attempt=3"
AGENT_ENV = {
    # torch 2.13 shares the rendezvous store with the workers by default, and then a node
    # joining a running world waits forever for the new round's MASTER_ADDR (the rank-0 agent
    # does not publish it again): a restart on join needs this.
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    "LOGLEVEL": "INFO",  # the agents' log says how long each waited in the exit barrier
}
EXIT_BARRIER = re.compile(r"Done waiting for other agents\. Elapsed: ([0-9.]+) seconds")
AGENT_TIMEOUT = 420  # seconds for a whole job; the exit barrier alone would take 300


@pytest.fixture
def rendezvous(tmp_path):
    """A c10d rendezvous store on 127.0.0.1 that outlives either agent (as on a cluster where
    the endpoint's host stays up), so that the test may take down any node: the endpoint for
    `--rdzv-endpoint`, the agents join it with `is_host=false`."""
    port = free_port()
    code = (
        "import sys, time, torch.distributed as d\n"
        "s = d.TCPStore('127.0.0.1', int(sys.argv[1]), is_master=True, wait_for_workers=False)\n"
        "print('ready', flush=True)\n"
        "time.sleep(3600)\n"
    )
    store = subprocess.Popen(
        [sys.executable, "-c", code, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert store.stdout.readline().strip() == "ready"
        yield f"127.0.0.1:{port}"
    finally:
        store.kill()
        store.wait()


class Agents:
    """torchrun agents of one job (one process each), their output in files under `tmp`."""

    def __init__(self, tmp: Path, endpoint: str, args: list[str], faults: list[str] | None):
        self.tmp, self.endpoint, self.args, self.faults = tmp, endpoint, args, faults
        self.run_id = f"elastic-{os.getpid()}-{tmp.name}"
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> subprocess.Popen:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1:2",
            "--nproc_per_node=1",
            "--max-restarts=3",
            "--monitor-interval=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id}",
            f"--rdzv-conf={RDZV_CONF},is_host=false",
            *train_entry(self.args, self.faults),
        ]
        with open(self.log(name), "w") as out:
            self.procs[name] = subprocess.Popen(
                cmd, cwd=REPO, env=child_env(AGENT_ENV), stdout=out, stderr=out
            )
        return self.procs[name]

    def log(self, name: str) -> Path:
        return self.tmp / f"agent-{name}.log"

    def text(self, name: str) -> str:
        return self.log(name).read_text()

    def wait(self) -> dict[str, int]:
        """Every agent's exit code, once all have ended."""
        deadline = time.monotonic() + AGENT_TIMEOUT
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"agent {name} still running after {AGENT_TIMEOUT} s:\n{self.tail()}")
        return {name: proc.returncode for name, proc in self.procs.items()}

    def tail(self) -> str:
        return "\n".join(f"--- agent {n}:\n{self.text(n)[-4000:]}" for n in self.procs)

    def stop(self) -> None:
        """SIGTERM (the agent stops its workers), then SIGKILL for any still running."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=40)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def elastic_job(tmp: Path, endpoint: str, args: list[str], faults: list[str] | None = None):
    agents = Agents(tmp, endpoint, args, faults)
    try:
        yield agents
    finally:
        agents.stop()


def _exit_barrier_waits(log: str) -> list[float]:
    return [float(s) for s in EXIT_BARRIER.findall(log)]


def _mnist_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "configs/cpu.yaml",
        f"data.root={root}",
        f"train.run_dir={run_dir}",
        "tracking.mode=disabled",
        "data.download=false",
        "data.val_size=0",
        *extra,
    ]


def _lose_a_node(tmp: Path, endpoint: str, args: list[str], step: int) -> tuple[str, str]:
    """Agents a and b run `args`, in which rank 1 loses its node after `step` (0: at the end
    of the run): the logs of the agent that finished (exit 0) and of the one that was
    killed."""
    faults = ["--fail-rank", "1", "--fail-step", str(step), "--fail-agent"]
    with elastic_job(tmp, endpoint, args, faults) as job:
        job.start("a")
        job.start("b")
        codes = job.wait()
        assert sorted(codes.values()) == [-signal.SIGKILL, 0], (codes, job.tail())
        survivor = next(n for n, c in codes.items() if c == 0)
        lost = next(n for n in codes if n != survivor)
        return job.text(survivor), job.text(lost)


def test_a_node_lost_mid_epoch_leaves_a_world_of_one_that_finishes(
    mnist_root, tmp_path, rendezvous
):
    """Rank 1's node dies at step 250 of 937 (its agent and worker killed): the survivor's
    torchrun re-forms a world of 1, which resumes from the checkpoint of step 200 and reaches
    the accuracy of the configuration."""
    run_dir = tmp_path / "run"
    args = _mnist_args(
        mnist_root,
        run_dir,
        "train.epochs=1",
        "checkpoint.every_steps=100",
    )
    log, lost_log = _lose_a_node(tmp_path, rendezvous, args, 250)
    assert "fault: rank 1 and its torchrun agent exits at step 250" in lost_log
    assert "world 2 (torchrun, gloo)" in log and "world 1 (torchrun, gloo)" in log
    assert "resumed from" in log and "(epoch 1, step 200/937, global step 200)" in log
    assert "world 2 -> 1: the same global batch of 64 per step" in log
    (epoch,) = read_jsonl(run_dir / "metrics.jsonl")
    assert epoch["step"] == 937 and epoch["test_count"] == 10000
    assert epoch["test_accuracy"] >= 0.975, epoch  # 1 epoch of configs/cpu.yaml: 98-98.5%
    assert read_jsonl(run_dir / "steps.jsonl")[-1]["step"] == 937
    waits = _exit_barrier_waits(log)
    assert waits and max(waits) < 10, (waits, log[-3000:])


def test_a_node_lost_after_the_last_checkpoint_does_not_hold_the_survivor(
    tiny_mnist, tmp_path, rendezvous
):
    """Rank 1's node dies after the run's last checkpoint, before the ranks' final barrier.
    Without that barrier the survivor's worker would exit 0 and its agent wait 300 s in the
    exit barrier for the lost one; with it, the survivor's torchrun re-forms a world of 1, which
    finds the run finished."""
    run_dir = tmp_path / "run"
    args = [
        *TINY_ARGS,
        f"data.root={tiny_mnist}",
        f"train.run_dir={run_dir}",
    ]
    started = time.monotonic()
    log, _ = _lose_a_node(tmp_path, rendezvous, args, 0)
    elapsed = time.monotonic() - started
    assert "lost contact with a peer rank" in log  # the final barrier noticed the loss
    assert "nothing to do: the run in" in log and "world 1 (torchrun, gloo)" in log
    waits = _exit_barrier_waits(log)
    assert waits and max(waits) < 10, (waits, log[-3000:])
    assert elapsed < 200, elapsed  # far from the 300 s of the exit barrier


def test_a_node_joining_a_world_of_one_makes_it_a_world_of_two(mnist_root, tmp_path, rendezvous):
    """Agent a trains alone (a world of 1); agent b starts: a's torchrun stops its worker with
    SIGTERM (which saves a checkpoint at that step), and both continue as a world of 2."""
    run_dir = tmp_path / "run"
    # 10 ms of sleep a step: the world of 1 trains for 10 s or more, whatever this machine's
    # speed, while agent b starts and joins (a few seconds).
    args = _mnist_args(mnist_root, run_dir, "train.epochs=1")
    with elastic_job(tmp_path, rendezvous, args, ["--step-sleep", "0.01"]) as job:
        a = job.start("a")
        wait_for_steps(run_dir, a, job.log("a"))
        job.start("b")
        codes = job.wait()
        assert codes == {"a": 0, "b": 0}, (codes, job.tail())
        logs = job.text("a") + job.text("b")
    saved = re.search(r"stop requested \(SIGTERM\): saved a checkpoint at step (\d+)", logs)
    assert saved, logs[-4000:]
    step = int(saved.group(1))
    assert 0 < step < 937
    assert f"global step {step})" in logs and "world 1 -> 2: the same global batch" in logs
    (epoch,) = read_jsonl(run_dir / "metrics.jsonl")
    assert epoch["step"] == 937 and epoch["test_count"] == 10000
    assert epoch["test_accuracy"] >= 0.975, epoch  # 1 epoch of configs/cpu.yaml: 98-98.5%
    waits = _exit_barrier_waits(logs)
    assert len(waits) == 2 and max(waits) < 10, waits
