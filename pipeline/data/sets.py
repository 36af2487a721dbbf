"""What a run trains and evaluates on, on this rank's device: `RunData.build` holds out the
validation split (`pipeline.data.split`), shards the rest into training batches, and takes this
rank's shares of the validation and test images (`EvalSets`). `eval_share` is this rank's share
of an evaluation split, for training, evaluate and the benchmark alike.

`EvalSets.epoch` is what every epoch reports and selection judges: the validation split's loss
and accuracy (`val_loss`, `val_accuracy`), or without a split the test set's (`test_loss`,
`test_accuracy`); with a split and train.test_every_epoch also the
test set's, as `test_loss_this_epoch` and `test_accuracy_this_epoch`, names that say they are
not the selected model's. `EvalSets.test` is the test set's, for the model the run ends with.
Each image counts once over the ranks (`eval_indices`); every number is summed over all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config.schema import Config, micro_batch
from pipeline.data import split
from pipeline.data.device import (
    TrainBatches,
    eval_indices,
    normalize_and_pad,
    steps_per_epoch,
    to_device,
)
from pipeline.dist import group
from pipeline.dist.group import DistContext
from pipeline.errors import ConfigError


def eval_share(
    raw: dict[str, torch.Tensor], split: str, ctx: DistContext
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's share of evaluation split `split` (`test`, `val`) of `raw`, the uint8 splits
    of `pipeline.data.store`: its images normalised on the rank's device, their labels, and their
    indices in the split (`eval_indices`: each image counts once over the ranks)."""
    labels = raw[f"{split}_labels"]
    index = eval_indices(len(labels), ctx.rank, ctx.world_size)
    x = normalize_and_pad(raw[f"{split}_images"][index], ctx.device)
    return x, labels[index].to(ctx.device, torch.long), index


@dataclass
class EvalSets:
    test_x: torch.Tensor
    test_y: torch.Tensor
    val_x: torch.Tensor | None
    val_y: torch.Tensor | None
    batch_size: int
    test_every_epoch: bool = False

    @classmethod
    def build(cls, raw: dict[str, torch.Tensor], ctx: DistContext, cfg: Config) -> EvalSets:
        """This rank's shares of `raw`'s test images and of its held-out ones (`val_*`, see
        `pipeline.data.split.apply`; none without a split)."""
        test_x, test_y, _ = eval_share(raw, "test", ctx)
        val_x, val_y, _ = eval_share(raw, "val", ctx) if "val_labels" in raw else (None,) * 3
        t = cfg.train
        return cls(test_x, test_y, val_x, val_y, t.eval_batch_size, t.test_every_epoch)

    @property
    def has_val(self) -> bool:
        return self.val_y is not None

    def test(self, engine) -> dict[str, float]:
        """`test_loss`, `test_accuracy`, `test_count` of `engine`'s model (a collective)."""
        return engine.evaluate(self.test_x, self.test_y, self.batch_size)

    def epoch(self, engine) -> dict[str, float]:
        """The numbers of an epoch (see the module's text; a collective)."""
        if not self.has_val:
            return self.test(engine)
        val = engine.evaluate(self.val_x, self.val_y, self.batch_size)
        out = {k.replace("test_", "val_"): v for k, v in val.items()}
        if self.test_every_epoch:
            test = self.test(engine)
            out["test_loss_this_epoch"] = test["test_loss"]
            out["test_accuracy_this_epoch"] = test["test_accuracy"]
        return out


@dataclass
class RunData:
    batches: TrainBatches
    evals: EvalSets
    steps_per_epoch: int
    split: dict  # `pipeline.data.split.Split.record()`: what split.json and checkpoints hold

    @classmethod
    def build(cls, raw: dict[str, torch.Tensor], cfg: Config, ctx: DistContext) -> RunData:
        """From `raw`, the uint8 splits of `pipeline.data.store` on every rank. A size that
        leaves less than a global batch to train on is a ConfigError (reported by rank 0)."""
        t, n = cfg.train, len(raw["train_labels"])
        problem = split.check_size(n, cfg.data.val_size, t.batch_size)
        if problem:
            group.raise_on_main(ctx, ConfigError(problem))
        held_out = split.split(n, cfg.data.val_size)
        raw = split.apply(raw, held_out)
        micro = micro_batch(t, ctx.world_size)
        steps = steps_per_epoch(len(raw["train_labels"]), micro, ctx.world_size, t.grad_accum)
        if steps == 0:
            group.raise_on_main(
                ctx,
                ConfigError(
                    f"config key train.batch_size: {t.batch_size} is larger than the "
                    f"training set ({len(raw['train_labels'])} images); lower it"
                ),
            )
        data = to_device(raw, ctx.device)
        batches = TrainBatches(data.train_x, data.train_y, micro, ctx.rank, ctx.world_size, t.seed)
        return cls(batches, EvalSets.build(raw, ctx, cfg), steps, held_out.record())
