"""Under `wandb agent` (a W&B sweep), offline, with the environment the agent sets
(WANDB_SWEEP_ID, WANDB_RUN_ID) and its default `--key=value` arguments: the run takes the
overrides, logs to the agent's run id (not one of its own) in the sweep's group, keeps that id in
its checkpoints, and a resume continues the same W&B run. (That the group is the sweep's is
checked in test_tracking, against a stand-in wandb that records what it was given.)"""

from __future__ import annotations

import importlib.util

from pipeline.training import checkpoint

from helpers import assert_ok, require, run_pipeline

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
