"""`train.run_dir` as a template: a directory of its own for every run that trains differently;
and the line a run starts with, naming its config and what the overrides changed
(`describe_overrides`).

Fields, filled in before the run starts (str.format syntax):
- `{config}`: the config's name (`cpu` for `--config configs/cpu.yaml`; `default` without one);
- `{changes}`: the command line's overrides of settings that change what is trained or which
  model the run ends with (those a resume insists on, `checkpoint.MUST_MATCH`: model.*,
  optim.*, train.batch_size, loss, seed, precision, epochs, early_stop_patience,
  early_stop_min_delta, data.dataset, val_size, checkpoint.select), where they differ from the
  config, as `,key=value` in key order (empty when there are none), e.g.
  `,optim.lr=0.1,train.seed=1`;
- `{seed}`: train.seed;
- `{slurm_job}`, `{slurm_array_task}`: SLURM_JOB_ID and SLURM_ARRAY_TASK_ID (empty outside
  SLURM);
- `{wandb_run}`: the W&B run id a `wandb agent` gives its run (WANDB_RUN_ID; empty otherwise).
The shipped configs use `runs/{config}{changes}`: the same command resumes in the same
directory (`runs/cpu`), and `optim.lr=0.1` trains in `runs/cpu,optim.lr=0.1`. Settings that do
not change the result (data.root, tracking, logging, checkpoint cadence, the world size) do not
change the directory.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any

from pipeline.config import shipped
from pipeline.config.schema import Config, show_value, to_dict
from pipeline.errors import ConfigError
from pipeline.training.checkpoint import MUST_MATCH

FIELDS = ("config", "changes", "seed", "slurm_job", "slurm_array_task", "wandb_run")


def changes_training(key: str) -> bool:
    """Whether the dotted key `key` changes what is trained (a resume refuses another value)."""
    section, _, name = key.partition(".")
    if section not in MUST_MATCH:
        return False
    keys = MUST_MATCH[section]
    return keys is None or name in keys


def overridden(cfg: Config, base: Config, overrides: list[str]) -> list[tuple[str, Any, Any]]:
    """(key, value in `cfg`, value in `base`) for each key the overrides name, in their order."""
    now, was, out = to_dict(cfg), to_dict(base), []
    for key in dict.fromkeys(item.partition("=")[0].strip() for item in overrides):
        section, _, name = key.partition(".")
        out.append((key, now[section][name], was[section][name]))
    return out


def changes(cfg: Config, base: Config, overrides: list[str]) -> str:
    """`,key=value` for each override of a setting that changes training where `cfg` differs
    from `base` (the config without the overrides), in key order."""
    return "".join(
        f",{key}={show_value(now)}"
        for key, now, was in sorted(overridden(cfg, base, overrides), key=lambda c: c[0])
        if changes_training(key) and now != was
    )


def config_name(path: str | Path | None) -> str:
    return Path(path).stem if path else "default"


def render(
    template: str,
    cfg: Config,
    base: Config,
    path: str | None,
    overrides: list[str],
    env: dict | None = None,
) -> str:
    """The run directory `template` names for this command (see the module's text)."""
    env = os.environ if env is None else env
    used = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    unknown = [name for name in used if name not in FIELDS]
    if unknown:
        raise ConfigError(
            f"config key train.run_dir: {template!r} has the unknown field {{{unknown[0]}}}; "
            f"the fields are {', '.join('{' + f + '}' for f in FIELDS)}"
        )
    if not used:
        return template
    values = {
        "config": config_name(path),
        "changes": changes(cfg, base, overrides),
        "seed": str(cfg.train.seed),
        "slurm_job": env.get("SLURM_JOB_ID", ""),
        "slurm_array_task": env.get("SLURM_ARRAY_TASK_ID", ""),
        "wandb_run": env.get("WANDB_RUN_ID", ""),
    }
    try:
        return template.format(**values)
    except (ValueError, IndexError) as e:
        raise ConfigError(
            f"config key train.run_dir: {template!r} is not a valid template ({e})"
        ) from e


def describe_overrides(
    path: str | None, overrides: list[str], cfg: Config, base: Config | None
) -> str:
    """The config file, where every setting is saved, and each setting that the overrides
    changed with the file's (or the default) value from `base` (the config without the
    overrides; None where the file alone is invalid), for the start of a run."""
    shown = path or "built-in defaults"
    if path and not Path(path).is_file():  # a shipped config, by its name
        shown = f"{path} = {shipped.resolve(path)}"
    lines = [f"config: {shown} (every setting: {cfg.train.run_dir}/config.yaml, or --print-config)"]
    what = "file" if path else "default"
    changed = [
        f"{key}={show_value(now)}" + (f" ({what}: {show_value(was)})" if base is not None else "")
        for key, now, was in overridden(cfg, base or cfg, overrides)
        if base is None or now != was
    ]
    if changed:
        lines.append(f"overrides: {', '.join(changed)}")
    return "\n".join(lines)
