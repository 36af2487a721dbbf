"""Several runs side by side: what `python -m pipeline.report RUN_DIR RUN_DIR...` (or a sweep's
folder) prints and writes.

One row per run: the settings that differ between the runs, its state (finished, or unfinished
and how far it got, or broken and why), epochs, final and best accuracy, losses, training time
and images/s. Runs that differ only by `train.seed` are also grouped: the mean and standard
deviation over the seeds. The table is written as Markdown and CSV, and one PNG overlays every
run's accuracy and train-loss curves, labelled by the settings that differ.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import DataError
from pipeline.files import read_jsonl, write_atomic
from pipeline.results.plots import pyplot

# Settings that never tell runs apart for a reader: where files live, how it was logged.
_IGNORED = ("train.run_dir", "train.resume", "data.root", "data.mirrors", "tracking.")


@dataclass
class Run:
    """One run directory, read for the comparison."""

    path: Path
    state: str  # finished | unfinished (...) | broken (...)
    settings: dict[str, Any] = field(default_factory=dict)  # dotted keys
    epochs: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.state.startswith("broken")

    def final(self, key: str) -> float | None:
        return self.epochs[-1].get(key) if self.epochs else None

    def best(self, key: str) -> float | None:
        values = [r[key] for r in self.epochs if isinstance(r.get(key), (int, float))]
        return max(values) if values else None

    def train_time(self) -> float:
        if "train_time_s" in self.summary:
            return float(self.summary["train_time_s"])
        return sum(r.get("epoch_time_s", 0.0) for r in self.epochs)

    def images_per_s(self) -> float | None:
        time = sum(r.get("epoch_time_s", 0.0) for r in self.epochs)
        images = sum(r.get("images_per_s", 0.0) * r.get("epoch_time_s", 0.0) for r in self.epochs)
        return images / time if time > 0 else None


def _flatten(config: dict) -> dict[str, Any]:
    return {
        f"{section}.{key}": value
        for section, values in config.items()
        if isinstance(values, dict)
        for key, value in values.items()
    }


def is_run(path: Path) -> bool:
    names = ("config.yaml", "metrics.jsonl", "steps.jsonl", "summary.json")
    return any((path / n).exists() for n in names) or any(path.glob("ckpt-*.pt"))


def find_runs(targets: list[Path]) -> list[Path]:
    """The run directories `targets` name: runs themselves, or folders holding runs (a sweep's
    folder), in order, each once. DataError for a target that is neither."""
    found: list[Path] = []
    for target in targets:
        if not target.is_dir():
            raise DataError(f"{target} is not a directory; pass run directories (train.run_dir)")
        if is_run(target):
            found.append(target)
            continue
        children = sorted(p for p in target.iterdir() if p.is_dir() and is_run(p))
        if not children:
            raise DataError(
                f"{target} holds no run (no config.yaml, metrics or checkpoints in it or in its "
                "folders); pass run directories or a sweep's folder"
            )
        found += children
    return list(dict.fromkeys(found))


def read_run(path: Path) -> Run:
    """A run directory for the comparison; a broken one says why rather than failing."""
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        why = "no config.yaml" if isinstance(e, FileNotFoundError) else "config.yaml unreadable"
        return Run(path, f"broken ({why})")
    if not isinstance(config, dict):
        return Run(path, "broken (config.yaml is not a mapping)")
    epochs = sorted(read_jsonl(path / "metrics.jsonl"), key=lambda r: r.get("epoch", 0))
    steps = sorted(read_jsonl(path / "steps.jsonl"), key=lambda r: r.get("step", 0))
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        summary = None
    settings = _flatten(config)
    if isinstance(summary, dict):
        state = "finished"
    else:
        done, total = (epochs[-1]["epoch"] if epochs else 0), settings.get("train.epochs", "?")
        state = f"unfinished ({done} of {total} epochs)"
    return Run(path, state, settings, epochs, steps, summary if isinstance(summary, dict) else {})


def differing(runs: list[Run]) -> list[str]:
    """The settings whose values are not the same in every readable run."""
    readable = [r for r in runs if r.ok]
    keys = sorted({k for r in readable for k in r.settings if not k.startswith(_IGNORED)})
    return [k for k in keys if len({json.dumps(r.settings.get(k)) for r in readable}) > 1]


def label(run: Run, keys: list[str]) -> str:
    shown = [f"{k}={_value(run.settings.get(k))}" for k in keys]
    return ", ".join(shown) or run.path.name


def _value(v: Any) -> str:
    if v is None:
        return "-"
    return str(v).lower() if isinstance(v, bool) else str(v)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}%"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def rows(runs: list[Run], keys: list[str]) -> list[dict[str, Any]]:
    """One dict per run: the columns of the table (numbers, not text)."""
    out = []
    for r in runs:
        row: dict[str, Any] = {"run": r.path.name, **{k: r.settings.get(k) for k in keys}}
        row.update(
            state=r.state,
            epochs=r.epochs[-1]["epoch"] if r.epochs else 0,
            final_test_accuracy=r.final("test_accuracy"),
            best_test_accuracy=r.best("test_accuracy"),
            final_train_loss=r.final("train_loss"),
            final_test_loss=r.final("test_loss"),
            train_time_s=r.train_time() if r.ok else None,
            images_per_s=r.images_per_s() if r.ok else None,
        )
        out.append(row)
    return out


def seed_groups(runs: list[Run], keys: list[str]) -> list[dict[str, Any]]:
    """Runs that differ only by train.seed, with two or more finished: mean and std."""
    others = [k for k in keys if k != "train.seed"]
    if "train.seed" not in keys:
        return []
    groups: dict[str, list[Run]] = {}
    for r in runs:
        if r.state == "finished" and r.epochs:
            groups.setdefault(label(r, others), []).append(r)
    out = []
    for name, members in groups.items():
        if len(members) < 2:
            continue
        row: dict[str, Any] = {"settings": name, "seeds": len(members)}
        for key, values in (
            ("final_test_accuracy", [m.final("test_accuracy") for m in members]),
            ("best_test_accuracy", [m.best("test_accuracy") for m in members]),
            ("train_time_s", [m.train_time() for m in members]),
            ("images_per_s", [m.images_per_s() or 0.0 for m in members]),
        ):
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values)
        out.append(row)
    return out


def markdown(runs: list[Run], keys: list[str]) -> str:
    head = ["run", *keys, "state", "epochs", "final test acc", "best test acc (over epochs)"]
    head += ["train loss", "test loss", "train time s", "img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows(runs, keys):
        cells = [row["run"], *(_value(row[k]) for k in keys), row["state"], str(row["epochs"])]
        cells += [_pct(row["final_test_accuracy"]), _pct(row["best_test_accuracy"])]
        cells += [_num(row["final_train_loss"], ".4f"), _num(row["final_test_loss"], ".4f")]
        cells += [_num(row["train_time_s"], ".1f"), _num(row["images_per_s"], ",.0f")]
        lines.append("| " + " | ".join(cells) + " |")
    groups = seed_groups(runs, keys)
    if groups:
        lines += [
            "",
            "Over seeds (runs that differ only by train.seed; mean ± standard deviation):",
            "",
            "| settings | seeds | final test acc | best test acc (over epochs) | train time s |"
            " img/s |",
            "|---|---|---|---|---|---|",
        ]
        for g in groups:
            cells = [g["settings"], str(g["seeds"])]
            for key in ("final_test_accuracy", "best_test_accuracy"):
                cells.append(f"{g[key] * 100:.2f} ± {g[key + '_std'] * 100:.2f}%")
            cells.append(f"{g['train_time_s']:.1f} ± {g['train_time_s_std']:.1f}")
            cells.append(f"{g['images_per_s']:,.0f} ± {g['images_per_s_std']:,.0f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(runs: list[Run], keys: list[str]) -> str:
    table = rows(runs, keys)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]) if table else ["run"])
    writer.writeheader()
    writer.writerows(table)
    return buf.getvalue()


def plot(runs: list[Run], keys: list[str], path: Path, title: str) -> Path:
    """Test accuracy by epoch and train loss by step, every run overlaid, labelled by `keys`."""
    plt = pyplot("the comparison's plot")
    from matplotlib.ticker import MaxNLocator

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(13, 5))
    for i, r in enumerate(x for x in runs if x.ok and (x.epochs or x.steps)):
        color, name = f"C{i % 10}", label(r, keys)
        if r.epochs:
            acc.plot(
                [e["epoch"] for e in r.epochs],
                [e["test_accuracy"] * 100 for e in r.epochs],
                "o-",
                color=color,
                label=name,
            )
        if r.steps:
            loss.plot([s["step"] for s in r.steps], [s["loss"] for s in r.steps], color=color,
                      linewidth=1, label=name)  # fmt: skip
    acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy by epoch")
    acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss.set(
        xlabel="optimizer step", ylabel="train loss", title="Train loss (per logging interval)"
    )
    loss.set_yscale("log")
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
    handles, names = acc.get_legend_handles_labels()
    if not names:
        handles, names = loss.get_legend_handles_labels()
    if names:
        fig.legend(handles, names, loc="lower center", ncol=min(3, len(names)), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(names) - 1) // 3), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(targets: list[Path], out: Path, title: str | None = None) -> str:
    """Compare the runs `targets` name; write comparison.md, .csv and .png into `out`; the
    table (Markdown) for printing."""
    runs = [read_run(p) for p in find_runs(targets)]
    keys = differing(runs)
    table = markdown(runs, keys)
    write_atomic(out / "comparison.md", table)
    write_atomic(out / "comparison.csv", csv_text(runs, keys))
    plot(runs, keys, out / "comparison.png", title or ", ".join(str(t) for t in targets))
    return table
