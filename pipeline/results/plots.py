"""The plots of `python -m pipeline.report`: loss (train, and per epoch validation and test where
logged), accuracy (per epoch on the validation split and the test set where logged, the
selected epoch, and the test accuracy of the selected model) and throughput of a run, as PNG
files; and the one way the project imports matplotlib (the `report` extra), drawing to files
only, imported when a plot is drawn, never when a module is."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.results.records import RunRecords, summarize

PLOTS = ("loss.png", "accuracy.png", "throughput.png")


def pyplot_or_none():
    """matplotlib.pyplot, drawing to files only; None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def pyplot(needed_for: str):
    """matplotlib.pyplot; a one-line PipelineError naming `needed_for` where it is missing."""
    plt = pyplot_or_none()
    if plt is None:
        raise PipelineError(
            f"{needed_for} needs matplotlib (the project's report extra): pip install matplotlib"
        )
    return plt


def _epoch_lines(ax, run: RunRecords) -> None:
    """Dotted vertical lines at the steps where epochs ended."""
    for r in run.epochs:
        ax.axvline(r["step"], color="0.8", linestyle=":", linewidth=1, zorder=0)


# Per-epoch curves: (record key, label, marker); a key a run did not log is left out.
LOSSES = (
    ("train_loss", "train loss (epoch)", "o"),
    ("val_loss", "val loss (epoch)", "s"),
    ("test_loss", "test loss (epoch)", "^"),
    ("test_loss_this_epoch", "test loss (epoch)", "^"),
)
ACCURACIES = (
    ("val_accuracy", "val accuracy", "o-"),
    ("test_accuracy", "test accuracy", "s-"),
    ("test_accuracy_this_epoch", "test accuracy (each epoch's model)", "s--"),
)


def _series(epochs: list[dict], key: str, by: str = "step") -> tuple[list, list]:
    logged = [r for r in epochs if key in r]
    return [r[by] for r in logged], [r[key] for r in logged]


def plot(run: RunRecords, out: Path) -> list[Path]:
    """Write the PNG plots into `out`; returns the files written."""
    plt = pyplot("the report")
    out.mkdir(parents=True, exist_ok=True)
    title = run.run_dir.resolve().name
    written = []

    def save(fig, ax, name: str, xlabel: str, ylabel: str, what: str) -> None:
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{what} - {title}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)

    if run.steps or run.epochs:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        if run.steps:
            ax.plot(
                [r["step"] for r in run.steps],
                [r["loss"] for r in run.steps],
                label="train loss (per logging interval)",
                linewidth=1.2,
            )
        values = [r["loss"] for r in run.steps]
        for key, label, marker in LOSSES:
            x, y = _series(run.epochs, key)
            if y:
                ax.plot(x, y, marker, label=label)
                values += y
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        _epoch_lines(ax, run)
        save(fig, ax, "loss.png", "optimizer step", "loss", "Loss")

    if run.epochs:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        s = summarize(run)
        shown = []
        for key, label, marker in ACCURACIES:
            x, y = _series(run.epochs, key, by="epoch")
            if y:
                ax.plot(x, [v * 100 for v in y], marker, label=label)
                shown += [v * 100 for v in y]
        picked, metric = s["selected_epoch"], s["selection_metric"]
        if picked is not None:
            ax.axvline(picked, color="0.6", linestyle="--", linewidth=1, zorder=0)
            label = f"selected: epoch {picked} (by {metric})"
            if s["test_accuracy"] is not None:
                tested = s["test_accuracy"] * 100
                ax.plot(
                    [picked], [tested], "*", markersize=14, label=f"{label}: test {tested:.2f}%"
                )
                shown.append(tested)
            else:
                ax.plot([], [], "--", color="0.6", label=label)
        ax.set_xticks([r["epoch"] for r in run.epochs])
        ax.set_ylim(max(0.0, min(shown) - 2), 100.5)
        save(fig, ax, "accuracy.png", "epoch", "accuracy (%)", "Accuracy")

    if run.steps:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot(
            [r["step"] for r in run.steps],
            [r["images_per_s"] for r in run.steps],
            label="per logging interval",
            linewidth=1.2,
        )
        mean = summarize(run)["mean_images_per_s"]
        if mean is not None:
            ax.axhline(mean, color="C1", linestyle="--", label=f"mean over epochs ({mean:,.0f})")
        _epoch_lines(ax, run)
        ax.set_ylim(bottom=0)
        save(fig, ax, "throughput.png", "optimizer step", "images/s", "Training throughput")
    return written
