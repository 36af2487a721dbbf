"""Runs side by side (`pipeline.report RUN_DIR...`, a sweep's folder): a row per run with the
settings that differ, runs that differ only by seed grouped with mean and standard deviation,
unfinished and broken run directories shown as such, Markdown, CSV and one PNG written."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from pipeline import report
from pipeline.config.schema import Config, to_dict
from pipeline.results import compare


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
    steps = [{"step": s, "loss": 2.0 / s} for s in (5, 10, 15, 20)]
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
