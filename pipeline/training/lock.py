"""One job per run directory: a lock taken at start and held for the whole run.

The lock is `run.lock` in the run directory (filelock: an flock(2) lock, which the OS drops when
its holder dies, however it dies); `run.lock.owner` says who holds it: host, pid, and the SLURM
job id or torchrun run id. A second job on the same directory stops at once naming the holder.
A lock whose holder is gone is taken over with a line saying so, unless the holder was an
earlier attempt of this same job (a torchrun restart, a SLURM requeue): that is the job taking
its own lock again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline.atomic import write_atomic
from pipeline.errors import RunDirError, describe

log = logging.getLogger(__name__)

LOCK, OWNER = "run.lock", "run.lock.owner"


def identity() -> dict:
    """Who this process is, as the lock records it."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "torchrun_run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def describe_holder(owner: dict) -> str:
    job = (
        f"SLURM job {owner['slurm_job_id']}"
        if owner.get("slurm_job_id")
        else f"torchrun run {owner['torchrun_run_id']}"
        if owner.get("torchrun_run_id")
        else "a plain process"
    )
    return f"{job}, pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}"


def same_job(a: dict, b: dict) -> bool:
    """Two attempts of one job: the same SLURM job, or the same torchrun run."""
    if a.get("slurm_job_id") or b.get("slurm_job_id"):
        return a.get("slurm_job_id") == b.get("slurm_job_id")
    return bool(a.get("torchrun_run_id")) and a.get("torchrun_run_id") == b.get("torchrun_run_id")


def _read_owner(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / OWNER).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Held:
    """A run directory's lock, held; `created`: the directory did not exist before."""

    run_dir: Path
    lock: FileLock
    created: bool


def acquire(run_dir: Path) -> Held:
    """Take the run directory's lock (creating the directory), or raise RunDirError naming the
    holder. The caller keeps it for the whole run, and gives it to `release` at the end."""
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(run_dir / LOCK, timeout=0)
        lock.acquire()
    except Timeout:
        owner = _read_owner(run_dir)
        holder = describe_holder(owner) if owner else "another job"
        raise RunDirError(
            f"run directory {run_dir} is in use by {holder}; wait for that job to end, or "
            "choose another train.run_dir"
        ) from None
    except OSError as e:
        raise RunDirError(
            f"cannot use run directory {run_dir}: {describe(e)}; choose a writable train.run_dir"
        ) from e
    me, previous = identity(), _read_owner(run_dir)
    if previous and not same_job(previous, me):
        log.info(
            f"took over the lock of {run_dir}: its holder ({describe_holder(previous)}) is gone"
        )
    try:
        write_atomic(run_dir / OWNER, json.dumps(me))
    except OSError as e:
        lock.release()
        raise RunDirError(
            f"cannot write in run directory {run_dir}: {describe(e)}; free space or choose "
            "another train.run_dir"
        ) from e
    return Held(run_dir, lock, created)


def release(held: Held | None) -> None:
    """Give the lock back at the end of the run, whatever the end; only a holder that died
    leaves its owner file behind. A directory this run created and left empty (a start that
    failed before writing anything) is removed."""
    if held is None or not held.lock.is_locked:
        return
    (held.run_dir / OWNER).unlink(missing_ok=True)
    unused = held.created and {p.name for p in held.run_dir.iterdir()} <= {LOCK}
    if unused:
        (held.run_dir / LOCK).unlink(missing_ok=True)
    held.lock.release()
    if unused:
        try:
            held.run_dir.rmdir()
        except OSError:
            pass  # something arrived meanwhile: keep it
