"""What a user reads, in this process: W&B named in one word in the header and not loaded
unless asked for, and a progress bar that fits the terminal. What real runs print when they
start, train, resume and have nothing left to do is in tests/multiproc/test_run_output.py."""

from __future__ import annotations

import io
import os
import sys
from types import SimpleNamespace

from pipeline.config.schema import load_config
from pipeline.tracking.tracker import Console, Progress, make_tracker, wandb_status

from helpers import no_credentials


def test_auto_without_credentials_is_off_and_never_imports_wandb(tmp_path, monkeypatch, capsys):
    for key, value in no_credentials(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` would now fail loudly
    cfg = load_config(None, ["tracking.mode=auto"])
    assert wandb_status(cfg.tracking) == "W&B off"
    cfg.train.run_dir = str(tmp_path)
    tracker = make_tracker(SimpleNamespace(is_main=True), cfg)
    tracker.start(cfg, {"steps_per_epoch": 4}, False, 0, 0)
    tracker.close()
    assert tracker.run_id is None and [type(s) for s in tracker.sinks] == [Console]
    assert capsys.readouterr().err == ""
    assert not (tmp_path / "wandb").exists()
    # Asked for, W&B is named in the header: with credentials, or by tracking.mode.
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_status(cfg.tracking) == "W&B online"
    assert wandb_status(load_config(None, ["tracking.mode=offline"]).tracking) == "W&B offline"


def test_progress_on_a_terminal_fits_its_width(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("shutil.get_terminal_size", lambda: os.terminal_size((60, 20)))
    stream = Terminal()
    progress = Progress(stream, epoch=0, epochs=3, total=938, start=400)
    progress.update(450, 0.1234, 12345.0)
    (line,) = stream.getvalue().split("\r")[1:]
    assert len(line.removesuffix("\x1b[K")) < 60
    assert line.startswith("epoch 1/3 |")
