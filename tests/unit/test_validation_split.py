"""The validation split (data.val_size), in this process: which images are held out, that the
sampler never trains on them on any world size, the one-line refusals (a split too large, a
resume with another split), and what a training run's split.json, checkpoints and metrics record.
(A real resume refusing another data.val_size: tests/unit/test_checkpoint.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import train
from pipeline.config import naming
from pipeline.config.schema import Config, load_config, to_dict
from pipeline.data.device import shard_indices, steps_per_epoch
from pipeline.data.split import SPLIT_SEED, check_size, digest, split
from pipeline.errors import EXIT_CONFIG, CheckpointError
from pipeline.training import checkpoint

from helpers import TINY_ARGS


def test_the_split_is_seeded_by_a_constant_sorted_and_disjoint():
    a, b = split(60_000, 5_000), split(60_000, 5_000)
    assert torch.equal(a.val, b.val) and a.seed == SPLIT_SEED
    assert len(a.val) == 5_000 and len(a.train) == 55_000
    assert torch.equal(torch.sort(torch.cat([a.train, a.val])).values, torch.arange(60_000))
    assert bool((a.val[1:] > a.val[:-1]).all()) and bool((a.train[1:] > a.train[:-1]).all())
    # Not the first or last images: a seeded random choice over the whole training set.
    assert a.val.min() < 100 and a.val.max() > 59_900
    assert not torch.equal(split(60_000, 5_000, seed=1).val, a.val)
    none = split(512, 0)
    assert len(none.val) == 0 and torch.equal(none.train, torch.arange(512))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_sampler_trains_on_every_kept_image_and_never_a_held_out_one(world):
    """The sampler shards the kept images as DistributedSampler does: the union over ranks of an
    epoch's shards, mapped back to training-set indices, is the kept set (with DistributedSampler's
    wrap-around padding where it does not split evenly) and never meets the held-out images."""
    n, val_size, seed = 1_000, 150, 7
    s = split(n, val_size)
    kept = len(s.train)
    for epoch in range(3):
        trained = torch.cat(
            [s.train[shard_indices(kept, r, world, seed, epoch)] for r in range(world)]
        )
        assert set(trained.tolist()) == set(s.train.tolist())
        assert not set(trained.tolist()) & set(s.val.tolist())
        assert len(trained) == -(-kept // world) * world  # padded to a multiple of the world


def test_the_split_does_not_depend_on_the_world_size_or_the_seed():
    cfgs = [load_config(None, ["data.val_size=64", f"train.seed={seed}"]) for seed in (0, 1)]
    records = [split(512, c.data.val_size).record() for c in cfgs]
    assert records[0] == records[1]
    assert records[0] == {
        "val_size": 64,
        "train_size": 448,
        "seed": SPLIT_SEED,
        "val_digest": digest(split(512, 64).val),
    }
    # The steps per epoch follow the kept images, the same for any world that splits the batch.
    assert {steps_per_epoch(448, 32 // w, w, 1) for w in (1, 2, 4)} == {14}


def test_a_split_that_does_not_fit_is_refused_in_one_line(tiny_mnist, tmp_path, capsys):
    assert check_size(60_000, 5_000, 64) is None
    assert check_size(512, 480, 32) is None
    problem = check_size(512, 500, 32)
    assert problem == (
        "config key data.val_size: 500 leaves 12 of the 512 training images to train on, fewer "
        "than one global batch (train.batch_size=32); use at most 480"
    )
    # The command ends with that line and exit code 2, as it does for a negative size.
    args = [*TINY_ARGS, f"data.root={tiny_mnist}", f"train.run_dir={tmp_path / 'run'}"]
    assert train.main([*args, "data.val_size=500"]) == EXIT_CONFIG
    assert capsys.readouterr().err == f"error: {problem}\n"
    assert train.main([*args, "data.val_size=-1"]) == EXIT_CONFIG
    assert capsys.readouterr().err == (
        "error: config key data.val_size: -1 is out of range; it must be a number >= 0\n"
    )


def test_a_resume_refuses_another_split_in_one_line(tmp_path):
    saved = {"config": to_dict(load_config(None, ["data.val_size=64"])), "world_size": 1}
    saved.update(steps_per_epoch=14, split=split(512, 64).record(), selection={}, rng=[])
    current = to_dict(load_config(None, ["data.val_size=64"]))
    ckpt = tmp_path / "ckpt-000000001.pt"
    checkpoint.check_compatible(saved, current, 1, 14, ckpt, split(512, 64).record())
    other = split(512, 64, seed=SPLIT_SEED + 1).record()  # the same size, other images
    with pytest.raises(CheckpointError, match="other validation images held out") as refused:
        checkpoint.check_compatible(saved, current, 1, 14, ckpt, other)
    assert "\n" not in str(refused.value)
    bigger = to_dict(load_config(None, ["data.val_size=32"]))
    with pytest.raises(CheckpointError, match="data.val_size=64, this run has data.val_size=32"):
        checkpoint.check_compatible(saved, bigger, 1, 14, ckpt, split(512, 32).record())


def test_the_split_and_selection_settings_name_the_run_directory():
    for key in (
        "data.val_size",
        "checkpoint.select",
        "train.early_stop_patience",
        "train.early_stop_min_delta",
    ):
        assert naming.names_run_dir(key), key
    for key in ("checkpoint.keep_best", "train.test_every_epoch"):
        assert not naming.names_run_dir(key), key
    base = Config()
    cfg = load_config(None, ["data.val_size=5000"])
    assert naming.changes(cfg, base, ["data.val_size=5000"]) == ",data.val_size=5000"


# -- the validation split, as a user runs it (in this process) -------------------------------------


def test_split_json_and_checkpoints_record_the_split(tiny_mnist, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [*TINY_ARGS, "train.fused_conv=false", f"data.root={tiny_mnist}"]
    code = train.main([*args, f"train.run_dir={run_dir}", "data.val_size=64"])
    assert code == 0, capsys.readouterr().err
    expected = split(512, 64).record()
    assert json.loads((run_dir / "split.json").read_text()) == expected
    for path in [*checkpoint.list_checkpoints(run_dir), run_dir / checkpoint.BEST]:
        assert checkpoint.load(path)["split"] == expected, path
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["val_count"] == 64 and record["step"] == 448 // 32
    assert "test_accuracy" not in record  # the test set is evaluated once, at the end
