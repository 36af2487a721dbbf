"""A trained model from a run directory or a checkpoint file: where evaluate, export and predict
start.

`find_checkpoint` takes what a user passes (a run directory: its newest valid checkpoint; or a
file), `config_of` reads the run's config from the checkpoint through the config's own
conversion and checks (keys of other versions of the project are left out, missing ones get
their defaults), and `build_model` gives the checkpoint's `LeNet` variant with its weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import checkpoint
from pipeline.config import Config, from_dict
from pipeline.errors import CheckpointError, ConfigError, describe
from pipeline.model import LeNet

log = logging.getLogger(__name__)


def find_checkpoint(target: Path) -> Path:
    """The checkpoint file `target` names: itself, or a run directory's newest valid one."""
    if target.is_dir():
        path = checkpoint.newest_valid(target)
        if path is None:
            raise CheckpointError(
                f"{target} holds no checkpoint (ckpt-*.pt); pass the train.run_dir of a run "
                "that saved one, or a checkpoint file"
            )
        return path
    if not target.exists():
        raise CheckpointError(
            f"{target} does not exist; pass a run directory (train.run_dir) or a ckpt-*.pt file"
        )
    return target


def config_of(state: dict, path: Path) -> Config:
    """The resolved config saved in checkpoint `state` (read from `path`), as a typed Config."""
    raw = state.get("config")
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise CheckpointError(
            f"checkpoint {path} holds no run config; pass a checkpoint written by "
            "python -m pipeline.train"
        )
    try:
        return from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(
            f"checkpoint {path} holds a config this version cannot use: {e}"
        ) from e


def build_model(state: dict, cfg: Config, path: Path) -> LeNet:
    """The checkpoint's LeNet variant with its weights, on CPU, in eval mode."""
    model = LeNet(cfg.model.kernel_size, cfg.model.fc1_width)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {path}: its model does not fit LeNet(kernel_size="
            f"{cfg.model.kernel_size}, fc1_width={cfg.model.fc1_width}) ({describe(e)})"
        ) from e
    return model.eval()


def load(target: Path) -> tuple[Path, dict, Config, LeNet]:
    """The checkpoint `target` names: its path, its state, its config and its model."""
    path = find_checkpoint(target)
    state = checkpoint.load(path)
    cfg = config_of(state, path)
    return path, state, cfg, build_model(state, cfg, path)
