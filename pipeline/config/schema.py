"""Typed configuration: YAML files plus dotted `key=value` overrides, validated before training.

Every key lives in a small dataclass with a default, a help text and, where it has one, a set of
allowed values or a range. `load_config` merges a YAML file and command-line overrides, rejects
unknown keys, converts and checks every value (`convert`, `check`), and raises
`ConfigError` with one line that names the key and what is allowed. `help_text` renders all
keys for `--help`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from pipeline.config import shipped
from pipeline.errors import ConfigError


class Rule(NamedTuple):
    """A range check of a numeric key, and how `--help` and errors state it."""

    check: Callable[[Any], bool]
    text: str


POSITIVE = Rule(lambda v: v > 0, "a number > 0")
NON_NEGATIVE = Rule(lambda v: v >= 0, "a number >= 0")
FRACTION = Rule(lambda v: 0 <= v < 1, "a number in [0, 1)")


def _opt(default: Any, help: str, choices: tuple | None = None, rule: Rule | None = None) -> Any:
    """A config field with its help text, and its allowed values or range where it has one."""
    return field(default=default, metadata={"help": help, "choices": choices, "rule": rule})


@dataclass
class ModelConfig:
    kernel_size: int = _opt(5, "convolution kernel size: 5 (the tutorial's LeNet) or 3", (5, 3))
    fc1_width: int = _opt(
        120, "width of the first fully connected layer (the tutorial uses 120)", rule=POSITIVE
    )


@dataclass
class DataConfig:
    root: str = _opt(
        "data",
        "directory holding MNIST/raw/ (FashionMNIST/raw/, KMNIST/raw/: torchvision's layout); "
        "missing files are downloaded there",
    )
    dataset: str = _opt(
        "mnist",
        "MNIST-format dataset: mnist, fashion_mnist (Zalando) or kmnist (Kuzushiji)",
        ("mnist", "fashion_mnist", "kmnist"),
    )
    download: bool = _opt(True, "download missing files from data.mirrors")
    val_size: int = _opt(
        0,
        "training images held out as the validation set that selects the model and early "
        "stopping judges (0: none; the test set then does both, as labelled)",
        rule=NON_NEGATIVE,
    )
    mirrors: str = _opt(
        "",
        "comma-separated base URLs to download from, tried in order (empty: the dataset's public "
        "mirrors, those torchvision uses)",
    )

    def __post_init__(self) -> None:
        for url in self.mirror_list():
            if not url.startswith(("http://", "https://")):
                raise ConfigError(
                    f"config key data.mirrors: {url!r} is not an http:// or https:// URL; give "
                    "base URLs separated by commas, e.g. https://example.org/mnist/"
                )

    def mirror_list(self) -> list[str]:
        """data.mirrors as a list (empty: use the dataset's own mirrors)."""
        return [url.strip() for url in self.mirrors.split(",") if url.strip()]


@dataclass
class OptimConfig:
    name: str = _opt("sgd", "optimizer", ("sgd", "nesterov", "adam", "adamw", "rmsprop"))
    lr: float = _opt(0.05, "peak learning rate", rule=POSITIVE)
    momentum: float = _opt(0.9, "momentum (sgd, nesterov, rmsprop)", rule=FRACTION)
    weight_decay: float = _opt(0.0, "weight decay", rule=NON_NEGATIVE)
    schedule: str = _opt("none", "learning-rate schedule", ("none", "step", "cosine", "onecycle"))
    warmup_epochs: float = _opt(
        0.0, "linear warm-up length in epochs (none, step, cosine)", rule=NON_NEGATIVE
    )
    step_epochs: int = _opt(
        1, "step schedule: multiply the lr by gamma every this many epochs", rule=POSITIVE
    )
    gamma: float = _opt(0.5, "step schedule: lr factor", rule=POSITIVE)
    clip_grad_norm: float = _opt(
        0.0, "clip the gradient norm to this value (0: off)", rule=NON_NEGATIVE
    )


@dataclass
class TrainConfig:
    epochs: int = _opt(3, "number of epochs", rule=POSITIVE)
    batch_size: int = _opt(
        64,
        "global batch size per optimizer step, split across ranks and accumulation micro-steps",
        rule=POSITIVE,
    )
    grad_accum: int = _opt(
        1, "micro-steps per optimizer step (no all-reduce on the others)", rule=POSITIVE
    )
    eval_batch_size: int = _opt(1000, "evaluation batch size per rank", rule=POSITIVE)
    loss: str = _opt(
        "cross_entropy", "loss function (mse: against one-hot targets)", ("cross_entropy", "mse")
    )
    seed: int = _opt(
        0, "random seed: the same seed, world size and threads per rank give the same run"
    )
    precision: str = _opt(
        "fp32",
        "fp32, bf16 autocast (CPU and CUDA) or fp16 autocast with a gradient scaler (CUDA)",
        ("fp32", "bf16", "fp16"),
    )
    compile: str = _opt(
        "none", "torch.compile the model, or the whole train step", ("none", "model", "step")
    )
    compile_mode: str = _opt(
        "default",
        "torch.compile mode (reduce-overhead uses CUDA graphs)",
        ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    cuda_graph: str = _opt(
        "none",
        "whole_step: the whole step (forward, loss, backward, clipping, optimizer step) on "
        "static input buffers with the learning rate in a tensor, captured as one CUDA graph "
        "after 3 eager steps and replayed (on CPU the same step runs eagerly); needs "
        "train.compile=none, fp32 or bf16, optim.name sgd or nesterov (not with onecycle), adam "
        "or adamw, and one process per job on GPUs",
        ("none", "whole_step"),
    )
    fused_conv: str = _opt(
        "auto",
        "CPU runs: each conv -> max-pool -> ReLU stage as one C++ kernel, built on first use "
        "(about 20 s, needs a C++ compiler) into torch's extension cache; torch's ops where it "
        "cannot be built; one build per instruction set (AVX-512, AVX2, portable). auto: whichever "
        "of the kernels and torch's ops is faster here, timed once per machine at the run's batch "
        "(a second or two) and remembered beside the kernels' build",
        ("auto", "true", "false"),
    )
    reuse_host_memory: bool = _opt(
        True,
        "CPU runs: malloc keeps freed memory for the next step instead of returning it to the "
        "kernel (no page faults per step; Linux with glibc)",
    )
    max_steps: int = _opt(
        0, "stop after this many optimizer steps in all (0: no limit)", rule=NON_NEGATIVE
    )
    log_every: int = _opt(
        50, "optimizer steps between progress updates and step metrics", rule=POSITIVE
    )
    run_dir: str = _opt(
        "runs/{config}{changes}",
        "run directory: config, metrics and checkpoints. A template: {config} is the config's "
        "name, {changes} the overrides of settings that change training or train.max_steps "
        "(',optim.lr=0.1'), {seed}, {slurm_job}, {slurm_array_task}, {wandb_run}; the default "
        "gives a run that trains differently or is cut short a directory of its own, and the "
        "same command the same directory",
    )
    resume: str = _opt("auto", "auto (newest valid checkpoint in run_dir), none, or a path")
    preempt_signal: str = _opt(
        "SIGUSR1",
        "signal that, like SIGTERM, saves a checkpoint and exits",
        ("SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP"),
    )
    stop_check_every: int = _opt(
        10, "steps between the ranks' check for a stop signal", rule=POSITIVE
    )
    test_every_epoch: bool = _opt(
        False,
        "with a validation split, also evaluate the test set every epoch (logged as "
        "test_*_this_epoch, never used for selection); it is always evaluated once at the end",
    )
    early_stop_patience: int = _opt(
        0,
        "stop after this many epochs without an improvement of the selection metric "
        "(checkpoint.select) by more than early_stop_min_delta (0: off)",
        rule=NON_NEGATIVE,
    )
    early_stop_min_delta: float = _opt(
        0.0,
        "the least change of the selection metric that counts as an improvement, in its units "
        "(a fraction for accuracy)",
        rule=NON_NEGATIVE,
    )
    profile: str = _opt(
        "",
        "A:B: torch.profiler over the optimizer steps A+1..B (step A warms it up); a trace for "
        "Perfetto or TensorBoard in RUN_DIR/profile and the top operators by self time printed "
        "(empty: off)",
    )
    profile_ranks: str = _opt("0", "ranks that profile with train.profile: comma-separated, or all")

    def __post_init__(self) -> None:
        try:
            step_range(self.profile)
        except ValueError as e:
            raise ConfigError(f"config key train.profile: {self.profile!r}: {e}") from None


def step_range(text: str) -> tuple[int, int] | None:
    """train.profile's `A:B` as (A, B); None for an empty setting; ValueError for others."""
    if not text:
        return None
    first, sep, last = text.partition(":")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise ValueError("use A:B, two step numbers with A < B, e.g. 20:30")
    a, b = int(first), int(last)
    if a >= b:
        raise ValueError("use A:B with A < B, e.g. 20:30")
    return a, b


@dataclass
class CheckpointConfig:
    every_seconds: float = _opt(
        0.0,
        "also save when this many seconds passed since the last save (0: off): bounds the work "
        "a hard kill loses whatever the step time; checked every train.stop_check_every steps",
        rule=NON_NEGATIVE,
    )
    every_steps: int = _opt(
        0, "save every this many optimizer steps (0: only at epoch ends)", rule=NON_NEGATIVE
    )
    every_epochs: int = _opt(1, "save every this many epochs (and the last epoch)", rule=POSITIVE)
    keep: int = _opt(3, "number of checkpoints kept in the run directory", rule=POSITIVE)
    keep_best: bool = _opt(
        True, "also keep the checkpoint of the selected epoch as best.pt (never rotated away)"
    )
    select: str = _opt(
        "val_accuracy",
        "the metric that selects the best epoch (without a validation split: its test-set "
        "counterpart, labelled so)",
        ("val_accuracy", "val_loss"),
    )


@dataclass
class DistConfig:
    backend: str = _opt(
        "auto", "process-group backend (auto: nccl on CUDA, gloo on CPU)", ("auto", "gloo", "nccl")
    )
    device: str = _opt(
        "auto",
        "training device (auto: cuda:LOCAL_RANK when CUDA is present)",
        ("auto", "cpu", "cuda"),
    )
    timeout_s: float = _opt(
        600.0,
        "seconds a collective may wait for a peer before the job ends with an error",
        rule=POSITIVE,
    )


@dataclass
class TrackingConfig:
    mode: str = _opt(
        "auto",
        "Weights & Biases: auto (online when logged in with `wandb login` or WANDB_API_KEY is "
        "set, else off; an exported WANDB_MODE wins), online, offline, or disabled (never "
        "loaded)",
        ("auto", "online", "offline", "disabled"),
    )
    project: str = _opt("lenet-ddp", "W&B project")
    entity: str = _opt("", "W&B entity (team or user); empty: your default")
    name: str = _opt("", "W&B run name; empty: the run directory's name")
    group: str = _opt(
        "", "W&B group of the run (pipeline.sweep sets the sweep's name); empty: none"
    )
    artifact: bool = _opt(False, "upload the final checkpoint as a W&B artifact")
    tensorboard: str = _opt(
        "auto",
        "also write the run's scalars as TensorBoard event files in RUN_DIR/tensorboard (rank 0). "
        "auto: where the tensorboard package is installed; true: asked for (an error without it)",
        ("auto", "true", "false"),
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}


def _build(raw: dict[str, dict[str, Any]]) -> Config:
    """The typed config of `raw`, every value converted and checked."""
    sections = {}
    for name, cls in _sections().items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in raw.get(name, {}).items():
            if key not in fields:
                raise unknown_key(f"{name}.{key}", [f"{name}.{k}" for k in fields])
            values[key] = convert(f"{name}.{key}", fields[key], value)
            check(f"{name}.{key}", fields[key], values[key])
        sections[name] = cls(**values)
    return Config(**sections)


def from_dict(raw: dict[str, Any]) -> Config:
    """The config saved with a run (a checkpoint's, a config.yaml's) as a typed Config, through
    the same conversion and checks as a YAML file."""
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ConfigError("a saved config must be a mapping of sections")
    for section in raw:
        if section not in _sections():
            raise unknown_key(str(section), list(_sections()))
    return _build({k: {str(key): v for key, v in vals.items()} for k, vals in raw.items()})


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}; check the path") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}; fix its syntax") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections ({', '.join(_sections())})"
        )
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML file (optional: a path, or a shipped config's name, see `config_files`) and
    apply dotted `section.key=value` overrides."""
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = shipped.resolve(path)
        for section, values in _read_yaml(path).items():
            if section not in _sections():
                raise unknown_key(str(section), list(_sections()))
            if not isinstance(values, dict):
                raise ConfigError(
                    f"config file {path}: section {section} must be a mapping of keys to values"
                )
            raw[section] = {str(k): v for k, v in values.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(
                f"override {item!r} is not of the form section.key=value "
                "(for example optim.lr=0.05)"
            )
        if section not in _sections():
            raise unknown_key(key, list(_sections()))
        raw.setdefault(section, {})[name] = value
    return _build(raw)


def check_precision(precision: str, device_type: str) -> None:
    """A one-line ConfigError when `train.precision` cannot run on a `device_type` device."""
    if precision == "fp16" and device_type != "cuda":
        raise ConfigError(
            f"config key train.precision: fp16 needs a CUDA device (it trains with a gradient "
            f"scaler) but this run is on {device_type}; use train.precision=bf16 or fp32"
        )


def check_whole_step(cfg: Config, world_size: int, device_type: str) -> None:
    """A one-line ConfigError for a setting that train.cuda_graph=whole_step cannot capture."""
    t, o = cfg.train, cfg.optim
    if t.cuda_graph != "whole_step":
        return
    refused = [
        (t.compile != "none", f"train.compile={t.compile}: it captures the eager step"),
        (t.precision == "fp16", "train.precision=fp16: its gradient scaler is not captured"),
        (o.name == "rmsprop", "optim.name=rmsprop: no fused kernel reads its rate from a tensor"),
        (
            o.schedule == "onecycle" and o.name in ("sgd", "nesterov"),
            "optim.schedule=onecycle with SGD: the schedule cycles the momentum, which the "
            "graph holds fixed",
        ),
        (
            device_type == "cuda" and world_size > 1,
            f"{world_size} GPU processes: capturing DDP's all-reduce needs NCCL's async error "
            "handling off, the watchdog that ends a rank stuck on its GPU",
        ),
    ]
    for bad, why in refused:
        if bad:
            raise ConfigError(
                f"config key train.cuda_graph: whole_step cannot take {why}; change that "
                "setting, or use train.cuda_graph=none"
            )


def micro_batch(cfg: Config | TrainConfig, world_size: int) -> int:
    """Images of one forward pass on one rank: the global batch split over the ranks and the
    accumulation steps (`validate_for_world` checks that it splits evenly)."""
    t = cfg.train if isinstance(cfg, Config) else cfg
    return t.batch_size // (world_size * t.grad_accum)


def validate_for_world(cfg: Config, world_size: int, device_type: str = "cpu") -> None:
    """Checks that need the world size or the kind of device; run before any process group
    starts."""
    check_precision(cfg.train.precision, device_type)
    check_whole_step(cfg, world_size, device_type)
    split = world_size * cfg.train.grad_accum
    if cfg.train.batch_size % split:
        raise ConfigError(
            f"config key train.batch_size: {cfg.train.batch_size} cannot be split across "
            f"{world_size} rank(s) x {cfg.train.grad_accum} accumulation step(s); use a multiple "
            f"of {split}"
        )


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def help_text() -> str:
    lines = ["config keys (set in the YAML file or as section.key=value):"]
    for name, cls in _sections().items():
        for f in dataclasses.fields(cls):
            choices, rule = f.metadata["choices"], f.metadata["rule"]
            allowed = f" [{'|'.join(str(c) for c in choices)}]" if choices else ""
            allowed += f" ({rule.text})" if rule else ""
            lines.append(f"  {name}.{f.name} = {f.default!r}{allowed}")
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def show_value(value: object) -> str:
    """A setting's value as the command line writes it (true, 0.1, '')."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if value == "" else str(value)


# -- One value from YAML or the command line: converted to its field's type and checked against
# the field's allowed values or range (the fields carry both in their metadata), each failure a
# ConfigError of one line that names the key.

_BOOLS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


def _parse_cli_scalar(text: str) -> Any:
    """A command-line value as bool, int or float where it reads as one (1e-3 included)."""
    if text.lower() in _BOOLS and not text.isdigit():
        return _BOOLS[text.lower()]
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def convert(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Convert one raw value to the field's type, or raise ConfigError naming the key."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    bad = ConfigError(f"config key {key}: {value!r} is not a valid {kind}")
    if kind == "str":
        if value is None or isinstance(value, (dict, list)):
            raise bad
        if "true" in (f.metadata["choices"] or ()):  # a switch with a third setting (auto)
            on = value if isinstance(value, bool) else _BOOLS.get(str(value).lower())
            if on is not None:
                return "true" if on else "false"  # also YAML's `key: off`, and `key=no`
        return str(value)
    if isinstance(value, str):
        # Command-line values arrive as text, and YAML reads 1e-3 (no dot) as text too.
        value = _parse_cli_scalar(value.strip())
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key}: {value!r} is not a valid bool; use true or false")
    if isinstance(value, bool):
        raise bad
    if kind == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if kind == "float":
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
        raise bad
    raise AssertionError(f"unhandled config type {kind}")


def check(key: str, f: dataclasses.Field, value: Any) -> None:
    choices, rule = f.metadata["choices"], f.metadata["rule"]
    if choices and value not in choices:
        allowed = ", ".join(str(c) for c in choices)
        raise ConfigError(f"config key {key}: {value!r} is not allowed; choose one of: {allowed}")
    if rule and not rule.check(value):
        raise ConfigError(f"config key {key}: {value!r} is out of range; it must be {rule.text}")


def unknown_key(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return ConfigError(
        f"unknown config key {key}; {hint}known keys in this place: {', '.join(known)} (see --help)"
    )
