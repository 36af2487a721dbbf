"""The validation split (data.val_size) in a real process: what split.json and the checkpoints
record. (A split that does not fit, and a resume's refusal of another split:
tests/unit/test_validation_split.py; a real resume refusing another data.val_size:
tests/multiproc/test_checkpoint_runs.py.)"""

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
