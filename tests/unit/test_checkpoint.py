"""Checkpoint files, in this process: plain torch files, corruption detection, keeping the
newest k and never rotating best.pt away. Writes killed mid-way and runs that resume from
checkpoints are in tests/multiproc/test_checkpoint_runs.py."""

import io
import random
import zipfile

import pytest
import torch

from pipeline.errors import CheckpointError
from pipeline.model import LeNet
from pipeline.training import checkpoint

from helpers import same_state


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
