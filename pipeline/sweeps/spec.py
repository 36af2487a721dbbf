"""A sweep file: a base config, settings for every point, a grid and/or a list of points over
dotted keys, and seeds; expanded into points, each a training command with its own run
directory.

```yaml
base: cpu                        # a shipped config's name, or a path
name: lr_seeds                   # default: the file's name
overrides: {train.epochs: 1}     # every point
grid: {optim.lr: [0.02, 0.05, 0.1]}                 # every combination of these values
points: [{optim.name: adam, optim.lr: 0.001}]       # and/or these points
seeds: [0, 1]                    # each point with each train.seed (or a count: 2)
run_dir: runs/sweeps/{sweep}/{point}                # the default
```

A point's name is its own settings as `key=value` joined by commas, in key order
(`optim.lr=0.1,train.seed=1`); its run directory is `run_dir` with `{sweep}` and `{point}`
filled in. Every point's config is checked when the file is read: a bad key or value is one
line naming the point.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import shipped
from pipeline.config.schema import Config, load_config, show_value
from pipeline.errors import ConfigError

KEYS = ("base", "name", "overrides", "grid", "points", "seeds", "run_dir")
DEFAULT_RUN_DIR = "runs/sweeps/{sweep}/{point}"


@dataclass
class Point:
    """One run of a sweep: its index, name, settings, run directory and command line."""

    index: int
    name: str
    settings: dict[str, Any]  # the point's own (grid, points, seed)
    run_dir: Path
    args: list[str] = field(default_factory=list)  # pipeline.train's arguments


@dataclass
class Sweep:
    path: Path
    name: str
    base: Path
    overrides: dict[str, Any]
    points: list[Point]

    @property
    def root(self) -> Path:
        """The folder above every point's run directory (where the comparison goes)."""
        dirs = [p.run_dir for p in self.points]
        common = Path(*Path(dirs[0]).parts[: _common_parts(dirs)])
        return common if dirs and common != Path() else Path("runs") / "sweeps" / self.name


def _common_parts(dirs: list[Path]) -> int:
    parts = [d.parts for d in dirs]
    n = 0
    while all(len(p) > n + 1 and p[n] == parts[0][n] for p in parts):
        n += 1
    return n


def _fail(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"sweep file {path}: {problem}")


def _mapping(path: Path, value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _fail(path, f"{what} must be a mapping of section.key to values")
    return value


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read sweep file {path}: {e.strerror}; check the path") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise _fail(path, f"not valid YAML{where}; fix its syntax") from e
    if not isinstance(data, dict):
        raise _fail(path, f"must be a mapping with the keys {', '.join(KEYS)}")
    if "parameters" in data and ("method" in data or "command" in data):
        raise _fail(
            path,
            "this is a W&B sweep file: run it with `wandb sweep FILE` and `wandb agent`, "
            "not with pipeline.sweep",
        )
    for key in data:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise _fail(path, f"unknown key {key!r}; {hint}the keys are {', '.join(KEYS)}")
    if "base" not in data:
        raise _fail(path, "no base: name the config every point starts from (base: cpu)")
    return data


def _seeds(path: Path, value: Any) -> list[int | None]:
    if value is None:
        return [None]
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return list(range(value))
    if (
        isinstance(value, list)
        and value
        and all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    ):
        return list(dict.fromkeys(value))
    raise _fail(path, "seeds must be a list of integers, or a count (seeds: 2 gives 0 and 1)")


def _combinations(path: Path, grid: dict, listed: Any) -> list[dict[str, Any]]:
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise _fail(path, f"grid {key} must be a non-empty list of values")
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    if listed is None:
        return combos or [{}]
    if not isinstance(listed, list):
        raise _fail(path, "points must be a list of mappings of section.key to values")
    extra = [_mapping(path, p, f"point {i + 1}") for i, p in enumerate(listed)]
    return (combos if grid else []) + extra


def point_name(settings: dict[str, Any]) -> str:
    """A point's settings as `key=value,...` in key order ("base" where it has none)."""
    shown = [f"{k}={show_value(v)}" for k, v in sorted(settings.items())]
    return ",".join(shown) or "base"


def _as_args(settings: dict[str, Any]) -> list[str]:
    return [f"{k}={show_value(v) if not isinstance(v, str) else v}" for k, v in settings.items()]


def load(path: str | Path) -> Sweep:
    """The sweep in file `path` (a path, or a shipped sweep's name: sweeps/lr_seeds), checked."""
    path = shipped.resolve(path)
    data = _read(path)
    name = str(data.get("name") or path.stem)
    base = shipped.resolve(str(data["base"]))
    overrides = _mapping(path, data.get("overrides"), "overrides")
    grid = _mapping(path, data.get("grid"), "grid")
    template = str(data.get("run_dir") or DEFAULT_RUN_DIR)
    combos = _combinations(path, grid, data.get("points"))
    points, seen = [], set()
    for combo in combos:
        for seed in _seeds(path, data.get("seeds")):
            settings = {**combo, **({"train.seed": seed} if seed is not None else {})}
            pname = point_name(settings)
            if pname in seen:
                continue
            seen.add(pname)
            try:
                run_dir = Path(template.format(sweep=name, point=pname))
            except (KeyError, IndexError, ValueError) as e:
                raise _fail(
                    path, f"run_dir {template!r}: the fields are {{sweep}} and {{point}}"
                ) from e
            args = [
                "--config",
                str(base),
                *_as_args(overrides),
                *_as_args(settings),
                f"train.run_dir={run_dir}",
                f"tracking.group={name}",
            ]
            points.append(Point(len(points), pname, settings, run_dir, args))
    if len({p.run_dir for p in points}) < len(points):
        raise _fail(path, f"run_dir {template!r} gives two points one directory; use {{point}}")
    sweep = Sweep(path, name, base, overrides, points)
    for point in points:
        check(sweep, point)
    return sweep


def check(sweep: Sweep, point: Point) -> Config:
    """The point's config, validated; ConfigError naming the point if it is not valid."""
    try:
        return load_config(sweep.base, point.args[2:])
    except ConfigError as e:
        raise ConfigError(f"sweep {sweep.path}, point {point.name}: {e}") from None
