"""End to end on the real MNIST: two gloo ranks under torchrun, one epoch, one set of logs."""

import json

from helpers import assert_ok, read_jsonl, run_pipeline


def test_two_ranks_one_epoch_reach_97_percent(mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_pipeline(
        [
            "--config",
            "configs/cpu.yaml",
            f"data.root={mnist_root}",
            f"train.run_dir={run_dir}",
            "train.epochs=1",
            "tracking.mode=disabled",
            "data.val_size=0",
        ],
        nproc=2,
    )
    assert_ok(proc)
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert len(records) == 1  # one record per epoch, written once (rank 0)
    record = records[0]
    for key in (
        "epoch",
        "train_loss",
        "test_loss",
        "test_accuracy",
        "epoch_time_s",
        "images_per_s",
    ):
        assert key in record
    assert record["test_count"] == 10000  # every test image counted once across ranks
    assert record["test_accuracy"] >= 0.97
    assert proc.stdout.count("epoch 1: train loss") == 1  # only rank 0 prints
    assert "world 2 (torchrun, gloo)" in proc.stdout
    # The first step (warm-up, or compilation) is timed and reported apart, once.
    assert proc.stdout.count("first step: ") == 1
    assert json.loads((run_dir / "summary.json").read_text())["first_step_s"] > 0
    assert (run_dir / "config.yaml").is_file()
