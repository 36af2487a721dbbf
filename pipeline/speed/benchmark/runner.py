"""The benchmark's cases and how each is timed: the project's pipeline against the classic
tutorial data path (what `python -m pipeline.bench` runs).

It trains each case of a list in fresh processes
(gloo ranks on CPU, one NCCL rank per GPU): the project's pipeline (device-resident data,
`Engine`) and a baseline with the same model, optimizer, schedule and batch size that reads
MNIST the classic way (a per-sample `Dataset` doing Pad/ToTensor/Normalize in Python, a
`DataLoader` with a `DistributedSampler`, the tutorial's loop, fp32 eager). It reports train
images/s, epoch times, train time to 98% and 99% test accuracy (tested at `evals_per_epoch`
points an epoch, evaluation excluded), the first step (compilation; one compile cache for the
whole benchmark) and warm-up apart from the steady state, and pipeline/baseline ratios, in
`bench/<device>[-quick].json` and `.md` with the machine, versions and command. The clock is
read only after the device has finished its queued work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.multiprocessing as mp

from pipeline.config.schema import Config, load_config, micro_batch, validate_for_world
from pipeline.data import store
from pipeline.data.device import load_splits, to_device
from pipeline.data.sets import eval_share
from pipeline.dist import group
from pipeline.dist.group import DistContext
from pipeline.errors import ConfigError, DataError
from pipeline.model import LeNet
from pipeline.results.records import percent
from pipeline.speed import kernels
from pipeline.speed.benchmark.results import aggregate, machine, markdown, summarize
from pipeline.speed.benchmark.trainers import baseline_trainer, pipeline_trainer
from pipeline.training.engine import synchronize

log = logging.getLogger(__name__)

WARMUP_STEPS = 5  # steps after the first that count as warm-up, not steady state


@dataclass
class Case:
    name: str
    kind: str  # pipeline | baseline
    config: str
    world: int
    overrides: list[str] = field(default_factory=list)
    workers: int = 0  # the baseline's DataLoader worker processes
    evals_per_epoch: int = 1  # test-set evaluations an epoch (the last at its end), untimed


def gpu_worlds(n_gpus: int, batch_size: int, grad_accum: int = 1) -> list[int]:
    """The world sizes a GPU case runs on: one GPU, and the most of the `n_gpus` GPUs that
    split `batch_size` (with `grad_accum` micro-steps) evenly: all of them where they do."""
    most = max(w for w in range(1, max(1, n_gpus) + 1) if batch_size % (w * grad_accum) == 0)
    return sorted({1, most})


def cases(device: str, n_gpus: int, quick: bool, say: Callable[[str], None] = print) -> list[Case]:
    if device == "cuda":
        worlds = {}
        for name in ("mnist_lenet.yaml", "fast_gpu.yaml"):
            train = load_config(name, []).train
            worlds[name] = gpu_worlds(n_gpus, train.batch_size, train.grad_accum)
            if worlds[name][-1] != max(1, n_gpus):
                say(
                    f"bench: {name} (train.batch_size={train.batch_size}) does not split "
                    f"across {n_gpus} GPUs: its cases run on "
                    f"{' and '.join(map(str, worlds[name]))} GPU(s)"
                )
        out = []
        for w in sorted(set().union(*worlds.values())):
            for name in worlds:
                if w in worlds[name]:
                    config = f"configs/{name}"
                    out += [
                        Case(f"baseline {name} w{w}", "baseline", config, w),
                        Case(f"pipeline {name} w{w}", "pipeline", config, w),
                    ]
        return out
    cpu, fast = "configs/cpu.yaml", "configs/fast_cpu.yaml"
    out = [
        Case("baseline cpu.yaml w1", "baseline", cpu, 1),
        Case("pipeline cpu.yaml w1", "pipeline", cpu, 1),
        Case("baseline cpu.yaml w2", "baseline", cpu, 2),
        Case("pipeline cpu.yaml w2", "pipeline", cpu, 2),
    ]
    if not quick:
        out += [
            Case("pipeline cpu.yaml bf16 w1", "pipeline", cpu, 1, ["train.precision=bf16"]),
            Case("pipeline cpu.yaml compile w1", "pipeline", cpu, 1, ["train.compile=model"]),
            # The default config on torch's ops only, and on the fused conv kernels only
            # (train.fused_conv=auto takes the faster of the two here, timed once per machine).
            Case("pipeline cpu.yaml torch-ops w1", "pipeline", cpu, 1, ["train.fused_conv=false"]),
            Case("pipeline cpu.yaml fused w1", "pipeline", cpu, 1, ["train.fused_conv=true"]),
            Case("baseline fast_cpu.yaml w1", "baseline", fast, 1),
        ]
    return out + [
        Case("pipeline fast_cpu.yaml w1", "pipeline", fast, 1),
        Case("pipeline fast_cpu.yaml w2", "pipeline", fast, 2),
    ]


class Clock:
    """Train time (evaluation excluded), with the first step and the warm-up steps apart."""

    def __init__(self, device: torch.device):
        self.device, self.train_s, self.steps = device, 0.0, 0
        self.first_step_s = self.warmup_s = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self.t = time.perf_counter()

    def lap(self) -> None:
        self.steps += 1
        if self.steps in (1, 1 + WARMUP_STEPS):
            synchronize(self.device)
            spent = self.train_s + time.perf_counter() - self.t
            if self.steps == 1:
                self.first_step_s = spent
            else:
                self.warmup_s = spent - self.first_step_s

    def stop(self) -> None:
        synchronize(self.device)
        self.train_s += time.perf_counter() - self.t


def run_case(rank: int, case: Case, cfg: Config, max_steps: int, out: str) -> None:
    """One rank of one case (rendezvous at MASTER_ADDR:MASTER_PORT); rank 0 writes the record
    to `out`."""
    world = case.world
    if cfg.dist.device != "cuda":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    ctx = DistContext(rank, rank, world, world, launcher="bench")
    try:
        group.init(ctx, cfg.dist)
        _measure(ctx, case, cfg, max_steps, out)
    finally:
        group.shutdown()  # _measure's model is gone; collect its cycles, then destroy the group


def _measure(ctx: DistContext, case: Case, cfg: Config, max_steps: int, out: str) -> None:
    """Train and time the case on this rank; rank 0 writes the record to `out`."""
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    raw = load_splits(cfg.data, ctx)
    data = to_device(raw, device)
    test_x, test_y, _ = eval_share(raw, "test", ctx)
    torch.manual_seed(cfg.train.seed)
    model = LeNet(cfg.model.kernel_size, cfg.model.fc1_width).to(device)
    micro = micro_batch(cfg, world)
    make = pipeline_trainer if case.kind == "pipeline" else baseline_trainer
    epoch_steps, flush, evaluate, record = make(cfg, ctx, data, raw, model, micro, case.workers)

    clock, images, epochs, evals = Clock(device), 0, [], []
    per_epoch = record["steps_per_epoch"]
    every = max(1, per_epoch // case.evals_per_epoch)
    for epoch in range(cfg.train.epochs):
        clock.start()
        for k, n in enumerate(epoch_steps(epoch), 1):
            images += n
            clock.lap()
            if clock.steps % cfg.train.log_every == 0:
                flush()
            if clock.steps == max_steps:
                break
            if k % every == 0 and k < per_epoch:  # untimed; the only syncs within an epoch
                clock.stop()
                evals.append((clock.train_s, evaluate(test_x, test_y)))
                clock.start()
        flush()
        clock.stop()
        evals.append((clock.train_s, evaluate(test_x, test_y)))
        epochs.append({"train_s": clock.train_s, "test_accuracy": evals[-1][1]})
        if clock.steps == max_steps:
            break
    steady_steps = max(1, clock.steps - 1 - WARMUP_STEPS)
    steady_s = clock.train_s - clock.first_step_s - clock.warmup_s
    steady_images = images - (1 + WARMUP_STEPS) * cfg.train.batch_size
    # The train time at each evaluation with the first step (compilation) and the warm-up
    # counted at the steady-state rate when they took longer: time to accuracy with
    # compilation reported apart.
    setup_s = max(
        0.0, clock.first_step_s + clock.warmup_s - (1 + WARMUP_STEPS) * steady_s / steady_steps
    )
    ends = [0.0] + [e["train_s"] for e in epochs]
    record.update(
        seed=cfg.train.seed,
        threads=torch.get_num_threads(),
        torch_isa=torch.backends.cpu.get_cpu_capability(),  # what this case's torch ops ran
        steps=clock.steps,
        images=images,
        train_s=clock.train_s,
        first_step_s=clock.first_step_s,
        warmup_s=clock.warmup_s,
        images_per_s=steady_images / max(steady_s, 1e-9),
        epoch_s=[b - a for a, b in zip(ends[:-1], ends[1:], strict=True)],
        epoch_end_s=[e["train_s"] - setup_s for e in epochs],
        accuracy=[e["test_accuracy"] for e in epochs],
        eval_s=[t - setup_s for t, _ in evals],
        eval_accuracy=[a for _, a in evals],
    )
    if rank == 0:
        Path(out).write_text(json.dumps(record))


# -- the driver ------------------------------------------------------------------------------
def _busy_cpu_s() -> float:
    """CPU seconds this machine has spent busy since boot, all processes (Linux)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def _own_cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return sum(r.ru_utime + r.ru_stime for r in own)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def case_config(case: Case, data_root: str, device: str, seed: int | None) -> Config:
    """The config `case` trains with on `device` ("cpu" or "cuda"), checked for its world
    size and that device as a training run's is."""
    seeded = [] if seed is None else [f"train.seed={seed}"]
    cfg = load_config(
        case.config,
        [*case.overrides, *seeded, f"data.root={data_root}", f"dist.device={device}"],
    )
    validate_for_world(cfg, case.world, device)
    return cfg


def spawn(case: Case, data_root: str, device: str, max_steps: int, seed: int | None) -> dict:
    """Run `case` in `case.world` fresh processes; rank 0's record and the case's facts."""
    cfg = case_config(case, data_root, device, seed)
    with tempfile.TemporaryDirectory(prefix="lenet-bench-") as tmp:
        out = Path(tmp) / "result.json"
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        busy, own, started = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
        mp.start_processes(
            run_case,
            args=(case, cfg, max_steps, str(out)),
            nprocs=case.world,
            start_method="spawn",
        )
        wall = time.perf_counter() - started
        record = json.loads(out.read_text())
    other = (_busy_cpu_s() - busy) - (_own_cpu_s() - own)
    t, baseline = cfg.train, case.kind == "baseline"
    record.update(
        asdict(case),
        batch_size=t.batch_size,
        precision="fp32" if baseline else t.precision,
        compile="none" if baseline or t.compile == "none" else f"{t.compile} ({t.compile_mode})",
        optimizer=f"{cfg.optim.name} lr {cfg.optim.lr:g}, {cfg.optim.schedule}",
        wall_s=wall,
        # CPU time other programs used while the case ran, in cores: above ~0.2 the timings
        # of this case are suspect.
        other_load=max(0.0, other / wall),
    )
    return record


def run_benchmark(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Run the cases `args` selects, in rounds; print and write the results."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device cuda but torch {torch.__version__} finds no GPU here; run on a GPU "
            "machine with a CUDA build of torch, or use --device cpu"
        )
    todo = [
        c
        for c in cases(device, torch.cuda.device_count(), args.quick > 0)
        if re.search(args.only, c.name)
    ]
    for c in todo:
        c.overrides = [*c.overrides, *args.set]
        if c.kind == "baseline" and load_config(c.config, c.overrides).train.grad_accum != 1:
            raise ConfigError(
                "config key train.grad_accum: the benchmark's baseline has no gradient "
                "accumulation; leave it at 1, or leave the baseline out with --only pipeline"
            )
    # The datasets of the cases' configs, checked (and cached) once here, not in every case.
    for dataset in sorted({load_config(c.config, c.overrides).data.dataset for c in todo}):
        try:
            store.prepare(args.data_root, download=False, dataset=dataset)
        except DataError as e:
            raise DataError(f"{e} (the benchmark reads it from --data-root)") from None
    workers = args.baseline_workers if args.baseline_workers >= 0 else 4 * (device == "cuda")
    kernel_s, kernel_problem = None, None
    if device == "cpu":  # built (or loaded from the cache) once here, before any case runs
        started = time.perf_counter()
        kernel_problem = kernels.load()
        kernel_s = time.perf_counter() - started
        if kernel_problem:
            log.warning(f"the fused conv kernels are not available: {kernel_problem}")
    evals = args.evals_per_epoch or (20 if device == "cuda" else 1)
    for c in todo:
        c.workers = workers if c.kind == "baseline" else 0
        c.evals_per_epoch = evals
    runs: dict[str, list[dict]] = {c.name: [] for c in todo}
    seeds = list(range(args.seeds)) if args.seeds > 0 else [None]
    rounds = [s for s in seeds for _ in range(args.repeat)]
    # One compile cache for the whole benchmark, empty at its start: a case's first run compiles
    # cold, as the first run of a new program does; its later seeds and rounds find the cache
    # filled, as a second run does.
    with tempfile.TemporaryDirectory(prefix="lenet-bench-compile-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        # Rounds over all cases, so that a busy spell of the machine hits them alike.
        for i, seed in enumerate(rounds):
            for case in todo:
                tag = "" if seed is None else f" seed {seed}"
                print(f"[{i + 1}/{len(rounds)}] {case.name}{tag} ...", end=" ", flush=True)
                r = spawn(case, args.data_root, device, args.quick, seed)  # 0: configs' own
                runs[case.name].append(r)
                reached = aggregate([r])["time_to"]["99%"]  # this run's alone
                to_99 = "-" if reached is None else f"{reached:.3f} s"
                print(
                    f"{r['images_per_s']:,.0f} img/s, first step {r['first_step_s']:.2f} s, "
                    f"accuracy {percent(r['accuracy'][-1])}, to 99% {to_99}, "
                    f"other load {r['other_load']:.2f}",
                    flush=True,
                )
    records = summarize([aggregate(v) for v in runs.values()])
    result = {
        "command": shlex.join(
            ["python", "-m", "pipeline.bench", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "repeat": args.repeat,
        "seeds": sorted({r["seed"] for v in runs.values() for r in v}),
        "warmup_steps": WARMUP_STEPS,
        "evals_per_epoch": evals,
        "baseline_workers": workers,
        "kernel_load_s": kernel_s,
        "kernel_problem": kernel_problem,
        "machine": machine(device),
        "baseline_transform": next(
            (r["baseline_transform"] for r in records if "baseline_transform" in r), ""
        ),
        "records": records,
    }
    name = device + ("-quick" if args.quick else "") + ("-partial" if args.only else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (out / f"{name}.md").write_text(text)
    print("\n" + text[text.index("| case") :])
    print(f"wrote {out / name}.json and {out / name}.md")
    return 0
