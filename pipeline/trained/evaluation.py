"""A trained model on its dataset's test set (what `python -m pipeline.evaluate` runs).

Test loss and accuracy come from the code training evaluates with:
`pipeline.training.engine.evaluate` on the test images as `pipeline.data.device` reads them (the
run's dataset, data root and mirrors), with the checkpoint's model variant placed as training
places it (`engine.place_model`) and its evaluation settings (batch size, precision, loss). On
CPU they are the numbers training reported for that checkpoint. Besides: the accuracy of each
class, the confusion matrix (PNG and JSON), a PNG grid of the most confident mistakes,
eval.json, and a printed summary; without matplotlib the numbers and JSON files only.

One process, or under torchrun: each rank evaluates its shard of the test set, the results are
summed through `pipeline.dist.group`, and rank 0 writes. With W&B tracking on (the checkpoint's
`tracking.mode`, or --tracking) the pictures and numbers also go to the run's W&B run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.atomic import write_atomic
from pipeline.config.schema import Config
from pipeline.data.device import eval_indices, load_splits, normalize_and_pad
from pipeline.dist import group
from pipeline.errors import describe
from pipeline.results.plots import pyplot_or_none
from pipeline.tracking.jsonl import read_jsonl
from pipeline.tracking.wandb_run import WandbUnavailable, new_run_id, open_run, resolve_mode
from pipeline.trained import figures, loading
from pipeline.training import checkpoint
from pipeline.training.engine import autocast, evaluate, loss_function, place_model

log = logging.getLogger(__name__)

CLASSES = 10


@torch.no_grad()
def predictions(
    model: nn.Module, x: torch.Tensor, batch_size: int, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's predicted class and the softmax probability the model gives it."""
    model.eval()
    probs = []
    for i in range(0, len(x), batch_size):
        with autocast(x.device, precision):
            out = model(x[i : i + batch_size])
        probs.append(out.float().softmax(1))
    confidence, predicted = torch.cat(probs).max(1)
    return predicted, confidence


def confusion(y: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Counts of (true class, predicted class) over all ranks; rows are true classes."""
    counts = torch.bincount(y * CLASSES + predicted, minlength=CLASSES * CLASSES)
    return group.all_reduce_sum(counts.view(CLASSES, CLASSES).double()).long().cpu()


def worst_mistakes(
    ctx: group.DistContext,
    index: torch.Tensor,
    y: torch.Tensor,
    predicted: torch.Tensor,
    confidence: torch.Tensor,
    k: int,
) -> list[dict] | None:
    """The `k` wrong predictions made with the highest probability, over all ranks (rank 0;
    None elsewhere). A collective."""
    wrong = (predicted != y).nonzero().flatten()
    top = wrong[confidence[wrong].argsort(descending=True)[:k]].cpu()
    mine = [
        {
            "index": int(index[i]),
            "label": int(y[i]),
            "predicted": int(predicted[i]),
            "probability": float(confidence[i]),
        }
        for i in top.tolist()
    ]
    gathered = group.gather_to_main(ctx, mine)
    if gathered is None:
        return None
    merged = [m for part in gathered for m in part]
    return sorted(merged, key=lambda m: (-m["probability"], m["index"]))[:k]


def reported_accuracy(run_dir: Path, step: int) -> float | None:
    """The test accuracy training logged for the model of global step `step`, if any: the
    test of the model the run ended with (summary.json), or an epoch's (metrics.jsonl: without
    a validation split, or with train.test_every_epoch)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        summary = None
    if isinstance(summary, dict) and summary.get("test_step") == step:
        return summary.get("test_accuracy")
    found = None
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        if record.get("step") == step:
            found = record.get("test_accuracy", record.get("test_accuracy_this_epoch", found))
    return found


def summary_text(results: dict) -> str:
    per_class = results["per_class_accuracy"]
    worst = sorted(per_class, key=per_class.get)[:3]
    reported = results["training_reported_accuracy"]
    lines = [
        f"checkpoint:      {results['checkpoint']} (global step {results['global_step']}, "
        f"{results['epochs_done']} epoch(s) done)",
        f"test images:     {results['test_count']:,}",
        f"test accuracy:   {results['test_accuracy'] * 100:.2f}% "
        f"({results['correct']:,} correct, {results['test_count'] - results['correct']} wrong)",
        f"test loss:       {results['test_loss']:.4f}",
    ]
    if reported is not None:
        same = "the same" if reported == results["test_accuracy"] else "DIFFERENT"
        lines.append(f"training logged: {reported * 100:.2f}% at this step ({same})")
    lines += [
        "per class:       "
        + "  ".join(f"{c}: {per_class[c] * 100:.2f}%" for c in sorted(per_class)),
        "weakest classes: " + ", ".join(f"{c} ({per_class[c] * 100:.2f}%)" for c in worst),
    ]
    return "\n".join(lines)


def to_wandb(state: dict, cfg: Config, mode: str, run_dir: Path, results: dict, files: dict):
    """Log the numbers and pictures to the checkpoint's W&B run (a new one when it had none);
    a W&B failure is a warning."""
    t = cfg.tracking
    try:
        run = open_run(
            mode,
            run_dir=run_dir,
            run_id=state.get("run_id") or new_run_id(),
            project=t.project,
            entity=t.entity,
            name=t.name,
            group=t.group,
            config=state["config"],
        )
    except WandbUnavailable as e:
        log.warning(f"the evaluation is not sent to W&B: {e}")
        return
    try:
        # No step: a finished run's steps are all taken, the rows go after them.
        run.run.log(
            {
                "eval/test_accuracy": results["test_accuracy"],
                "eval/test_loss": results["test_loss"],
                **{f"eval/{k}": run.wandb.Image(str(v)) for k, v in files.items()},
            }
        )
        run.summary({"eval/test_accuracy": results["test_accuracy"]})
        run.finish()
    except Exception as e:
        log.warning(f"the evaluation could not be sent to W&B ({describe(e, with_type=True)})")
        return
    log.info(f"sent to W&B run {run.run.id}" + (f": {run.url}" if run.url else ""))


def run(
    ctx: group.DistContext,
    target: Path,
    data_root: Path | None = None,
    out: Path | None = None,
    mistakes: int = 24,
    tracking: str | None = None,
    last: bool = False,
) -> None:
    """Evaluate the checkpoint `target` names (a run directory: its best.pt, or with `last` its
    newest checkpoint; see `loading.find_checkpoint`) on its dataset's test set; rank 0 writes
    the results into `out` (default: beside the checkpoint, eval/) and prints the summary."""
    plt = pyplot_or_none()
    path, state = checkpoint.load_on_main(ctx, lambda: loading.find_checkpoint(target, last))
    log.info(loading.chosen(path, state, target, last))
    cfg = loading.config_of(state, path)
    model = loading.build_model(state, cfg, path)
    micro_batch = cfg.train.batch_size // (ctx.world_size * cfg.train.grad_accum)
    place_model(model, cfg, ctx.device, micro_batch)  # the conv path training would take here
    precision = cfg.train.precision
    if precision == "fp16" and ctx.device.type != "cuda":
        log.warning("the checkpoint trained in fp16, which needs CUDA; evaluating in fp32")
        precision = "fp32"
    raw = load_splits(cfg.data, ctx, splits=("test",), root=data_root)
    images, labels = raw["test_images"], raw["test_labels"]
    index = eval_indices(len(labels), ctx.rank, ctx.world_size)
    x = normalize_and_pad(images, ctx.device)[index.to(ctx.device)]
    y = labels.to(ctx.device, torch.long)[index.to(ctx.device)]

    batch = cfg.train.eval_batch_size
    result = evaluate(model, x, y, batch, loss_function(cfg.train.loss), precision)
    predicted, confidence = predictions(model, x, batch, precision)
    matrix = confusion(y, predicted)
    worst = worst_mistakes(ctx, index, y, predicted, confidence, mistakes)
    if worst is None:
        return  # not rank 0: rank 0 writes and reports
    correct = int(matrix.diag().sum())
    if correct != round(result["test_accuracy"] * result["test_count"]):
        log.warning("the confusion matrix counts another number of correct predictions")

    out = out or path.parent / "eval"
    rows = matrix.sum(1).clamp(min=1).tolist()
    per_class = {str(c): matrix[c, c].item() / rows[c] for c in range(CLASSES)}
    results = {
        "checkpoint": str(path),
        "dataset": cfg.data.dataset,
        "epochs_done": state.get("epoch"),
        "global_step": state.get("global_step"),
        **result,
        "correct": correct,
        "training_reported_accuracy": reported_accuracy(path.parent, state.get("global_step")),
        "per_class_accuracy": per_class,
        "mistakes": worst,
    }
    print(summary_text(results), flush=True)
    matrix_json = {"rows": "true label", "columns": "predicted label", "matrix": matrix.tolist()}
    write_atomic(out / "confusion_matrix.json", json.dumps(matrix_json) + "\n")
    write_atomic(out / "eval.json", json.dumps(results, indent=2) + "\n")
    written = ["eval.json", "confusion_matrix.json"]
    pictures: dict[str, Path] = {}
    if plt is not None:
        title = f"{path.parent.resolve().name}, step {state.get('global_step')}"
        pictures = {
            "confusion_matrix": figures.confusion_png(matrix, out / "confusion_matrix.png", title),
            "mistakes": figures.mistakes_png(images, worst, out / "mistakes.png", title),
        }
        written += [p.name for p in pictures.values()]
    print(f"wrote {', '.join(written)} in {out}")
    if plt is None:
        log.warning(
            "matplotlib is not installed: confusion_matrix.png and mistakes.png were not drawn "
            "(pip install matplotlib, the project's report extra)"
        )
    mode = resolve_mode(tracking or cfg.tracking.mode)
    if mode != "disabled":
        to_wandb(state, cfg, mode, path.parent, results, pictures)
