"""The decisions behind the GPU paths, checked on CPU in this process: which compile modes replay
CUDA graphs, bf16 on GPUs without it, checkpoints that hold CPU tensors and each rank's own CUDA
generator, what an NCCL failure means and how long the host waits for an NCCL sum, the
benchmark's world sizes on any number of GPUs, the warning for a GPU machine training on CPU,
and the step interval's clock. (Real CPU runs' checkpoints and the commands refusing CUDA
without a GPU: tests/multiproc/test_cuda.py; the GPU runs themselves:
tests/integration/test_cuda.py.)"""

import dataclasses
import inspect
import logging
import random
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist

from pipeline.config.schema import DistConfig, TrainConfig, load_config, validate_for_world
from pipeline.dist import group
from pipeline.errors import DistributedError
from pipeline.speed.benchmark.runner import cases, gpu_worlds
from pipeline.training import checkpoint
from pipeline.training.engine import CUDA_GRAPH_MODES, bf16_warning, uses_cuda_graphs
from pipeline.training.trainer import Trainer, TrainState

from helpers import REPO

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


# -- compile modes and CUDA graphs -----------------------------------------------------------------
def _allowed(key: str) -> tuple:
    (f,) = [f for f in dataclasses.fields(TrainConfig) if f.name == key]
    return f.metadata["choices"]


@pytest.mark.parametrize("mode", _allowed("compile_mode"))
def test_the_modes_taken_for_cuda_graphs_are_torchs_own(mode):
    """torch.compile turns CUDA graphs on for a mode through inductor's "triton.cudagraphs"
    option (max-autotune too, not only reduce-overhead); the engine then allocates gradient
    buffers outside the graphs and marks each step's start, or accumulation breaks."""
    torch_says = bool(torch._inductor.list_mode_options(mode).get("triton.cudagraphs", False))
    assert (mode in CUDA_GRAPH_MODES) == torch_says
    assert uses_cuda_graphs("model", mode, CUDA) == torch_says
    assert uses_cuda_graphs("step", mode, CUDA) == torch_says
    assert not uses_cuda_graphs("none", mode, CUDA)  # eager
    assert not uses_cuda_graphs("model", mode, CPU)  # no CUDA graphs on CPU


# -- bf16 on GPUs without it -----------------------------------------------------------------------
def test_bf16_on_a_gpu_without_native_bf16_is_warned_about():
    said = bf16_warning("bf16", CUDA, native_bf16=False, gpu="Tesla V100-SXM2-16GB")
    assert said is not None and "\n" not in said
    assert "Tesla V100-SXM2-16GB" in said and "train.precision=fp16" in said
    assert bf16_warning("bf16", CUDA, native_bf16=True, gpu="NVIDIA H100") is None
    assert bf16_warning("fp16", CUDA, native_bf16=False, gpu="Tesla T4") is None
    assert bf16_warning("fp32", CUDA, native_bf16=False, gpu="Tesla T4") is None
    assert bf16_warning("bf16", CPU, native_bf16=False, gpu="") is None  # CPU autocast: no GPU


def test_torch_tells_native_bf16_apart_from_emulation():
    """The engine asks `torch.cuda.is_bf16_supported(including_emulation=False)`."""
    params = inspect.signature(torch.cuda.is_bf16_supported).parameters
    assert "including_emulation" in params
    assert torch.cuda.is_bf16_supported(including_emulation=False) in (True, False)


# -- CPU tensors in checkpoints --------------------------------------------------------------------
def test_every_tensor_of_a_nested_state_is_reached():
    state = {
        "model": {"w": torch.zeros(2), "b": torch.zeros(1)},
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 0.1}]},
        "rng": [{"numpy": ("MT19937", torch.zeros(3), 5), "cuda": [torch.zeros(4)]}],
        "epoch": 3,
        "scaler": None,
    }
    moved = checkpoint.map_tensors(state, lambda t: t + 7)
    assert moved["model"]["w"].tolist() == [7, 7] and moved["model"]["b"].tolist() == [7]
    assert moved["optimizer"]["state"][0]["exp_avg"].tolist() == [7, 7]
    numpy_state = moved["rng"][0]["numpy"]
    assert isinstance(numpy_state, tuple) and numpy_state[0] == "MT19937"
    assert numpy_state[1].tolist() == [7, 7, 7] and numpy_state[2] == 5
    assert moved["rng"][0]["cuda"][0].tolist() == [7] * 4
    assert moved["optimizer"]["param_groups"] == [{"lr": 0.1}]
    assert (moved["epoch"], moved["scaler"]) == (3, None)
    assert state["model"]["w"].tolist() == [0, 0]  # the state itself is left alone


def test_on_cpu_gives_plain_cpu_tensors():
    weight = torch.nn.Parameter(torch.ones(3))
    got = checkpoint.on_cpu({"model": {"w": weight}, "rng": [(torch.ones(2),)]})
    w = got["model"]["w"]
    assert w.device.type == "cpu" and not w.requires_grad and not isinstance(w, torch.nn.Parameter)
    assert got["rng"][0][0].device.type == "cpu"


# -- each rank's own CUDA generator ----------------------------------------------------------------
def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_states_come_back_with_or_without_a_cuda_generator():
    state = checkpoint.rng_state(CPU)
    expected = _draws()
    for cuda in ([], [torch.zeros(16, dtype=torch.uint8)]):
        random.seed(1), np.random.seed(1), torch.manual_seed(1)
        checkpoint.set_rng_state({**state, "cuda": cuda}, CPU)
        assert _draws() == expected


# -- what an NCCL failure means --------------------------------------------------------------------
# Texts as torch 2.13 and NCCL write them: C10D_NCCL_CHECK's "NCCL error in: FILE:LINE, " +
# ncclGetErrorString + ", NCCL version V", then getNcclErrorDetailStr's reading and NCCL's
# last error; the watchdog's timeout message.
NCCL_OOM = (
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, unhandled "
    "cuda error (run with NCCL_DEBUG=INFO for details), NCCL version 2.26.2\n"
    "ncclUnhandledCudaError: Call to CUDA function failed.\nLast error:\n"
    "Cuda failure 2 'out of memory'"
)
NCCL_SAME_GPU = (
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, invalid "
    "usage (run with NCCL_DEBUG=WARN for details), NCCL version 2.21.5\n"
    "ncclInvalidUsage: This usually reflects invalid usage of NCCL library.\nLast error:\n"
    "Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 1000"
)
NCCL_REMOTE = (
    "NCCL error: remote process exited or there was a network error, NCCL version 2.20.5\n"
    "ncclRemoteError: A call failed possibly due to a network error or a remote process "
    "exiting prematurely.\nLast error:\n"
    "socketProgress: Connection closed by remote peer node1.cluster<45074>"
)
NCCL_OLD_SYSTEM = (  # NCCL before ncclRemoteError: a peer that exited was a system error
    "NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1269, unhandled system "
    "error, NCCL version 2.10.3\nncclSystemError: System call (e.g. socket, malloc) or external "
    "library call failed or device error. It can be also caused by unexpected exit of a remote "
    "peer, you can check NCCL warnings for failure reason and see if there is connection closure "
    "by a peer."
)
NCCL_WATCHDOG = (
    "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE"
    ", NumelIn=61706, NumelOut=61706, Timeout(ms)=1200000) ran for 1200081 milliseconds before "
    "timing out."
)


@pytest.fixture(autouse=True)
def _group_not_broken(monkeypatch):
    """collective_failure marks this process's groups broken: keep that inside each test."""
    monkeypatch.setattr(group, "_broken", False)


@pytest.mark.parametrize(
    "text, starting, says",
    [
        (NCCL_OOM, True, "NCCL could not start on this rank's GPU, not because of a peer"),
        (NCCL_OOM, False, "NCCL failed on this rank's GPU, not because of a peer"),
        (NCCL_SAME_GPU, True, "Duplicate GPU detected : rank 1 and rank 0 both on CUDA device"),
        (NCCL_REMOTE, False, "lost contact with a peer rank (NCCL error: remote process exited"),
        (NCCL_OLD_SYSTEM, False, "lost contact with a peer rank"),
        (NCCL_WATCHDOG, False, "an NCCL collective waited more than 1200 s (2 x dist.timeout_s)"),
    ],
    ids=["oom-start", "oom", "same-gpu", "remote", "old-system", "watchdog"],
)
def test_an_nccl_failure_is_told_apart_from_a_lost_peer(text, starting, says):
    err = group.collective_failure(torch_dist.DistBackendError(text), 600, starting=starting)
    assert err is not None and says in str(err), str(err)
    assert "\n" not in str(err) and err.exit_code == 6
    if "not because of a peer" in str(err):
        assert "NCCL_DEBUG=INFO" in str(err) and "dist.backend=gloo" in str(err)


def test_the_oom_detail_names_cudas_failure():
    err = group.collective_failure(torch_dist.DistBackendError(NCCL_OOM), 600, starting=True)
    assert "ncclUnhandledCudaError: Call to CUDA function failed; Cuda failure 2 'out of " in str(
        err
    )


def test_a_gloo_timeout_is_still_dist_timeout_s():
    text = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms"
    err = group.collective_failure(RuntimeError(text), 5)
    assert "a collective waited more than dist.timeout_s=5 s" in str(err)


def test_the_control_collectives_time_out_before_the_nccl_group():
    """A hung peer is met by a host-side (gloo) collective first, which ends the job with one
    line and exit 6, before NCCL's watchdog takes the process down."""
    control, training = group.group_timeouts("nccl", 600)
    assert control.total_seconds() == 600 and training > control
    control, training = group.group_timeouts("gloo", 600)
    assert control == training and control.total_seconds() == 600


class _NcclSum:
    """What `dist.all_reduce(..., async_op=True)` hands back on NCCL: a sum that finishes after
    `polls` looks (never, for None)."""

    def __init__(self, polls: int | None):
        self.polls, self.waited = polls, False

    def is_completed(self) -> bool:
        if self.polls is None:
            return False
        self.polls -= 1
        return self.polls < 0

    def wait(self) -> bool:
        self.waited = True
        return True


@pytest.mark.parametrize("polls", [0, 3, None], ids=["done", "after-3-looks", "hung-peer"])
def test_the_host_waits_for_an_nccl_sum_it_reads_at_most_dist_timeout_s(monkeypatch, polls):
    """The loss read-back and evaluation wait for their NCCL sum on the host, not inside CUDA:
    a hung peer ends the rank with one line and exit 6, the group marked for abort."""
    work = _NcclSum(polls)
    monkeypatch.setattr(torch_dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch_dist, "all_reduce", lambda tensor, op, async_op: work)
    monkeypatch.setattr(group, "_timeout_s", 0.05)
    totals = torch.ones(2)
    if polls is None:
        with pytest.raises(DistributedError) as caught:
            group.all_reduce_sum(totals)
        err = caught.value
        assert str(err) == (
            "a collective waited more than dist.timeout_s=0.05 s for a peer rank that stopped "
            "responding (an NCCL all-reduce whose sum this rank reads)"
        )
        assert err.exit_code == 6 and group._broken and not work.waited
    else:
        assert group.all_reduce_sum(totals) is totals
        assert work.waited and not group._broken


def test_a_gloo_group_marked_broken_is_still_destroyed():
    """After a failure only NCCL communicators are aborted; a gloo group is destroyed as ever."""
    group.init(group.DistContext(), DistConfig())
    try:
        group.collective_failure(RuntimeError("Connection closed by peer"), 5)
        assert group._broken
    finally:
        group.shutdown()
    assert not torch_dist.is_initialized() and not group._broken


# -- the benchmark on any number of GPUs -----------------------------------------------------------
def test_gpu_worlds_split_the_batch():
    assert gpu_worlds(1, 512) == [1]
    assert gpu_worlds(2, 512) == [1, 2]
    assert gpu_worlds(3, 512) == [1, 2]
    assert gpu_worlds(6, 128) == [1, 4]
    assert gpu_worlds(7, 128) == [1, 4]
    assert gpu_worlds(8, 128) == [1, 8]
    assert gpu_worlds(4, 128, grad_accum=64) == [1, 2]


@pytest.mark.parametrize("n_gpus", range(1, 9))
def test_every_gpu_case_splits_its_batch(n_gpus):
    notes = []
    todo = cases("cuda", n_gpus, False, say=notes.append)
    for case in todo:
        validate_for_world(load_config(REPO / case.config, case.overrides), case.world)
    assert {c.world for c in todo} <= set(range(1, n_gpus + 1))
    if n_gpus in (1, 2, 4, 8):
        assert not notes and {c.world for c in todo} == {1, n_gpus}
    else:
        assert len(notes) == 2 and all(f"across {n_gpus} GPUs" in n for n in notes), notes


# -- a GPU machine that trains on CPU --------------------------------------------------------------
def test_the_unused_gpu_warning_says_why_and_what_to_do():
    smi = "/usr/bin/nvidia-smi"
    cpu_build = group.unused_gpu_warning(False, smi, "2.13.0+cpu", None)
    assert "2.13.0+cpu is a CPU build" in cpu_build and "TORCH_INDEX_URL" in cpu_build
    assert "dist.device=cpu" in cpu_build and "\n" not in cpu_build
    no_gpu = group.unused_gpu_warning(False, smi, "2.13.0+cu128", "12.8")
    assert "(CUDA 12.8) finds no usable GPU" in no_gpu and "CUDA_VISIBLE_DEVICES" in no_gpu
    assert group.unused_gpu_warning(True, smi, "2.13.0+cu128", "12.8") is None
    assert group.unused_gpu_warning(False, None, "2.13.0+cpu", None) is None


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("smi", ["/usr/bin/nvidia-smi", None])
def test_auto_device_on_cpu_warns_only_where_nvidia_smi_is(monkeypatch, smi):
    monkeypatch.setattr(group.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(group.shutil, "which", lambda name: smi if name == "nvidia-smi" else None)
    handler = _Lines()
    logger = logging.getLogger("pipeline.dist.group")
    logger.addHandler(handler)
    try:
        assert group._choose_device(group.DistContext(), "auto") == CPU
        assert group._choose_device(group.DistContext(), "cpu") == CPU  # asked for: no warning
        other_rank = group.DistContext(local_rank=1, local_world_size=2)
        assert group._choose_device(other_rank, "auto") == CPU
    finally:
        logger.removeHandler(handler)
    if smi is None:
        assert handler.lines == []
    else:  # once: the first call's, on the node's local rank 0
        assert len(handler.lines) == 1 and "trains on CPU although" in handler.lines[0]


# -- the step interval's clock ---------------------------------------------------------------------
class _SlowReadBack:
    """An engine whose loss read-back waits, as it does for a GPU's queued steps."""

    lr = 0.01

    def __init__(self, wait_s: float):
        self.wait_s, self.returned = wait_s, 0.0

    def read_loss(self):
        time.sleep(self.wait_s)
        self.returned = time.perf_counter()
        return 4 * 2.0, 4


def test_an_interval_includes_the_read_back_it_waited_for():
    """The interval's time ends after the loss read-back, which waits for the device's queued
    steps: read before it, the clock would give this interval too little time (too many img/s)
    and the next one the wait."""
    records = []
    engine = _SlowReadBack(0.3)
    fake = SimpleNamespace(
        pending=4,
        interval_started=time.perf_counter(),
        state=TrainState(global_step=4, step_in_epoch=4),
        ctx=SimpleNamespace(world_size=1),
        cfg=SimpleNamespace(train=SimpleNamespace(grad_accum=1, batch_size=64)),
        engine=engine,
        tracker=SimpleNamespace(log_step=records.append),
        run_dir=Path("runs/x"),
    )
    Trainer.report_steps(fake)
    (record,) = records
    seconds = 4 * 64 / record["images_per_s"]
    assert seconds >= 0.3, record
    assert fake.interval_started >= engine.returned  # the next interval starts after the wait
    assert record["loss"] == 2.0 and fake.pending == 0
