"""Experiment tracking in real jobs: a 2-rank offline job writes one W&B run (read back from its
.wandb file) and its resumed job continues it; training goes on unchanged when wandb cannot be
imported; importing the package imports neither wandb nor matplotlib. (The W&B mode, step rows
and the tracker against a stand-in wandb: tests/unit/test_tracking.py.)"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.training import checkpoint

from helpers import REPO, TINY_ARGS, assert_ok, read_jsonl, run_pipeline

# -- reading a .wandb file back -------------------------------------------------------------
# An offline run's run-<id>.wandb is a LevelDB-style log (a 7-byte ":W&B" header, then 32 KiB
# blocks of records, each a 7-byte header and a chunk) of wandb's own protobuf `Record`s.
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pos, payload = [], _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        payload = chunk if kind in (_FULL, _FIRST) else payload + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
    return records


def _items(update) -> dict:
    """A history/summary/config update as {dotted key: value}."""
    out = {}
    for item in update:
        key = ".".join(item.nested_key) if item.nested_key else item.key
        out[key] = json.loads(item.value_json)
    return out


class OfflineRun:
    """What one offline run directory holds: id, config, history rows by step, summary, exit."""

    def __init__(self, run_dir: Path):
        (file,) = run_dir.glob("run-*.wandb")
        self.dir, self.config, self.history, self.summary = run_dir, {}, {}, {}
        self.id, self.exit_code = None, None
        for r in wandb_records(file):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                self.id = r.run.run_id
                self.config.update(_items(r.run.config.update))
            elif kind == "config":
                self.config.update(_items(r.config.update))
            elif kind == "history":
                self.history[r.history.step.num] = _items(r.history.item)
            elif kind == "summary":
                self.summary.update(_items(r.summary.update))
            elif kind == "exit":
                self.exit_code = r.exit.exit_code


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    return [OfflineRun(d) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]


def wandb_env(tmp: Path) -> dict:
    """Keep wandb's settings, cache and staging files out of the home directory."""
    return {
        "WANDB_CONFIG_DIR": str(tmp / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp / "wandb-data"),
    }


def test_importing_the_package_does_not_import_wandb_or_matplotlib():
    code = (
        "import sys, pipeline.train, pipeline.tracking.tracker, pipeline.tracking.wandb_run, "
        "pipeline.report\n"
        "print(sorted(m for m in ('wandb', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.fixture(scope="module")
def offline_job(tiny_mnist, tmp_path_factory):
    """A 2-rank offline job stopped at step 8, then resumed in the same run dir to the end."""
    pytest.importorskip("wandb", reason="the offline-run tests need wandb: pip install -e .[wandb]")
    tmp = tmp_path_factory.mktemp("offline-job")
    run_dir = tmp / "run"
    args = [
        *TINY_ARGS,
        f"data.root={tiny_mnist}",
        f"train.run_dir={run_dir}",
        "train.log_every=2",
        "tracking.mode=offline",
    ]
    first = run_pipeline([*args, "train.max_steps=8"], nproc=2, env=wandb_env(tmp))
    assert_ok(first)
    after_first = {
        "runs": offline_runs(run_dir),
        "metrics": read_jsonl(run_dir / "metrics.jsonl"),
        "steps": read_jsonl(run_dir / "steps.jsonl"),
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "run_id": checkpoint.load(checkpoint.list_checkpoints(run_dir)[0])["run_id"],
    }
    second = run_pipeline(args, nproc=2, env=wandb_env(tmp))
    assert_ok(second)
    return run_dir, first, after_first, second


def test_two_rank_job_writes_one_offline_run_with_config_and_metrics(offline_job):
    run_dir, first, after, _ = offline_job
    (run,) = after["runs"]  # one run for the job, whatever the world size
    assert run.id == after["run_id"] and run.exit_code == 0
    assert warnings(first.stderr) == []
    assert f"wandb sync {run_dir}/wandb/offline-run-*" in first.stdout
    # The resolved config and the job's facts.
    assert run.config["train"]["max_steps"] == 8 and run.config["tracking"]["mode"] == "offline"
    assert run.config["meta"]["world_size"] == 2 and run.config["meta"]["backend"] == "gloo"
    # A step row for each record of steps.jsonl (every train.log_every=2 steps), its numbers.
    records = {r["step"]: r for r in after["steps"]}
    assert sorted(s for s, row in run.history.items() if "train/loss" in row) == [2, 4, 6, 8]
    for step, r in records.items():
        row = run.history[step]
        assert row["train/loss"] == pytest.approx(r["loss"]) and row["train/lr"] == r["lr"]
        assert row["train/images_per_s"] == pytest.approx(r["images_per_s"])
        assert row["train/epoch"] == pytest.approx(step / 16)  # 16 steps per epoch
    # The epoch record at its global step, and the summary.
    (epoch,) = after["metrics"]
    assert run.history[8]["epoch/test_accuracy"] == epoch["test_accuracy"]
    assert run.history[8]["epoch/epoch"] == 1
    assert run.summary["selected_value"] == after["summary"]["selected_value"]
    assert run.summary["test_accuracy"] == after["summary"]["test_accuracy"]


def test_resumed_job_continues_the_same_run(offline_job):
    run_dir, _, after, second = offline_job
    assert "resumed from" in second.stdout and warnings(second.stderr) == []
    runs = offline_runs(run_dir)
    assert len(runs) == 2 and {r.id for r in runs} == {after["run_id"]}
    final = checkpoint.load(checkpoint.list_checkpoints(run_dir)[0])
    assert final["run_id"] == after["run_id"] and final["global_step"] == 16
    # The second part logs where the first stopped: steps 10 to 16, never back at 0.
    resumed = runs[1].history
    assert sorted(s for s, row in resumed.items() if "train/loss" in row) == [10, 12, 14, 16]
    (epoch,) = read_jsonl(run_dir / "metrics.jsonl")
    assert resumed[16]["epoch/test_accuracy"] == epoch["test_accuracy"]


def _comparable(records: list[dict], timing: tuple[str, ...]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in timing} for r in records]


def test_missing_wandb_leaves_training_unaffected(tiny_mnist, tmp_path):
    args = [*TINY_ARGS, f"data.root={tiny_mnist}"]
    # A `wandb` that cannot be imported, first on the path.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "wandb.py").write_text("raise ImportError('No module named wandb')\n")
    missing_env = {**wandb_env(tmp_path), "PYTHONPATH": os.pathsep.join([str(shadow), str(REPO)])}
    # The two single-process runs are independent: run them side by side.
    with ThreadPoolExecutor(2) as pool:
        off = pool.submit(run_pipeline, [*args, f"train.run_dir={tmp_path / 'off'}"])
        proc = pool.submit(
            run_pipeline,
            [*args, f"train.run_dir={tmp_path / 'missing'}", "tracking.mode=offline"],
            env=missing_env,
        ).result()
        assert_ok(off.result())
    assert_ok(proc)
    (warning,) = warnings(proc.stderr)
    assert "wandb cannot be imported" in warning and "pip install -e .[wandb]" in warning
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "missing" / "wandb").exists()
    timing = ("epoch_time_s", "images_per_s", "time_s")
    for name in ("metrics.jsonl", "steps.jsonl"):
        off, missing = (read_jsonl(tmp_path / d / name) for d in ("off", "missing"))
        assert off and _comparable(off, timing) == _comparable(missing, timing)
    off, missing = (
        json.loads((tmp_path / d / "summary.json").read_text()) for d in ("off", "missing")
    )
    assert off["test_accuracy"] == missing["test_accuracy"]
