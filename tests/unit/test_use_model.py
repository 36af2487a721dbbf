"""evaluate, export and predict, in this process.

Where evaluate writes, on the tiny dataset: a run directory's best.pt into RUN_DIR/eval/, --last
and a checkpoint file into eval-NAME/ beside the checkpoint; no evaluation overwrites another's
files.

Bad input: a missing path, a file that is not a checkpoint, a damaged checkpoint, a bad image, a
missing onnx package; each ends in one line and a non-zero exit. A run directory whose newest
checkpoint is damaged falls back to the previous.

Without the optional packages: predict without Pillow ends in one line saying what to install;
evaluate without matplotlib prints its numbers, writes its files and says which pictures it did
not draw."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from pipeline import evaluate, export, predict
from pipeline.config.schema import load_config, to_dict
from pipeline.errors import EXIT_CHECKPOINT, EXIT_DATA
from pipeline.model import LeNet
from pipeline.training import checkpoint

from helpers import REPO, require, run_dir_with_two_checkpoints

# -- where evaluate writes -------------------------------------------------------------------------
FILES = {"eval.json", "confusion_matrix.json", "confusion_matrix.png", "mistakes.png"}


def test_best_last_and_a_file_each_write_their_own_folder(tmp_path, tiny_mnist, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = to_dict(load_config(None, ["train.fused_conv=false"]))
    for step in (1, 2):
        torch.manual_seed(step)
        state = {"model": LeNet().state_dict(), "config": config, "global_step": step}
        checkpoint.save(run_dir, step, state, keep=3)
    best = {"epoch": 1, "step": 1, "metric": "val_accuracy", "value": 0.1}
    checkpoint.save_best(run_dir, checkpoint.load(run_dir / checkpoint.checkpoint_name(1)), best)

    def evaluated(*argv: str) -> dict:
        args = [*argv, "--data-root", str(tiny_mnist), "--tracking", "disabled"]
        assert evaluate.main(args) == 0
        (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("wrote ")]
        out = Path(line.rsplit(" in ", 1)[1])
        assert {p.name for p in out.iterdir()} >= FILES, out
        return {"out": out, **json.loads((out / "eval.json").read_text())}

    first = evaluated(str(run_dir))
    last = evaluated(str(run_dir), "--last")
    assert first["out"] == run_dir / "eval" and first["global_step"] == 1
    assert first["checkpoint"] == str(run_dir / "best.pt")
    assert last["out"] == run_dir / "eval-ckpt-000000002" and last["global_step"] == 2
    # Neither overwrote the other.
    assert json.loads((run_dir / "eval" / "eval.json").read_text())["global_step"] == 1

    older = evaluated(str(run_dir / checkpoint.checkpoint_name(1)))
    assert older["out"] == run_dir / "eval-ckpt-000000001" and older["global_step"] == 1
    assert evaluated(str(run_dir / "best.pt"))["out"] == run_dir / "eval"


# -- bad input -------------------------------------------------------------------------------------
@pytest.fixture
def run_dir(tmp_path):
    return run_dir_with_two_checkpoints(tmp_path / "run")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


COMMANDS = {
    "evaluate": lambda target: evaluate.main([str(target), "--tracking", "disabled"]),
    "export": lambda target: export.main([str(target), "--format", "state_dict"]),
    "predict": lambda target: predict.main([str(target), str(REPO / "docs/images/digit.png")]),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_checkpoint_path_is_one_line(command, run_dir, tmp_path, capsys):
    run = COMMANDS[command]
    assert run(tmp_path / "nothing-here") == EXIT_CHECKPOINT
    assert "does not exist" in one_error_line(capsys)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(empty) == EXIT_CHECKPOINT
    assert "holds no checkpoint" in one_error_line(capsys)

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    assert run(text) == EXIT_CHECKPOINT
    assert "not a checkpoint of this pipeline" in one_error_line(capsys)

    plain = tmp_path / "weights.pt"
    torch.save(LeNet().state_dict(), plain)
    assert run(plain) == EXIT_CHECKPOINT
    assert "not a checkpoint of this pipeline" in one_error_line(capsys)

    damaged = run_dir / checkpoint.checkpoint_name(2)
    blob = bytearray(damaged.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    damaged.write_bytes(bytes(blob))
    assert run(damaged) == EXIT_CHECKPOINT
    line = one_error_line(capsys)
    assert "ckpt-000000002.pt is truncated or corrupt" in line


def test_a_run_directory_with_a_damaged_newest_checkpoint_falls_back(run_dir, tmp_path, capsys):
    newest = run_dir / checkpoint.checkpoint_name(2)
    newest.write_bytes(newest.read_bytes()[:-50])
    out = tmp_path / "m.pt"
    assert export.main([str(run_dir), "--format", "state_dict", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "ckpt-000000002.pt is truncated or corrupt" in captured.err
    assert f"exported {run_dir / checkpoint.checkpoint_name(1)}" in captured.out
    expected = checkpoint.load(run_dir / checkpoint.checkpoint_name(1))["model"]
    saved = torch.load(out, weights_only=True)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_bad_images_are_one_line(run_dir, tmp_path, capsys):
    if importlib.util.find_spec("PIL") is None:
        require("predict needs Pillow: pip install -e .[predict]")
    from PIL import Image

    def run(image) -> int:
        return predict.main([str(run_dir), str(image)])

    assert run(tmp_path / "missing.png") == EXIT_DATA
    assert "image" in (line := one_error_line(capsys)) and "does not exist" in line
    not_image = tmp_path / "digit.png"
    not_image.write_text("not an image")
    assert run(not_image) == EXIT_DATA
    assert "cannot be read" in one_error_line(capsys)
    blank = tmp_path / "blank.png"
    Image.new("L", (40, 40), 255).save(blank)
    assert run(blank) == EXIT_DATA
    assert "shows no digit" in one_error_line(capsys)
    cut = tmp_path / "cut.png"
    Image.new("L", (40, 40), 0).save(cut)
    cut.write_bytes(cut.read_bytes()[:40])
    assert run(cut) == EXIT_DATA
    assert "cannot be read" in one_error_line(capsys)


def test_onnx_without_the_onnx_package_is_one_line(run_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert export.main([str(run_dir), "--format", "onnx"]) != 0
    assert "pip install onnx onnxscript" in one_error_line(capsys)
    assert not list(run_dir.glob("*.onnx"))


# -- without the optional packages, as a user runs the commands (in this process) ----------------
# Pillow and matplotlib are imported when an image is read or a picture drawn, never when a
# module is: a None in sys.modules makes each such import fail as for a package not installed.


@pytest.fixture
def torchs_run_dir(tmp_path):
    """A run directory with a checkpoint of an untrained LeNet on torch's conv ops."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = to_dict(load_config(None, ["train.fused_conv=false"]))
    state = {"model": LeNet().state_dict(), "config": config, "global_step": 1}
    checkpoint.save(run_dir, 1, state, keep=1)
    return run_dir


def test_predict_without_pillow_says_how_to_install_it(torchs_run_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert predict.main([str(torchs_run_dir), "digit.png"]) != 0
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: predict needs Pillow to read images (the project's predict extra): pip install "
        "pillow"
    ]


def test_evaluate_without_matplotlib_prints_its_numbers_and_says_what_it_skipped(
    torchs_run_dir, tiny_mnist, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    argv = [str(torchs_run_dir), "--data-root", str(tiny_mnist), "--tracking", "disabled"]
    assert evaluate.main(argv) == 0
    out, err = capsys.readouterr()
    assert "test accuracy:" in out and "wrote eval.json, confusion_matrix.json in" in out
    (line,) = err.strip().splitlines()
    assert line == (
        "warning: matplotlib is not installed: confusion_matrix.png and mistakes.png were not "
        "drawn (pip install matplotlib, the project's report extra)"
    )
    assert (torchs_run_dir / "eval" / "eval.json").exists()
    assert not (torchs_run_dir / "eval" / "confusion_matrix.png").exists()
