"""A trained model from a run directory or a checkpoint file: where evaluate, export and predict
start.

`find_checkpoint` takes what a user passes: a run directory (its best.pt, the checkpoint of the
epoch training selected, where it kept one; with `last`, or where there is none, its newest
valid checkpoint) or a file; `chosen` is the line that says which one is used. `config_of`
reads the run's config from the checkpoint through the config's own conversion and checks (a
key it does not know is refused; a missing one gets its default), and
`build_model` gives the checkpoint's `LeNet` variant with its weights. `load` does all of it:
the one way evaluate, export and predict read a trained model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config.schema import Config, from_dict
from pipeline.dist.group import DistContext
from pipeline.errors import CheckpointError, ConfigError, describe
from pipeline.model import LeNet
from pipeline.results.records import metric_text
from pipeline.training import checkpoint

log = logging.getLogger(__name__)


def find_checkpoint(target: Path, last: bool = False) -> Path:
    """The checkpoint file `target` names: itself, or a run directory's best.pt (unless `last`,
    or it has none, or it is damaged: then its newest valid checkpoint)."""
    if target.is_dir():
        best = target / checkpoint.BEST
        if not last and best.is_file():
            try:
                checkpoint.load(best)
                return best
            except CheckpointError as e:
                log.warning(f"{e}; using the newest checkpoint instead")
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


def chosen(path: Path, state: dict, target: Path, last: bool = False) -> str:
    """The line that says which checkpoint a command uses, and why."""
    where = f"{path} (epoch {state.get('epoch')}, global step {state.get('global_step')})"
    best = state.get("best")
    if path.name == checkpoint.BEST and isinstance(best, dict):
        metric = str(best.get("metric"))
        shown = metric_text(metric, best.get("value"))
        how = f"using {where}: the epoch selected by {metric} {shown}"
        return how + ("; --last for the newest checkpoint" if target.is_dir() else "")
    if not target.is_dir():
        return f"using {where}"
    if last:
        return f"using {where}: the newest checkpoint (--last)"
    return f"using {where}: the newest checkpoint ({target} has no usable {checkpoint.BEST})"


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


def load(
    target: Path, last: bool = False, ctx: DistContext | None = None
) -> tuple[Path, dict, Config, LeNet]:
    """The checkpoint `target` names (see `find_checkpoint`): its path, state, config and model
    (on CPU); the line saying which it is is logged. With `ctx` (a started process group) rank 0
    reads the file and every rank gets the same (a collective, `checkpoint.load_on_main`)."""
    if ctx is None:
        path = find_checkpoint(target, last)
        state = checkpoint.load(path)
    else:
        path, state = checkpoint.load_on_main(ctx, lambda: find_checkpoint(target, last))
    log.info(chosen(path, state, target, last))
    cfg = config_of(state, path)
    return path, state, cfg, build_model(state, cfg, path)
