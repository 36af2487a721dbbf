"""One optimizer step, and evaluation: the tutorial's loop with DDP, AMP, compile and no_sync.

The step is the tutorial's forward, loss, backward and optimizer step, repeated over
gradient-accumulation micro-batches, with DDP's all-reduce skipped (`no_sync`) on all but the
last. Nothing in the step reads a value back to the host: the loss is summed on the device and
read only when the caller asks for it at a logging interval.

Speed options (`train.*`):
- `fused_conv` (CPU): each of the model's stages, conv -> max-pool -> ReLU, runs as one C++
  kernel (pipeline/speed/kernels.py) instead of three torch ops; torch's ops where it cannot be
  built.
- `precision`: fp32; bf16 autocast (CPU and CUDA); fp16 autocast with a gradient scaler (CUDA),
  whose gradients are unscaled before clipping and whose overflowing steps are skipped.
- `compile`: `model` compiles the DDP-wrapped network (torch's documented order, so that
  Dynamo splits the graph at DDP's bucket boundaries); `step` compiles autocast, forward and loss,
  whose backward AOTAutograd compiles too: one graph at world 1, two under DDP (the network and
  the loss), whose forward wrapper torch keeps out of Dynamo. The optimizer update is a single
  fused kernel already (fused SGD/Adam/AdamW exist on CPU and CUDA), so it is not compiled.
- `compile_mode=reduce-overhead` and `max-autotune` replay CUDA graphs on GPU
  (`CUDA_GRAPH_MODES`) for the forward, loss and backward. Batches have one static shape (the
  data drops the ragged tail).
- `cuda_graph=whole_step` (`WholeStep`): the whole step, optimizer update included, as one CUDA
  graph replayed on static input buffers, at world 1; eager on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.config.schema import (
    Config,
    OptimConfig,
    check_precision,
    check_whole_step,
    micro_batch,
)
from pipeline.dist.group import DistContext, all_reduce_sum
from pipeline.speed.place import place_model

log = logging.getLogger(__name__)

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Optimizers with a fused (one kernel for all parameters) implementation on these devices.
_FUSED = {"sgd", "nesterov", "adam", "adamw"}
_FUSED_DEVICES = {"cpu", "cuda"}
# The torch.compile modes whose inductor options turn on CUDA graphs ("triton.cudagraphs" in
# torch._inductor.list_mode_options; a test checks this set against it for every allowed mode).
CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})


def uses_cuda_graphs(compile: str, compile_mode: str, device: torch.device) -> bool:
    """Whether the compiled step replays CUDA graphs: a compiled run, on CUDA, in a mode that
    turns them on."""
    return compile != "none" and compile_mode in CUDA_GRAPH_MODES and device.type == "cuda"


def bf16_warning(precision: str, device: torch.device, native_bf16: bool, gpu: str) -> str | None:
    """The warning for bf16 autocast on a GPU without native bf16 (before compute capability
    8.0: V100, T4), where torch emulates it, slower than fp32; None where there is nothing to
    say. `native_bf16`: `torch.cuda.is_bf16_supported(including_emulation=False)`."""
    if precision != "bf16" or device.type != "cuda" or native_bf16:
        return None
    return (
        f"train.precision=bf16 on {gpu}, which has no native bf16 (compute capability below "
        "8.0): torch emulates it, slower than fp32; use train.precision=fp16 (with its gradient "
        "scaler) or fp32"
    )


def build_optimizer(
    params, cfg: OptimConfig, device: torch.device, capturable: bool = False
) -> torch.optim.Optimizer:
    """The optimizer named by `optim.name`, with fused or foreach kernels where torch has them;
    `capturable`: Adam and AdamW admit CUDA graph capture of their step (SGD needs no flag)."""
    fast = {"fused": True} if cfg.name in _FUSED and device.type in _FUSED_DEVICES else {}
    fast = fast or {"foreach": True}
    if capturable and cfg.name in ("adam", "adamw"):
        fast["capturable"] = True
    if cfg.name in ("sgd", "nesterov"):
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.name == "nesterov",
            weight_decay=cfg.weight_decay,
            **fast,
        )
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)
    raise ValueError(f"unknown optimizer {cfg.name}")


def lr_factor(cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step `s`: linear warm-up, then the schedule."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if cfg.schedule == "step":
            return cfg.gamma ** ((s // steps_per_epoch) // cfg.step_epochs)
        if cfg.schedule == "cosine":
            progress = (s - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "onecycle":
        pct = cfg.warmup_epochs * steps_per_epoch / total_steps if cfg.warmup_epochs else 0.25
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=total_steps,
            pct_start=min(pct, 0.99),
            cycle_momentum=cfg.name in ("sgd", "nesterov"),
        )
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(cfg, steps_per_epoch, total_steps)
    )


def loss_function(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "mse":
        # The tutorial's MSELoss, against one-hot targets.
        return lambda out, y: F.mse_loss(out.float(), F.one_hot(y, out.shape[1]).float())
    return lambda out, y: F.cross_entropy(out.float(), y)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AMP_DTYPES[precision])


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: call before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    precision: str = "fp32",
    outputs: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Loss and accuracy over this rank's test images `x`, `y`, summed over all ranks; each
    batch's output is appended to `outputs` where given (for numbers of one pass beside them)."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=x.device)
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        with autocast(x.device, precision):
            out = model(xb)
        if outputs is not None:
            outputs.append(out)
        totals[0] += (criterion(out, yb) * len(yb)).double()
        totals[1] += (out.argmax(1) == yb).sum()
        totals[2] += len(yb)
    loss_sum, correct, count = all_reduce_sum(totals).tolist()
    return {
        "test_loss": loss_sum / count,
        "test_accuracy": correct / count,
        "test_count": int(count),
    }


class Engine:
    """Owns the wrapped model, optimizer, schedule and scaler; runs steps and evaluation."""

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        ctx: DistContext,
        steps_per_epoch: int,
        total_steps: int,
    ):
        self.model, self.ctx, self.cfg = model, ctx, cfg
        self.device = ctx.device
        self.precision = cfg.train.precision
        check_precision(self.precision, self.device.type)
        check_whole_step(cfg, ctx.world_size, self.device.type)
        if self.precision == "bf16" and self.device.type == "cuda":
            native = torch.cuda.is_bf16_supported(including_emulation=False)  # this rank's GPU
            problem = bf16_warning(
                self.precision, self.device, native, torch.cuda.get_device_name(self.device)
            )
            if problem:
                log.warning(problem)
        self.fused_conv, self.conv_path, self.speed_notes = place_model(
            model, cfg, self.device, micro_batch(cfg, ctx.world_size)
        )
        # A world of one trains the plain model: DDP would all-reduce every gradient bucket with
        # no peer, a cost on each step for nothing.
        self.ddp = model
        if ctx.world_size > 1:
            # Gradients as views into DDP's all-reduce buckets (allocated here, once, outside any
            # CUDA-graph pool, in the parameters' layout): no copy between the two each step.
            # Each backward points a dropped (set_to_none) gradient at its bucket again.
            self.ddp = DDP(
                model,
                device_ids=[self.device] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
            )
        graphed = cfg.train.cuda_graph == "whole_step"
        self.optimizer = build_optimizer(
            model.parameters(), cfg.optim, self.device, graphed and self.device.type == "cuda"
        )
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, steps_per_epoch, total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.criterion = loss_function(cfg.train.loss)
        self.params = [p for p in model.parameters() if p.requires_grad]

        self._forward: Callable[[torch.Tensor], torch.Tensor] = self.ddp
        self._loss = self._eager_loss
        if cfg.train.compile == "model":
            self._forward = torch.compile(self.ddp, mode=cfg.train.compile_mode)
        elif cfg.train.compile == "step":
            self._loss = torch.compile(self._eager_loss, mode=cfg.train.compile_mode)
        self.cuda_graphs = uses_cuda_graphs(cfg.train.compile, cfg.train.compile_mode, self.device)
        # A gradient the compiled backward hands over lives in the CUDA-graph pool, where the
        # next micro-batch's replay overwrites it: with accumulation the micro-batches add into
        # buffers allocated here, once (torch's advice for reduce-overhead with accumulation).
        # With one micro-batch the optimizer step consumes the gradient before the next replay,
        # and zero_grad drops it first, so buffers would only cost a zeroing and an addition
        # per parameter each step.
        self.grad_buffers = self.cuda_graphs and cfg.train.grad_accum > 1
        if self.grad_buffers:
            for p in self.params:
                p.grad = torch.zeros_like(p)
        self.whole_step = WholeStep(self) if graphed else None

        # Running sums on the device, read only at logging intervals; zeroed in place, as the
        # whole-step graph adds into these very tensors.
        self.loss_sum = torch.zeros((), device=self.device)
        self.finite_steps = torch.zeros((), dtype=torch.long, device=self.device)
        # Seconds the first train_step took (compilation and warm-up included), once it ran.
        self.first_step_s: float | None = None
        # The learning rate the last step used (read before the schedule moves on).
        self.step_lr = self.optimizer.param_groups[0]["lr"]

    def _eager_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return self.criterion(self._forward(x), y)

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One optimizer step over `micro_batches` (gradient accumulation when more than one)."""
        first = self.first_step_s is None
        if first:
            synchronize(self.device)
            started = time.perf_counter()
        if not self.model.training:
            self.model.train()
        if self.whole_step is not None:
            self.whole_step(micro_batches)
        else:
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            self.optimizer.zero_grad(set_to_none=not self.grad_buffers)  # keep those of __init__
            self.update(micro_batches)
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # what this step used
        self.scheduler.step()
        if first:
            synchronize(self.device)
            self.first_step_s = time.perf_counter() - started

    def update(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The step after zero_grad: each micro-batch's forward, loss and backward into the
        gradients, then clipping and the optimizer update (what `WholeStep` captures)."""
        n = len(micro_batches)
        for i, (x, y) in enumerate(micro_batches):
            skip_sync = i < n - 1 and self.ddp is not self.model
            with self.ddp.no_sync() if skip_sync else contextlib.nullcontext():
                loss = self._loss(x, y)
                scaled = loss / n if n > 1 else loss
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            loss = loss.detach()
            self.loss_sum += loss
            self.finite_steps += torch.isfinite(loss)
        if self.cfg.optim.clip_grad_norm > 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients
            nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip_grad_norm, foreach=True)
        if self.scaler is not None:
            # Skips the update when a gradient overflowed, and lowers the scale. The fused
            # optimizers do the check on the device; the others read one flag back.
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    @property
    def lr(self) -> float:
        """The learning rate of the last step (before any step: of the first)."""
        return float(self.step_lr)

    def read_loss(self) -> tuple[float, int]:
        """The loss summed over all ranks' micro-steps since the last call, and how many of
        those losses were finite; a collective, and the step's only read-back to the host."""
        totals = all_reduce_sum(torch.stack([self.loss_sum.double(), self.finite_steps.double()]))
        self.loss_sum.zero_()
        self.finite_steps.zero_()
        loss_sum, finite = totals.tolist()
        return loss_sum, int(finite)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict[str, float]:
        return evaluate(self.model, x, y, batch_size, self.criterion, self.precision)

    def state_dict(self) -> dict:
        return {
            # In the plain layout, so that checkpoints do not depend on the training layout.
            "model": {k: v.contiguous() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        # How the optimizer runs is this run's choice, not the checkpoint's: a checkpoint of the
        # ordinary step resumes in a captured one (torch's loading takes the saved flags too).
        groups = self.optimizer.param_groups
        own = [{k: g[k] for k in ("capturable", "fused", "foreach") if k in g} for g in groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, flags in zip(self.optimizer.param_groups, own, strict=True):
            group.update(flags)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.whole_step is not None:
            self.whole_step.reset()  # the optimizer's state lives in new tensors


# Eager steps on a side stream before the capture, as in torch's whole-network capture example:
# what is made on first use (the optimizer's state, cuBLAS's workspace) exists by the capture.
CAPTURE_AFTER = 3


class WholeStep:
    """`train.cuda_graph=whole_step`: the step on buffers of fixed addresses. Each step copies its
    batches into static input buffers (batches have one static shape) and the schedule's rate
    into the tensor `lr`, then runs `Engine.update` on them. On CUDA, after CAPTURE_AFTER eager
    steps on a side stream, that update (forward, loss, backward, clipping, optimizer step) is
    captured once as a CUDA graph and replayed: one launch in place of one per kernel. On CPU it
    runs eagerly every step, the very arithmetic of the ordinary step (the tests check it).

    The schedule writes a float into the optimizer's param group, as in the ordinary step, so
    checkpoints and `Engine.lr` are the same in both; the optimizer reads `lr` in its place while
    the update runs, so the captured kernels read the rate of each replay's step.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.capture = engine.device.type == "cuda"
        # The fused CUDA kernels read a float32 rate; the CPU ones read it as a double, so a
        # float64 tensor gives them the very value of the float the ordinary step passes.
        dtype = torch.float32 if self.capture else torch.float64
        rate = engine.optimizer.param_groups[0]["lr"]
        self.lr = torch.tensor(rate, dtype=dtype, device=engine.device)
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0

    def reset(self) -> None:
        """Warm up and capture again (the optimizer's state tensors were replaced)."""
        self.graph, self.eager_steps = None, 0

    def __call__(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if not self.inputs:
            self.inputs = [(torch.empty_like(x), torch.empty_like(y)) for x, y in micro_batches]
        for (xs, ys), (x, y) in zip(self.inputs, micro_batches, strict=True):
            xs.copy_(x)
            ys.copy_(y)
        self.lr.fill_(self.engine.optimizer.param_groups[0]["lr"])
        if self.graph is None and self.capture and self.eager_steps >= CAPTURE_AFTER:
            started = time.perf_counter()
            # Gradients set to None: the captured backward makes them in the graph's pool, at
            # the addresses each replay writes and the captured optimizer step reads.
            self.engine.optimizer.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), self._rate_from_tensor():
                self.engine.update(self.inputs)
            log.info(
                f"captured the whole step as one CUDA graph after {CAPTURE_AFTER} eager steps "
                f"({time.perf_counter() - started:.2f} s)"
            )
        if self.graph is not None:
            self.graph.replay()
            return
        side = torch.cuda.Stream(self.engine.device) if self.capture else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.engine.device))
        with torch.cuda.stream(side), self._rate_from_tensor():
            self.engine.optimizer.zero_grad(set_to_none=True)
            self.engine.update(self.inputs)
        if side is not None:
            torch.cuda.current_stream(self.engine.device).wait_stream(side)
        self.eager_steps += 1

    @contextlib.contextmanager
    def _rate_from_tensor(self) -> Iterator[None]:
        groups = self.engine.optimizer.param_groups
        rates = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = self.lr
        try:
            with warnings.catch_warnings():
                # Adam's capturable step says when it runs uncaptured, as the warm-up must.
                warnings.filterwarnings("ignore", "This instance was constructed with capturable")
                yield
        finally:
            for g, rate in zip(groups, rates, strict=True):
                g["lr"] = rate
