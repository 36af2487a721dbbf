"""A trained model from a run directory or a checkpoint file: where evaluate, export and predict
start.

`find_checkpoint` takes what a user passes (a run directory: its newest valid checkpoint; or a
file), `config_of` rebuilds the run's typed config from the checkpoint (keys of other versions
of the project are ignored, missing ones get their defaults), and `build_model` gives the
checkpoint's `LeNet` variant with its weights. `run_cli` turns the errors of a command into one
line and its exit code.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline import checkpoint
from pipeline.config import Config
from pipeline.errors import EXIT_INTERRUPTED, CheckpointError, PipelineError, describe
from pipeline.model import LeNet


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def find_checkpoint(target: Path, warn: Callable[[str], None] = warn) -> Path:
    """The checkpoint file `target` names: itself, or a run directory's newest valid one."""
    if target.is_dir():
        path = checkpoint.newest_valid(target, warn)
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
    sections = {}
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        known = {f.name for f in dataclasses.fields(cls)}
        values = raw.get(section.name, {})
        sections[section.name] = cls(**{k: v for k, v in values.items() if k in known})
    return Config(**sections)


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


def load(target: Path, warn: Callable[[str], None] = warn) -> tuple[Path, dict, Config, LeNet]:
    """The checkpoint `target` names: its path, its state, its config and its model."""
    path = find_checkpoint(target, warn)
    state = checkpoint.load(path)
    cfg = config_of(state, path)
    return path, state, cfg, build_model(state, cfg, path)


def run_cli(body: Callable[[], int]) -> int:
    """Run a command's `body`; an error becomes one line on stderr and its exit code."""
    try:
        return body()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
