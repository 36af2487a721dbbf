"""Experiment tracking, in this process.

With a stand-in wandb: the W&B mode, wandb never imported unless asked for, step rows, the
fall-back to offline, the init timeout, a failing log call, resume by run id, the artifact, and
the tracker of ranks that do not report. Real jobs writing real offline runs are in
tests/multiproc/test_tracking.py.

The progress line on a terminal: it fits the terminal's width, leaving out its least important
fields rather than wrapping, and whatever is printed while it is shown (a log line, a warning,
the Ctrl-C line) starts on a line of its own.

What a user reads as a run starts, trains, resumes and has nothing left to do (the training
command on the tiny dataset): the header with one word for W&B, the overrides instead of the
whole config (every setting with --print-config), img/s that say what they measure, and one
line for a run already finished.

TensorBoard event files, from the training command called in this process: the scalars, read
back with TensorBoard's own reader, equal metrics.jsonl and steps.jsonl, each step once, also
after a run that failed between checkpoints and was resumed (its second attempt logs those steps
again); without the package nothing is imported or said unless tracking.tensorboard=true asks for
it (one error line). (`tensorboard --logdir` listing a run, a server process:
tests/multiproc/test_tracking.py.)"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import cli, train
from pipeline.config.schema import Config, load_config
from pipeline.dist.group import DistContext
from pipeline.errors import EXIT_CONFIG, EXIT_UNEXPECTED
from pipeline.tracking.progress import end_line
from pipeline.tracking.tracker import Console, Progress, Tracker, make_tracker, tracking_status
from pipeline.tracking.wandb_run import has_credentials, resolve_mode
from pipeline.training import checkpoint
from pipeline.training.trainer import Trainer

from helpers import REPO, TINY_ARGS, call_command, no_credentials, read_jsonl, require


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


# -- choosing the mode ----------------------------------------------------------------------
def test_mode_auto_is_online_only_with_credentials(tmp_path):
    no_netrc = {"NETRC": str(tmp_path / "none")}
    assert resolve_mode("auto", no_netrc) == "disabled"  # W&B was never set up: off
    assert resolve_mode("auto", {**no_netrc, "WANDB_API_KEY": "k" * 40}) == "online"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert has_credentials({"NETRC": str(netrc)})
    assert resolve_mode("auto", {"NETRC": str(netrc)}) == "online"
    # A key for another server does not count for the one in WANDB_BASE_URL.
    other = {"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.org"}
    assert resolve_mode("auto", other) == "disabled"
    # A WANDB_MODE the user exported is honoured by auto; an explicit tracking.mode wins.
    assert resolve_mode("auto", {**no_netrc, "WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_mode("offline", {"WANDB_API_KEY": "k" * 40}) == "offline"
    assert resolve_mode("disabled", {"WANDB_MODE": "online"}) == "disabled"


# -- the tracker with a stand-in wandb ------------------------------------------------------
class FakeRun:
    def __init__(self, kwargs: dict, fail_log_at: int | None):
        self.kwargs, self.id, self.fail_log_at = kwargs, kwargs["id"], fail_log_at
        self.dir = str(Path(kwargs["dir"]) / "wandb" / f"offline-run-x-{self.id}" / "files")
        self.url, self.starting_step, self.summary = None, 0, {}
        self.rows, self.artifacts, self.finished = [], [], None

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, row, step):
        if step == self.fail_log_at:
            raise ConnectionError("stream closed\nsecond line")
        self.rows.append((step, row))

    def log_artifact(self, artifact, aliases):
        self.artifacts.append(artifact)

    def finish(self, exit_code=0):
        self.finished = exit_code


def fake_wandb(fail_online: bool = False, fail_log_at: int | None = None):
    module = types.ModuleType("wandb")
    module.runs, module.run = [], None

    def init(**kwargs):
        if fail_online and kwargs["mode"] == "online":
            raise TimeoutError("Run initialization has timed out after 30.0 sec.\nmore")
        module.runs.append(FakeRun(kwargs, fail_log_at))
        return module.runs[-1]

    class Artifact:
        def __init__(self, name, type, metadata):
            self.name, self.files = name, []

        def add_file(self, path, name):
            self.files.append(path)

    module.init, module.Settings, module.Artifact = init, lambda **kw: kw, Artifact
    module.finish = lambda exit_code=None: None
    return module


def tiny_config(mode: str, run_dir: Path, *overrides: str) -> Config:
    return load_config(
        None,
        [f"tracking.mode={mode}", "tracking.tensorboard=false", "tracking.project=p"]
        + ["train.epochs=1", *overrides]
        + [f"train.run_dir={run_dir}"],
    )


def drive(
    config: Config,
    steps=range(2, 17, 2),
    resumed_at: int = 0,
    run_id: str | None = None,
    main: bool = True,
) -> Tracker:
    """What the trainer does with the tracker of a rank: the checkpoint's run id, start, step
    records every 2 steps, an epoch record, finish."""
    if main:  # in a run, the run's lock makes the directory before the tracker writes into it
        Path(config.train.run_dir).mkdir(parents=True, exist_ok=True)
    tracker = make_tracker(SimpleNamespace(is_main=main), config)
    tracker.run_id = run_id
    meta = {"world_size": 2, "steps_per_epoch": 16}
    tracker.start(config, meta, resumed_at > 0, resumed_at, 0)
    for s in steps:
        tracker.log_step(
            {"step": s, "epoch": 1, "step_in_epoch": s, "loss": 1.0 / s, "lr": 0.1}
            | {"images_per_s": 1000.0 * s, "time_s": 0.0}
        )
    tracker.log_epoch(
        {"epoch": 1, "step": 16, "train_loss": 0.5, "test_loss": 0.4, "test_accuracy": 0.9}
        | {"test_count": 128, "epoch_time_s": 1.0, "images_per_s": 1000.0, "lr": 0.1}
    )
    tracker.finish({"final_accuracy": 0.9, "best_accuracy": 0.9, "epochs": 1, "global_step": 16})
    return tracker


def step_rows(run) -> dict[int, dict]:
    return {step: row for step, row in run.rows if "train/loss" in row}


def test_unreachable_server_falls_back_to_offline_with_one_warning(tmp_path, monkeypatch, capsys):
    wandb = fake_wandb(fail_online=True)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    tracker = drive(tiny_config("online", tmp_path))
    (run,) = wandb.runs
    assert run.kwargs["mode"] == "offline" and run.kwargs["dir"] == str(tmp_path)
    assert run.kwargs["settings"]["init_timeout"] == 30.0
    assert run.kwargs["id"] == tracker.run_id and run.kwargs["resume"] == "allow"
    (warning,) = warnings(capsys.readouterr().err)
    assert "timed out" in warning and "wandb sync" in warning and "more" not in warning
    assert run.summary["best_accuracy"] == 0.9 and run.finished == 0


def test_step_rows_are_the_step_records(tmp_path, monkeypatch):
    wandb = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    drive(tiny_config("offline", tmp_path))
    rows = step_rows(wandb.runs[0])
    # One row per record of steps.jsonl, at its global step, with its numbers.
    records = read_jsonl(tmp_path / "steps.jsonl")
    assert list(rows) == [r["step"] for r in records] == list(range(2, 17, 2))
    for r in records:
        row = rows[r["step"]]
        assert row["train/loss"] == r["loss"] and row["train/lr"] == r["lr"]
        assert row["train/images_per_s"] == r["images_per_s"]
        assert row["train/epoch"] == pytest.approx(r["step"] / 16)  # 16 steps per epoch
    # The epoch record at its global step, without the fields that are not metrics.
    (epoch,) = [row for _, row in wandb.runs[0].rows if "epoch/test_accuracy" in row]
    assert epoch["epoch/epoch"] == 1 and "epoch/test_count" not in epoch


@pytest.mark.parametrize(
    "value, seconds",
    [(None, 30.0), ("7", 7.0), ("2.5", 2.5), ("soon", 30.0), ("", 30.0)],
    ids=["default", "7", "2.5", "not-a-number", "empty"],
)
def test_wandb_init_timeout_is_30s_unless_set(tmp_path, monkeypatch, value, seconds):
    wandb = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    if value is None:
        monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("WANDB_INIT_TIMEOUT", value)
    drive(tiny_config("offline", tmp_path))
    (run,) = wandb.runs
    timeout = run.kwargs["settings"]["init_timeout"]
    assert timeout == seconds and type(timeout) is float, timeout


def test_a_failing_log_call_stops_wandb_once_and_training_goes_on(tmp_path, monkeypatch, capsys):
    wandb = fake_wandb(fail_log_at=8)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    drive(tiny_config("offline", tmp_path))
    (run,) = wandb.runs
    assert [s for s, _ in run.rows] == [2, 4, 6]  # nothing is sent after the failure
    (warning,) = warnings(capsys.readouterr().err)
    assert "W&B logging stopped" in warning and "stream closed" in warning
    assert [r["step"] for r in read_jsonl(tmp_path / "steps.jsonl")] == list(range(2, 17, 2))
    assert json.loads((tmp_path / "summary.json").read_text())["final_accuracy"] == 0.9


def test_resume_continues_the_run_id_from_the_checkpoint(tmp_path, monkeypatch):
    wandb = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    # "abc12345": what the trainer restores from the checkpoint.
    config = tiny_config("offline", tmp_path)
    tracker = drive(config, steps=range(10, 17, 2), resumed_at=8, run_id="abc12345")
    (run,) = wandb.runs
    assert run.kwargs["id"] == "abc12345" and tracker.run_id == "abc12345"
    # Rows continue from the checkpoint's step.
    rows = step_rows(run)
    assert list(rows) == [10, 12, 14, 16] and rows[10]["train/loss"] == pytest.approx(1 / 10)


def test_artifact_is_the_newest_checkpoint(tmp_path, monkeypatch):
    wandb = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    for step in (8, 16):
        (tmp_path / checkpoint.checkpoint_name(step)).write_bytes(b"x")
    drive(tiny_config("offline", tmp_path, "tracking.artifact=true"))
    (artifact,) = wandb.runs[0].artifacts
    assert artifact.files == [str(tmp_path / checkpoint.checkpoint_name(16))]


def test_wandb_not_asked_for_is_never_imported(tmp_path, monkeypatch, capsys):
    """tracking.mode=disabled, and auto without credentials: the header says W&B off, and wandb
    is not imported, warns nothing and writes nothing. Asked for, the header names its mode."""
    for key, value in no_credentials(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` would now fail loudly
    for mode in ("disabled", "auto"):
        cfg = tiny_config(mode, tmp_path / mode)
        assert tracking_status(cfg.tracking) == "W&B off | TensorBoard off", mode
        tracker = drive(cfg)
        tracker.close()
        assert tracker.run_id is None and [type(s) for s in tracker.sinks] == [Console], mode
        assert not (tmp_path / mode / "wandb").exists(), mode
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking_status(tiny_config("auto", tmp_path).tracking).startswith("W&B online | ")
    assert tracking_status(tiny_config("offline", tmp_path).tracking).startswith("W&B offline | ")


def test_ranks_that_do_not_report_have_no_sinks_and_write_nothing(tmp_path, monkeypatch, capsys):
    wandb = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    tracker = drive(tiny_config("offline", tmp_path / "run"), main=False)
    tracker.close(1)
    assert tracker.sinks == [] and tracker.run_id is None
    assert wandb.runs == [] and not (tmp_path / "run").exists()
    assert capsys.readouterr() == ("", "")


def test_under_a_wandb_agent_the_run_is_the_agents_in_the_sweeps_group(tmp_path, monkeypatch):
    wandb = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep42x")
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun7")
    # An earlier checkpoint's run id: the agent's run wins.
    tracker = drive(tiny_config("offline", tmp_path), run_id="fromckpt")
    (run,) = wandb.runs
    assert run.kwargs["id"] == tracker.run_id == "agentrun7"
    assert run.kwargs["group"] == "sweep42x"
    # A sweep of pipeline.sweep names its group itself, agent or not.
    monkeypatch.delenv("WANDB_SWEEP_ID")
    wandb.runs.clear()
    drive(tiny_config("offline", tmp_path / "b", "tracking.group=lr_seeds"))
    assert wandb.runs[0].kwargs["group"] == "lr_seeds"
    assert wandb.runs[0].kwargs["id"] != "agentrun7"  # no agent: an id of its own


# -- the progress line on a terminal --------------------------------------------------------
class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(text: str) -> list[str]:
    """The lines a terminal shows for `text`: each `\\r` starts its line again, `\\x1b[K`
    erases the rest of it."""
    return [line.split("\r")[-1].replace("\x1b[K", "") for line in text.split("\n")]


def terminal_of(monkeypatch, columns: int) -> Terminal:
    monkeypatch.setattr("shutil.get_terminal_size", lambda *_: os.terminal_size((columns, 24)))
    return Terminal()


@pytest.mark.parametrize("columns", [80, 60, 120])
def test_the_line_never_exceeds_the_terminal_width(monkeypatch, columns):
    stream = terminal_of(monkeypatch, columns)
    progress = Progress(stream, epoch=9, epochs=10, total=60_000, start=40_000)
    for step in (40_001, 45_000, 60_000):  # the last one is drawn whatever the interval
        progress.update(step, 123.4567, 1_234_567.0)
    drawn = stream.getvalue().split("\r")[1:]
    assert drawn
    for text in drawn:
        line = text.removesuffix("\x1b[K")
        # The last column stays free: a line that fills it wraps on some terminals.
        assert len(line) < columns, (columns, line)
        # The most important fields first, whole; what did not fit is left out, not cut.
        assert line.startswith("epoch 10/10 ") and " loss 123.4567" in line, line
        assert line.endswith(("123.4567", " img/s", " steps)", " step)")), line
    assert ("(last 15000 steps)" in drawn[-1]) == (columns == 120)
    assert ("|####" in drawn[-1]) == (columns != 60)  # the bar takes the room that is left
    progress.close()


def test_a_message_starts_on_a_line_of_its_own(monkeypatch):
    """Log lines (stdout), warnings (stderr) and the Ctrl-C line, on one terminal, while the
    progress line is shown: each at column 0 of a line of its own, the progress line kept."""
    stream = terminal_of(monkeypatch, 80)
    monkeypatch.setattr("sys.stdout", stream)
    monkeypatch.setattr("sys.stderr", stream)
    cli.setup_logging(rank=0)
    progress = Progress(stream, epoch=0, epochs=3, total=938, start=0)
    progress.update(450, 0.1234, 12345.0)
    logging.getLogger("pipeline.training.trainer").info("a message")
    progress.update(938, 0.1, 12000.0)
    logging.getLogger("pipeline.training.trainer").warning("careful")

    def interrupted() -> int:
        progress.update(938, 0.1, 12000.0)
        raise KeyboardInterrupt

    try:
        assert cli.run(interrupted, interrupted="interrupted (Ctrl-C): stopped") == 130
    finally:
        logging.getLogger("pipeline").handlers.clear()
        end_line()
    lines = screen(stream.getvalue())
    messages = [line for line in lines if not line.startswith("epoch 1/3 |")]
    assert messages == ["a message", "warning: careful", "interrupted (Ctrl-C): stopped", ""]
    assert len(lines) == 7 and "450/938" in lines[0] and "938/938" in lines[4], lines


# -- what a user reads as a run starts, resumes and has nothing to do (in this process) ------------
@pytest.fixture(scope="module")
def three_runs(tiny_mnist, tmp_path_factory) -> tuple[SimpleNamespace, ...]:
    """One run dir: 4 steps (train.max_steps; data.mirrors overridden, unused), then resumed
    to the end with --print-config, then the same command again; each one's stdout and stderr.
    W&B is auto without credentials; the config is configs/cpu.yaml, named from the directory
    the command runs in."""
    tmp = tmp_path_factory.mktemp("output")
    (tmp / "configs").mkdir()
    shutil.copy(REPO / "configs" / "cpu.yaml", tmp / "configs")
    args = [
        "--config",
        "configs/cpu.yaml",
        *[a for a in TINY_ARGS if not a.startswith("tracking.")],
        f"data.root={tiny_mnist}",
        f"train.run_dir={tmp / 'run'}",
        "data.val_size=0",
        "train.fused_conv=false",
    ]
    runs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        for key, value in no_credentials(tmp).items():
            mp.setenv(key, value)
        first = ["train.max_steps=4", "data.mirrors=http://127.0.0.1:9/"]
        for extra in (first, ["--print-config"], ["--print-config"]):
            code, stdout, stderr = call_command(train.main, [*args, *extra])
            assert code == 0, stderr
            runs.append(SimpleNamespace(stdout=stdout, stderr=stderr))
    return tuple(runs)


def test_start_shows_the_overrides_not_the_config(three_runs):
    first, *_ = three_runs
    lines = first.stdout.splitlines()
    assert lines[0].startswith("lenet-ddp ") and " | W&B off | " in lines[0]
    assert lines[1].startswith("config: configs/cpu.yaml (every setting: ")
    assert lines[2].startswith(
        "overrides: train.epochs=1 (config: 3), train.batch_size=32 (config: 64)"
    )
    assert "train.max_steps=4 (config: 0)" in lines[2]
    assert "data.mirrors=http://127.0.0.1:9/ (config: none)" in lines[2]  # empty in the file
    assert "resolved config" not in first.stdout and "optim:" not in first.stdout


def test_img_per_s_says_what_it_measures(three_runs):
    first, resumed, *_ = three_runs
    # Log lines every 4 steps (train.log_every), the resumed epoch's first one too.
    assert "epoch 1/1 4/16 [ 25%] loss " in first.stdout
    assert "img/s (last 4 steps)" in first.stdout
    assert "epoch 1/1 8/16 [ 50%] loss " in resumed.stdout
    assert "img/s (last 4 steps)" in resumed.stdout and "(last 8 steps)" not in resumed.stdout
    (summary,) = [line for line in resumed.stdout.splitlines() if line.startswith("epoch 1:")]
    assert "epoch average " in summary and summary.endswith(" img/s")


def test_print_config_shows_every_setting(three_runs):
    _, resumed, *_ = three_runs
    assert "resumed from " in resumed.stdout
    assert "resolved config:\n  model:\n    kernel_size: 5" in resumed.stdout


def test_a_finished_run_says_nothing_to_do_and_nothing_else(three_runs):
    *_, again = three_runs
    lines = again.stdout.splitlines()
    assert len(lines) == 2, again.stdout
    assert lines[0].startswith("lenet-ddp ")
    assert lines[1].startswith("nothing to do: the run in ")
    assert "resum" not in again.stdout + again.stderr


# -- TensorBoard event files ----------------------------------------------------------------------


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the run's event files, as TensorBoard shows them."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        require("tensorboard is not installed (pip install tensorboard)")
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class Fault(Exception):
    """What ends the first attempt between two checkpoints."""


# -- event files, as a user runs the training command (in this process) --------------------------


def test_event_files_hold_each_step_once_with_the_values_of_the_json_lines(
    tiny_mnist, tmp_path, monkeypatch, capsys
):
    run_dir = tmp_path / "run"
    args = [
        *TINY_ARGS,
        "train.fused_conv=false",
        f"data.root={tiny_mnist}",
        f"train.run_dir={run_dir}",
        "train.epochs=2",
        "train.log_every=2",
        "checkpoint.every_steps=4",
        "tracking.tensorboard=true",
    ]
    after_step = Trainer.after_step

    def failing_at_step_11(self: Trainer) -> None:
        if self.state.global_step == 11:
            raise Fault("at step 11")
        after_step(self)

    # Failed at step 11: steps 2-10 were logged (and their events written as the writer closed),
    # the newest checkpoint is of step 8.
    with monkeypatch.context() as m:
        m.setattr(Trainer, "after_step", failing_at_step_11)
        assert train.main(args) == EXIT_UNEXPECTED
    assert "Fault: at step 11" in capsys.readouterr().err
    assert read_jsonl(run_dir / "steps.jsonl")[-1]["step"] == 10
    assert train.main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "resumed from" in out and "global step 8)" in out

    found = scalars(run_dir)
    steps, epochs = read_jsonl(run_dir / "steps.jsonl"), read_jsonl(run_dir / "metrics.jsonl")
    assert (
        [s for s, _ in found["train/loss"]] == [r["step"] for r in steps] == list(range(2, 33, 2))
    )
    for key in ("loss", "images_per_s", "lr"):
        got = [v for _, v in found[f"train/{key}"]]
        assert got == pytest.approx([r[key] for r in steps], rel=1e-6), key
    assert [s for s, _ in found["epoch/test_accuracy"]] == [16, 32]
    for key in ("train_loss", "test_loss", "test_accuracy", "lr"):
        got = [v for _, v in found[f"epoch/{key}"]]
        assert got == pytest.approx([r[key] for r in epochs], rel=1e-6), key


def test_without_the_package_nothing_is_imported_or_said_unless_asked(
    tmp_path, monkeypatch, capsys
):
    """auto: no event files, no import, no warning, and the header says so; true: the train
    command ends with one line and exit 2 before it loads any data."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not found, and no import can succeed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = load_config(None, ["tracking.mode=disabled", f"train.run_dir={tmp_path / 'run'}"])
    assert cfg.tracking.tensorboard == "auto"
    assert tracking_status(cfg.tracking) == "W&B off | TensorBoard off"
    assert [type(s) for s in make_tracker(DistContext(), cfg).sinks] == [Console]
    assert capsys.readouterr().err == ""
    code = train.main(["tracking.tensorboard=true", f"data.root={tmp_path / 'absent'}"])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG and err.count("\n") == 1, err
    assert "tracking.tensorboard=true but the tensorboard package is not installed" in err
