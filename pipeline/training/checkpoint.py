"""Checkpoints: atomic save on rank 0, newest-valid lookup, compatibility check, RNG capture.

A checkpoint file is what `torch.save` writes (a zip archive of plain tensors and Python values),
so `torch.load(path, weights_only=True)` opens it without this project, and its `model` is a
plain state_dict of `pipeline.model.LeNet`. One more record in the archive, `lenet-ddp.sha256`,
holds the SHA-256 of every other record (names and contents): a file whose records do not match
it, or that is not a whole archive, is reported and skipped. The file is written to a temporary
file in the run directory, flushed, fsynced and renamed over, so a process killed mid-write
leaves either the old set of checkpoints or the new one, never a file that passes for a
checkpoint. A resume also insists on the keys of this format (`FORMAT`, the config's layout).
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import re
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic import write_atomic
from pipeline.data.split import same_split
from pipeline.dist.group import DistContext, broadcast_object, gather_to_main, raise_on_main
from pipeline.errors import CheckpointError, describe

log = logging.getLogger(__name__)

DIGEST_RECORD = "lenet-ddp.sha256"  # in the archive's folder, beside torch's own records
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")

# Keys that must match between a checkpoint and the run resuming it: they change the model,
# the optimizer's state or the sequence of global batches. The world size and train.grad_accum
# may change: the global batch at every step is the same set of samples for any split of it.
# The held-out images (data.val_size), the selection metric and early stopping change which
# model the run ends with.
MUST_MATCH = {
    "model": None,  # every key of the section
    "optim": None,
    "train": (
        "batch_size",
        "loss",
        "seed",
        "precision",
        "epochs",
        "early_stop_patience",
        "early_stop_min_delta",
    ),
    "data": ("dataset", "val_size"),
    "checkpoint": ("select",),
}
BEST = "best.pt"  # the checkpoint of the selected epoch, beside the rotating ones
# What a resume reads of a checkpoint beside its engine's and progress' own states.
FORMAT = ("config", "selection", "split", "rng", "world_size", "steps_per_epoch")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:09d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files in `run_dir`, newest (highest step) first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def _records_digest(archive: zipfile.ZipFile, skip: zipfile.ZipInfo | None) -> str:
    """SHA-256 over the names and contents of the archive's records, but `skip`; reading each
    record also checks its local header and its CRC-32."""
    h = hashlib.sha256()
    for info in archive.infolist():
        if info is skip:
            continue
        name, data = info.filename.encode(), archive.read(info)
        for part in (name, data):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`obj` with `fn` applied to every tensor in it, through nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def on_cpu(state: Any) -> Any:
    """`state` with every tensor on the CPU: a checkpoint of a GPU run then opens with plain
    `torch.load(path, weights_only=True)` on a machine without CUDA."""
    return map_tensors(state, lambda t: t.detach().cpu())


def encode(state: dict) -> bytes:
    """The bytes of a checkpoint file: `torch.save(state)`, every tensor on the CPU, with the
    digest record added."""
    buf = io.BytesIO()
    torch.save(on_cpu(state), buf)
    with zipfile.ZipFile(buf, "a") as archive:
        folder = archive.namelist()[0].split("/")[0]
        line = f"sha256 {_records_digest(archive, None)}\n"
        archive.writestr(f"{folder}/{DIGEST_RECORD}", line)
    return buf.getvalue()


def save(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write checkpoint `state` for `step`, then drop all but the newest `keep`. Rank 0 only."""
    path = run_dir / checkpoint_name(step)
    write_atomic(path, encode(state))
    for old in list_checkpoints(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def save_best(run_dir: Path, state: dict, best: dict) -> Path:
    """Write `state` as RUN_DIR/best.pt, with `best` (epoch, step, metric, value) recorded in
    it. Rank 0 only. Not a ckpt-*.pt name: rotation never removes it."""
    path = run_dir / BEST
    write_atomic(path, encode({**state, "best": best}))
    return path


def load(path: Path) -> dict:
    """Read and verify one checkpoint; CheckpointError with one line if it is not valid."""
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from e
    return parse(blob, path)


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is truncated or corrupt ({why})")


def _foreign(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a checkpoint of this pipeline ({why}); pass a ckpt-*.pt file of a run "
        "directory"
    )


def _verify_archive(blob: bytes, path: Path) -> None:
    """Raise CheckpointError unless `blob` is a whole archive whose records match its digest."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            stored = [i for i in archive.infolist() if i.filename.endswith("/" + DIGEST_RECORD)]
            if len(stored) != 1:
                raise CheckpointError(
                    f"{path} is a PyTorch file but not a checkpoint of this pipeline (it has no "
                    f"{DIGEST_RECORD} record); pass a ckpt-*.pt file of a run directory"
                )
            expected = archive.read(stored[0]).decode("ascii", "replace").strip()
            actual = f"sha256 {_records_digest(archive, stored[0])}"
    except CheckpointError:
        raise
    except Exception as e:  # a damaged archive fails in many ways: zip, zlib, size, CRC errors
        raise _corrupt(path, describe(e)) from e
    if actual != expected:
        raise _corrupt(path, "checksum mismatch")


def parse(blob: bytes, path: Path) -> dict:
    """Verify and decode the bytes of checkpoint file `path`."""
    if not blob.startswith(b"PK\x03\x04"):
        raise _foreign(path, "bad header: not a PyTorch archive")
    _verify_archive(blob, path)
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {describe(e)}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def newest_valid(run_dir: Path) -> Path | None:
    """The newest checkpoint in `run_dir` that verifies; each bad newer one is reported."""
    found = list_checkpoints(run_dir)
    for path in found:
        try:
            load(path)
            return path
        except CheckpointError as e:
            log.warning(f"{e}; falling back to the previous checkpoint")
    if found:
        raise CheckpointError(
            f"none of the {len(found)} checkpoint(s) in {run_dir} is valid; move them away to "
            "start fresh, or choose another train.run_dir"
        )
    return None


def check_compatible(
    saved: dict,
    current: dict,
    world_size: int,
    steps_per_epoch: int,
    path: Path,
    split: dict,
) -> None:
    """Raise CheckpointError naming the first setting that differs in a way resume cannot bear,
    or saying that `saved` is of another format (it lacks a key of `FORMAT`, or its config has
    other keys than `current`).

    Another world size is fine where it gives the same optimizer steps per epoch (it does
    unless the training set does not split evenly). `split` (this run's
    `pipeline.data.split.Split.record()`) must hold out the images the checkpoint's did.
    """
    missing = [key for key in FORMAT if key not in saved]
    if missing or _layout(saved["config"]) != _layout(current):
        raise _foreign(path, f"it has no {missing[0]}" if missing else "its config has other keys")
    old = saved["config"]
    for section, keys in MUST_MATCH.items():
        for key in keys or current[section]:
            a, b = old[section][key], current[section][key]
            if a != b:
                raise CheckpointError(
                    f"checkpoint {path} was written with {section}.{key}={a!r}, this run has "
                    f"{section}.{key}={b!r}; resume with the same value or start a new run "
                    "(another train.run_dir)"
                )
    if not same_split(saved["split"], split):
        raise CheckpointError(
            f"checkpoint {path} was trained with other validation images held out (its "
            f"split.json digest differs from this run's, data.val_size={split['val_size']}); "
            "resume with the data it was trained on or start a new run (another train.run_dir)"
        )
    old_world, old_steps = saved["world_size"], saved["steps_per_epoch"]
    if old_steps != steps_per_epoch:
        raise CheckpointError(
            f"checkpoint {path} was written with {old_steps} steps per epoch (world "
            f"{old_world}), this run has {steps_per_epoch} (world {world_size}): the training "
            f"set does not split alike; resume with {old_world} processes or start a new run"
        )


def _layout(config: dict) -> dict:
    """The sections of a config and their keys."""
    return {section: sorted(values) for section, values in config.items()}


def choose(run_dir: Path, resume: str) -> Path | None:
    """Which checkpoint `train.resume` names (None: start fresh); CheckpointError if none fits."""
    if resume == "auto":
        return newest_valid(run_dir)
    if resume == "none":
        if list_checkpoints(run_dir):
            raise CheckpointError(
                f"train.resume=none but {run_dir} holds checkpoints of an earlier run; "
                "choose another train.run_dir or remove them"
            )
        return None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"train.resume={resume}: no such checkpoint file")
    return path


def rng_state(device: torch.device) -> dict:
    """This rank's RNG states: Python, NumPy, torch's CPU generator and, on a CUDA `device`,
    that device's generator (a list of one: only the rank's own GPU, so that a process that
    sees fewer GPUs can resume it)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore `state` (of `rng_state`); its CUDA generator (the saving rank's own GPU's, none
    from a CPU rank) onto `device` only, when it is a GPU, whichever GPU that is."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state(state["cuda"][0], device)


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class Checkpoints:
    """A run's checkpoint files as its ranks write and read them, the newest `keep` ckpt-*.pt
    and best.pt (the Trainer's part; every method a collective)."""

    def __init__(self, ctx: DistContext, run_dir: Path, keep: int):
        self.ctx, self.run_dir, self.keep = ctx, run_dir, keep

    def save(self, step: int, state: dict, best: dict | None = None) -> None:
        """Gather every rank's RNG state to rank 0, which writes the checkpoint of `step`; with
        `best` (see `save_best`) it writes best.pt instead, and rotates nothing."""
        buf = io.BytesIO()
        torch.save(state["rng"], buf)  # plain bytes travel safely through the object collectives
        blobs = gather_to_main(self.ctx, buf.getvalue())
        if blobs is not None:
            rngs = [torch.load(io.BytesIO(b), weights_only=True) for b in blobs]
            if best is not None:
                save_best(self.run_dir, {**state, "rng": rngs}, best)
            else:
                save(self.run_dir, step, {**state, "rng": rngs}, self.keep)

    def load_best(self) -> dict | None:
        """best.pt's state on every rank; None, with a warning, where it is missing (a run
        resumed with checkpoint.keep_best turned on after its best epoch)."""
        path = self.run_dir / BEST
        _, best = load_on_main(self.ctx, lambda: path if path.is_file() else None)
        if best is None:
            log.warning(f"{path} is missing: the test is of the last model")
        return best


def load_on_main(
    ctx: DistContext, locate: Callable[[], Path | None]
) -> tuple[Path | None, dict | None]:
    """The checkpoint rank 0 picks with `locate`, and its state, on every rank (None, None:
    `locate` found none). Rank 0 reads the file; every rank decodes the same bytes, so no shared
    disk is needed. An error of rank 0's ends the job once (`raise_on_main`)."""
    found: tuple[Path, bytes] | CheckpointError | None = None
    if ctx.is_main:
        path = None
        try:
            path = locate()
            found = (path, path.read_bytes()) if path is not None else None
        except CheckpointError as e:
            found = e
        except OSError as e:
            found = CheckpointError(f"cannot read checkpoint {path}: {e.strerror}")
    found = broadcast_object(ctx, found)
    if isinstance(found, CheckpointError):
        raise_on_main(ctx, found)
    if found is None:
        return None, None
    path, blob = found
    return path, parse(blob, path)


def load_for_resume(
    run_dir: Path, resume: str, ctx: DistContext
) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from, and its state, on every rank (None, None: start fresh)."""
    return load_on_main(ctx, lambda: choose(run_dir, resume))
