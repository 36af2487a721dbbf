"""Rank, world and rendezvous address of a process started by SLURM's srun (no torchrun).

Maps SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID and the step's task and node lists to what the
process group needs, sets MASTER_ADDR/MASTER_PORT when the batch script has not, and fails
fast with one line on settings that would otherwise hang at the rendezvous.
"""

from __future__ import annotations

import os
import re
import socket

from pipeline.errors import DistributedError


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list, e.g. 'n[1-2],gpu[01,03-04]' -> ['n1', 'n2', ...]."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{width}d}")
    return hosts


def tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM's task-count list, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise DistributedError(f"cannot read SLURM task counts {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def detect(env: dict) -> dict | None:
    """The distributed identity of an srun task, or None when this is not an srun step."""
    if "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return None
    world = int(env["SLURM_STEP_NUM_TASKS"])
    if world <= 1:
        return None
    node_id = int(env.get("SLURM_NODEID", "0"))
    nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
    per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", str(world)))
    if len(per_node) != nodes or sum(per_node) != world:
        raise DistributedError(
            f"SLURM step has {world} tasks on {nodes} node(s) laid out as "
            f"{env.get('SLURM_STEP_TASKS_PER_NODE')}; use --ntasks-per-node so every node runs "
            "the same number of tasks"
        )
    if len(set(per_node)) != 1:
        raise DistributedError(
            f"SLURM tasks are not divisible by nodes ({per_node} tasks per node); use "
            "--ntasks-per-node so every node runs the same number of tasks"
        )
    local_world = per_node[node_id]
    gpus = env.get("CUDA_VISIBLE_DEVICES") or env.get("SLURM_STEP_GPUS") or ""
    n_gpus = len([g for g in gpus.split(",") if g.strip()])
    if n_gpus and local_world > n_gpus:
        raise DistributedError(
            f"SLURM starts {local_world} tasks on node {node_id} but it has {n_gpus} GPU(s); "
            "use --ntasks-per-node equal to --gpus-per-node"
        )
    master_addr = env.get("MASTER_ADDR")
    if not master_addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        hosts = expand_hostlist(nodelist)
        if not hosts:
            raise DistributedError("SLURM_JOB_NODELIST is empty; set MASTER_ADDR")
        master_addr = hosts[0]
    try:
        socket.getaddrinfo(master_addr, None)
    except OSError as e:
        raise DistributedError(
            f"the first host of the job, {master_addr!r}, does not resolve "
            "on this node; set MASTER_ADDR to an address all nodes reach"
        ) from e
    master_port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 10000)
    os.environ["MASTER_ADDR"] = master_addr
    os.environ["MASTER_PORT"] = master_port
    return {
        "rank": int(env["SLURM_PROCID"]),
        "local_rank": int(env.get("SLURM_LOCALID", "0")),
        "world_size": world,
        "local_world_size": local_world,
        "node_rank": node_id,
    }
