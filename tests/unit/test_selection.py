"""Model selection and early stopping, in-process: `Selection` on its own, and the Trainer's epoch
loop driven with fakes (no process group, no data) through scripted evaluations: which epoch is
kept as best.pt, when the run stops and that every rank follows the agreed verdict, a resume
that stops where an uninterrupted run does, partial epochs, the final test and summary.json's
fields."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from fakes import Agreement, FakeCheckpoints, FakeEvals, make_trainer
from split_data import write_misleading_mnist

from pipeline import evaluate, export, predict, train
from pipeline.config.schema import load_config
from pipeline.dist.group import DistContext
from pipeline.training import checkpoint
from pipeline.training.selection import Selection, closing_line
from pipeline.training.stop import StopRequest
from pipeline.training.trainer import Trainer

from helpers import REPO, TINY_ARGS, call_command, read_jsonl, require


def selection(*overrides: str) -> Selection:
    return Selection.from_config(load_config(None, ["data.val_size=100", *overrides]))


def judge(sel: Selection, values: list[float]) -> list[tuple[bool, bool]]:
    verdicts = []
    for epoch, value in enumerate(values, 1):
        verdict = sel.propose({"epoch": epoch, "step": 10 * epoch, sel.metric: value})
        sel.accept({"epoch": epoch, "step": 10 * epoch, sel.metric: value}, *verdict)
        verdicts.append(verdict)
    return verdicts


def test_an_epoch_improves_by_more_than_min_delta_and_a_tie_does_not():
    sel = selection()
    assert sel.metric == "val_accuracy" and sel.split == "val"
    assert [v[0] for v in judge(sel, [0.5, 0.7, 0.7, 0.69, 0.71])] == [1, 1, 0, 0, 1]
    assert (sel.best_epoch, sel.best_value, sel.bad_epochs) == (5, 0.71, 0)
    sel = selection("checkpoint.select=val_loss", "train.early_stop_min_delta=0.01")
    assert [v[0] for v in judge(sel, [1.0, 0.995, 0.98, 0.975, 0.95])] == [1, 0, 1, 0, 1]


def test_patience_stops_after_that_many_epochs_without_improvement():
    sel = selection("train.early_stop_patience=2")
    verdicts = judge(sel, [0.5, 0.7, 0.6, 0.65])
    assert verdicts == [(True, False), (True, False), (False, False), (False, True)]
    assert sel.stopped and sel.best_epoch == 2 and sel.bad_epochs == 2
    off = selection()
    assert not any(stop for _, stop in judge(off, [0.9] + [0.1] * 20)) and not off.stopped


def test_without_a_split_the_test_set_selects_and_says_so():
    sel = Selection.from_config(load_config(None, ["checkpoint.select=val_loss"]))
    assert sel.metric == "test_loss" and sel.split == "test"
    judge(sel, [0.4, 0.3])
    summary = {
        **sel.summary(),
        "epochs": 2,
        "global_step": 20,
        "stop_reason": "epochs",
        "test_accuracy": 0.9,
        "test_loss": 0.3,
        "test_of": "best.pt (epoch 2)",
    }
    line = closing_line(summary, 0, 0.0)
    assert line == (
        "finished 2 epoch(s); selected epoch 2 (test_loss 0.3000) on the test set: no validation "
        "split (data.val_size=0); test accuracy of best.pt (epoch 2): 90.00% (test loss 0.3000)"
    )


# -- the Trainer's epoch loop, with fakes ------------------------------------------------------
@pytest.fixture
def agreed(monkeypatch) -> Agreement:
    return Agreement.install(monkeypatch)


def make(
    accuracies: list[float], *overrides: str, checkpoints: FakeCheckpoints | None = None
) -> Trainer:
    """A Trainer whose parts are fakes (tests/fakes.py), 4 steps an epoch; its `checkpoints`
    hold the global steps of the rotating and best.pt checkpoints it asked for."""
    # No stop vote (dist.any_rank too) within these short runs: `agreed` sees the verdicts only.
    base = ["data.val_size=100", "train.epochs=10", "train.stop_check_every=1000"]
    return make_trainer(
        [*base, *overrides],
        steps_per_epoch=4,
        evals=FakeEvals(accuracies),
        checkpoints=checkpoints,
    )


def test_the_best_epoch_is_saved_as_best_pt_and_patience_ends_the_run(agreed):
    t = make([0.5, 0.7, 0.6, 0.7, 0.9], "train.early_stop_patience=2", "checkpoint.keep=1")
    t.run()
    assert t.state.epoch == 4 and t.selection.stopped and t.finished()
    assert t.checkpoints.best_saves == [4, 8]  # epochs 1 and 2, before their rotating ones
    assert t.checkpoints.saves == [4, 8, 12, 16]
    assert len(agreed.flags) == 4  # one agreement per epoch, at its end
    assert [r["best_epoch"] for r in t.tracker.epochs] == [1, 2, 2, 2]
    s = t.tracker.summary
    assert (s["stop_reason"], s["epochs"], s["selected_epoch"], s["selected_value"]) == (
        "early_stop",
        4,
        2,
        0.7,
    )
    assert all(not isinstance(v, (dict, list)) for v in s.values())  # flat, for tables
    assert t.tracker.line.startswith(
        "stopped early after epoch 4: val_accuracy did not improve by more than 0 for 2 "
        "epoch(s); selected epoch 2 (val_accuracy 70.00%)"
    )


def test_every_rank_follows_the_agreed_verdict_not_its_own(agreed):
    t = make([0.5, 0.7, 0.9, 0.95])
    agreed.answer = (False, True)  # another rank saw no improvement and asked to stop
    t.run()
    assert agreed.flags == [(True, False)]  # this rank's own proposal
    assert t.state.epoch == 1 and t.selection.stopped and t.checkpoints.best_saves == []
    assert t.tracker.summary["stop_reason"] == "early_stop"


def test_a_resumed_run_stops_at_the_epoch_an_uninterrupted_one_does(agreed):
    accuracies = [0.5, 0.8, 0.7, 0.75, 0.79, 0.6, 0.9]
    straight = make(accuracies, "train.early_stop_patience=3")
    straight.run()
    first = make(accuracies, "train.early_stop_patience=3", "train.max_steps=10")
    first.run()  # ends 2 steps into epoch 3: epochs 1 and 2 judged, epoch 3 only logged
    assert first.state.global_step == 10 and first.selection.judged == 2
    resumed = make(accuracies[2:], "train.early_stop_patience=3")
    resumed.state.load_state_dict(first.state.state_dict())
    resumed.selection.load_state_dict(first.selection.state_dict())
    resumed.run()
    assert resumed.state.epoch == straight.state.epoch == 5
    assert resumed.selection.state_dict() == straight.selection.state_dict()
    assert resumed.tracker.summary["selected_epoch"] == straight.tracker.summary["selected_epoch"]


def test_a_partial_epoch_is_logged_but_judged_once_whole(agreed):
    t = make([0.5, 0.6, 0.55, 0.4], "train.max_steps=6", "train.epochs=3")
    t.run()  # epoch 1, then 2 of epoch 2's 4 steps
    assert [r["epoch"] for r in t.tracker.epochs] == [1, 2]
    assert len(agreed.flags) == 1 and t.selection.judged == 1
    assert t.tracker.summary["stop_reason"] == "max_steps"
    t.cfg.train.max_steps = 0  # resumed without the limit: epoch 2 is finished, then judged
    t.stop = StopRequest(())
    t.run()
    assert len(agreed.flags) == 3 and t.selection.judged == 3
    # The whole epoch 2 (0.55) was judged, not its cut-short part (0.6).
    assert (t.selection.best_epoch, t.selection.best_value) == (2, 0.55)


def test_the_final_test_is_of_best_pt_with_a_split(agreed, monkeypatch, tmp_path, capsys):
    best = {"model": {"weight": torch.full((1, 1), 3.0), "bias": torch.zeros(1)}}
    best["best"] = {"epoch": 2, "step": 8}
    read = []

    def load_on_main(ctx, locate):  # rank 0 reads the file it locates; here: best's state
        path = locate()
        read.append(path)
        return (path, best) if path is not None else (None, None)

    def reading_best_pt(run_dir):  # the run's own reader of best.pt, the saves faked
        fake = FakeCheckpoints()
        fake.load_best = checkpoint.Checkpoints(DistContext(), run_dir, 1).load_best
        return fake

    monkeypatch.setattr(checkpoint, "load_on_main", load_on_main)
    t = make([0.5, 0.7, 0.6], "train.epochs=3", checkpoints=reading_best_pt(tmp_path))
    (tmp_path / "best.pt").write_bytes(b"")  # what exists decides; the fake gives the state
    t.run()
    assert read == [tmp_path / "best.pt"]
    assert t.engine.model.weight.item() == 3.0  # best.pt's weights were tested
    s = t.tracker.summary
    assert (s["test_accuracy"], s["test_of"], s["test_epoch"], s["test_step"]) == (
        0.75,
        "best.pt (epoch 2)",
        2,
        8,
    )
    assert t.data.evals.tests == 1  # the test set once, at the end
    # A best.pt gone missing (a resume that turned checkpoint.keep_best on late): the last
    # model is tested, with a warning.
    t = make([0.5, 0.7, 0.6], "train.epochs=3", checkpoints=reading_best_pt(tmp_path / "x"))
    t.run()
    assert t.tracker.summary["test_of"] == "the last model (epoch 3, step 12)"
    assert "best.pt is missing: the test is of the last model" in capsys.readouterr().err


def test_without_best_pt_the_last_model_is_tested(agreed):
    t = make([0.5, 0.7, 0.6], "checkpoint.keep_best=false", "train.epochs=3")
    t.run()
    assert t.checkpoints.best_saves == [] and t.data.evals.tests == 1
    s = t.tracker.summary
    assert s["test_of"] == "the last model (epoch 3, step 12)" and s["selected_epoch"] == 2
    assert math.isclose(s["val_accuracy"], 0.7) and s["val_loss"] == pytest.approx(0.3)


# -- best.pt, as a user trains and uses it (in this process) ---------------------------------------
VAL = 96
REAL_DIGIT = REPO / "docs" / "images" / "digit.png"


@pytest.fixture(scope="module")
def best_run(tmp_path_factory) -> Path:
    """Four epochs on `split_data.write_misleading_mnist`, checkpoint.keep=1, selected by the
    validation loss (best at epoch 1); the run's stdout saved beside it."""
    tmp = tmp_path_factory.mktemp("best")
    data = write_misleading_mnist(tmp / "data", VAL)
    run_dir = tmp / "run"
    args = [*TINY_ARGS, f"data.root={data}", f"train.run_dir={run_dir}", "train.epochs=4"]
    args += [f"data.val_size={VAL}", "checkpoint.select=val_loss", "checkpoint.keep=1"]
    code, stdout, stderr = call_command(train.main, [*args, "train.fused_conv=false"])
    assert code == 0, stderr
    (run_dir / "stdout").write_text(stdout)
    return run_dir


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_the_selected_epoch_is_kept_beside_the_newest_checkpoint(best_run):
    s = summary_of(best_run)
    assert s["selection_metric"] == "val_loss" and s["selection_split"] == "val"
    assert s["selected_epoch"] == 1 and s["test_of"] == "best.pt (epoch 1)"
    records = read_jsonl(best_run / "metrics.jsonl")
    assert [r["best_epoch"] for r in records] == [1, 1, 1, 1]
    assert s["selected_value"] == records[0]["val_loss"] == min(r["val_loss"] for r in records)
    steps_per_epoch = records[0]["step"]
    assert [p.name for p in checkpoint.list_checkpoints(best_run)] == [
        checkpoint.checkpoint_name(4 * steps_per_epoch)
    ]
    best = checkpoint.load(best_run / checkpoint.BEST)
    assert best["best"] == {
        "epoch": 1,
        "step": steps_per_epoch,
        "metric": "val_loss",
        "value": s["selected_value"],
    }
    assert best["global_step"] == s["test_step"] == steps_per_epoch and best["epoch"] == 1
    last_line = (best_run / "stdout").read_text().splitlines()[-1]
    assert last_line.startswith("finished 4 epoch(s); selected epoch 1 (val_loss ")
    assert last_line.endswith(
        f"test accuracy of best.pt (epoch 1): {s['test_accuracy'] * 100:.2f}% "
        f"(test loss {s['test_loss']:.4f})"
    )


def test_evaluate_uses_best_pt_and_reports_what_training_logged_for_it(
    best_run, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert evaluate.main([str(best_run), "--out", str(tmp_path / "eval")]) == 0
    stdout = capsys.readouterr().out
    s, results = summary_of(best_run), json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert stdout.startswith(f"using {best_run / 'best.pt'} (epoch 1, global step ")
    assert "the epoch selected by val_loss " in stdout.splitlines()[0]
    assert results["checkpoint"] == str(best_run / "best.pt")
    assert results["global_step"] == s["test_step"]
    assert results["test_accuracy"] == s["test_accuracy"] and results["test_loss"] == s["test_loss"]
    assert f"training logged: {s['test_accuracy'] * 100:.2f}% at this step (the same)" in stdout
    newest = checkpoint.list_checkpoints(best_run)[0]
    assert evaluate.main([str(best_run), "--last", "--out", str(tmp_path / "last")]) == 0
    last = capsys.readouterr().out
    assert last.startswith(f"using {newest} (epoch 4, ")
    assert "the newest checkpoint (--last)" in last.splitlines()[0]


def test_export_and_predict_say_they_use_best_pt(best_run, tmp_path, capsys):
    out = tmp_path / "lenet.pt"
    assert export.main([str(best_run), "--format", "state_dict", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"using {best_run / 'best.pt'} ")
    best = checkpoint.load(best_run / checkpoint.BEST)["model"]
    assert all(torch.equal(v, best[k]) for k, v in torch.load(out, weights_only=True).items())
    if importlib.util.find_spec("PIL") is None:
        require("predict needs Pillow: pip install -e .[predict]")
    assert predict.main([str(best_run), "--last", str(REAL_DIGIT)]) == 0
    using, result = capsys.readouterr().out.splitlines()
    newest = checkpoint.list_checkpoints(best_run)[0]
    assert using.startswith(f"using {newest} ") and result.startswith(f"{REAL_DIGIT}: ")
