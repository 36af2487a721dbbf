"""srun tasks -> ranks (pipeline/dist/slurm.py), in this process: the mapping, and one clear line
per launch error. (The same errors from the command, and the batch scripts' run directory:
tests/multiproc/test_slurm.py.)"""

from __future__ import annotations

import os

import pytest

from pipeline.dist import group, slurm
from pipeline.errors import DistributedError

from helpers import step_env


@pytest.fixture(autouse=True)
def _no_rendezvous_env(monkeypatch):
    """detect() exports MASTER_ADDR/PORT: start each test without them and leave none behind."""
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def launch_error(env: dict) -> str:
    with pytest.raises(DistributedError) as caught:
        slurm.detect(env)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_every_task_of_two_nodes_gets_its_rank():
    found = [slurm.detect(step_env(p)) for p in range(4)]
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
    slurm.detect(step_env(3))
    assert os.environ["MASTER_ADDR"] == "localhost"
    assert os.environ["MASTER_PORT"] == "23456"  # 20000 + 123456 % 10000


def test_rendezvous_set_by_the_batch_script_wins():
    env = step_env(1, MASTER_ADDR="127.0.0.1", MASTER_PORT="29999", SLURM_STEP_NODELIST="x[1-2]")
    assert slurm.rendezvous(env) == ("127.0.0.1", "29999")


def test_dist_detect_builds_a_slurm_context():
    ctx = group.detect(step_env(2, CUDA_VISIBLE_DEVICES="0,1"))
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
    assert slurm.detect(env) is None


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
    assert slurm.expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("spec, counts", [("4", [4]), ("2(x3)", [2, 2, 2]), ("2(x2),1", [2, 2, 1])])
def test_task_counts_expand(spec, counts):
    assert slurm.tasks_per_node(spec) == counts


def test_more_tasks_on_a_node_than_gpus_fails_at_once():
    message = launch_error(step_env(0, CUDA_VISIBLE_DEVICES="0"))
    assert "2 tasks on node 0 but they see 1 GPU(s)" in message
    assert "--ntasks-per-node equal to --gpus-per-node" in message


def test_gpus_of_the_step_count_when_cuda_visible_devices_is_unset():
    message = launch_error(step_env(1, per_node=4, SLURM_STEP_GPUS="0,1"))
    assert "4 tasks on node 0 but they see 2 GPU(s)" in message


def test_a_cpu_job_has_no_gpu_limit():
    assert slurm.detect(step_env(0, per_node=4, CUDA_VISIBLE_DEVICES="NoDevFiles"))


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
