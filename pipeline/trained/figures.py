"""The pictures of `pipeline.evaluate`: the confusion matrix and a grid of mistakes, as PNG files.

Drawing needs matplotlib (the project's `report` extra); it is imported when a picture is
drawn, never when this module is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.results.plots import pyplot
from pipeline.results.records import percent

COLUMNS = 8  # of the mistakes grid


def confusion_png(matrix: torch.Tensor, path: Path, title: str) -> Path:
    """Counts of true (rows) against predicted (columns) classes, on a log colour scale so
    that the few mistakes show next to the diagonal's thousands."""
    plt = pyplot("drawing the confusion matrix and the mistakes")
    from matplotlib.colors import LogNorm

    counts = matrix.numpy()
    n = len(counts)
    per_class = counts.diagonal() / counts.sum(1).clip(min=1)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    shown = counts.astype(float)
    shown[shown == 0] = float("nan")  # empty cells stay white
    image = ax.imshow(shown, cmap="Blues", norm=LogNorm(vmin=1, vmax=max(2, counts.max())))
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                dark = counts[i, j] > counts.max() ** 0.5
                ax.text(
                    j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if dark else "black",
                )  # fmt: skip
    ax.set_xticks(range(n), [str(c) for c in range(n)])
    ax.set_yticks(range(n), [f"{c}  ({per_class[c] * 100:.1f}%)" for c in range(n)])
    total = counts.sum()
    accuracy = counts.diagonal().sum() / max(1, total)
    ax.set(
        xlabel="predicted label",
        ylabel="true label (accuracy of the class)",
        title=f"Confusion matrix: {percent(accuracy)} of {total:,}\n{title}",
    )
    fig.colorbar(image, ax=ax, label="images (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def mistakes_png(images: torch.Tensor, mistakes: list[dict], path: Path, title: str) -> Path:
    """The test images of `mistakes` (index, label, predicted, probability), most confident
    first, each titled with its true and predicted label."""
    plt = pyplot("drawing the confusion matrix and the mistakes")
    rows = max(1, -(-len(mistakes) // COLUMNS))
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(COLUMNS * 1.3, rows * 1.55 + 0.6))
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, mistakes, strict=False):
        ax.imshow(images[m["index"]].numpy(), cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(
            f"true {m['label']}, pred {m['predicted']}\n{m['probability'] * 100:.1f}%  "
            f"#{m['index']}",
            fontsize=8,
        )
    fig.suptitle(f"Most confident mistakes ({len(mistakes)}): {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
