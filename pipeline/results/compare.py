"""Several runs side by side: what `python -m pipeline.report RUN_DIR RUN_DIR...` (or a sweep's
folder) prints and writes.

One row per run: the settings that differ between the runs, its state (finished, or unfinished
and how far it got, or broken and why), epochs, the selected epoch and the metric it was
selected by (val_accuracy on the validation split; test_accuracy, said so, in a run without
one), the test accuracy of the selected model (once the run finished), the last train loss,
training time and images/s. Runs that differ only by `train.seed` are also grouped: the mean and
standard deviation over the seeds. The table is written as Markdown and CSV, and one PNG
overlays every run's selection-split accuracy by epoch and train loss, labelled by the settings
that differ. The last line names the settings chosen: the best mean selection metric over seeds.
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

from pipeline.atomic import write_atomic
from pipeline.errors import DataError
from pipeline.results.plots import pyplot
from pipeline.results.records import RunRecords, metric_text, percent, read_records, summarize

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

    def selection(self) -> dict[str, Any]:
        """The selected epoch, its metric and value, and the selected model's test (the
        report's own reading: summary.json once finished, the records before)."""
        records = RunRecords(self.path, self.epochs, self.steps, self.summary or None)
        return summarize(records)

    def train_time(self) -> float:
        if "train_time_s" in self.summary:
            return float(self.summary["train_time_s"])
        return sum(r.get("epoch_time_s", 0.0) for r in self.epochs)

    def images_per_s(self) -> float | None:
        """The whole run's: all images over the epochs' train time (`records.THROUGHPUT`)."""
        return self.selection()["images_per_s"]


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
    records = read_records(path)
    epochs, settings = records.epochs, _flatten(config)
    if records.summary is not None:
        state = "finished"
    else:
        done, total = (epochs[-1]["epoch"] if epochs else 0), settings.get("train.epochs", "?")
        state = f"unfinished ({done} of {total} epochs)"
    return Run(path, state, settings, epochs, records.steps, records.summary or {})


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


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def rows(runs: list[Run], keys: list[str]) -> list[dict[str, Any]]:
    """One dict per run: the columns of the table (numbers, not text)."""
    out = []
    for r in runs:
        row: dict[str, Any] = {"run": r.path.name, **{k: r.settings.get(k) for k in keys}}
        s = r.selection() if r.ok and r.epochs else {}
        row.update(
            state=r.state,
            epochs=r.epochs[-1]["epoch"] if r.epochs else 0,
            stop_reason=s.get("stop_reason"),
            selection_metric=s.get("selection_metric"),
            selected_epoch=s.get("selected_epoch"),
            selected_value=s.get("selected_value"),
            test_accuracy=s.get("test_accuracy"),
            test_loss=s.get("test_loss"),
            final_train_loss=r.final("train_loss"),
            train_time_s=r.train_time() if r.ok else None,
            images_per_s=r.images_per_s() if r.ok else None,
        )
        out.append(row)
    return out


def seed_groups(runs: list[Run], keys: list[str], least: int = 2) -> list[dict[str, Any]]:
    """Finished runs that differ only by train.seed, in groups of `least` or more: the mean and
    standard deviation (None for a single run)."""
    others = [k for k in keys if k != "train.seed"]
    if least > 1 and "train.seed" not in keys:
        return []
    groups: dict[str, list[Run]] = {}
    for r in runs:
        if r.state == "finished" and r.epochs:
            groups.setdefault(label(r, others), []).append(r)
    out = []
    for name, members in groups.items():
        if len(members) < least:
            continue
        row: dict[str, Any] = {"settings": name, "seeds": len(members)}
        chosen = [m.selection() for m in members]
        row["selection_metric"] = chosen[0]["selection_metric"]
        for key, values in (
            ("selected_value", [c["selected_value"] for c in chosen]),
            ("test_accuracy", [c["test_accuracy"] for c in chosen]),
            ("train_time_s", [m.train_time() for m in members]),
            ("images_per_s", [m.images_per_s() or 0.0 for m in members]),
        ):
            if any(v is None for v in values):
                row[key] = row[f"{key}_std"] = None
                continue
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(row)
    return out


def choice(runs: list[Run], keys: list[str]) -> str | None:
    """The comparison's closing line: the settings (over their seeds) with the best mean
    selection metric (a loss: the lowest), with that mean and the selected models' test
    accuracy. None when no run finished or the runs were selected by different metrics."""
    groups = [g for g in seed_groups(runs, keys, least=1) if g["selected_value"] is not None]
    metrics = {g["selection_metric"] for g in groups}
    if len(metrics) != 1:
        return None
    (metric,) = metrics
    best = (min if metric.endswith("loss") else max)(groups, key=lambda g: g["selected_value"])

    on_test = metric.startswith("test")
    where = "the test set (no validation split)" if on_test else "the validation split"
    text = f"chosen on {where}: {best['settings']} ({metric.replace('_', ' ')} "
    text += _mean_std(metric, best["selected_value"], best["selected_value_std"])
    if not on_test:
        tested = _mean_std("accuracy", best["test_accuracy"], best["test_accuracy_std"])
        text += f", test accuracy of the selected model {tested}"
    return text + (f" over {best['seeds']} seeds)" if best["seeds"] > 1 else ")")


def _selected(row: dict[str, Any]) -> str:
    if row["selected_epoch"] is None:
        return "-"
    metric = row["selection_metric"]
    shown = f"{row['selected_epoch']} ({metric} {metric_text(metric, row['selected_value'], '-')})"
    return shown + (" on test: no val split" if metric.startswith("test") else "")


def _mean_std(metric: str, mean: float | None, std: float | None, fmt: str = ".4f") -> str:
    if mean is None or std is None:  # one run: no spread
        return metric_text(metric, mean, "-")
    if metric.endswith("accuracy"):
        return f"{mean * 100:.2f} ± {std * 100:.2f}%"
    return f"{mean:{fmt}} ± {std:{fmt}}"


def markdown(runs: list[Run], keys: list[str]) -> str:
    head = ["run", *keys, "state", "epochs", "selected epoch (metric)"]
    head += ["test acc of the selected", "train loss", "train time s", "img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows(runs, keys):
        state = row["state"] + (" (early stop)" if row["stop_reason"] == "early_stop" else "")
        cells = [row["run"], *(_value(row[k]) for k in keys), state, str(row["epochs"])]
        cells += [_selected(row), percent(row["test_accuracy"], "-")]
        cells += [_num(row["final_train_loss"], ".4f"), _num(row["train_time_s"], ".1f")]
        cells += [_num(row["images_per_s"], ",.0f")]
        lines.append("| " + " | ".join(cells) + " |")
    groups = seed_groups(runs, keys)
    if groups:
        lines += [
            "",
            "Over seeds (runs that differ only by train.seed; mean ± standard deviation):",
            "",
            "| settings | seeds | selection metric | test acc of the selected | train time s |"
            " img/s |",
            "|---|---|---|---|---|---|",
        ]
        for g in groups:
            metric = g["selection_metric"]
            cells = [g["settings"], str(g["seeds"])]
            cells.append(
                f"{metric} {_mean_std(metric, g['selected_value'], g['selected_value_std'])}"
            )
            cells.append(_mean_std("accuracy", g["test_accuracy"], g["test_accuracy_std"]))
            cells.append(_mean_std("time", g["train_time_s"], g["train_time_s_std"], ".1f"))
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
    """Each run's selection-split accuracy by epoch (val_accuracy; test_accuracy in a run
    without a split) and train loss by step, overlaid, labelled by `keys`."""
    plt = pyplot("the comparison's plot")
    from matplotlib.ticker import MaxNLocator

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(13, 5))
    splits, epochs = set(), set()
    for i, r in enumerate(x for x in runs if x.ok and (x.epochs or x.steps)):
        color, name = f"C{i % 10}", label(r, keys)
        key = "val_accuracy" if any("val_accuracy" in e for e in r.epochs) else "test_accuracy"
        points = [(e["epoch"], e[key] * 100) for e in r.epochs if key in e]
        if points:
            splits.add(key.partition("_")[0])
            epochs.update(e for e, _ in points)
            acc.plot(*zip(*points, strict=True), "o-", color=color, label=name)
        if r.steps:
            loss.plot([s["step"] for s in r.steps], [s["loss"] for s in r.steps], color=color,
                      linewidth=1, label=name)  # fmt: skip
    which = " / ".join(sorted(splits)) or "val"
    acc.set(
        xlabel="epoch",
        ylabel=f"{which} accuracy (%)",
        title=f"{which.capitalize()} accuracy by epoch",
    )
    if 0 < len(epochs) <= 12:  # a tick at each epoch, even for a single one
        acc.set_xticks(sorted(epochs))
        acc.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    else:
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
    """Compare the runs `targets` name; write comparison.md, .csv and .png into `out`; what the
    command prints: the table (Markdown), where the files are and the settings chosen."""
    runs = [read_run(p) for p in find_runs(targets)]
    keys = differing(runs)
    table = markdown(runs, keys)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "comparison.md", table)
    write_atomic(out / "comparison.csv", csv_text(runs, keys))
    plot(runs, keys, out / "comparison.png", title or ", ".join(str(t) for t in targets))
    chosen = choice(runs, keys)
    table += f"comparison.md, comparison.csv and comparison.png in {out}\n"
    return table + (f"{chosen}\n" if chosen else "")
