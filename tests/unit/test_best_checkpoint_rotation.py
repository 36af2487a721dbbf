"""best.pt, the checkpoint of the selected epoch, is never rotated away (checkpoint.keep=1)."""

from __future__ import annotations

import torch

from pipeline.training import checkpoint


def test_best_pt_survives_rotation_with_keep_1(tmp_path):
    state = {"model": {"w": torch.zeros(2)}, "epoch": 1, "global_step": 4}
    checkpoint.save(tmp_path, 4, state, keep=1)
    best = {"epoch": 1, "step": 4, "metric": "val_loss", "value": 0.5}
    checkpoint.save_best(tmp_path, state, best)
    for step in (8, 12, 16):
        checkpoint.save(tmp_path, step, {**state, "global_step": step}, keep=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-000000016.pt"]
    kept = checkpoint.load(tmp_path / checkpoint.BEST)  # a whole, verified checkpoint
    assert kept["global_step"] == 4 and kept["best"] == best
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "ckpt-000000016.pt"]
