"""Evaluate a trained model on the MNIST test set: `python -m pipeline.evaluate RUN_DIR|CKPT`.

Test loss and accuracy come from the code training evaluates with: `pipeline.engine.evaluate`
on the test images as `pipeline.data` prepares them, with the checkpoint's model variant and its
evaluation settings (batch size, precision, loss, the model in channels-last layout with the
fused CPU kernels where training used them). On CPU they are the numbers training reported for
that checkpoint. Besides: the accuracy of each class, the confusion matrix (PNG and JSON), a PNG
grid of the most confident mistakes, eval.json, and a printed summary.

One process, or under torchrun: each rank evaluates its shard of the test set, the results are
summed through `pipeline.dist`, and rank 0 writes. With W&B tracking on (the checkpoint's
`tracking.mode`, or --tracking) the pictures and numbers also go to the run's W&B run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from pipeline import checkpoint, dist, eval_figures, kernels, mnist, trained
from pipeline.config import Config, DistConfig
from pipeline.data import eval_indices, normalize_and_pad
from pipeline.engine import autocast, evaluate, loss_function
from pipeline.errors import EXIT_INTERRUPTED, PipelineError, describe
from pipeline.wandb_run import WandbUnavailable, new_run_id, open_run, resolve_mode

CLASSES = 10


def prepare_model(model: nn.Module, cfg: Config, device: torch.device) -> tuple[nn.Module, str]:
    """The model laid out and run as training's engine ran it; the precision to evaluate in."""
    model.to(device, memory_format=torch.channels_last)
    if device.type == "cpu" and kernels.wanted(cfg.train.fused_conv):
        problem = kernels.load()
        if problem is None:
            model.conv_pool_relu = kernels.conv_pool_relu
        else:
            trained.warn(f"the fused conv kernels are not available, using torch's ops: {problem}")
    precision = cfg.train.precision
    if precision == "fp16" and device.type != "cuda":
        trained.warn("the checkpoint trained in fp16, which needs CUDA; evaluating in fp32")
        precision = "fp32"
    return model, precision


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
    return dist.all_reduce_sum(counts.view(CLASSES, CLASSES).double()).long().cpu()


def worst_mistakes(
    ctx: dist.DistContext,
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
    gathered = dist.gather_to_main(ctx, mine)
    if gathered is None:
        return None
    merged = [m for part in gathered for m in part]
    return sorted(merged, key=lambda m: (-m["probability"], m["index"]))[:k]


def reported_accuracy(run_dir: Path, step: int) -> float | None:
    """The test accuracy training logged at global step `step` (metrics.jsonl), if any."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step") == step:
            found = record.get("test_accuracy", found)
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
            config=state["config"],
        )
    except WandbUnavailable as e:
        trained.warn(f"the evaluation is not sent to W&B: {e}")
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
        trained.warn(f"the evaluation could not be sent to W&B ({describe(e, with_type=True)})")
        return
    print(f"sent to W&B run {run.run.id}" + (f": {run.url}" if run.url else ""))


def run(args: argparse.Namespace, ctx: dist.DistContext) -> int:
    eval_figures.pyplot()  # before the work: a missing matplotlib is one line, at once
    path, state = checkpoint.load_on_main(ctx, lambda: trained.find_checkpoint(args.target))
    cfg = trained.config_of(state, path)
    model, precision = prepare_model(trained.build_model(state, cfg, path), cfg, ctx.device)
    root = args.data_root or Path(cfg.data.root)
    raw = dist.leader_then_all(
        ctx, lambda: mnist.prepare(root, download=cfg.data.download), lambda: mnist.load(root)
    )
    images, labels = raw["test_images"], raw["test_labels"]
    index = eval_indices(len(labels), ctx.rank, ctx.world_size)
    x = normalize_and_pad(images, ctx.device)[index.to(ctx.device)]
    y = labels.to(ctx.device, torch.long)[index.to(ctx.device)]

    batch = cfg.train.eval_batch_size
    result = evaluate(model, x, y, batch, loss_function(cfg.train.loss), precision)
    predicted, confidence = predictions(model, x, batch, precision)
    matrix = confusion(y, predicted)
    mistakes = worst_mistakes(ctx, index, y, predicted, confidence, args.mistakes)
    if mistakes is None:
        return 0  # not rank 0: rank 0 writes and reports
    correct = int(matrix.diag().sum())
    if correct != round(result["test_accuracy"] * result["test_count"]):
        trained.warn("the confusion matrix counts another number of correct predictions")

    out = args.out or path.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    rows = matrix.sum(1).clamp(min=1).tolist()
    per_class = {str(c): matrix[c, c].item() / rows[c] for c in range(CLASSES)}
    results = {
        "checkpoint": str(path),
        "epochs_done": state.get("epoch"),
        "global_step": state.get("global_step"),
        **result,
        "correct": correct,
        "training_reported_accuracy": reported_accuracy(path.parent, state.get("global_step")),
        "per_class_accuracy": per_class,
        "mistakes": mistakes,
    }
    (out / "confusion_matrix.json").write_text(
        json.dumps({"rows": "true label", "columns": "predicted label", "matrix": matrix.tolist()})
        + "\n"
    )
    (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    title = f"{path.parent.resolve().name}, step {state.get('global_step')}"
    files = {
        "confusion_matrix": eval_figures.confusion_png(matrix, out / "confusion_matrix.png", title),
        "mistakes": eval_figures.mistakes_png(images, mistakes, out / "mistakes.png", title),
    }
    print(summary_text(results))
    print(f"wrote eval.json, confusion_matrix.json, confusion_matrix.png, mistakes.png in {out}")
    mode = resolve_mode(args.tracking or cfg.tracking.mode)
    if mode != "disabled":
        to_wandb(state, cfg, mode, path.parent, results, files)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate",
        description="Test accuracy (overall and per class), confusion matrix and the most "
        "confident mistakes of a trained model. Runs as one process or under torchrun.",
    )
    parser.add_argument(
        "target", type=Path, help="a run directory (its newest valid checkpoint) or a checkpoint"
    )
    parser.add_argument(
        "--data-root", type=Path, help="directory holding MNIST/raw (default: the run's data.root)"
    )
    parser.add_argument("--out", type=Path, help="where to write (default: next to it, eval/)")
    parser.add_argument(
        "--mistakes", type=int, default=24, help="how many mistakes to show (default 24)"
    )
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto"
    )
    parser.add_argument(
        "--tracking",
        choices=("auto", "online", "offline", "disabled"),
        help="send the results to W&B (default: the run's tracking.mode)",
    )
    args = parser.parse_args(argv)
    if args.mistakes < 0:
        parser.error("--mistakes must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx: dist.DistContext | None = None
    try:
        ctx = dist.detect()
        dist.init(ctx, DistConfig(device=args.device))
        return run(args, ctx)
    except dist.PeerFailed as e:
        return e.exit_code
    except PipelineError as e:
        if ctx is None or ctx.is_main or getattr(e, "report_here", False):
            print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except OSError as e:
        print(f"error: cannot write the results: {e}; pass a writable --out DIR", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
