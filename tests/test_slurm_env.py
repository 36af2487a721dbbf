"""srun tasks -> ranks (pipeline/slurm_env.py): the mapping, and one clear line per launch error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline import dist, slurm_env
from pipeline.errors import EXIT_DISTRIBUTED, DistributedError

from conftest import REPO


@pytest.fixture(autouse=True)
def _no_rendezvous_env(monkeypatch):
    """detect() exports MASTER_ADDR/PORT: start each test without them and leave none behind."""
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def step_env(procid: int, nodes: int = 2, per_node: int = 2, **extra: str) -> dict:
    """The variables srun sets for task `procid` of a step with `per_node` tasks on each node."""
    node = procid // per_node
    return {
        "SLURM_JOB_ID": "123456",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % per_node),
        "SLURM_NODEID": str(node),
        "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
        "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})" if nodes > 1 else str(per_node),
        "SLURM_STEP_NODELIST": "localhost" if nodes == 1 else f"localhost,node[2-{nodes}]",
        **extra,
    }


def launch_error(env: dict) -> str:
    with pytest.raises(DistributedError) as caught:
        slurm_env.detect(env)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_every_task_of_two_nodes_gets_its_rank():
    found = [slurm_env.detect(step_env(p)) for p in range(4)]
    assert found == [
        {
            "rank": p,
            "local_rank": p % 2,
            "world_size": 4,
            "local_world_size": 2,
            "node_rank": p // 2,
        }
        for p in range(4)
    ]


def test_rendezvous_is_the_first_host_on_a_port_of_the_job():
    slurm_env.detect(step_env(3))
    assert os.environ["MASTER_ADDR"] == "localhost"
    assert os.environ["MASTER_PORT"] == "23456"  # 20000 + 123456 % 10000


def test_rendezvous_set_by_the_batch_script_wins():
    env = step_env(1, MASTER_ADDR="127.0.0.1", MASTER_PORT="29999", SLURM_STEP_NODELIST="x[1-2]")
    assert slurm_env.rendezvous(env) == ("127.0.0.1", "29999")


def test_dist_detect_builds_a_slurm_context():
    ctx = dist.detect(step_env(2, CUDA_VISIBLE_DEVICES="0,1"))
    assert (ctx.launcher, ctx.rank, ctx.local_rank, ctx.world_size, ctx.node_rank) == (
        "slurm",
        2,
        0,
        4,
        1,
    )


@pytest.mark.parametrize(
    "env",
    [
        {},  # no SLURM at all
        {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"},  # the batch script
        step_env(0, nodes=1, per_node=1),  # a one-task step: a plain single process
    ],
    ids=["no-slurm", "batch-script", "one-task"],
)
def test_not_an_srun_step_of_several_tasks(env):
    assert slurm_env.detect(env) is None


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("vm", ["vm"]),
        ("n[1-2]", ["n1", "n2"]),
        ("gpu[01,03-04],login", ["gpu01", "gpu03", "gpu04", "login"]),
        ("gpu[8-10]-ib", ["gpu8-ib", "gpu9-ib", "gpu10-ib"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ],
)
def test_host_lists_expand_like_scontrol_show_hostnames(nodelist, hosts):
    assert slurm_env.expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("spec, counts", [("4", [4]), ("2(x3)", [2, 2, 2]), ("2(x2),1", [2, 2, 1])])
def test_task_counts_expand(spec, counts):
    assert slurm_env.tasks_per_node(spec) == counts


def test_more_tasks_on_a_node_than_gpus_fails_at_once():
    message = launch_error(step_env(0, CUDA_VISIBLE_DEVICES="0"))
    assert "2 tasks on node 0 but they see 1 GPU(s)" in message
    assert "--ntasks-per-node equal to --gpus-per-node" in message


def test_gpus_of_the_step_count_when_cuda_visible_devices_is_unset():
    message = launch_error(step_env(1, per_node=4, SLURM_STEP_GPUS="0,1"))
    assert "4 tasks on node 0 but they see 2 GPU(s)" in message


def test_a_cpu_job_has_no_gpu_limit():
    assert slurm_env.detect(step_env(0, per_node=4, CUDA_VISIBLE_DEVICES="NoDevFiles"))


def test_tasks_not_divisible_by_nodes_fail_at_once():
    env = step_env(2, SLURM_STEP_NUM_TASKS="3", SLURM_STEP_TASKS_PER_NODE="2,1")
    message = launch_error(env)
    assert "3 tasks on 2 nodes (2,1 per node)" in message
    assert "not divisible by nodes; use --ntasks-per-node" in message


def test_a_first_host_that_does_not_resolve_fails_at_once():
    message = launch_error(step_env(0, SLURM_STEP_NODELIST="nosuchhost.invalid,localhost"))
    assert "first host 'nosuchhost.invalid' does not resolve" in message
    assert "set MASTER_ADDR" in message


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"SLURM_PROCID": "zero"}, "SLURM_PROCID='zero' is not an integer"),
        ({"SLURM_STEP_TASKS_PER_NODE": "2(x2"}, "cannot read the SLURM task counts '2(x2'"),
        ({"SLURM_STEP_NODELIST": "n[1-2"}, "cannot read the SLURM host list 'n[1-2'"),
        ({"SLURM_STEP_TASKS_PER_NODE": "2(x3)"}, "tasks per node '2(x3)'"),
    ],
    ids=["procid", "task-counts", "host-list", "layout"],
)
def test_unreadable_slurm_variables_fail_with_one_line(extra, expected):
    assert expected in launch_error(step_env(1, **extra))


def test_the_cli_reports_a_launch_error_in_one_line():
    """What a user sees in the job log: one line from rank 0, exit code 6, no traceback."""
    launcher = ("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    env.update(step_env(0, CUDA_VISIBLE_DEVICES="0"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "tracking.mode=disabled"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == EXIT_DISTRIBUTED, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: SLURM starts 2 tasks on node 0 but they see 1 GPU(s); use --ntasks-per-node "
        "equal to --gpus-per-node (and no --gpus-per-task or --gpu-bind, so that every task "
        "sees all GPUs of its node)"
    ], proc.stderr


def test_the_batch_scripts_name_the_run_directory_an_override_chose(tmp_path):
    """slurm/common.sh's RUN_DIR (its log lines, the requeue message) is the run's own: a
    train.run_dir among the overrides wins over the default runs/<job name>-<job id>."""
    script = (
        "set -euo pipefail\n"
        "export SLURM_JOB_ID=42 SLURM_JOB_NAME=lenet-srun SLURM_NNODES=1 "
        "SLURM_JOB_NODELIST=localhost\n"
        "scontrol() { echo localhost; }\n"  # the only Slurm command lenet_setup calls
        f"LENET_DIR={REPO}\n"
        "source slurm/common.sh\n"
        'lenet_setup configs/cpu.yaml "$@"\n'
        'echo "RUN_DIR=$RUN_DIR"\n'
    )

    def run_dir(*overrides: str) -> str:
        proc = subprocess.run(
            ["bash", "-c", script, "bash", *overrides],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().splitlines()[-1]

    assert run_dir("train.epochs=1") == "RUN_DIR=runs/lenet-srun-42"
    assert run_dir("train.run_dir=/scratch/me/run", "train.epochs=1") == "RUN_DIR=/scratch/me/run"
