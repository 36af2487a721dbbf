"""Where a `--config` comes from: a path, or the name of a config shipped with the project.

The shipped configs live in the repository's `configs/` folder and are installed with the
package (as `pipeline.configs`), so `--config cpu` (or `cpu.yaml`, or `configs/cpu.yaml`) works
from any directory, in a checkout or after `pip install`. A path that exists always wins.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ConfigError

SUFFIXES = (".yaml", ".yml")


def shipped_dir() -> Path | None:
    """The folder of the shipped configs: the installed package data (pipeline/configs/), else
    the checkout's configs/ (an editable install, or the checkout on PYTHONPATH)."""
    here = Path(__file__).resolve().parents[1]  # pipeline/
    for folder in (here / "configs", here.parent / "configs"):
        if folder.is_dir():
            return folder
    return None


def shipped_names() -> list[str]:
    """The shipped configs by name (cpu, fast_cpu, ...; sweeps/... for sweep files)."""
    root = shipped_dir()
    if root is None:
        return []
    return sorted(
        str(p.relative_to(root).with_suffix(""))
        for p in root.rglob("*")
        if p.suffix in SUFFIXES and p.is_file()
    )


def resolve(given: str | Path) -> Path:
    """The config file `given` names: an existing path as it is, else a shipped config by its
    name, with or without `.yaml` and a leading `configs/`. ConfigError if neither."""
    path = Path(given)
    if path.is_file():
        return path
    name = path.as_posix()
    name = name.removeprefix("./").removeprefix("configs/")
    root = shipped_dir()
    if root is not None and not path.is_absolute():
        for candidate in (root / name, *(root / f"{name}{s}" for s in SUFFIXES)):
            if candidate.is_file():
                return candidate
    names = ", ".join(n for n in shipped_names() if "/" not in n) or "none found"
    where = "is a directory" if path.is_dir() else "not found"
    raise ConfigError(
        f"config file {given} {where}; pass the path of a YAML file, or the name of a shipped "
        f"config: {names}"
    )
