"""The validation split (data.val_size) in single real processes: what split.json and the
checkpoints record, and the one-line refusals of a split that does not fit."""

from __future__ import annotations

import json

from pipeline.data.split import split
from pipeline.training import checkpoint

from helpers import TINY_ARGS, assert_ok, run_pipeline


def _run(tiny_mnist, run_dir, *extra):
    args = [*TINY_ARGS, f"data.root={tiny_mnist}", f"train.run_dir={run_dir}", *extra]
    return run_pipeline(args)


def test_split_json_and_checkpoints_record_the_split(tiny_mnist, tmp_path):
    run_dir = tmp_path / "run"
    assert_ok(_run(tiny_mnist, run_dir, "data.val_size=64"))
    expected = split(512, 64).record()
    assert json.loads((run_dir / "split.json").read_text()) == expected
    for path in [*checkpoint.list_checkpoints(run_dir), run_dir / checkpoint.BEST]:
        assert checkpoint.load(path)["split"] == expected, path
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["val_count"] == 64 and record["step"] == 448 // 32
    assert "test_accuracy" not in record  # the test set is evaluated once, at the end


def test_bad_splits_end_in_one_line(tiny_mnist, tmp_path):
    too_big = _run(tiny_mnist, tmp_path / "big", "data.val_size=500")
    assert too_big.returncode == 2 and too_big.stderr.count("\n") == 1
    assert too_big.stderr.startswith("error: config key data.val_size: 500 leaves 12 of the 512")
    negative = _run(tiny_mnist, tmp_path / "negative", "data.val_size=-1")
    assert negative.returncode == 2
    assert (
        negative.stderr
        == "error: config key data.val_size: -1 is out of range; it must be a number >= 0\n"
    )
    run_dir = tmp_path / "resumed"
    assert_ok(_run(tiny_mnist, run_dir, "data.val_size=64", "train.max_steps=4"))
    other = _run(tiny_mnist, run_dir, "data.val_size=32")
    assert other.returncode == 4 and other.stderr.count("\n") == 1, other.stderr
    assert "data.val_size=64, this run has data.val_size=32" in other.stderr
