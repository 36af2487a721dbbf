"""Every command ends alike, called in this process: the README's exit code for each kind of
error, one `error:` line, and an old checkpoint's test-only keys left out. (`--version`,
`--help` and a closed pipe, in fresh processes: tests/multiproc/test_command_processes.py.)"""

from __future__ import annotations

import pytest
import torch

from pipeline import bench, evaluate, export, predict, report, train
from pipeline.config.schema import load_config, to_dict
from pipeline.errors import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DATA, EXIT_RUN_DIR
from pipeline.model import LeNet
from pipeline.training import checkpoint

from helpers import REPO, TINY_ARGS, write_tiny_mnist

COMMANDS = {
    "train": train.main,
    "evaluate": evaluate.main,
    "export": export.main,
    "predict": predict.main,
    "report": report.main,
    "bench": bench.main,
}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with a checkpoint of an untrained LeNet (torch's conv ops), and its
    metrics."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = to_dict(load_config(None, ["train.fused_conv=false"]))
    state = {"model": LeNet().state_dict(), "config": config, "global_step": 1}
    checkpoint.save(run_dir, 1, state, keep=3)
    (run_dir / "steps.jsonl").write_text(
        '{"step": 1, "epoch": 1, "loss": 2.3, "lr": 0.1, '
        + '"images_per_s": 100.0, "step_in_epoch": 1}\n'
    )
    return run_dir


def test_a_missing_input_exits_with_its_kind(tmp_path, capsys):
    nowhere = tmp_path / "nowhere"
    digit = str(REPO / "docs/images/digit.png")
    cases = {
        "train": ([*TINY_ARGS, f"data.root={nowhere}", f"train.run_dir={tmp_path / 'r'}"], 3),
        "evaluate": ([str(nowhere), "--tracking", "disabled"], EXIT_CHECKPOINT),
        "export": ([str(nowhere), "--format", "state_dict"], EXIT_CHECKPOINT),
        "predict": ([str(nowhere), digit], EXIT_CHECKPOINT),
        "report": ([str(nowhere)], EXIT_DATA),
        "bench": (["--data-root", str(nowhere), "--only", "pipeline cpu.yaml w1"], EXIT_DATA),
    }
    for name, (argv, code) in cases.items():
        assert COMMANDS[name](argv) == code, name
        assert str(nowhere) in one_error_line(capsys), name
    # A failed start leaves no run directory behind (it would hold only a lock file).
    assert not (tmp_path / "r").exists()


def test_a_bad_key_or_option_exits_2(tmp_path, capsys):
    assert train.main(["optim.lrate=0.1", f"train.run_dir={tmp_path / 'r'}"]) == EXIT_CONFIG
    line = one_error_line(capsys)
    assert "unknown config key optim.lrate; did you mean optim.lr?" in line
    for name, main in COMMANDS.items():
        with pytest.raises(SystemExit) as exited:
            main(["--no-such-option", "x"])
        assert exited.value.code == EXIT_CONFIG, name
        err = capsys.readouterr().err
        assert f"python -m pipeline.{name}: error: " in err, (name, err)


def test_an_output_that_cannot_be_written_exits_7(run_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    out = blocker / "sub"  # a directory inside a file: cannot be created, even by root
    tiny = write_tiny_mnist(tmp_path / "tiny")
    train_args = [*TINY_ARGS, f"data.root={tiny}", f"train.run_dir={out}"]
    assert train.main(train_args) == EXIT_RUN_DIR
    assert str(out) in one_error_line(capsys)
    cases = {
        "evaluate": [str(run_dir), "--data-root", str(tiny), "--out", str(out)],
        "export": [str(run_dir), "--format", "state_dict", "--out", str(out / "m.pt")],
        "report": [str(run_dir), "--out", str(out)],
    }
    for name, argv in cases.items():
        assert COMMANDS[name]([*argv, *(["--tracking", "disabled"] * (name == "evaluate"))]) == 7
        assert "a-file" in one_error_line(capsys), name


def test_an_old_checkpoint_with_a_debug_section_still_loads(run_dir, capsys):
    """Checkpoints of earlier versions hold test-only keys (a `debug` section) that this one
    does not have: they are left out, not refused."""
    path = run_dir / checkpoint.checkpoint_name(1)
    state = checkpoint.load(path)
    state["config"]["debug"] = {"fail_rank": -1, "fail_step": -1}
    state["config"]["train"]["fused_conv"] = True  # a bool, as earlier versions saved it
    checkpoint.save(run_dir, 2, state, keep=3)
    out = run_dir / "m.pt"
    assert export.main([str(run_dir), "--format", "state_dict", "--out", str(out)]) == 0
    saved = torch.load(out, weights_only=True)
    assert all(torch.equal(saved[k], state["model"][k]) for k in state["model"])
