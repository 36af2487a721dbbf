"""The fused conv kernels of this checkout against those of an earlier commit, in one process.

    python bench/kernels_against.py REV [--batch 64] [--rounds 15] [--steps 20]

Builds REV's kernels (its pipeline/kernels.py and pipeline/csrc/, taken with `git show`) beside
this checkout's, then trains LeNet steps (forward, cross-entropy, backward, SGD step) at the
batch size on random images, on each conv path in turn: torch's ops, REV's kernels, this
checkout's kernels. Each round runs every path for `--steps` steps, so a busy spell of the
machine hits all of them alike; it prints the median step time of each path and their ratios.
Needs a C++ compiler; REV's kernels must have the `torch.ops.lenet` interface (commits before
the per-instruction-set builds).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.model import LeNet  # noqa: E402
from pipeline.model import conv_pool_relu as torch_ops  # noqa: E402
from pipeline.speed import kernels  # noqa: E402


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout


def old_kernels(rev: str, where: Path):
    """REV's kernels module, loaded from a copy of its files in `where`, its library built."""
    (where / "csrc").mkdir(parents=True)
    for path in git("ls-tree", "--name-only", rev, "pipeline/csrc/").split():
        (where / "csrc" / Path(path).name).write_text(git("show", f"{rev}:{path}"))
    (where / "kernels_at_rev.py").write_text(git("show", f"{rev}:pipeline/kernels.py"))
    spec = importlib.util.spec_from_file_location("kernels_at_rev", where / "kernels_at_rev.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    # Its build goes to `where`: the cache's directory of the same name holds this checkout's.
    os.environ["TORCH_EXTENSIONS_DIR"] = str(where / "build")
    try:
        problem = module.load(print)
    finally:
        os.environ.pop("TORCH_EXTENSIONS_DIR")
    if problem:
        raise SystemExit(f"error: the kernels of {rev} could not be built: {problem}")
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="the commit whose kernels to compare with, e.g. HEAD~3")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=20, help="steps of each path in a round")
    args = p.parse_args()
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        raise SystemExit("error: unset TORCH_EXTENSIONS_DIR: REV's kernels are built apart")
    problem = kernels.load()
    if problem:
        raise SystemExit(f"error: this checkout's kernels could not be built: {problem}")
    with tempfile.TemporaryDirectory(prefix="kernels-at-rev-") as tmp:
        old = old_kernels(args.rev, Path(tmp))
        paths = {
            "torch's ops": torch_ops,
            f"kernels at {args.rev}": old.conv_pool_relu,
            f"kernels here ({kernels.cpu_variant()})": kernels.conv_pool_relu,
        }
        torch.manual_seed(0)
        net = LeNet().to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(args.batch, 1, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (args.batch,))

        def steps(path, n: int) -> float:
            net.conv_pool_relu = path
            started = time.perf_counter()
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                opt.step()
            return (time.perf_counter() - started) / n

        for path in paths.values():
            steps(path, 5)  # warm-up
        times = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, path in paths.items():
                times[name].append(steps(path, args.steps))
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, torch's ISA "
        f"{torch.backends.cpu.get_cpu_capability()}, batch {args.batch}, "
        f"{args.rounds} rounds of {args.steps} steps each path; median step:"
    )
    base = median["torch's ops"]
    for name, s in median.items():
        print(f"  {name:28s} {s * 1e3:7.3f} ms   {base / s:5.2f}x torch's ops")
    old_s, new_s = list(median.values())[1:]
    print(f"this checkout's kernels run at {old_s / new_s:.2f}x the speed of those at {args.rev}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
