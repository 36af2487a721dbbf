"""Experiment tracking in real jobs: a 2-rank offline job writes one W&B run (read back from its
.wandb file) and its resumed job continues it; training goes on unchanged when wandb cannot be
imported; importing the package imports neither wandb nor matplotlib; under `wandb agent` (a W&B
sweep), offline, with the environment the agent sets (WANDB_SWEEP_ID, WANDB_RUN_ID) and its
default `--key=value` arguments, the run takes the overrides, logs to the agent's run id in the
sweep's group, keeps that id in its checkpoints, and a resume continues the same W&B run;
`tensorboard --logdir`, a server started as a user starts it, lists a run trained without any
tracking key. (The W&B mode, step rows and the tracker against a stand-in wandb, the event
files' scalars: tests/unit/test_tracking.py.)"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline import train
from pipeline.training import checkpoint

from helpers import REPO, TINY_ARGS, assert_ok, child_env, read_jsonl, require, run_pipeline

# -- reading a .wandb file back -------------------------------------------------------------------
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


# -- under wandb agent ----------------------------------------------------------------------------


AGENT = {"WANDB_SWEEP_ID": "sweep42x", "WANDB_RUN_ID": "agentrun7", "WANDB_MODE": "offline"}


def test_an_agents_run_keeps_the_agents_id_across_a_resume(tiny_mnist, tmp_path):
    if importlib.util.find_spec("wandb") is None:
        require("wandb is not installed (pip install wandb)")
    run_dir = tmp_path / "run"
    # How the agent's ${args} passes the sweep's parameters: --section.key=value.
    args = [
        "--optim.lr=0.1",
        "--train.epochs=1",
        "--train.batch_size=32",
        f"--data.root={tiny_mnist}",
        "--data.download=false",
        f"train.run_dir={run_dir}",
        "tracking.mode=auto",  # auto follows the WANDB_MODE the agent's environment sets
    ]
    first = run_pipeline([*args, "train.max_steps=8"], env=AGENT)
    assert_ok(first)
    assert "optim.lr=0.1 (default: 0.05)" in first.stdout  # the agent's overrides were taken
    assert "W&B offline run agentrun7" in first.stdout
    saved = checkpoint.load(checkpoint.list_checkpoints(run_dir)[0])
    assert saved["run_id"] == "agentrun7"
    resumed = run_pipeline(args, env=AGENT)
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout and "W&B offline run agentrun7" in resumed.stdout
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith("-agentrun7") for r in runs)
    assert checkpoint.load(checkpoint.list_checkpoints(run_dir)[0])["run_id"] == "agentrun7"


# -- tensorboard --logdir -------------------------------------------------------------------------


def serve(logdir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`tensorboard --logdir logdir` on a free port, as a user starts it, and the URL it prints
    (its output goes to `log`)."""
    command = Path(sys.executable).with_name("tensorboard")
    if not command.exists():
        require("the tensorboard command is not installed (pip install tensorboard)")
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(command), "--logdir", str(logdir), "--port", "0", "--host", "127.0.0.1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
    deadline = time.monotonic() + 120  # a guard against a server that never starts
    while server.poll() is None and time.monotonic() < deadline:
        found = re.search(r"at (http://\S+/) ", log.read_text())
        if found:
            return server, found.group(1)
        time.sleep(0.2)
    server.kill()
    raise AssertionError(f"tensorboard printed no URL: {log.read_text()[-2000:]}")


def get(url: str) -> dict | list:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def test_a_run_without_tracking_keys_writes_event_files_that_tensorboard_lists(
    tiny_mnist, tmp_path, capsys
):
    if importlib.util.find_spec("tensorboard") is None:
        require("tensorboard is not installed (pip install tensorboard)")
    runs = tmp_path / "runs"
    args = [*TINY_ARGS, "train.fused_conv=false", f"data.root={tiny_mnist}"]
    assert train.main([*args, f"train.run_dir={runs / 'tiny'}", "train.max_steps=4"]) == 0
    assert " | TensorBoard on | run dir " in capsys.readouterr().out
    assert list((runs / "tiny" / "tensorboard").glob("events.out.tfevents.*"))
    server, url = serve(runs, tmp_path / "tensorboard.log")
    try:
        deadline = time.monotonic() + 120  # the server reads the folder in the background
        while "tiny/tensorboard" not in get(url + "data/runs") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert get(url + "data/runs") == ["tiny/tensorboard"]
        tags = get(url + "data/plugin/scalars/tags")["tiny/tensorboard"]
        assert {"train/loss", "train/lr", "epoch/train_loss"} <= set(tags)
    finally:
        server.terminate()
        server.wait(timeout=30)
