"""Speed options keep training right, in this process: fp16 is refused on CPU (by the engine, and
by the command in one line before a rank starts), the fp16 gradient
scaler unscales before clipping and skips overflows, and the tensor shards are
DistributedSampler's. Compiled DDP on real ranks: tests/multiproc/test_ddp.py; the
accuracy of bf16 and torch.compile on the real MNIST: tests/integration/test_speed.py."""

import pytest
import torch
from torch.utils.data import DistributedSampler

from pipeline import train
from pipeline.config.schema import load_config
from pipeline.data.device import shard_indices
from pipeline.dist.group import DistContext
from pipeline.errors import EXIT_CONFIG, ConfigError
from pipeline.model import LeNet
from pipeline.training import engine as engine_module
from pipeline.training.engine import Engine

from helpers import TINY_ARGS


def _engine(monkeypatch, *overrides):
    overrides = ["optim.schedule=none", "optim.lr=0.1", "train.fused_conv=false", *overrides]
    cfg = load_config(None, overrides)
    if cfg.train.precision == "fp16":
        # fp16 is for CUDA only; its scaler logic runs the same on CPU, so test it here.
        monkeypatch.setattr(engine_module, "check_precision", lambda *_: None)
    torch.manual_seed(0)
    return Engine(LeNet(), cfg, DistContext(), steps_per_epoch=10, total_steps=10)


def test_fp16_on_cpu_is_a_one_line_config_error(tmp_path, capsys):
    cfg = load_config(None, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.precision"):
        Engine(LeNet(), cfg, DistContext(), steps_per_epoch=10, total_steps=10)
    # The command refuses it before any rank starts: exit code 2, one line that says what to use.
    args = [*TINY_ARGS, f"data.root={tmp_path / 'none'}", f"train.run_dir={tmp_path / 'run'}"]
    assert train.main([*args, "train.precision=fp16", "dist.device=cpu"]) == EXIT_CONFIG
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config key train.precision: ")
    assert "use train.precision=bf16 or fp32" in lines[0], lines


def _batch():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 1, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))]


def _params(e):
    return torch.cat([p.detach().flatten() for p in e.model.parameters()])


def test_fp16_scaler_clips_the_unscaled_gradients(monkeypatch):
    clip = 0.01  # far below the gradient norm of a fresh LeNet, so clipping acts
    e = _engine(monkeypatch, "train.precision=fp16", f"optim.clip_grad_norm={clip}")
    before = _params(e)
    e.train_step(_batch())
    # First SGD step: momentum buffer = gradient, so the update is lr x the clipped gradient.
    # Clipping the scaled gradient would leave an update 65536 times smaller.
    moved = (_params(e) - before).norm().item()
    assert moved == pytest.approx(0.1 * clip, rel=1e-3)


def test_fp16_scaler_skips_a_step_whose_gradients_overflow(monkeypatch):
    e = _engine(monkeypatch, "train.precision=fp16")
    e.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 gradients overflow
    before = _params(e)
    e.train_step(_batch())
    assert torch.equal(_params(e), before)  # skipped
    assert e.scaler.get_scale() == 2.0**39  # and the scale backed off
    assert e.finite_steps.item() == 1  # the loss itself was finite: no error for the trainer
    e.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    e.train_step(_batch())
    assert not torch.equal(_params(e), before)  # a normal step updates


@pytest.mark.parametrize("n, world", [(60000, 2), (1000, 3), (10, 4), (3, 8)])
def test_tensor_shards_are_the_distributed_samplers(n, world):
    for epoch in (0, 5):
        for rank in range(world):
            sampler = DistributedSampler(range(n), world, rank, shuffle=True, seed=7)
            sampler.set_epoch(epoch)
            assert torch.equal(shard_indices(n, rank, world, 7, epoch), torch.tensor(list(sampler)))
