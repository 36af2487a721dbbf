"""CPU runs keep freed memory in malloc's heap: a step's activation-sized buffers are reused,
not mapped afresh (with page faults) every step. Checked in fresh processes, by the kernel's
count of page faults, on Linux with glibc where mallopt exists. (Speed options in this process:
tests/unit/test_speed.py; on the real MNIST: tests/integration/test_speed.py.)"""

import ctypes
import subprocess
import sys

import pytest

from helpers import REPO, TINY_ARGS, assert_ok, run_pipeline

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallopt"),
    reason="malloc tuning needs Linux with glibc",
)

PROBE = """
import resource, sys, torch
import torch.nn.functional as F
from pipeline.speed import cpu_memory
from pipeline.model import LeNet
torch.set_num_threads(2)
if sys.argv[1] == "reuse":
    assert cpu_memory.reuse_freed_memory()
model = LeNet().to(memory_format=torch.channels_last)  # as the engine trains it
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,))


def step():  # activations pile up in forward, all are freed after backward
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


for _ in range(10):  # the heap settles in the first few
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


def test_freed_buffers_are_reused_without_page_faults():
    default, reused = _faults("default"), _faults("reuse")
    # By default glibc returns the freed activations to the kernel and faults them back in.
    assert default > 50 * 100, (default, reused)
    assert reused < 50 * 20, (default, reused)  # a stray page now and then


def test_training_reports_the_setting(tiny_mnist, tmp_path):
    common = [*TINY_ARGS, f"data.root={tiny_mnist}", "dist.device=cpu"]
    on = run_pipeline([*common, f"train.run_dir={tmp_path / 'on'}"])
    off = run_pipeline(
        [*common, f"train.run_dir={tmp_path / 'off'}", "train.reuse_host_memory=false"]
    )
    assert_ok(on)
    assert_ok(off)
    assert "memory reused between steps" in on.stdout
    assert "memory reused between steps" not in off.stdout
