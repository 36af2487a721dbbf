"""Checkpoints, in this process: the files (plain torch files, corruption detection, keeping the
newest k and never rotating best.pt away), and the training command's use of them on the tiny
dataset: falling back from a corrupt newest checkpoint, refusing an incompatible one or an
earlier run before overwriting anything, and saving what resume needs in files plain
torch.load opens. A writer killed mid-write: tests/multiproc/test_checkpoint.py."""

import io
import random
import zipfile

import pytest
import torch

from pipeline import train
from pipeline.errors import EXIT_CHECKPOINT, CheckpointError
from pipeline.model import LeNet
from pipeline.training import checkpoint

from helpers import TINY_ARGS, final_model, same_state


def test_corrupt_and_truncated_files_are_detected(tmp_path, caplog):
    good = checkpoint.save(tmp_path, 5, {"x": torch.arange(10)}, keep=3)
    blob = good.read_bytes()
    bad = tmp_path / checkpoint.checkpoint_name(6)
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.load(bad)
    flipped = bytearray(blob)
    flipped[blob.index(b"data/0") + 100] ^= 0xFF  # inside the tensor's record
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.load(bad)
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad header"):
        checkpoint.load(bad)
    assert checkpoint.newest_valid(tmp_path) == good
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "ckpt-000000006.pt" in warnings[0]


def test_no_damaged_byte_passes_for_a_checkpoint(tmp_path):
    """Flip bits all over a small checkpoint: each copy is refused, or reads back the same
    state (zip fields that no reader uses, such as timestamps, may change freely)."""
    state = {
        "model": {"w": torch.arange(6.0), "n": torch.ones(2, dtype=torch.long)},
        "epoch": 3,
        "rng": random.getstate()[:2],
        "config": {"train": {"seed": 0}},
    }
    blob = checkpoint.encode(state)
    refused = 0
    for i in range(0, len(blob), 3):
        damaged = bytearray(blob)
        damaged[i] ^= (0x01, 0x10, 0x80)[i % 3]
        try:
            got = checkpoint.parse(bytes(damaged), tmp_path / "c.pt")
        except CheckpointError:
            refused += 1
            continue
        assert same_state(got, state), f"a flipped bit at byte {i} passed for a checkpoint"
    assert refused > len(blob) // 6  # most bytes matter
    for n in range(0, len(blob), 11):
        with pytest.raises(CheckpointError):
            checkpoint.parse(blob[:n], tmp_path / "c.pt")


def test_a_changed_record_with_a_valid_crc_fails_the_digest(tmp_path):
    """Damage that zip's CRC-32 cannot see (a record rewritten whole) is caught by the SHA-256."""
    path = checkpoint.save(tmp_path, 1, {"model": {"w": torch.zeros(4)}}, keep=3)
    rewritten = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(rewritten, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data/0"):
                data = torch.ones(4).numpy().tobytes()
            dst.writestr(info, data)
    path.write_bytes(rewritten.getvalue())
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(4))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.load(path)


def test_a_plain_torch_file_is_not_taken_for_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"model": LeNet().state_dict()}, path)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    assert "not a checkpoint of this pipeline" in str(e.value) and "\n" not in str(e.value)


def test_only_the_newest_k_are_kept(tmp_path):
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, {"s": step}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "ckpt-000000005.pt",
        "ckpt-000000004.pt",
    ]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


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


# -- checkpoints, as a user runs it (in this process) ----------------------------------------------


def _train(capsys, tiny_mnist, run_dir, *extra) -> tuple[int, str, str]:
    """The training command on the tiny dataset, checkpointing every 4 steps: its exit code,
    stdout and stderr."""
    code = train.main(
        [
            *TINY_ARGS,
            "train.fused_conv=false",
            f"data.root={tiny_mnist}",
            f"train.run_dir={run_dir}",
            "train.epochs=2",
            "checkpoint.every_steps=4",
            *extra,
        ]
    )
    out, err = capsys.readouterr()
    return code, out, err


def _train_ok(capsys, tiny_mnist, run_dir, *extra) -> tuple[str, str]:
    code, out, err = _train(capsys, tiny_mnist, run_dir, *extra)
    assert code == 0, f"exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    return out, err


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tiny_mnist, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _train_ok(capsys, tiny_mnist, run_dir, "train.max_steps=12")
    newest = run_dir / checkpoint.checkpoint_name(12)
    data = bytearray(newest.read_bytes())
    # One flipped byte inside the model's largest tensor (fc1's weights, about a third of the
    # way in): the archive is still whole.
    data[len(data) // 3] ^= 0xFF
    newest.write_bytes(bytes(data))
    out, err = _train_ok(capsys, tiny_mnist, run_dir, "train.max_steps=16")
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "ckpt-000000012.pt is truncated or corrupt" in warning[0]
    assert f"resumed from {run_dir / checkpoint.checkpoint_name(8)}" in out
    straight = tmp_path / "straight"
    _train_ok(capsys, tiny_mnist, straight, "train.max_steps=16")
    a, b = final_model(run_dir), final_model(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_within_an_epoch_holds_the_epochs_train_time_so_far(
    tiny_mnist, tmp_path, capsys
):
    """With the epoch's images so far: a run resumed from it reports the epoch's speed over
    the whole epoch, not the epoch's images over the resumed part's time."""
    run_dir = tmp_path / "run"
    _train_ok(capsys, tiny_mnist, run_dir, "train.max_steps=12")
    at4, at8 = (checkpoint.load(run_dir / checkpoint.checkpoint_name(n)) for n in (4, 8))
    assert (at4["epoch_micro_steps"], at8["epoch_micro_steps"]) == (4, 8)
    assert 0 < at4["epoch_time"] < at8["epoch_time"], (at4["epoch_time"], at8["epoch_time"])


def test_incompatible_checkpoint_is_refused_before_anything_is_overwritten(
    tiny_mnist, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    _train_ok(capsys, tiny_mnist, run_dir, "train.max_steps=8")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    for override, key in (
        ("model.kernel_size=3", "model.kernel_size"),
        ("optim.name=adam", "optim.name"),
        ("train.batch_size=64", "train.batch_size"),
        ("data.val_size=32", "data.val_size"),  # another validation split
    ):
        code, _, err = _train(capsys, tiny_mnist, run_dir, "train.max_steps=16", override)
        assert code == EXIT_CHECKPOINT, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and key in errors[0] and "start a new run" in errors[0]
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_resume_none_refuses_to_overwrite_an_earlier_run(tiny_mnist, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _train_ok(capsys, tiny_mnist, run_dir, "train.max_steps=4")
    code, _, err = _train(capsys, tiny_mnist, run_dir, "train.resume=none")
    assert code == EXIT_CHECKPOINT and "holds checkpoints of an earlier run" in err
    code, _, err = _train(capsys, tiny_mnist, tmp_path / "r2", f"train.resume={tmp_path}/x.pt")
    assert code == EXIT_CHECKPOINT and "no such checkpoint file" in err


def test_checkpoint_holds_what_resume_needs(tiny_mnist, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _train_ok(capsys, tiny_mnist, run_dir, "train.max_steps=6")
    state = checkpoint.load(checkpoint.list_checkpoints(run_dir)[0])
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "step_in_epoch",
        "global_step",
        "rng",
        "config",
        "world_size",
        "run_id",
        "torch_version",
        "git_revision",
    ):
        assert key in state
    assert (state["global_step"], state["step_in_epoch"], state["epoch"]) == (6, 6, 0)
    assert not any(k.startswith("module.") or "_orig_mod" in k for k in state["model"])
    assert state["config"]["train"]["max_steps"] == 6
    assert (run_dir / "config.yaml").exists()


def test_a_checkpoint_opens_with_plain_torch_load(tiny_mnist, tmp_path, capsys):
    """No project code needed: torch.load(weights_only=True), and `model` fits a plain LeNet."""
    run_dir = tmp_path / "run"
    _train_ok(capsys, tiny_mnist, run_dir, "train.max_steps=4")
    path = checkpoint.list_checkpoints(run_dir)[0]
    state = torch.load(path, weights_only=True)
    model = LeNet()
    model.load_state_dict(state["model"])  # strict: every key, every shape
    assert state["global_step"] == 4 and state["config"]["model"]["kernel_size"] == 5
    assert all(v.is_contiguous() for v in state["model"].values())
    assert same_state(state, checkpoint.load(path))


def test_without_every_seconds_only_the_configured_checkpoints_are_taken(tiny_mnist, tmp_path):
    """(Checkpoints by the clock, at a step the ranks agree on:
    tests/multiproc/test_checkpoint.py.)"""
    run_dir = tmp_path / "run"
    args = [*TINY_ARGS, "train.fused_conv=false", f"data.root={tiny_mnist}"]
    args += [f"train.run_dir={run_dir}", "train.epochs=3", "train.stop_check_every=4"]
    assert train.main([*args, "checkpoint.keep=1000"]) == 0
    steps = sorted(checkpoint.load(p)["global_step"] for p in checkpoint.list_checkpoints(run_dir))
    assert steps == [16, 32, 48]  # each epoch's end: 512 images at a global batch of 32
