"""A sweep as a SLURM job array on the local test cluster (slurm/sweep.sbatch through
`python -m pipeline.sweep FILE --slurm`): three points, one task per point in its own run
directory; one task warned before its time limit checkpoints, requeues itself alone, resumes and
ends with the parameters of an uninterrupted run of its point; the other tasks are untouched."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import torch
from test_slurm import Job, cluster  # noqa: F401 - the session's test cluster

from pipeline.sweeps import spec

from helpers import REPO, final_model, read_jsonl

STEPS = 200


def test_a_warned_array_task_requeues_alone_and_resumes_exactly(cluster, mnist_root, tmp_path):  # noqa: F811
    cluster.up(1)
    work = tmp_path / "work"
    work.mkdir()
    sweep_file = tmp_path / "three.yaml"
    sweep_file.write_text(
        "base: cpu\n"
        f"overrides: {{data.root: {mnist_root}, data.download: false, train.max_steps: {STEPS}, "
        "train.log_every: 10, tracking.mode: disabled}\n"
        "grid: {optim.lr: [0.02, 0.05, 0.1]}\n"
    )
    name = cluster.job_name("sweep.sbatch")
    submitted = subprocess.run(
        [sys.executable, "-m", "pipeline.sweep", str(sweep_file), "--slurm", "--max-running", "3",
         "--", f"--chdir={work}", "--cpus-per-task=1", f"--job-name={name}"],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    array = re.search(r"as job array (\d+)", submitted.stdout).group(1)
    tasks = [Job(f"{array}_{i}", name, work, cluster.env) for i in range(3)]
    points = spec.load(sweep_file).points

    # Warn task 1 once its point trains (its first steps logged), as --signal=B:USR1 would.
    steps = work / points[1].run_dir / "steps.jsonl"
    deadline = time.monotonic() + 300
    while not (steps.exists() and steps.stat().st_size):
        assert tasks[1].show().get("JobState") in ("PENDING", "RUNNING"), tasks[1].why()
        assert time.monotonic() < deadline, tasks[1].why()
        time.sleep(0.05)
    cluster.run("scancel", "--signal=USR1", "--batch", tasks[1].id)
    cluster.wait(*tasks, timeout=600, hurry_requeue=True)

    for i, task in enumerate(tasks):
        info = task.show()
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), task.why()
        assert info["Restarts"] == ("1" if i == 1 else "0"), task.why()
        records = read_jsonl(work / points[i].run_dir / "metrics.jsonl")
        assert [r["step"] for r in records] == [STEPS], task.why()
        assert (i == 1) == ("requeueing" in task.log), task.why()
    saved = re.search(r"stop requested \(SIGTERM\): saved a checkpoint at step (\d+)", tasks[1].log)
    assert saved and int(saved.group(1)) < STEPS, tasks[1].why()
    assert f"resumed from {points[1].run_dir}/" in tasks[1].log, tasks[1].why()

    # The uninterrupted run of point 1, with the thread count of the array's tasks.
    twin = tmp_path / "twin"
    args = [a for a in points[1].args if not a.startswith("train.run_dir=")]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", *args, f"train.run_dir={twin}"],
        cwd=work, env={**cluster.env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = final_model(work / points[1].run_dir), final_model(twin)
    assert all(torch.equal(got[k], want[k]) for k in want), "the resumed point differs"
