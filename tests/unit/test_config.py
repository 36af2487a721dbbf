"""Config: YAML plus dotted overrides, typed and validated, with one-line errors; and the
training command's arguments as a user types them: `--config` may stand anywhere among the
overrides. (The launch scripts themselves: tests/multiproc/test_launch.py.)"""

from __future__ import annotations

import pytest

from pipeline import train
from pipeline.config.schema import help_text, load_config, to_yaml, validate_for_world
from pipeline.errors import ConfigError
from pipeline.train import parse_args

from helpers import REPO


def test_every_shipped_config_loads():
    shipped = sorted((REPO / "configs").glob("*.yaml"))
    assert shipped, REPO / "configs"
    for path in shipped:
        load_config(path, [])


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.1\n  name: adam\ntrain:\n  epochs: 5\n")
    cfg = load_config(
        f,
        [
            "optim.lr=0.05",
            "train.epochs=3",
            "data.root=/data",
            "data.download=false",
            "dist.timeout_s=30",
        ],
    )
    assert cfg.optim.lr == 0.05 and cfg.optim.name == "adam"
    assert cfg.train.epochs == 3 and cfg.data.root == "/data" and cfg.data.download is False
    assert cfg.dist.timeout_s == 30.0
    assert cfg.train.batch_size == 64  # untouched default


def test_string_override_keeps_text_as_given():
    cfg = load_config(None, ["train.run_dir=runs/007", "train.resume=none"])
    assert cfg.train.run_dir == "runs/007" and cfg.train.resume == "none"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["optim.name=rmsprop", "model.kernel_size=3"])
    (tmp_path / "r.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "r.yaml", []) == cfg


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["optim.lrr=0.1"], "unknown config key optim.lrr"),
        (["optimizer.lr=0.1"], "unknown config key optimizer.lr"),
        (["optim.lr=-0.1"], "optim.lr: -0.1 is out of range"),
        (["optim.lr=fast"], "optim.lr: 'fast' is not a valid float"),
        (["optim.name=lbfgs"], "optim.name: 'lbfgs' is not allowed; choose one of: sgd, nesterov"),
        (["train.epochs=2.5"], "train.epochs: '2.5' is not a valid int"),
        (["train.epochs=0"], "train.epochs: 0 is out of range"),
        (["data.download=maybe"], "data.download: 'maybe' is not a valid bool"),
        (["train.precision=fp8"], "train.precision: 'fp8' is not allowed"),
        (["lr=0.1"], "is not of the form section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad, [])
    bad.write_text("optim:\n  momentum: 1.5\n")
    with pytest.raises(ConfigError, match="optim.momentum: 1.5 is out of range"):
        load_config(bad, [])
    bad.write_text("trainer:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match="unknown config key trainer"):
        load_config(bad, [])
    with pytest.raises(ConfigError, match="missing.yaml not found; pass the path of a YAML file"):
        load_config(tmp_path / "missing.yaml", [])


def test_a_switch_with_an_auto_setting_reads_true_and_false_as_yaml_and_the_cli_write_them(
    tmp_path,
):
    (tmp_path / "off.yaml").write_text("train:\n  fused_conv: off\n")
    assert load_config(tmp_path / "off.yaml", []).train.fused_conv == "false"
    for text, want in (("yes", "true"), ("0", "false"), ("auto", "auto"), ("False", "false")):
        assert load_config(None, [f"train.fused_conv={text}"]).train.fused_conv == want
    assert load_config(None, []).train.fused_conv == "auto"
    with pytest.raises(ConfigError, match="choose one of: auto, true, false"):
        load_config(None, ["train.fused_conv=maybe"])


def test_batch_size_must_split_across_world_and_accumulation():
    cfg = load_config(None, ["train.batch_size=64", "train.grad_accum=2"])
    validate_for_world(cfg, 4)  # 64 = 4 ranks x 2 micro-steps x 8
    with pytest.raises(ConfigError, match="train.batch_size: 64 cannot be split across 3 rank"):
        validate_for_world(cfg, 3)


def test_help_lists_every_key_with_default_and_no_test_only_key(capsys):
    with pytest.raises(SystemExit) as exited:
        train.main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert help_text() in text  # the keys, after the command's own options
    for key in (
        "optim.lr = 0.05",
        "train.batch_size = 64",
        "train.resume = 'auto'",
        "model.kernel_size = 5 [5|3]",
        "tracking.mode = 'auto'",
        "train.run_dir = ",
    ):
        assert key in text
    assert "debug." not in text and "test only" not in text


def test_config_may_stand_anywhere_among_the_overrides():
    args = parse_args(["dist.device=cpu", "--config", "configs/cpu.yaml", "train.epochs=1"])
    assert args.config == "configs/cpu.yaml"
    assert args.overrides == ["dist.device=cpu", "train.epochs=1"]
    args = parse_args(["train.epochs=1", "--config=configs/cpu.yaml", "optim.lr=0.1"])
    assert args.config == "configs/cpu.yaml" and args.overrides == [
        "train.epochs=1",
        "optim.lr=0.1",
    ]
