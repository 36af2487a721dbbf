"""The plots of `python -m pipeline.report`: loss (train, and per epoch validation and test where
logged), accuracy (per epoch on the validation split and the test set where logged, the
selected epoch at its selection-split accuracy, and apart from it the test accuracy of the model
tested at the end) and throughput (per logging interval, with the figures of
`records.THROUGHPUT`) of a run, as PNG files; and the one way the project imports matplotlib
(the `report` extra), drawing to files only, imported when a plot is drawn, never when a module
is."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.results.records import THROUGHPUT, RunRecords, summarize

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
    ("val_accuracy", "validation split (each epoch)", "o-"),
    ("test_accuracy", "test set (each epoch; no validation split)", "s-"),
    ("test_accuracy_this_epoch", "test set (each epoch's model)", "s--"),
)
SPLITS = {"val": "validation split", "test": "test set"}


def _series(epochs: list[dict], key: str, by: str = "step") -> tuple[list, list]:
    logged = [r for r in epochs if key in r]
    return [r[by] for r in logged], [r[key] for r in logged]


def plot(run: RunRecords, out: Path) -> list[Path]:
    """Write the PNG plots into `out`; returns the files written."""
    plt = pyplot("the report")
    out.mkdir(parents=True, exist_ok=True)
    title = run.run_dir.resolve().name
    written = []
    s = summarize(run)

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
        shown = []
        for key, label, marker in ACCURACIES:
            x, y = _series(run.epochs, key, by="epoch")
            if y:
                ax.plot(x, [v * 100 for v in y], marker, label=label)
                shown += [v * 100 for v in y]
        # The selection is marked on the curve of the split it was made on, at that split's
        # accuracy; the run's one test is a marker of its own, never a point of another split.
        picked, split = s["selected_epoch"], s["selection_split"]
        if picked is not None:
            value = next(r for r in run.epochs if r["epoch"] == picked)[f"{split}_accuracy"] * 100
            so_far = "" if s["finished"] else " so far"
            label = (
                f"selected{so_far}: epoch {picked} by {s['selection_metric']}, "
                f"{SPLITS[split]} {value:.2f}%"
            )
            ax.axvline(picked, color="0.6", linestyle="--", linewidth=1, zorder=0)
            ax.plot([picked], [value], "*", color="C3", markersize=14, label=label)
        if s["test_accuracy"] is not None:
            tested, of = s["test_accuracy"] * 100, s["test_of"]
            of = f"the selected model, {of}" if s["test_epoch"] == picked else of
            label = f"test of {of}: {tested:.2f}%"
            ax.plot([s["test_epoch"]], [tested], "D", c="C2", ms=9, mfc="none", mew=2, label=label)
            shown.append(tested)
        ax.set_xticks([r["epoch"] for r in run.epochs])
        ax.set_ylim(max(0.0, min(shown) - 2), 100.5)
        save(fig, ax, "accuracy.png", "epoch", "accuracy (%)", "Accuracy")

    if run.steps:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot(
            [r["step"] for r in run.steps],
            [r["images_per_s"] for r in run.steps],
            ".-",
            label="per logging interval",
            linewidth=1,
        )
        styles = ({"c": "C1", "ls": "--"}, {"c": "C2", "ls": ":"})
        for (key, words), style in zip(THROUGHPUT, styles, strict=True):
            if s[key] is not None:
                ax.axhline(s[key], **style, label=f"{words}: {s[key]:,.0f} img/s")
        _epoch_lines(ax, run)
        ax.set_ylim(bottom=0)
        save(fig, ax, "throughput.png", "optimizer step", "images/s", "Training throughput")
    return written
