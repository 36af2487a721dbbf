"""The training engine (pipeline/training/engine.py) in this process.

Its step: gradient buffers only where a compiled CUDA-graph step with accumulation needs them,
and the whole-step mode (`train.cuda_graph=whole_step`: static input buffers, the learning rate
in a tensor) training to the very bits of the ordinary step on CPU, with its refusals as
one-line config errors. (Its CUDA graph captured and replayed on a GPU:
tests/integration/test_cuda.py.)

The learning-rate schedules, step by step: the step schedule halves the rate every
step_epochs, one-cycle rises to optim.lr and falls to torch's final rate, and `Engine.lr` is the
rate each step used. (The rates real runs log: tests/integration/test_documented_behaviour.py.)"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from pipeline.config.schema import load_config, validate_for_world
from pipeline.dist.group import DistContext
from pipeline.errors import ConfigError
from pipeline.model import LeNet
from pipeline.training import engine as engine_module
from pipeline.training.engine import Engine

STEPS = 20
STEPS_PER_EPOCH = 5


@pytest.fixture(autouse=True)
def one_thread():
    """Steps at batch 16 run several times faster on one thread than on two threads that wait
    for each other on a busy machine; both engines a test compares run alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _engine(overrides: list[str]) -> Engine:
    cfg = load_config(None, ["train.fused_conv=false", "train.batch_size=16", *overrides])
    torch.manual_seed(0)
    return Engine(LeNet(), cfg, DistContext(), STEPS_PER_EPOCH, STEPS)


def _batches(accum: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """STEPS steps of `accum` micro-batches of random 32x32 images (16 a step in all)."""
    g = torch.Generator().manual_seed(1)
    per = 16 // accum
    return [
        [
            (torch.randn(per, 1, 32, 32, generator=g), torch.randint(0, 10, (per,), generator=g))
            for _ in range(accum)
        ]
        for _ in range(STEPS)
    ]


# -- gradient buffers ------------------------------------------------------------------------------
def test_the_eager_step_keeps_no_gradient_buffers():
    e = _engine([])
    assert not e.grad_buffers and all(p.grad is None for p in e.params)
    e.train_step(_batches(1)[0])
    e.optimizer.zero_grad(set_to_none=not e.grad_buffers)  # how the next step starts
    assert all(p.grad is None for p in e.params)


# cudagraph_mark_step_begin imports inductor's CUDA-graph trees, whose imports use the deprecated
# torch.jit.script_method.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
@pytest.mark.parametrize("accum, kept", [(1, False), (2, True)])
def test_a_cuda_graph_step_keeps_gradient_buffers_only_with_accumulation(monkeypatch, accum, kept):
    """reduce-overhead on a GPU, told to the engine on CPU: with one micro-batch the optimizer
    consumes each replay's gradient before the next replay, so no buffers; with two, the
    micro-batches add into buffers allocated once, the same tensors every step."""
    monkeypatch.setattr(engine_module, "uses_cuda_graphs", lambda *_: True)
    e = _engine([f"train.grad_accum={accum}"])
    assert e.grad_buffers == kept
    first = [p.grad for p in e.params]
    assert all((g is not None) == kept for g in first)
    for batch in _batches(accum)[:2]:
        e.train_step(batch)
    if kept:
        assert all(p.grad is g for p, g in zip(e.params, first, strict=True))


# -- the whole step on static buffers --------------------------------------------------------------
SETTINGS = {
    "sgd momentum, warm-up then cosine": ["optim.name=sgd", "optim.schedule=cosine"],
    "nesterov, step schedule": ["optim.name=nesterov", "optim.schedule=step", "optim.gamma=0.5"],
    "adam, warm-up then cosine, clipped": [
        "optim.name=adam",
        "optim.lr=0.003",
        "optim.schedule=cosine",
        "optim.clip_grad_norm=0.5",
    ],
    "adamw, one-cycle": ["optim.name=adamw", "optim.lr=0.003", "optim.schedule=onecycle"],
    "sgd, 2 micro-batches, bf16": [
        "train.grad_accum=2",
        "train.precision=bf16",
        "optim.schedule=cosine",
    ],
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_whole_step_trains_to_the_bits_of_the_ordinary_step(setting):
    """The same kernels in the same order on the same values: only the inputs' addresses and the
    learning rate's carrier (a float64 tensor, which the fused CPU kernels read as the double the
    ordinary step passes) differ, so the parameters agree to the last bit after 20 steps."""
    overrides = ["optim.warmup_epochs=1", "optim.weight_decay=1e-4", *SETTINGS[setting]]
    ordinary, whole = _engine(overrides), _engine([*overrides, "train.cuda_graph=whole_step"])
    assert ordinary.whole_step is None and whole.whole_step is not None
    rates = []
    for batch in _batches(whole.cfg.train.grad_accum):
        ordinary.train_step(batch)
        whole.train_step(batch)
        assert whole.lr == ordinary.lr
        assert whole.whole_step.lr.item() == whole.lr  # the tensor held the rate the step used
        rates.append(whole.lr)
    assert len(set(rates)) > 5  # the schedule moved the rate
    theirs = dict(whole.model.named_parameters())
    for name, ours in ordinary.model.named_parameters():
        assert torch.equal(ours, theirs[name]), name
    assert torch.equal(ordinary.loss_sum, whole.loss_sum)
    # The float rate stays in the optimizer: checkpoints are those of the ordinary step.
    assert isinstance(whole.optimizer.state_dict()["param_groups"][0]["lr"], float)


def test_the_whole_step_copies_each_batch_into_the_same_buffers():
    e = _engine(["train.cuda_graph=whole_step"])
    batches = _batches(1)
    e.train_step(batches[0])
    buffers = [t.data_ptr() for pair in e.whole_step.inputs for t in pair]
    e.train_step(batches[1])
    assert [t.data_ptr() for pair in e.whole_step.inputs for t in pair] == buffers
    assert torch.equal(e.whole_step.inputs[0][0], batches[1][0][0])


def test_a_checkpoint_of_the_ordinary_step_resumes_in_the_whole_step_built_for_capture():
    """Checkpoints are the same in both modes, and the optimizer keeps the way it runs
    (capturable=True for Adam on a GPU) when a checkpoint saved without it is loaded."""
    ordinary = _engine(["optim.name=adam"])
    ordinary.train_step(_batches(1)[0])
    whole = _engine(["optim.name=adam", "train.cuda_graph=whole_step"])
    whole.optimizer.param_groups[0]["capturable"] = True  # as build_optimizer makes it on CUDA
    saved = copy.deepcopy(ordinary.state_dict())  # as a file holds it, sharing no tensor
    assert saved["optimizer"]["param_groups"][0]["capturable"] is False
    whole.load_state_dict(saved)
    assert whole.optimizer.param_groups[0]["capturable"] is True
    assert whole.optimizer.state_dict()["state"][0]["step"].item() == 1  # the saved state
    for batch in _batches(1)[1:3]:
        ordinary.train_step(batch)
        whole.train_step(batch)
    for a, b in zip(ordinary.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "overrides, world, device, named",
    [
        (["train.compile=model"], 1, "cuda", "train.compile=model"),
        (["train.precision=fp16"], 1, "cuda", "train.precision=fp16"),
        (["optim.name=rmsprop"], 1, "cpu", "optim.name=rmsprop"),
        (["optim.schedule=onecycle"], 1, "cpu", "optim.schedule=onecycle with SGD"),
        ([], 2, "cuda", "2 GPU processes"),
    ],
)
def test_what_the_whole_step_cannot_capture_is_one_config_line(overrides, world, device, named):
    cfg = load_config(None, ["train.cuda_graph=whole_step", "train.batch_size=64", *overrides])
    with pytest.raises(ConfigError) as e:
        validate_for_world(cfg, world, device)
    message = str(e.value)
    assert "\n" not in message and named in message
    assert message.startswith("config key train.cuda_graph: whole_step cannot take ")
    assert message.endswith("or use train.cuda_graph=none")


def test_the_whole_step_runs_with_ranks_on_cpu_and_alone_on_a_gpu():
    cfg = load_config(None, ["train.cuda_graph=whole_step", "optim.name=adam"])
    validate_for_world(cfg, 2, "cpu")  # eager there: DDP all-reduces as in the ordinary step
    validate_for_world(cfg, 1, "cuda")


# -- the learning-rate schedules -------------------------------------------------------------------
def _rising(values: list[float]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))


def _rates(overrides: list[str], steps_per_epoch: int, total: int) -> list[float]:
    """The learning rate each of `total` optimizer steps used, as the Engine reports it."""
    cfg = load_config(None, ["train.fused_conv=false", *overrides])
    engine = Engine(LeNet(), cfg, DistContext(), steps_per_epoch, total)
    batch = [(torch.zeros(2, 1, 32, 32), torch.zeros(2, dtype=torch.long))]
    rates = []
    for _ in range(total):
        engine.train_step(batch)
        rates.append(engine.lr)
    return rates


def test_each_step_uses_its_schedules_rate():
    # step: 3 steps per epoch, 5 epochs, lr 0.1 halved every 2 epochs
    step = _rates(
        ["optim.lr=0.1", "optim.schedule=step", "optim.step_epochs=2", "optim.gamma=0.5"], 3, 15
    )
    assert step == pytest.approx([0.1] * 6 + [0.05] * 6 + [0.025] * 3, rel=1e-12)

    # onecycle: 10 steps per epoch, 4 epochs; up to optim.lr over the first quarter, then down
    cycle = _rates(["optim.lr=0.1", "optim.schedule=onecycle"], 10, 40)
    peak = cycle.index(max(cycle))
    assert (peak, cycle[peak]) == (9, pytest.approx(0.1, rel=1e-12))
    assert cycle[0] == pytest.approx(0.1 / 25)  # torch's OneCycleLR default div_factor
    assert _rising(cycle[: peak + 1])
    assert _rising(cycle[peak:][::-1])
    assert cycle[-1] == pytest.approx(0.1 / 25 / 1e4)  # and final_div_factor
