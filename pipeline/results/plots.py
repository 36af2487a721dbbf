"""The plots of `python -m pipeline.report`: loss, test accuracy and throughput of a run, as PNG
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


def plot(run: RunRecords, out: Path) -> list[Path]:
    """Write the PNG plots into `out`; returns the files written."""
    plt = pyplot("the report")
    out.mkdir(parents=True, exist_ok=True)
    title = run.run_dir.resolve().name
    written = []

    def save(fig, name: str) -> None:
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
        if run.epochs:
            x = [r["step"] for r in run.epochs]
            ax.plot(x, [r["train_loss"] for r in run.epochs], "o", label="train loss (epoch)")
            ax.plot(x, [r["test_loss"] for r in run.epochs], "s", label="test loss (epoch)")
        values = [r["loss"] for r in run.steps] + [r["test_loss"] for r in run.epochs]
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        _epoch_lines(ax, run)
        ax.set(xlabel="optimizer step", ylabel="loss", title=f"Loss - {title}")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "loss.png")

    if run.epochs:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        epochs = [r["epoch"] for r in run.epochs]
        accuracy = [r["test_accuracy"] * 100 for r in run.epochs]
        ax.plot(epochs, accuracy, "o-", label="test accuracy")
        best = max(range(len(accuracy)), key=accuracy.__getitem__)
        ax.annotate(
            f"best {accuracy[best]:.2f}%",
            (epochs[best], accuracy[best]),
            textcoords="offset points",
            xytext=(0, -16),
            ha="right" if best == len(accuracy) - 1 and best > 0 else "center",
        )
        ax.set_xticks(epochs)
        ax.set_ylim(max(0.0, min(accuracy) - 2), 100.5)
        ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"Test accuracy - {title}")
        ax.grid(alpha=0.3)
        save(fig, "accuracy.png")

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
        ax.set(xlabel="optimizer step", ylabel="images/s", title=f"Training throughput - {title}")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "throughput.png")
    return written
