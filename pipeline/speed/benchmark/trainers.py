"""The two trainers the benchmark times: the project's pipeline, and the classic tutorial path.

Each trainer gives the benchmark's loop the same four things: the steps of an epoch (each
yielding the images it trained on), a logging-interval read-back, an evaluation, and facts for
the record. The pipeline's steps and read-backs are the training run's own (`Trainer.step`,
`Trainer.report_steps`). The baseline reads MNIST the classic way: a per-sample `Dataset` doing
Pad/ToTensor/Normalize in Python, a `DataLoader` with a `DistributedSampler`, the tutorial's
loop, fp32 eager, torch's default (unfused) optimizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pipeline.config.schema import Config
from pipeline.data.device import MEAN, STD, TrainBatches
from pipeline.data.sets import RunData
from pipeline.speed import kernels
from pipeline.tracking.tracker import Tracker
from pipeline.training.checkpoint import Checkpoints
from pipeline.training.engine import Engine, build_scheduler, loss_function
from pipeline.training.engine import evaluate as evaluate_model
from pipeline.training.selection import Selection
from pipeline.training.stop import StopRequest
from pipeline.training.trainer import Trainer


def conv_impl(fused: bool) -> str:
    return "fused kernels" if fused else "torch ops"


# -- the classic data path -------------------------------------------------------------------
def _classic_transform():
    """torchvision's Pad(2), ToTensor, Normalize when it imports, else the same steps by hand."""
    try:
        from PIL import Image
        from torchvision import transforms as T

        t = T.Compose([T.Pad(2), T.ToTensor(), T.Normalize((MEAN,), (STD,))])
        return lambda img: t(Image.fromarray(img, mode="L")), "torchvision.transforms on PIL"
    except Exception:  # noqa: BLE001 - torchvision is optional; the hand-written path mirrors it
        return _by_hand, "Pad/ToTensor/Normalize by hand, per sample (no torchvision here)"


def _by_hand(img: np.ndarray) -> torch.Tensor:
    """What torchvision's Pad(2) -> ToTensor -> Normalize do to one 28x28 uint8 image."""
    img = np.pad(img, 2)  # Pad: constant 0
    x = torch.from_numpy(img[:, :, None].transpose((2, 0, 1))).contiguous()
    x = x.to(dtype=torch.get_default_dtype()).div(255)  # ToTensor
    x = x.clone()  # Normalize(inplace=False)
    mean = torch.as_tensor((MEAN,), dtype=x.dtype)
    std = torch.as_tensor((STD,), dtype=x.dtype)
    if (std == 0).any():
        raise ValueError("std evaluated to zero")
    return x.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


class ClassicMNIST(Dataset):
    """MNIST as torchvision's dataset serves it: one sample at a time, transformed in Python."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images.numpy(), labels.numpy()
        self.transform, self.transform_name = _classic_transform()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


def classic_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    """The optimizer `Engine` builds, in torch's default (not fused) implementation."""
    o = cfg.optim
    if o.name in ("sgd", "nesterov"):
        return torch.optim.SGD(
            params, o.lr, o.momentum, nesterov=o.name == "nesterov", weight_decay=o.weight_decay
        )
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}
    return kinds[o.name](params, lr=o.lr, weight_decay=o.weight_decay)


# -- the two trainers, each: steps of an epoch, a logging-interval flush, evaluation ----------
def pipeline_trainer(cfg, ctx, data, raw, model, micro, workers):
    batches = TrainBatches(
        data.train_x, data.train_y, micro, ctx.rank, ctx.world_size, cfg.train.seed
    )
    steps = batches.micro_steps_per_epoch // cfg.train.grad_accum
    engine = Engine(model, cfg, ctx, steps, steps * cfg.train.epochs)
    trainer = Trainer(
        cfg,
        ctx,
        engine,
        RunData(batches, None, steps, {}),
        Tracker([]),  # reports to no sink
        Checkpoints(ctx, Path(cfg.train.run_dir), cfg.checkpoint.keep),  # never written here
        Selection.from_config(cfg),
        StopRequest(()),
    )

    def epoch_steps(epoch: int):
        if epoch:
            trainer.state.next_epoch()
        it = batches.epoch(epoch)
        for _ in range(steps):
            trainer.step(it)
            yield cfg.train.batch_size

    def evaluate(x, y):
        return engine.evaluate(x, y, cfg.train.eval_batch_size)["test_accuracy"]

    record = {
        "steps_per_epoch": steps,
        "conv": conv_impl(engine.fused_conv),
        "kernels_variant": kernels.cpu_variant() if engine.fused_conv else None,
        "conv_path": engine.conv_path,
    }
    return epoch_steps, trainer.report_steps, evaluate, record


def baseline_trainer(cfg, ctx, data, raw, model, micro, workers):
    device, world = ctx.device, ctx.world_size
    dataset = ClassicMNIST(raw["train_images"], raw["train_labels"])
    sampler = DistributedSampler(dataset, world, ctx.rank, shuffle=True, seed=cfg.train.seed)
    loader = DataLoader(
        dataset,
        batch_size=micro,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    net = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    optimizer = classic_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg.optim, len(loader), len(loader) * cfg.train.epochs)
    criterion = loss_function(cfg.train.loss)

    def epoch_steps(epoch: int):
        model.train()
        sampler.set_epoch(epoch)
        running_loss = 0.0
        for x, y in loader:  # the tutorial's loop
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = criterion(net(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running_loss += loss.item()
            yield len(y) * world

    def evaluate(x, y):  # the pipeline's evaluation, on the same test tensors (untimed)
        accuracy = evaluate_model(model, x, y, cfg.train.eval_batch_size, criterion)
        model.train()  # it may come within an epoch
        return accuracy["test_accuracy"]

    record = {
        "steps_per_epoch": len(loader),
        "baseline_transform": dataset.transform_name,
        "conv": conv_impl(False),
    }
    return epoch_steps, lambda: None, evaluate, record
