"""Every command ends alike, called in this process: the README's exit code for each kind of
error, one `error:` line, also for a checkpoint of another format and for training data that is
missing or damaged; the job of several ranks ends with the line and code of the rank that failed
on its own. (`--version`, `--help` and a closed pipe in fresh processes, bad input to 2 ranks
and to `--nproc-per-node`: tests/multiproc/test_commands.py.)"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from pipeline import bench, cli, evaluate, export, predict, report, train
from pipeline.config.schema import load_config, to_dict
from pipeline.dist import launch
from pipeline.errors import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DATA, EXIT_RUN_DIR
from pipeline.model import LeNet
from pipeline.training import checkpoint

from helpers import REPO, TINY_ARGS, child_env, write_tiny_mnist

COMMANDS = {
    "train": train.main,
    "evaluate": evaluate.main,
    "export": export.main,
    "predict": predict.main,
    "report": report.main,
    "bench": bench.main,
}


# Every installed command (pyproject.toml's lenet-* scripts): its module.
SCRIPTS = re.findall(
    r'^lenet-[a-z]+ = "(pipeline\.[a-z]+):main"$', (REPO / "pyproject.toml").read_text(), re.M
)


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
        line = one_error_line(capsys)
        assert str(nowhere) in line, name
        assert name != "train" or "train-images-idx3-ubyte" in line, line
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


def test_a_checkpoint_of_another_format_is_refused_in_one_line(run_dir, tmp_path, capsys):
    """A file of a format this version does not write ends a resume and evaluate like any
    foreign file: one line, exit 4. The formats: a header and a SHA-256 before the torch.save
    bytes; an archive whose config has a section this version lacks; an archive without the
    selection's state, the split and the epoch length."""
    state = checkpoint.load(run_dir / checkpoint.checkpoint_name(1))
    buf = io.BytesIO()
    torch.save(state, buf)
    headed = tmp_path / "headed.pt"
    digest = hashlib.sha256(buf.getvalue()).hexdigest().encode()
    headed.write_bytes(b"LENET-DDP-CKPT-1\n" + digest + b"\n" + buf.getvalue())
    state.update(world_size=1, rng=[checkpoint.rng_state(torch.device("cpu"))])
    other = {**state, "config": {**state["config"], "debug": {"fail_rank": -1}}}
    for name in ("other", "bare"):
        (tmp_path / name).mkdir()
    other = checkpoint.save(tmp_path / "other", 1, other, keep=1)
    bare = checkpoint.save(tmp_path / "bare", 1, state, keep=1)
    tiny = write_tiny_mnist(tmp_path / "tiny")
    for path in (headed, other, bare):
        resume = [f"train.resume={path}", f"train.run_dir={tmp_path / 'run2'}"]
        assert train.main([*TINY_ARGS, f"data.root={tiny}", *resume]) == EXIT_CHECKPOINT
        assert f"{path} is not a checkpoint of this pipeline" in one_error_line(capsys)
    for path in (headed, other):
        assert evaluate.main([str(path), "--tracking", "disabled"]) == EXIT_CHECKPOINT
        assert str(path) in one_error_line(capsys)


@pytest.mark.parametrize("module", SCRIPTS)
def test_version_and_help_answer_without_importing_torch(module):
    """`--version` and `--help` of every command, as its script calls it, in a fresh process:
    torch (seconds to import on a small machine) is not imported for them."""
    code = (
        f"import sys; from {module} import main\n"
        "for argv in (['--version'], ['--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (argv, e.code)\n"
        "print('imported:', *sorted(m for m in sys.modules if m.partition('.')[0] == 'torch'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "(lenet-ddp)" in proc.stdout and "usage:" in proc.stdout, proc.stdout
    assert proc.stdout.splitlines()[-1] == "imported:", proc.stdout.splitlines()[-1][:300]


# -- damaged training data, as a user runs the training command (in this process) ---------------


def test_damaged_data_is_one_line_naming_the_file(tiny_mnist, tmp_path, capsys):
    """An IDX file cut short and a gzip file cut short: exit 3 and one line naming the file and
    what is wrong with it (a missing data directory: test_a_missing_input_exits_with_its_kind)."""

    def copy(name: str) -> Path:
        shutil.copytree(tiny_mnist, tmp_path / name)
        return tmp_path / name

    truncated = copy("truncated")
    images = truncated / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    gzipped = copy("gzipped")
    labels = gzipped / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.with_name(labels.name + ".gz").write_bytes(gzip.compress(labels.read_bytes())[:-12])
    labels.unlink()
    cases = {
        truncated: ("train-images-idx3-ubyte", "truncated"),
        gzipped: ("t10k-labels-idx1-ubyte.gz",),
    }
    for root, needles in cases.items():
        args = [*TINY_ARGS, "train.fused_conv=false", f"data.root={root}"]
        assert train.main([*args, f"train.run_dir={tmp_path / 'run'}"]) == EXIT_DATA, root
        line = one_error_line(capsys)
        assert all(needle in line for needle in needles), line


# -- the line of a job of several ranks: the rank that failed on its own ------------------------


def test_the_cause_is_the_first_rank_with_its_own_error_else_the_first_killed(tmp_path):
    """torchrun's failures as it lists them (timestamps in whole seconds): a rank with its own
    error wins over a rank killed earlier or at the same time; among killed ranks, the first."""

    def failure(rank: int, exitcode: int, timestamp: int) -> ProcessFailure:
        f = ProcessFailure(rank, 1000 + rank, exitcode, str(tmp_path / f"none-{rank}.json"))
        f.timestamp = timestamp
        return f

    stopped, own = failure(0, -15, 100), failure(1, 3, 100)
    assert launch.job_cause({0: stopped, 1: own}) == (1, own)
    killed_first, own_later = failure(0, -9, 99), failure(1, 3, 101)
    assert launch.job_cause({0: killed_first, 1: own_later}) == (1, own_later)
    own_first, own_after = failure(0, 3, 101), failure(1, 6, 102)
    assert launch.job_cause({1: own_after, 0: own_first}) == (0, own_first)
    late, early = failure(0, -15, 101), failure(1, -9, 100)
    assert launch.job_cause({0: late, 1: early}) == (1, early)


def test_a_failed_background_thread_is_one_warning_line(capsys):
    def body() -> int:
        def write() -> None:
            raise FileNotFoundError(2, "No such file or directory", "/gone/events.out")

        thread = threading.Thread(target=write, name="event-writer")
        thread.start()
        thread.join()
        return 0

    hook = threading.excepthook
    assert cli.run(body) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("warning: a background thread (event-writer) stopped: ") and (
        "No such file or directory" in line
    )
    assert threading.excepthook is hook  # put back when the command ends
