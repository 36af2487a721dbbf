"""Who am I in the job, and the process group.

`detect` reads the launcher's environment (torchrun, SLURM's srun, or nothing for one plain
process) without starting anything, so the config can be validated against the world size first.
`init` starts the process group: a world of one still gets a real gloo group, and every control
collective below runs in it, so a laptop or CI run takes the same code path as a multi-node job.
(Only DDP's wrapper is left out at world 1: it would all-reduce each gradient with no peer.)
Every collective the project calls lives here, with the classification of a collective's
failure, so rank logic stays in one place.

Timeouts: the host-side control collectives (stop checks, checkpoint gathers, flags) wait
`dist.timeout_s`, and so does the host for the NCCL sums it reads back (`all_reduce_sum`: the
loss, evaluation); on GPUs the NCCL group's watchdog waits `NCCL_TIMEOUT_FACTOR` times longer.
A peer that stops responding is then met first by one of those, which fails with one line and
exit code 6, while NCCL's watchdog, which takes the whole process down (with
`TORCH_NCCL_ASYNC_ERROR_HANDLING` 1, torchrun's setting, or 3, torch's default), stays the
backstop for a rank that waits on the GPU anywhere else.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from pipeline.config.schema import DistConfig
from pipeline.dist.slurm import env_int
from pipeline.errors import DistributedError, PeerFailed, PipelineError, RankError, describe

T = TypeVar("T")
_timeout_s: float | None = None  # dist.timeout_s of the group `init` started, for messages
log = logging.getLogger(__name__)

NCCL_TIMEOUT_FACTOR = 2  # the NCCL group's timeout, in units of dist.timeout_s
_POLL_S = 1e-4  # how often the host looks whether an NCCL sum it waits for has finished
# Whether a collective of this process failed (`collective_failure`): `shutdown` then aborts
# the NCCL communicators, whose queued work would otherwise wait for the lost peer.
_broken = False


@dataclass
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    launcher: str = "single"  # single | torchrun | slurm
    device: torch.device = torch.device("cpu")
    backend: str = "gloo"
    control_group: object | None = None  # CPU (gloo) group for host-side flags

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_leader(self) -> bool:
        return self.local_rank == 0


def _int_env(env: dict, name: str, default: int = 0) -> int:
    try:
        return env_int(name, default, env)
    except ValueError as e:
        raise DistributedError(f"{e}; check how the job was launched") from None


def detect(env: dict | None = None) -> DistContext:
    """Read rank and world from torchrun's or SLURM's variables; start nothing."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        ctx = DistContext(
            rank=_int_env(env, "RANK"),
            local_rank=_int_env(env, "LOCAL_RANK"),
            world_size=_int_env(env, "WORLD_SIZE", 1),
            local_world_size=_int_env(env, "LOCAL_WORLD_SIZE", 1),
            node_rank=_int_env(env, "GROUP_RANK"),
            launcher="torchrun",
        )
    else:
        from pipeline.dist import slurm

        found = slurm.detect(env)
        if found is None:
            return DistContext()
        ctx = DistContext(launcher="slurm", **found)
    if not 0 <= ctx.rank < ctx.world_size or not 0 <= ctx.local_rank < ctx.local_world_size:
        raise DistributedError(
            f"inconsistent launch: rank {ctx.rank} of world {ctx.world_size}, "
            f"local rank {ctx.local_rank} of {ctx.local_world_size}; check the "
            "launcher's settings"
        )
    return ctx


def device_type(cfg: DistConfig) -> str:
    """ "cuda" or "cpu": the kind of device `init` will give this config, known before it runs."""
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return "cuda"


def unused_gpu_warning(
    cuda_available: bool, nvidia_smi: str | None, torch_version: str, torch_cuda: str | None
) -> str | None:
    """The warning for dist.device=auto training on CPU on a machine with NVIDIA GPUs (an
    `nvidia-smi` on PATH), or None. `torch_cuda`: `torch.version.cuda` (None: a CPU build)."""
    if cuda_available or nvidia_smi is None:
        return None
    if torch_cuda is None:
        why = (
            f"torch {torch_version} is a CPU build; install a CUDA build (launch/setup.sh "
            "prints how: TORCH_INDEX_URL)"
        )
    else:
        why = (
            f"torch {torch_version} (CUDA {torch_cuda}) finds no usable GPU; check nvidia-smi, "
            "the driver's CUDA version and CUDA_VISIBLE_DEVICES"
        )
    return (
        f"dist.device=auto trains on CPU although {nvidia_smi} is here: {why}; or set "
        "dist.device=cpu to train on CPU without this warning"
    )


def _choose_device(ctx: DistContext, want: str) -> torch.device:
    if want == "auto" and not torch.cuda.is_available():
        warning = unused_gpu_warning(
            False, shutil.which("nvidia-smi"), torch.__version__, torch.version.cuda
        )
        if warning and ctx.is_local_leader:  # once per node
            log.warning(warning)
        return torch.device("cpu")
    if want == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistributedError(
            "dist.device=cuda but CUDA is not available here; use dist.device=auto or cpu"
        )
    count = torch.cuda.device_count()
    if ctx.local_rank >= count:
        raise DistributedError(
            f"local rank {ctx.local_rank} has no GPU: this node shows {count} "
            f"GPU(s) for {ctx.local_world_size} process(es); start at most "
            f"{count} processes per node"
        )
    return torch.device("cuda", ctx.local_rank)


def init(ctx: DistContext, cfg: DistConfig) -> DistContext:
    """Pick the device and backend, and start the process group (world of one included)."""
    ctx.device = _choose_device(ctx, cfg.device)
    backend, timeout_s = cfg.backend, cfg.timeout_s
    ctx.backend = (
        backend if backend != "auto" else ("nccl" if ctx.device.type == "cuda" else "gloo")
    )
    if ctx.backend == "nccl" and ctx.device.type != "cuda":
        raise DistributedError("dist.backend=nccl needs CUDA devices; use dist.backend=gloo on CPU")
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    timeout, group_timeout = group_timeouts(ctx.backend, timeout_s)
    global _timeout_s
    _timeout_s = timeout_s
    kwargs = {"device_id": ctx.device} if ctx.backend == "nccl" else {}
    store = (
        dist.HashStore()  # no launcher: an in-process store, no port to pick or clash over
        if ctx.launcher == "single"
        else _rendezvous_store(ctx, timeout)
    )
    try:
        dist.init_process_group(
            ctx.backend,
            store=store,
            rank=ctx.rank,
            world_size=ctx.world_size,
            timeout=group_timeout,
            **kwargs,
        )
    except dist.DistBackendError as e:
        # With device_id, NCCL starts its communicator here: a failure of this rank's own GPU
        # is reported by this rank, whatever the main rank says.
        if not _local_nccl_failure(str(e)):
            raise
        err = collective_failure(e, timeout_s, starting=True)
        raise RankError(str(err)) from e
    # Host-side flags (stop requests, failures) travel over gloo so that they never wait
    # on the device stream.
    ctx.control_group = (
        dist.new_group(backend="gloo", timeout=timeout)
        if ctx.backend != "gloo"
        else dist.group.WORLD
    )
    return ctx


def group_timeouts(backend: str, timeout_s: float) -> tuple[timedelta, timedelta]:
    """(the control collectives' timeout, the training group's): dist.timeout_s for both on
    gloo; on NCCL the training group waits `NCCL_TIMEOUT_FACTOR` times longer, so that the
    control collectives meet a lost peer first (see the module's docstring)."""
    timeout = timedelta(seconds=timeout_s)
    return timeout, timeout * (NCCL_TIMEOUT_FACTOR if backend == "nccl" else 1)


def _rendezvous_store(ctx: DistContext, timeout: timedelta) -> dist.Store:
    """The TCP store at MASTER_ADDR:MASTER_PORT, with keys kept apart per torchrun restart.

    Under torchrun the agent hosts the store and keeps it across restarts of the worker group;
    without a per-attempt prefix, restarted workers can read their predecessors' addresses and
    fail to connect. Elsewhere (srun, plain env) rank 0 hosts it.
    """
    try:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError) as e:
        raise DistributedError(
            "MASTER_ADDR and MASTER_PORT must name the rendezvous host and port; launch with "
            "torchrun or srun, or set them"
        ) from e
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        host,
        port,
        ctx.world_size,
        is_master=ctx.rank == 0 and not agent_hosts,
        timeout=timeout,
        wait_for_workers=False,
    )
    return dist.PrefixStore(f"lenet-ddp/attempt-{restart_count()}", store)


def shutdown() -> None:
    """Destroy the process group, after what still holds it.

    A DDP model sits in reference cycles (hooks, compiled graphs) and holds the group and its
    pending work: collect it first, while the interpreter is whole. Left to interpreter exit,
    gloo's threads can die mid-teardown and abort a process that finished its work. Callers drop
    their own references to the model before calling this.
    """
    gc.collect()
    if not dist.is_initialized():
        return
    global _broken
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if _broken and abort is not None and dist.get_backend() == "nccl":
        # A collective failed: destroying would first flush the NCCL queue, whose work waits
        # for the lost peer until the watchdog takes the process down.
        abort()
    else:
        dist.destroy_process_group()
    _broken = False


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place (on the training device's group), for the host to
    read. On NCCL the host waits for the sum itself, at most dist.timeout_s: reading it back
    straight away would wait inside CUDA for a peer that stopped responding, until NCCL's
    watchdog ends the process without a word of ours (`Work.wait(timeout)` would abort the
    communicators under the watchdog's eyes, which then ends the process all the same)."""
    global _broken
    if dist.get_backend() != "nccl" or _timeout_s is None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
    deadline = time.monotonic() + _timeout_s
    while not work.is_completed():  # true on NCCL's own error too, which wait() raises
        if time.monotonic() > deadline:
            _broken = True  # `shutdown` aborts the group, whose queue waits for the peer
            raise _timed_out("an NCCL all-reduce whose sum this rank reads")
        time.sleep(_POLL_S)
    work.wait()  # the current stream continues after the sum
    return tensor


def any_rank(ctx: DistContext, *flags: bool) -> tuple[bool, ...]:
    """Each flag, true on every rank when it is true on any rank (one collective for all of
    them: every rank calls it with as many flags)."""
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.control_group)
    return tuple(bool(v) for v in t.tolist())


def broadcast_object(ctx: DistContext, obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=ctx.control_group)
    return box[0]


def _raise_once(error: PipelineError | None, code: int) -> None:
    """The one way an error ends a job once: `error` is raised on the rank that met it, which
    reports it; every other rank raises `PeerFailed` with the job's exit `code` (0: no error)
    instead of printing the same error again or waiting forever."""
    if error is not None:
        raise error
    if code:
        raise PeerFailed(code)


def _run_where(ctx: DistContext, here: bool, fn: Callable[[], T]) -> T | None:
    """`fn()` on the ranks where `here` (None elsewhere); a PipelineError of it ends the job
    once (`_raise_once`). A collective."""
    result, error = None, None
    if here:
        try:
            result = fn()
        except PipelineError as e:
            error = e
    code = torch.tensor([error.exit_code if error else 0], dtype=torch.int32)
    dist.all_reduce(code, op=dist.ReduceOp.MAX, group=ctx.control_group)
    _raise_once(error, int(code.item()))
    return result


def leader_then_all(
    ctx: DistContext, leader_fn: Callable[[], object], all_fn: Callable[[], T]
) -> T:
    """Run `leader_fn` on each node's local rank 0, then `all_fn` everywhere; a failure of a
    leader ends the job once (`_raise_once`)."""
    _run_where(ctx, ctx.is_local_leader, leader_fn)
    return all_fn()


def gather_to_main(ctx: DistContext, obj: T) -> list[T] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere). A collective."""
    found: list = [None] * ctx.world_size
    dist.all_gather_object(found, obj, group=ctx.control_group)
    return found if ctx.is_main else None


def on_main(ctx: DistContext, fn: Callable[[], T]) -> T | None:
    """`fn()` on rank 0 (None elsewhere); a PipelineError there ends the job once
    (`_raise_once`). A collective."""
    return _run_where(ctx, ctx.is_main, fn)


def raise_on_main(ctx: DistContext, error: PipelineError) -> None:
    """End the job once (`_raise_once`) with an error every rank knows alike (from values they
    agreed on, or one rank 0 shared): raised on rank 0, no collective needed."""
    _raise_once(error if ctx.is_main else None, error.exit_code)


def barrier(ctx: DistContext) -> None:
    dist.barrier(group=ctx.control_group)


# Local NCCL failures (its ncclResult_t names and ncclGetErrorString texts, as torch's
# "NCCL error in: ..." message gives them): this rank's GPU, driver or NCCL set-up, not a peer.
_NCCL_LOCAL = (
    "ncclunhandledcudaerror",
    "unhandled cuda error",
    "ncclsystemerror",
    "unhandled system error",
    "ncclinternalerror",
    "ncclinvalidargument",
    "ncclinvalidusage",
)


def _local_nccl_failure(text: str) -> bool:
    text = text.lower()
    # NCCL's system error also stands for a peer that exited; torch's reading then says "remote".
    return "nccl" in text and any(k in text for k in _NCCL_LOCAL) and "remote" not in text


# Gloo raises a plain RuntimeError for a lost peer and a timeout alike: only its text (gloo's
# source path, which its messages carry, or the socket's complaint) says a collective failed.
_GLOO = ("gloo", "connection closed", "connection reset")


def collective_failure(
    e: BaseException, timeout_s: float | None = None, starting: bool = False
) -> DistributedError | None:
    """What a failed collective means for a person, or None when `e` is not one; `starting`:
    it failed while the process group started. A failure also marks this process's groups as
    broken, for `shutdown`.

    Told by type where torch gives one: a `DistError` is a collective's failure, a
    `DistBackendError` NCCL's, a `DistStoreError` the rendezvous store's timeout. The text is
    read only where torch has no finer type: gloo's plain RuntimeErrors (`_GLOO`); which NCCL
    errors are this rank's GPU's (`_NCCL_LOCAL`, NCCL's own names); and the timeouts that
    arrive as one of the other errors (gloo's "Timed out waiting", NCCL's watchdog, the store
    socket's "Socket Timeout", a DistNetworkError).
    """
    global _broken
    text = str(e).lower()
    if not isinstance(e, dist.DistError) and not any(k in text for k in _GLOO):
        return None
    _broken = True
    nccl = isinstance(e, dist.DistBackendError)
    if nccl and _local_nccl_failure(text):
        # torch's text: "NCCL error in: FILE:LINE, REASON, NCCL version V", then NCCL's
        # reading of it, then "Last error:" and NCCL's last message.
        lines = [line.strip().rstrip(".") for line in str(e).splitlines()]
        detail = "; ".join([x for x in lines[1:] if x and x.lower() != "last error:"][:2])
        when = "could not start" if starting else "failed"
        return DistributedError(
            f"NCCL {when} on this rank's GPU, not because of a peer ({detail or describe(e)}); "
            "run with NCCL_DEBUG=INFO for NCCL's reason, check the GPU with nvidia-smi, or "
            "use dist.backend=gloo"
        )
    if isinstance(e, dist.DistStoreError) or "timed out" in text or "timeout" in text:
        timeout_s = timeout_s or _timeout_s
        if nccl:
            waited = f"{timeout_s * NCCL_TIMEOUT_FACTOR:g} s " if timeout_s else ""
            return DistributedError(
                f"an NCCL collective waited more than {waited}({NCCL_TIMEOUT_FACTOR} x "
                f"dist.timeout_s) for a peer rank that stopped responding ({describe(e)})"
            )
        return _timed_out(describe(e), timeout_s)
    return DistributedError(f"lost contact with a peer rank ({describe(e)}); see that rank's error")


def _timed_out(detail: str, timeout_s: float | None = None) -> DistributedError:
    """A collective that waited dist.timeout_s (`timeout_s`, else the group's) for a peer;
    `detail`: which, or torch's words for it."""
    timeout_s = timeout_s or _timeout_s
    limit = f"dist.timeout_s={timeout_s:g} s" if timeout_s else "dist.timeout_s"
    return DistributedError(
        f"a collective waited more than {limit} for a peer rank that stopped responding ({detail})"
    )


def restart_count() -> int:
    """How many times torchrun restarted this worker group (0 on the first attempt)."""
    return _int_env(os.environ, "TORCHELASTIC_RESTART_COUNT")
