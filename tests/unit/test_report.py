"""`python -m pipeline.report`, in this process on run directories written here as training
writes them.

A run's report follows the split: the validation metric that selected the model and the test
accuracy of the selected model, for a finished run and one still running; the plots take
validation and per-epoch test curves.

Runs side by side (`pipeline.report RUN_DIR...`, a sweep's folder): a row per run with the
settings that differ, runs that differ only by seed grouped with mean and standard deviation,
unfinished and broken run directories shown as such, Markdown, CSV and one PNG written.

A real run's report as a user runs it, on a run trained here on the tiny dataset: the plots and
summary.txt agree with its metrics, a running job's partial lines are skipped, and bad input or
a missing matplotlib is one line and a failing exit."""

from __future__ import annotations

import csv
import json
import shutil
import struct
import sys
from pathlib import Path
from statistics import median

import pytest
import yaml

from pipeline import report, train
from pipeline.config.schema import Config, to_dict
from pipeline.results import compare
from pipeline.results.plots import PLOTS, plot
from pipeline.results.records import load_run, summarize, summary_text

from helpers import TINY_ARGS, read_jsonl


# -- a run's report --------------------------------------------------------------------------------
def fields(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def epoch(n: int, **scores) -> dict:
    base = {"epoch": n, "step": 10 * n, "train_loss": 1.0 / n, "epoch_time_s": 1.0}
    return {**base, "images_per_s": 640.0, "lr": 0.1, **scores}


def write_run(
    run_dir: Path, epochs: list[dict], summary: dict | None, steps: list[dict] = ()
) -> Path:
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epochs))
    if steps:
        (run_dir / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def drawn(run, out: Path, monkeypatch) -> dict:
    """plot(run, out)'s figures by file name, caught as they are saved."""
    pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install -e .[report]")
    from matplotlib.figure import Figure

    figures, save = {}, Figure.savefig

    def savefig(fig, path, **kwargs):
        figures[Path(path).name] = fig
        return save(fig, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    plot(run, out)
    return figures


def marked(figure, marker: str):
    """The one line of the figure's axes drawn with `marker`."""
    (line,) = [x for x in figure.axes[0].lines if x.get_marker() == marker]
    return line


SPLIT_EPOCHS = [
    epoch(1, val_loss=0.3, val_accuracy=0.97, test_accuracy_this_epoch=0.975, best_epoch=1),
    epoch(2, val_loss=0.2, val_accuracy=0.985, test_accuracy_this_epoch=0.99, best_epoch=2),
    epoch(3, val_loss=0.25, val_accuracy=0.98, test_accuracy_this_epoch=0.991, best_epoch=2),
]


SPLIT_SUMMARY = {
    "epochs": 3,
    "global_step": 30,
    "stop_reason": "early_stop",
    "selection_metric": "val_accuracy",
    "selection_split": "val",
    "selected_epoch": 2,
    "selected_value": 0.985,
    "test_accuracy": 0.9895,
    "test_loss": 0.031,
    "test_of": "best.pt (epoch 2)",
    "test_epoch": 2,
}


def test_a_finished_run_shows_the_selection_and_the_test_of_the_selected_model(tmp_path):
    run = load_run(write_run(tmp_path / "run", SPLIT_EPOCHS, SPLIT_SUMMARY))
    f = fields(summary_text(run, summarize(run)))
    assert f["status"] == "finished (stopped early after epoch 3)"
    assert f["selected"] == "epoch 2 by val_accuracy (98.50%)"
    assert f["test accuracy"] == "98.95% (test loss 0.0310, of best.pt (epoch 2))"
    # The last epoch's own test accuracy is shown as what it is, not as the model's.
    assert f["last epoch"] == (
        "val accuracy 98.00%, val loss 0.2500; test accuracy this epoch 99.10%"
    )
    pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install -e .[report]")
    written = plot(run, tmp_path / "out")
    assert {p.name for p in written} == {"loss.png", "accuracy.png"}  # no steps.jsonl here


def test_a_running_run_shows_the_epoch_selected_so_far_and_no_test_yet(tmp_path):
    run = load_run(write_run(tmp_path / "run", SPLIT_EPOCHS[:2], None))
    f = fields(summary_text(run, summarize(run)))
    assert f["status"].startswith("not finished")
    assert f["selected"] == "epoch 2 by val_accuracy (98.50%) so far"
    assert f["test accuracy"] == "n/a (the selected model is tested when the run ends)"


def test_the_accuracy_plot_marks_the_selection_on_validation_and_the_test_apart(
    tmp_path, monkeypatch
):
    run = load_run(write_run(tmp_path / "run", SPLIT_EPOCHS, SPLIT_SUMMARY))
    figure = drawn(run, tmp_path / "out", monkeypatch)["accuracy.png"]
    star = marked(figure, "*")  # the selected epoch, at its validation accuracy
    assert list(star.get_xdata()) == [2] and list(star.get_ydata()) == [pytest.approx(98.5)]
    assert star.get_label() == "selected: epoch 2 by val_accuracy, validation split 98.50%"
    test = marked(figure, "D")  # the one test of the selected model, apart from the star
    assert list(test.get_xdata()) == [2] and list(test.get_ydata()) == [pytest.approx(98.95)]
    assert test.get_label() == "test of the selected model, best.pt (epoch 2): 98.95%"


def test_a_run_without_a_validation_split_plots_its_selection_on_the_test_curve(
    tmp_path, monkeypatch
):
    epochs = [
        epoch(1, test_loss=0.3, test_accuracy=0.97, best_epoch=1),
        epoch(2, test_loss=0.2, test_accuracy=0.98, best_epoch=2),
    ]
    summary = {
        **SPLIT_SUMMARY,
        "epochs": 2,
        "global_step": 20,
        "stop_reason": "epochs",
        "selection_metric": "test_accuracy",
        "selection_split": "test",
        "selected_value": 0.98,
        "test_accuracy": 0.98,
    }
    run = load_run(write_run(tmp_path / "run", epochs, summary))
    figure = drawn(run, tmp_path / "out", monkeypatch)["accuracy.png"]
    curve = marked(figure, "s")
    assert curve.get_label() == "test set (each epoch; no validation split)"
    star = marked(figure, "*")
    assert list(star.get_ydata()) == [pytest.approx(98.0)]
    assert star.get_label() == "selected: epoch 2 by test_accuracy, test set 98.00%"
    assert marked(figure, "D").get_label().startswith("test of the selected model")


def test_the_throughput_lines_are_the_figures_summary_txt_gives(tmp_path, monkeypatch):
    rates = [6000.0, 6400.0, 320.0, 6200.0, 5800.0]  # one slow interval: a warm-up, a busy machine
    steps = [{"step": 2 * i + 2, "loss": 0.5, "images_per_s": r} for i, r in enumerate(rates)]
    seconds = sum(640 / r for r in rates)  # 640 images an interval
    epochs = [epoch(1, test_loss=0.3, test_accuracy=0.97, best_epoch=1)]
    epochs[0].update(epoch_time_s=seconds, images_per_s=640 * len(rates) / seconds)
    run = load_run(write_run(tmp_path / "run", epochs, None, steps))
    median_rate = median(rates)
    whole = sum(r["images_per_s"] * r["epoch_time_s"] for r in epochs) / seconds
    assert whole < sorted(rates)[1]  # the time-weighted figure sits below all intervals but one
    figure = drawn(run, tmp_path / "out", monkeypatch)["throughput.png"]
    lines = {x.get_label(): list(x.get_ydata()) for x in figure.axes[0].lines}
    assert lines[f"median of the logging intervals: {median_rate:,.0f} img/s"] == [median_rate] * 2
    assert (
        lines[f"whole run (all images / train time): {whole:,.0f} img/s"]
        == [pytest.approx(whole)] * 2
    )
    f = fields(summary_text(run, summarize(run)))
    assert f["images/s"] == (
        f"{median_rate:,.0f} median of the logging intervals; "
        f"{whole:,.0f} whole run (all images / train time)"
    )


# -- runs side by side -----------------------------------------------------------------------------
def make_run(
    root, name: str, lr: float, seed: int, accuracies: list[float], finished=True, split=True
):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    cfg = to_dict(Config())
    cfg["optim"]["lr"], cfg["train"]["seed"] = lr, seed
    cfg["train"]["run_dir"] = str(run_dir)  # differs everywhere, never shown
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    which = "val" if split else "test"
    epochs = [
        {"epoch": i + 1, "step": 10 * (i + 1), "train_loss": 1.0 / (i + 1), f"{which}_loss": 0.5,
         f"{which}_accuracy": a, "epoch_time_s": 2.0, "images_per_s": 500.0}
        for i, a in enumerate(accuracies)
    ]  # fmt: skip
    for e in epochs:  # as training records it: the first of the best epochs so far
        e["best_epoch"] = max(epochs[: e["epoch"]], key=lambda r: r[f"{which}_accuracy"])["epoch"]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    steps = [{"step": s, "loss": 2.0 / s, "images_per_s": 500.0} for s in (5, 10, 15, 20)]
    (run_dir / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    if finished:
        best = max(range(len(accuracies)), key=accuracies.__getitem__)
        summary = {
            "train_time_s": 4.5,
            "global_step": 10 * len(accuracies),
            "stop_reason": "epochs",
            "selection_metric": f"{which}_accuracy",
            "selected_epoch": best + 1,
            "selected_value": accuracies[best],
            "test_accuracy": accuracies[best] + 0.01,  # the selected model, tested once
            "test_loss": 0.4,
            "test_of": f"best.pt (epoch {best + 1})",
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    make_run(root, "a", 0.1, 0, [0.90, 0.95])
    make_run(root, "b", 0.1, 1, [0.92, 0.97])
    make_run(root, "c", 0.2, 0, [0.80, 0.85])
    make_run(root, "d", 0.2, 1, [0.70], finished=False)
    (root / "e").mkdir()
    (root / "e" / "steps.jsonl").write_text("")  # a run that never wrote its config
    return root


def test_a_row_per_run_with_the_settings_that_differ(sweep):
    runs = [compare.read_run(p) for p in compare.find_runs([sweep])]
    assert [r.path.name for r in runs] == ["a", "b", "c", "d", "e"]
    keys = compare.differing(runs)
    assert keys == ["optim.lr", "train.seed"]  # not train.run_dir
    rows = {r["run"]: r for r in compare.rows(runs, keys)}
    a = rows["a"]
    assert (a["selection_metric"], a["selected_epoch"], a["selected_value"]) == (
        "val_accuracy",
        2,
        0.95,
    )
    assert a["test_accuracy"] == pytest.approx(0.96)  # the selected model's test, not a best
    assert a["train_time_s"] == 4.5 and a["images_per_s"] == 500.0
    assert rows["d"]["state"] == "unfinished (1 of 3 epochs)"
    assert rows["d"]["selected_epoch"] == 1 and rows["d"]["test_accuracy"] is None
    assert rows["e"]["state"] == "broken (no config.yaml)" and rows["e"]["train_time_s"] is None


def test_runs_that_differ_by_seed_only_are_grouped(sweep):
    runs = [compare.read_run(p) for p in compare.find_runs([sweep])]
    (group,) = compare.seed_groups(runs, compare.differing(runs))  # c's partner is unfinished
    assert group["settings"] == "optim.lr=0.1" and group["seeds"] == 2
    assert group["selected_value"] == pytest.approx(0.96)  # val accuracy 0.95 and 0.97
    assert group["selected_value_std"] == pytest.approx(0.01414, abs=1e-4)
    assert group["test_accuracy"] == pytest.approx(0.97)


def test_the_closing_line_names_the_settings_chosen_over_their_seeds(sweep, tmp_path):
    runs = [compare.read_run(p) for p in compare.find_runs([sweep])]
    assert compare.choice(runs, compare.differing(runs)) == (
        "chosen on the validation split: optim.lr=0.1 (val accuracy 96.00 ± 1.41%, "
        "test accuracy of the selected model 97.00 ± 1.41% over 2 seeds)"
    )  # lr 0.2 has one finished seed, at 85%
    grid = [compare.read_run(make_run(tmp_path / "grid", f"{lr}", lr, 0, [0.8, a]))
            for lr, a in ((0.1, 0.90), (0.2, 0.93))]  # fmt: skip
    assert compare.choice(grid, ["optim.lr"]) == (
        "chosen on the validation split: optim.lr=0.2 (val accuracy 93.00%, "
        "test accuracy of the selected model 94.00%)"
    )  # a sweep without seeds: the single best run


def test_the_closing_line_chooses_the_lowest_loss(tmp_path):
    runs = []
    for name, lr, seed, loss in (("a", 0.1, 0, 0.05), ("b", 0.1, 1, 0.40), ("c", 0.2, 0, 0.20),
                                 ("d", 0.2, 1, 0.22)):  # fmt: skip
        run_dir = make_run(tmp_path, name, lr, seed, [0.8, 0.9])
        summary = json.loads((run_dir / "summary.json").read_text())
        summary.update(selection_metric="val_loss", selected_value=loss)
        (run_dir / "summary.json").write_text(json.dumps(summary))
        runs.append(compare.read_run(run_dir))
    assert compare.choice(runs, compare.differing(runs)) == (
        "chosen on the validation split: optim.lr=0.2 (val loss 0.2100 ± 0.0141, "
        "test accuracy of the selected model 91.00 ± 0.00% over 2 seeds)"
    )  # the lowest mean, 0.21 (lr 0.1: 0.225), though lr 0.1 has the lowest run
    old = compare.read_run(make_run(tmp_path, "old", 0.1, 0, [0.90, 0.93], split=False))
    assert compare.choice([old], []) == (
        "chosen on the test set (no validation split): old (test accuracy 93.00%)"
    )


def test_the_report_of_a_folder_writes_the_table_the_csv_and_the_plot(sweep, capsys):
    assert report.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| a | 0.1 | 0 | finished | 2 | 2 (val_accuracy 95.00%) | 96.00% |" in out
    assert "| optim.lr=0.1 | 2 | val_accuracy 96.00 ± 1.41% | 97.00 ± 1.41% |" in out
    assert "| e | - | - | broken (no config.yaml) |" in out
    assert out.splitlines()[-1].startswith("chosen on the validation split: optim.lr=0.1 (")
    folder = sweep / "comparison"
    assert (folder / "comparison.md").read_text() in out
    with open(folder / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["a", "b", "c", "d", "e"]
    assert table[1]["selected_value"] == "0.97" and table[1]["optim.lr"] == "0.1"
    assert (folder / "comparison.png").stat().st_size > 10_000


def test_a_run_without_a_split_says_it_was_selected_on_the_test_set(tmp_path):
    run = compare.read_run(make_run(tmp_path, "old", 0.1, 0, [0.90, 0.93], split=False))
    (row,) = compare.rows([run], [])
    assert row["selection_metric"] == "test_accuracy" and row["selected_epoch"] == 2
    assert "2 (test_accuracy 93.00%) on test: no val split" in compare.markdown([run], [])


def test_several_run_directories_and_a_missing_one(sweep, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert report.main([str(sweep / "a"), str(sweep / "c"), "--out", str(out)]) == 0
    assert "| a | 0.1 | finished |" in capsys.readouterr().out  # only optim.lr differs
    assert report.main([str(sweep / "a"), str(tmp_path / "nowhere")]) == 3
    assert "is not a directory" in capsys.readouterr().err


# -- a real run's report, as a user runs it (in this process) --------------------------------------
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished_run(tiny_mnist, tmp_path_factory) -> Path:
    """A real two-epoch run on the tiny dataset, W&B off."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    args = [*TINY_ARGS, "train.epochs=2", "train.log_every=2", "train.fused_conv=false"]
    assert train.main([*args, f"data.root={tiny_mnist}", f"train.run_dir={run_dir}"]) == 0
    return run_dir


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_plots_and_summary_match_the_metrics(finished_run, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install -e .[report]")
    out = tmp_path / "out"
    assert report.main([str(finished_run), "--out", str(out)]) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    for name in PLOTS:
        width, height = png_size(out / name)
        assert width >= 600 and height >= 300 and (out / name).stat().st_size > 10_000
    epochs = read_jsonl(finished_run / "metrics.jsonl")
    accuracy = [r["test_accuracy"] for r in epochs]
    time_s = sum(r["epoch_time_s"] for r in epochs)
    images = sum(r["images_per_s"] * r["epoch_time_s"] for r in epochs)
    text = (out / "summary.txt").read_text()
    assert text.strip() in stdout  # printed as well as written
    summary = fields(text)
    assert summary["status"] == "finished"
    assert summary["epochs"] == f"2 (global step {epochs[-1]['step']})"
    best = epochs[accuracy.index(max(accuracy))]  # the first of the best: a tie does not improve
    assert summary["selected"] == (
        f"epoch {best['epoch']} by test_accuracy ({max(accuracy) * 100:.2f}%), on the test set: "
        "no validation split"
    )
    assert summary["test accuracy"].startswith(f"{max(accuracy) * 100:.2f}% (test loss ")
    assert summary["last epoch"].startswith(f"test accuracy {accuracy[-1] * 100:.2f}%")
    rates = [r["images_per_s"] for r in read_jsonl(finished_run / "steps.jsonl")]
    assert summary["images/s"] == (
        f"{median(rates):,.0f} median of the logging intervals; "
        f"{images / time_s:,.0f} whole run (all images / train time)"
    )
    assert summary["train time"].startswith(f"{time_s:.1f} s")


def test_a_running_job_is_reported_with_its_partial_lines_skipped(finished_run, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install -e .[report]")
    run_dir = tmp_path / "running"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "summary.json").unlink()  # written only when training ends
    first_epoch = read_jsonl(run_dir / "metrics.jsonl")[0]
    (run_dir / "metrics.jsonl").write_text(json.dumps(first_epoch) + '\n{"epoch": 2, "st')
    with open(run_dir / "steps.jsonl", "a") as f:
        f.write('{"step": 40, "loss": 0.')
    assert report.main([str(run_dir)]) == 0, capsys.readouterr().err
    summary = fields((run_dir / "report" / "summary.txt").read_text())
    assert summary["status"].startswith("not finished")
    assert summary["epochs"].startswith("1 ")
    first = f"test accuracy {first_epoch['test_accuracy'] * 100:.2f}%"
    assert summary["last epoch"].startswith(first)
    assert all((run_dir / "report" / name).exists() for name in PLOTS)


def test_bad_input_is_one_line_and_a_failing_exit(tmp_path, capsys):
    assert report.main([str(tmp_path / "nowhere")]) != 0
    missing = capsys.readouterr()
    assert missing.out == ""
    assert missing.err.count("\n") == 1 and "does not exist" in missing.err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "steps.jsonl").write_text('{"step": 1, "lo')  # nothing whole yet
    assert report.main([str(tmp_path / "empty")]) != 0
    empty = capsys.readouterr().err
    assert empty.startswith("error: no metrics in") and empty.count("\n") == 1


def test_missing_matplotlib_says_what_to_install(finished_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert report.main([str(finished_run), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install matplotlib" in err
