"""Benchmark: the project's pipeline against the classic tutorial data path.

`python -m pipeline.bench [--quick] [--repeat N]` trains each case of a list in fresh processes
(gloo ranks on CPU, one NCCL rank per GPU): the project's pipeline (device-resident data,
`Engine`) and a baseline with the same model, optimizer, schedule and batch size that reads
MNIST the classic way (a per-sample `Dataset` doing Pad/ToTensor/Normalize in Python, a
`DataLoader` with a `DistributedSampler`, the tutorial's loop, fp32 eager). It reports train
images/s, epoch times, train time to 98% and 99% test accuracy (evaluation excluded), the first
step (compilation) and warm-up apart from the steady state, and pipeline/baseline ratios, in
`bench/<device>[-quick].json` and `.md` with the machine, versions and command. The clock is
read only after the device has finished its queued work.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pipeline import host, mnist
from pipeline.config import Config, load_config, validate_for_world
from pipeline.data import MEAN, STD, TrainBatches, eval_indices, to_device
from pipeline.dist import DistContext
from pipeline.engine import Engine, build_scheduler, loss_function, synchronize
from pipeline.errors import PipelineError
from pipeline.model import LeNet

REPO = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 5  # steps after the first that count as warm-up, not steady state
QUICK_STEPS = 150
THRESHOLDS = ("98%", "99%")


@dataclass
class Case:
    name: str
    kind: str  # pipeline | baseline
    config: str
    world: int
    overrides: list[str] = field(default_factory=list)
    workers: int = 0  # the baseline's DataLoader worker processes


def cases(device: str, n_gpus: int, quick: bool) -> list[Case]:
    if device == "cuda":
        out = []
        for w in sorted({1, n_gpus}):
            out += [
                Case(f"baseline mnist_lenet.yaml w{w}", "baseline", "configs/mnist_lenet.yaml", w),
                Case(f"pipeline mnist_lenet.yaml w{w}", "pipeline", "configs/mnist_lenet.yaml", w),
                Case(f"baseline fast_gpu.yaml w{w}", "baseline", "configs/fast_gpu.yaml", w),
                Case(f"pipeline fast_gpu.yaml w{w}", "pipeline", "configs/fast_gpu.yaml", w),
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
            Case("baseline fast_cpu.yaml w1", "baseline", fast, 1),
        ]
    return out + [
        Case("pipeline fast_cpu.yaml w1", "pipeline", fast, 1),
        Case("pipeline fast_cpu.yaml w2", "pipeline", fast, 2),
    ]


# -- the classic data path -------------------------------------------------------------------
def _classic_transform():
    """torchvision's Pad(2), ToTensor, Normalize when it imports, else the same steps by hand."""
    try:
        from PIL import Image
        from torchvision import transforms as T

        t = T.Compose([T.Pad(2), T.ToTensor(), T.Normalize((MEAN,), (STD,))])
        return lambda img: t(Image.fromarray(img, mode="L")), "torchvision.transforms on PIL"
    except Exception:  # noqa: BLE001 - torchvision is optional; the hand-written path mirrors it
        return _by_hand, "Pad/ToTensor/Normalize by hand, per sample (no torchvision here)"


def _by_hand(img: np.ndarray) -> torch.Tensor:
    """What torchvision's Pad(2) -> ToTensor -> Normalize do to one 28x28 uint8 image."""
    img = np.pad(img, 2)  # Pad: constant 0
    x = torch.from_numpy(img[:, :, None].transpose((2, 0, 1))).contiguous()
    x = x.to(dtype=torch.get_default_dtype()).div(255)  # ToTensor
    x = x.clone()  # Normalize(inplace=False)
    mean = torch.as_tensor((MEAN,), dtype=x.dtype)
    std = torch.as_tensor((STD,), dtype=x.dtype)
    if (std == 0).any():
        raise ValueError("std evaluated to zero")
    return x.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


class ClassicMNIST(Dataset):
    """MNIST as torchvision's dataset serves it: one sample at a time, transformed in Python."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images.numpy(), labels.numpy()
        self.transform, self.transform_name = _classic_transform()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


def classic_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    """The optimizer `Engine` builds, in torch's default (not fused) implementation."""
    o = cfg.optim
    if o.name in ("sgd", "nesterov"):
        return torch.optim.SGD(
            params, o.lr, o.momentum, nesterov=o.name == "nesterov", weight_decay=o.weight_decay
        )
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}
    return kinds[o.name](params, lr=o.lr, weight_decay=o.weight_decay)


# -- the two trainers, each: steps of an epoch, a logging-interval flush, evaluation ----------
def pipeline_trainer(cfg, ctx, data, raw, model, micro, workers):
    if cfg.train.reuse_host_memory and ctx.device.type == "cpu":
        host.reuse_freed_memory()  # as pipeline.train does; the baseline keeps the defaults
    batches = TrainBatches(
        data.train_x, data.train_y, micro, ctx.rank, ctx.world_size, cfg.train.seed
    )
    steps = batches.micro_steps_per_epoch // cfg.train.grad_accum
    engine = Engine(model, cfg, ctx, steps, steps * cfg.train.epochs)

    def epoch_steps(epoch: int):
        it = batches.epoch(epoch)
        for _ in range(steps):  # the trainer's loop
            engine.train_step([next(it) for _ in range(cfg.train.grad_accum)])
            yield cfg.train.batch_size

    def flush():  # what the trainer does at each logging interval: one read-back
        totals = torch.stack([engine.loss_sum.double(), engine.finite_steps.double()])
        dist.all_reduce(totals)
        totals.tolist()
        engine.loss_sum.zero_()
        engine.finite_steps.zero_()

    def evaluate(x, y):
        return engine.evaluate(x, y, cfg.train.eval_batch_size)["test_accuracy"]

    return epoch_steps, flush, evaluate, {}


def baseline_trainer(cfg, ctx, data, raw, model, micro, workers):
    if cfg.train.grad_accum != 1:
        raise SystemExit("the baseline has no gradient accumulation; use train.grad_accum=1")
    device, world = ctx.device, ctx.world_size
    dataset = ClassicMNIST(raw["train_images"], raw["train_labels"])
    sampler = DistributedSampler(dataset, world, ctx.rank, shuffle=True, seed=cfg.train.seed)
    loader = DataLoader(
        dataset,
        batch_size=micro,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    net = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    optimizer = classic_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg.optim, len(loader), len(loader) * cfg.train.epochs)
    criterion = loss_function(cfg.train.loss)

    def epoch_steps(epoch: int):
        model.train()
        sampler.set_epoch(epoch)
        running_loss = 0.0
        for x, y in loader:  # the tutorial's loop
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = criterion(net(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running_loss += loss.item()
            yield len(y) * world

    @torch.no_grad()
    def evaluate(x, y):  # on the same device-resident test tensors as the pipeline (untimed)
        model.eval()
        correct = torch.zeros(2, dtype=torch.float64, device=device)
        for i in range(0, len(y), cfg.train.eval_batch_size):
            out = model(x[i : i + cfg.train.eval_batch_size])
            correct[0] += (out.argmax(1) == y[i : i + cfg.train.eval_batch_size]).sum()
        correct[1] = len(y)
        dist.all_reduce(correct)
        return (correct[0] / correct[1]).item()

    return epoch_steps, lambda: None, evaluate, {"baseline_transform": dataset.transform_name}


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


def run_case(rank: int, case: Case, cfg: Config, max_steps: int, store: str, out: str) -> None:
    """One rank of one case; rank 0 writes the record to `out`."""
    world = case.world
    cuda = cfg.dist.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        ctx = DistContext(
            rank, rank, world, world, launcher="bench", device=device, backend=backend
        )
        _measure(ctx, case, cfg, max_steps, out)
    finally:
        gc.collect()  # the DDP model, in reference cycles, goes before its process group
        dist.destroy_process_group()


def _measure(ctx: DistContext, case: Case, cfg: Config, max_steps: int, out: str) -> None:
    """Train and time the case on this rank; rank 0 writes the record to `out`."""
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    raw = mnist.load(cfg.data.root)
    data = to_device(raw, device)
    test = eval_indices(len(data.test_y), rank, world).to(device)
    torch.manual_seed(cfg.train.seed)
    model = LeNet(cfg.model.kernel_size, cfg.model.fc1_width).to(device)
    micro = cfg.train.batch_size // (world * cfg.train.grad_accum)
    make = pipeline_trainer if case.kind == "pipeline" else baseline_trainer
    epoch_steps, flush, evaluate, record = make(cfg, ctx, data, raw, model, micro, case.workers)

    clock, images, epochs = Clock(device), 0, []
    time_to: dict[str, float | None] = dict.fromkeys(THRESHOLDS)
    for epoch in range(cfg.train.epochs):
        clock.start()
        for n in epoch_steps(epoch):
            images += n
            clock.lap()
            if clock.steps % cfg.train.log_every == 0:
                flush()
            if clock.steps == max_steps:
                break
        flush()
        clock.stop()
        accuracy = evaluate(data.test_x[test], data.test_y[test])
        epochs.append({"train_s": clock.train_s, "test_accuracy": accuracy})
        for mark in THRESHOLDS:
            if time_to[mark] is None and accuracy >= float(mark[:-1]) / 100:
                time_to[mark] = clock.train_s
        if clock.steps == max_steps:
            break
    steady_s = clock.train_s - clock.first_step_s - clock.warmup_s
    steady_images = images - (1 + WARMUP_STEPS) * cfg.train.batch_size
    ends = [0.0] + [e["train_s"] for e in epochs]
    record.update(
        threads=torch.get_num_threads(),
        steps=clock.steps,
        images=images,
        train_s=clock.train_s,
        first_step_s=clock.first_step_s,
        warmup_s=clock.warmup_s,
        images_per_s=steady_images / max(steady_s, 1e-9),
        epoch_s=[b - a for a, b in zip(ends[:-1], ends[1:], strict=True)],
        accuracy=[e["test_accuracy"] for e in epochs],
        time_to=time_to,
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


def spawn(case: Case, data_root: str, device: str, max_steps: int) -> dict:
    """Run `case` in `case.world` fresh processes; rank 0's record and the case's facts."""
    cfg = load_config(
        REPO / case.config, [*case.overrides, f"data.root={data_root}", f"dist.device={device}"]
    )
    validate_for_world(cfg, case.world)
    with tempfile.TemporaryDirectory(prefix="lenet-bench-") as tmp:
        # A cold compile cache: the compile time the first run of a new program sees.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        store, out = str(Path(tmp) / "store"), Path(tmp) / "result.json"
        busy, own, started = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
        mp.start_processes(
            run_case,
            args=(case, cfg, max_steps, store, str(out)),
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


def aggregate(runs: list[dict]) -> dict:
    """One record per case: the median of each timing over the repeats (accuracy is the same
    in every repeat: same seed, same run)."""
    r = dict(runs[0])
    med = statistics.median
    for key in ("images_per_s", "train_s", "first_step_s", "warmup_s", "wall_s", "other_load"):
        r[key] = med(x[key] for x in runs)
    r["epoch_s"] = [med(x["epoch_s"][i] for x in runs) for i in range(len(r["epoch_s"]))]
    r["time_to"] = {
        m: None if r["time_to"][m] is None else med(x["time_to"][m] for x in runs)
        for m in THRESHOLDS
    }
    r["images_per_s_runs"] = [x["images_per_s"] for x in runs]
    r["other_load_runs"] = [x["other_load"] for x in runs]
    return r


def _baseline_for(r: dict, records: list[dict]) -> dict | None:
    """The baseline of the same config and world size, else of the same config."""
    same = [b for b in records if b["kind"] == "baseline" and b["config"] == r["config"]]
    return ([b for b in same if b["world"] == r["world"]] or same or [None])[0]


def summarize(records: list[dict]) -> list[dict]:
    for r in records:
        b = _baseline_for(r, records) if r["kind"] == "pipeline" else None
        r["baseline"] = b["name"] if b else None
        r["speedup"] = r["images_per_s"] / b["images_per_s"] if b else None
        both = b and r["time_to"]["99%"] and b["time_to"]["99%"]
        r["time_to_99_speedup"] = b["time_to"]["99%"] / r["time_to"]["99%"] if both else None
    return records


def machine(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [x for x in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in x]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }
    if device == "cuda":
        info.update(gpu=f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}")
        info.update(cuda=torch.version.cuda)
    return info


def _s(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def headlines(records: list[dict]) -> list[str]:
    lines = []
    for r in records:
        if r["speedup"] and r["config"].endswith("/cpu.yaml") and len(r["overrides"]) == 0:
            lines.append(
                f"- {r['config']}, {r['world']} process(es): {r['images_per_s']:,.0f} img/s, "
                f"{_x(r['speedup'])} the baseline's (both fp32 eager, batch {r['batch_size']})."
            )
    reached = [r for r in records if r["kind"] == "pipeline" and r["time_to"]["99%"]]
    if reached:
        best = min(reached, key=lambda r: r["time_to"]["99%"])
        lines.append(
            f"- Fastest to 99% test accuracy: {best['name']}, {best['time_to']['99%']:.1f} s of "
            f"training ({_x(best['time_to_99_speedup'])} faster than the baseline of its config)."
        )
    return lines


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Benchmark: {m.get('gpu') or m['cpu']}, {m['cores']} CPU cores",
        "",
        f"Command: `{result['command']}` ({result['date']}); torch {m['torch']}, "
        f"python {m['python']}, numpy {m['numpy']}, {m['platform']}. "
        f"Each case ran {result['repeat']} time(s) in fresh processes; timings are medians.",
        "",
        "- **img/s**: train images per second in the steady state; the first step "
        f"(compilation) and the next {WARMUP_STEPS} (warm-up) are timed apart.",
        "- **to 98% / 99%**: train seconds (first step included, evaluation excluded) at the "
        "first end of epoch whose test accuracy reaches the mark; `-`: not reached.",
        "- **baseline**: the same model, optimizer, schedule and batch size in fp32 eager, "
        f"reading MNIST the classic way: {result['baseline_transform']}, a DataLoader "
        f"(num_workers={result['baseline_workers']}) with a DistributedSampler, `loss.item()` "
        "every step. Ratios are pipeline/baseline of the "
        "same config and world size (for time to 99%: baseline time / pipeline time).",
        "- **other load**: CPU cores other programs kept busy meanwhile; above ~0.2 the "
        "timings of that case are disturbed.",
        "",
        "| case | ranks x threads | batch | precision | compile | img/s | vs baseline | "
        "epoch s (first / rest) | first step s | warm-up s | to 98% s | to 99% s | "
        "99% vs baseline | accuracy by epoch | other load |",
        "|" + "---|" * 15,
    ]
    for r in result["records"]:
        ep = r["epoch_s"]
        rest = statistics.mean(ep[1:]) if len(ep) > 1 else None
        accs = " ".join(f"{a:.2%}" for a in r["accuracy"])
        lines.append(
            f"| {r['name']} | {r['world']} x {r['threads']} | {r['batch_size']} | "
            f"{r['precision']} | {r['compile']} | {r['images_per_s']:,.0f} | "
            f"{_x(r['speedup'])} | {ep[0]:.1f} / {_s(rest)} | {r['first_step_s']:.2f} | "
            f"{r['warmup_s']:.2f} | {_s(r['time_to']['98%'])} | {_s(r['time_to']['99%'])} | "
            f"{_x(r['time_to_99_speedup'])} | {accs} | {r['other_load']:.2f} |"
        )
    return "\n".join([*lines, "", *headlines(result["records"])]) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"a fast check: {QUICK_STEPS} steps a case")
    p.add_argument("--repeat", type=int, default=1, help="runs of each case (medians reported)")
    p.add_argument(
        "--data-root",
        default=os.environ.get("MNIST_ROOT", "data"),
        help="directory holding MNIST/raw (default: $MNIST_ROOT, else data)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--baseline-workers",
        type=int,
        default=-1,
        help="DataLoader worker processes of the baseline (default: 0 on CPU, 4 per GPU)",
    )
    p.add_argument("--out", default=str(REPO / "bench"), help="folder for the JSON and markdown")
    p.add_argument("--only", default="", help="only the cases whose name matches this regex")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        mnist.prepare(args.data_root, download=False)
    except PipelineError as e:
        print(f"error: {e} (the benchmark reads it from --data-root)", file=sys.stderr)
        return e.exit_code
    todo = [
        c
        for c in cases(device, torch.cuda.device_count(), args.quick)
        if re.search(args.only, c.name)
    ]
    workers = args.baseline_workers if args.baseline_workers >= 0 else 4 * (device == "cuda")
    for c in todo:
        c.workers = workers if c.kind == "baseline" else 0
    runs: dict[str, list[dict]] = {c.name: [] for c in todo}
    for i in range(args.repeat):  # rounds over all cases, so that a busy spell hits them alike
        for case in todo:
            print(f"[{i + 1}/{args.repeat}] {case.name} ...", end=" ", flush=True)
            r = spawn(case, args.data_root, device, QUICK_STEPS if args.quick else 0)
            runs[case.name].append(r)
            print(
                f"{r['images_per_s']:,.0f} img/s, first step {r['first_step_s']:.2f} s, to 99% "
                f"{_s(r['time_to']['99%'])} s, other load {r['other_load']:.2f}",
                flush=True,
            )
    records = summarize([aggregate(v) for v in runs.values()])
    result = {
        "command": shlex.join(
            ["python", "-m", "pipeline.bench", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "repeat": args.repeat,
        "baseline_workers": workers,
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


if __name__ == "__main__":
    sys.exit(main())
