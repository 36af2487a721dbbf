"""`train.run_dir` as a template: a directory of its own for every run that trains differently
or is cut short; and the line a run starts with, naming its config and what the overrides
changed (`describe_overrides`).

Fields, filled in before the run starts (str.format syntax):
- `{config}`: the config's name (`cpu` for `--config configs/cpu.yaml`; `default` without one);
- `{changes}`: the command line's overrides of settings that change what is trained or which
  model the run ends with (those a resume insists on, `checkpoint.MUST_MATCH`: model.*,
  optim.*, train.batch_size, loss, seed, precision, epochs, early_stop_patience,
  early_stop_min_delta, data.dataset, val_size, checkpoint.select) and of train.max_steps (a
  trial cut short, which a resume may still train on), where they differ from the config, as
  `,key=value` in key order (empty when there are none), e.g. `,optim.lr=0.1,train.seed=1`;
- `{seed}`: train.seed;
- `{slurm_job}`, `{slurm_array_task}`: SLURM_JOB_ID and SLURM_ARRAY_TASK_ID (empty outside
  SLURM);
- `{wandb_run}`: the W&B run id a `wandb agent` gives its run (WANDB_RUN_ID; empty otherwise).
The shipped configs use `runs/{config}{changes}`: the same command resumes in the same
directory (`runs/cpu`; a requeued job too), `optim.lr=0.1` trains in `runs/cpu,optim.lr=0.1`,
and a trial with `train.max_steps=30` in `runs/cpu,train.max_steps=30`, so the config's full run
never resumes a trial. A trial is trained on by naming its directory:
`train.run_dir=runs/cpu,train.max_steps=30 train.max_steps=100` (or `train.max_steps=0`: to the
config's epochs). Settings that do not change the result (data.root, tracking, logging,
checkpoint cadence, the world size) do not change the directory.
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


def names_run_dir(key: str) -> bool:
    """Whether the dotted key `key` is in `{changes}`: it changes what is trained (a resume
    refuses another value), or it is train.max_steps."""
    section, _, name = key.partition(".")
    keys = MUST_MATCH.get(section, ())
    return key == "train.max_steps" or keys is None or name in keys


def overridden(cfg: Config, base: Config, overrides: list[str]) -> list[tuple[str, Any, Any]]:
    """(key, value in `cfg`, value in `base`) for each key the overrides name, in their order."""
    now, was, out = to_dict(cfg), to_dict(base), []
    for key in dict.fromkeys(item.partition("=")[0].strip() for item in overrides):
        section, _, name = key.partition(".")
        out.append((key, now[section][name], was[section][name]))
    return out


def changes(cfg: Config, base: Config, overrides: list[str]) -> str:
    """`,key=value` for each override of a setting that names the run directory where `cfg`
    differs from `base` (the config without the overrides), in key order."""
    return "".join(
        f",{key}={show_value(now)}"
        for key, now, was in sorted(overridden(cfg, base, overrides), key=lambda c: c[0])
        if names_run_dir(key) and now != was
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
    changed with the config's (or the default) value from `base` (the config without the
    overrides; None where the file alone is invalid), `none` where it is empty, for the start
    of a run: `overrides: optim.lr=0.1 (config: 0.05), data.mirrors=URL (config: none)`."""
    shown = path or "built-in defaults"
    if path and not Path(path).is_file():  # a shipped config, by its name
        shown = f"{path} = {shipped.resolve(path)}"
    lines = [f"config: {shown} (every setting: {cfg.train.run_dir}/config.yaml, or --print-config)"]
    what = "config" if path else "default"
    changed = [
        f"{key}={show_value(now)}"
        + (f" ({what}: {show_value(was) if was != '' else 'none'})" if base is not None else "")
        for key, now, was in overridden(cfg, base or cfg, overrides)
        if base is None or now != was
    ]
    if changed:
        lines.append(f"overrides: {', '.join(changed)}")
    return "\n".join(lines)
