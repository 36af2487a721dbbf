"""`python -m pipeline.report RUN_DIR`: plots and a summary from a real run's files, finished or
still running, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from statistics import median

import pytest

from pipeline import report
from pipeline.results.plots import PLOTS

from helpers import REPO, TINY_ARGS, assert_ok, read_jsonl, run_pipeline

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished_run(tiny_mnist, tmp_path_factory) -> Path:
    """A real two-epoch run on the tiny dataset, W&B off."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    args = [*TINY_ARGS, "train.epochs=2", "train.log_every=2"]
    assert_ok(run_pipeline([*args, f"data.root={tiny_mnist}", f"train.run_dir={run_dir}"]))
    return run_dir


def run_report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.report", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def summary_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_plots_and_summary_match_the_metrics(finished_run, tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install -e .[report]")
    out = tmp_path / "out"
    proc = run_report(finished_run, "--out", out)
    assert proc.returncode == 0, proc.stderr
    for name in PLOTS:
        width, height = png_size(out / name)
        assert width >= 600 and height >= 300 and (out / name).stat().st_size > 10_000
    epochs = read_jsonl(finished_run / "metrics.jsonl")
    accuracy = [r["test_accuracy"] for r in epochs]
    time_s = sum(r["epoch_time_s"] for r in epochs)
    images = sum(r["images_per_s"] * r["epoch_time_s"] for r in epochs)
    text = (out / "summary.txt").read_text()
    assert text.strip() in proc.stdout  # printed as well as written
    fields = summary_fields(text)
    assert fields["status"] == "finished"
    assert fields["epochs"] == f"2 (global step {epochs[-1]['step']})"
    best = epochs[accuracy.index(max(accuracy))]  # the first of the best: a tie does not improve
    assert fields["selected"] == (
        f"epoch {best['epoch']} by test_accuracy ({max(accuracy) * 100:.2f}%), on the test set: "
        "no validation split"
    )
    assert fields["test accuracy"].startswith(f"{max(accuracy) * 100:.2f}% (test loss ")
    assert fields["last epoch"].startswith(f"test accuracy {accuracy[-1] * 100:.2f}%")
    rates = [r["images_per_s"] for r in read_jsonl(finished_run / "steps.jsonl")]
    assert fields["images/s"] == (
        f"{median(rates):,.0f} median of the logging intervals; "
        f"{images / time_s:,.0f} whole run (all images / train time)"
    )
    assert fields["train time"].startswith(f"{time_s:.1f} s")


def test_a_running_job_is_reported_with_its_partial_lines_skipped(finished_run, tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install -e .[report]")
    run_dir = tmp_path / "running"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "summary.json").unlink()  # written only when training ends
    first_epoch = read_jsonl(run_dir / "metrics.jsonl")[0]
    (run_dir / "metrics.jsonl").write_text(json.dumps(first_epoch) + '\n{"epoch": 2, "st')
    with open(run_dir / "steps.jsonl", "a") as f:
        f.write('{"step": 40, "loss": 0.')
    proc = run_report(run_dir)
    assert proc.returncode == 0, proc.stderr
    fields = summary_fields((run_dir / "report" / "summary.txt").read_text())
    assert fields["status"].startswith("not finished")
    assert fields["epochs"].startswith("1 ")
    first = f"test accuracy {first_epoch['test_accuracy'] * 100:.2f}%"
    assert fields["last epoch"].startswith(first)
    assert all((run_dir / "report" / name).exists() for name in PLOTS)


def test_bad_input_is_one_line_and_a_failing_exit(tmp_path):
    missing = run_report(tmp_path / "nowhere")
    assert missing.returncode != 0 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "steps.jsonl").write_text('{"step": 1, "lo')  # nothing whole yet
    empty = run_report(tmp_path / "empty")
    assert empty.returncode != 0 and empty.stderr.startswith("error: no metrics in")
    assert empty.stderr.count("\n") == 1


def test_missing_matplotlib_says_what_to_install(finished_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert report.main([str(finished_run), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install matplotlib" in err
