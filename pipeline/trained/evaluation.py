"""A trained model on its dataset's test set (what `python -m pipeline.evaluate` runs).

Test loss and accuracy come from the code training evaluates with:
`pipeline.training.engine.evaluate` on the test images as `pipeline.data.device` reads them (the
run's dataset, data root and mirrors), with the checkpoint's model variant placed as training
places it (`speed.place.place_model`) and its evaluation settings (batch size, precision, loss). On
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

from pipeline.atomic import write_atomic
from pipeline.config.schema import Config, check_precision, micro_batch
from pipeline.data.device import load_splits
from pipeline.data.sets import eval_share
from pipeline.dist import group
from pipeline.errors import ConfigError, describe
from pipeline.results.plots import pyplot_or_none
from pipeline.results.records import percent, read_records
from pipeline.speed.place import place_model
from pipeline.tracking.wandb_run import WandbSink, WandbUnavailable, new_run_id, resolve_mode
from pipeline.trained import figures, loading
from pipeline.training.checkpoint import BEST
from pipeline.training.engine import evaluate, loss_function

log = logging.getLogger(__name__)

CLASSES = 10


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
    run = read_records(run_dir)
    if run.summary is not None and run.summary.get("test_step") == step:
        return run.summary.get("test_accuracy")
    found = None
    for record in run.epochs:
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
        f"test accuracy:   {percent(results['test_accuracy'])} "
        f"({results['correct']:,} correct, {results['test_count'] - results['correct']} wrong)",
        f"test loss:       {results['test_loss']:.4f}",
    ]
    if reported is not None:
        same = "the same" if reported == results["test_accuracy"] else "DIFFERENT"
        lines.append(f"training logged: {percent(reported)} at this step ({same})")
    lines += [
        "per class:       " + "  ".join(f"{c}: {percent(per_class[c])}" for c in sorted(per_class)),
        "weakest classes: " + ", ".join(f"{c} ({percent(per_class[c])})" for c in worst),
    ]
    return "\n".join(lines)


def to_wandb(state: dict, cfg: Config, mode: str, run_dir: Path, results: dict, files: dict):
    """Log the numbers and pictures to the checkpoint's W&B run (a new one when it had none);
    a W&B failure is a warning."""
    sink = WandbSink(run_dir, cfg.tracking, mode)
    try:
        sink.open(state.get("run_id") or new_run_id(), state["config"], cfg.tracking.group)
    except WandbUnavailable as e:
        log.warning(f"the evaluation is not sent to W&B: {e}")
        return
    try:
        sink.log_evaluation(results, files)
    except Exception as e:
        log.warning(f"the evaluation could not be sent to W&B ({describe(e, with_type=True)})")
        return
    log.info(f"sent to W&B run {sink.run_id}" + (f": {sink.url}" if sink.url else ""))


def out_dir(target: Path, path: Path, last: bool = False) -> Path:
    """Where evaluate writes by default, beside checkpoint `path`: eval/ for what a run
    directory names without --last (its best.pt, or its newest checkpoint where it has none) and
    for a best.pt file; eval-NAME/ for any other checkpoint (--last, or a file:
    eval-ckpt-000002577/), so that no checkpoint's results overwrite another's."""
    if (target.is_dir() and not last) or path.name == BEST:
        return path.parent / "eval"
    return path.parent / f"eval-{path.stem}"


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
    the results into `out` (default: `out_dir`) and prints the summary."""
    plt = pyplot_or_none()
    path, state, cfg, model = loading.load(target, last, ctx)
    # The conv path training would take here.
    place_model(model, cfg, ctx.device, micro_batch(cfg, ctx.world_size))
    precision = cfg.train.precision
    try:
        check_precision(precision, ctx.device.type)
    except ConfigError:  # training's rule; a trained model is evaluated in fp32 instead
        log.warning("the checkpoint trained in fp16, which needs CUDA; evaluating in fp32")
        precision = "fp32"
    raw = load_splits(cfg.data, ctx, splits=("test",), root=data_root)
    x, y, index = eval_share(raw, "test", ctx)

    # One pass: the loss and accuracy, and each image's predicted class and its probability.
    outs: list[torch.Tensor] = []
    criterion = loss_function(cfg.train.loss)
    result = evaluate(model, x, y, cfg.train.eval_batch_size, criterion, precision, outs)
    confidence, predicted = torch.cat([out.float().softmax(1) for out in outs]).max(1)
    matrix = confusion(y, predicted)
    worst = worst_mistakes(ctx, index, y, predicted, confidence, mistakes)
    if worst is None:
        return  # not rank 0: rank 0 writes and reports
    correct = int(matrix.diag().sum())
    if correct != round(result["test_accuracy"] * result["test_count"]):
        log.warning("the confusion matrix counts another number of correct predictions")

    out = out or out_dir(target, path, last)
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
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "confusion_matrix.json", json.dumps(matrix_json) + "\n")
    write_atomic(out / "eval.json", json.dumps(results, indent=2) + "\n")
    written = ["eval.json", "confusion_matrix.json"]
    pictures: dict[str, Path] = {}
    if plt is not None:
        title = f"{path.parent.resolve().name}, step {state.get('global_step')}"
        pictures = {
            "confusion_matrix": figures.confusion_png(matrix, out / "confusion_matrix.png", title),
            "mistakes": figures.mistakes_png(
                raw["test_images"], worst, out / "mistakes.png", title
            ),
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
