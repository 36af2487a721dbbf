"""Rank, world and rendezvous address of a process started by SLURM's srun (no torchrun).

`detect(env)` maps the step's SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_STEP_NUM_TASKS,
SLURM_STEP_TASKS_PER_NODE and SLURM_STEP_NODELIST to what the process group needs, and exports
MASTER_ADDR (the step's first host) and MASTER_PORT (20000 + SLURM_JOB_ID % 10000, so that two
jobs on one node do not clash) unless the batch script set them. Settings that would otherwise
hang at the rendezvous or fail later on one rank (uneven tasks per node, more tasks on a node
than GPUs, a first host that does not resolve) fail at once with one line that says what to do.
"""

from __future__ import annotations

import os
import re
import socket

from pipeline.errors import DistributedError

PORT_BASE, PORT_SPAN = 20000, 10000
# One host pattern, e.g. "gpu[01-04,07]-ib"; a host list is such patterns joined by commas.
_HOST = r"(?:[^,\[\]]+|\[[^\[\]]*\])+"
_HOSTLIST = re.compile(rf"{_HOST}(?:,{_HOST})*")


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    """'01,03-04' -> ['01', '03', '04'] (zero padding kept)."""
    out: list[str] = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise DistributedError(
                f"cannot read the SLURM host list {nodelist!r}; set MASTER_ADDR to the first "
                "host of the job"
            )
        out += [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list, e.g. 'n[1-2],gpu[01,03-04]' -> ['n1', 'n2', ...]."""
    if not _HOSTLIST.fullmatch(nodelist):
        raise DistributedError(
            f"cannot read the SLURM host list {nodelist!r}; set MASTER_ADDR to the first host "
            "of the job"
        )
    hosts: list[str] = []
    for item in re.findall(_HOST, nodelist):
        names = [""]
        for text, ranges in re.findall(r"([^\[]+)|\[([^\]]*)\]", item):
            if text:
                names = [name + text for name in names]
            else:
                names = [name + n for name in names for n in _expand_ranges(ranges, nodelist)]
        hosts += names
    return hosts


def tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM's task-count list, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise DistributedError(f"cannot read the SLURM task counts {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def visible_gpus(env: dict) -> int:
    """GPUs this task may use: CUDA_VISIBLE_DEVICES, else the step's GPUs; 0 when none."""
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS"):
        value = env.get(name)
        if value is not None:
            # Device indices, GPU-/MIG- UUIDs; SLURM writes "NoDevFiles" where there are none.
            return len([d for d in value.split(",") if re.fullmatch(r"\d+|GPU-.+|MIG-.+", d)])
    return 0


def _int(env: dict, name: str, default: int | None = None) -> int:
    if default is None and not env.get(name, "").strip():
        raise DistributedError(
            f"SLURM variable {name} is not set; start the tasks with srun and leave the SLURM_* "
            "variables as srun sets them"
        )
    try:
        return env_int(name, default or 0, env)
    except ValueError as e:
        raise DistributedError(
            f"SLURM {e}; start the tasks with srun and leave the SLURM_* variables as srun "
            "sets them"
        ) from None


def rendezvous(env: dict) -> tuple[str, str]:
    """MASTER_ADDR and MASTER_PORT for an srun step: set ones win, else derived from SLURM."""
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        if not nodelist:
            raise DistributedError(
                "SLURM_STEP_NODELIST and SLURM_JOB_NODELIST are empty; set MASTER_ADDR to "
                "the first host of the job"
            )
        addr = expand_hostlist(nodelist)[0]
    try:
        socket.getaddrinfo(addr, None)
    except OSError as e:
        raise DistributedError(
            f"the job's first host {addr!r} does not resolve on {socket.gethostname()}; set "
            "MASTER_ADDR to an address of that host that every node can reach"
        ) from e
    port = env.get("MASTER_PORT") or str(PORT_BASE + _int(env, "SLURM_JOB_ID", 0) % PORT_SPAN)
    return addr, port


def detect(env: dict) -> dict | None:
    """The distributed identity of an srun task, or None when this is not a multi-task step.

    Returns rank, local_rank, world_size, local_world_size and node_rank, and exports
    MASTER_ADDR and MASTER_PORT for the process group's env:// rendezvous.
    """
    if "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return None  # not an srun task (a batch script itself, salloc, or no SLURM at all)
    world = _int(env, "SLURM_STEP_NUM_TASKS")
    if world <= 1:
        return None
    node = _int(env, "SLURM_NODEID", 0)
    nodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", 1))
    layout = env.get("SLURM_STEP_TASKS_PER_NODE", str(world))
    per_node = tasks_per_node(layout)
    if len(per_node) != nodes or sum(per_node) != world or not 0 <= node < nodes:
        raise DistributedError(
            f"SLURM step of {world} tasks on {nodes} node(s) has tasks per node {layout!r} and "
            f"node id {node}, which do not add up; start the tasks with srun in a job "
            "submitted with --ntasks-per-node"
        )
    if len(set(per_node)) != 1:
        counts = ",".join(map(str, per_node))
        raise DistributedError(
            f"SLURM started {world} tasks on {nodes} nodes ({counts} per node): tasks are not "
            "divisible by nodes; use --ntasks-per-node so that every node runs as many tasks"
        )
    local_world = per_node[node]
    gpus = visible_gpus(env)
    if gpus and local_world > gpus:
        raise DistributedError(
            f"SLURM starts {local_world} tasks on node {node} but they see {gpus} GPU(s); "
            "use --ntasks-per-node equal to --gpus-per-node (and no --gpus-per-task or "
            "--gpu-bind, so that every task sees all GPUs of its node)"
        )
    addr, port = rendezvous(env)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port
    return {
        "rank": _int(env, "SLURM_PROCID"),
        "local_rank": _int(env, "SLURM_LOCALID", 0),
        "world_size": world,
        "local_world_size": local_world,
        "node_rank": node,
    }


def env_int(name: str, default: int, env: dict | None = None) -> int:
    """An integer environment variable; `default` where it is unset or empty. A value that is
    not an integer raises ValueError naming the variable."""
    value = (os.environ if env is None else env).get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
