"""Speed options keep training right on the real MNIST: bf16 autocast, torch.compile and the
fused conv kernels reach the accuracy of fp32 eager on torch's ops, one epoch of
configs/fast_cpu.yaml each. (The other speed tests: tests/unit/test_speed.py,
tests/multiproc/test_ddp.py.)"""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import assert_ok, run_pipeline

TOLERANCE = 0.01  # accuracy (as a fraction) a variant may differ from fp32 eager
BATCH = 512  # configs/fast_cpu.yaml's


@pytest.fixture(scope="module")
def inductor_env(tmp_path_factory):
    """One compile cache for this module: identical graphs are compiled once."""
    return {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path_factory.mktemp("inductor"))}


def test_bf16_and_compile_reach_the_accuracy_of_fp32_eager(mnist_root, tmp_path, inductor_env):
    variants = {  # the longest first: it runs beside the other two, one after the other
        # The recipe compiled (compile=model, and both modes under DDP against eager, on the
        # tiny data: tests/multiproc/test_ddp.py).
        "bf16 compile=step": ["train.precision=bf16", "train.compile=step"],
        "fp32 eager, torch ops": ["train.precision=fp32", "train.fused_conv=false"],
        # The fused kernels (which bf16 autocast runs in fp32): their values against torch's,
        # in fp32 too, in tests/integration/test_kernels.py.
        "bf16 eager, fused kernels": ["train.precision=bf16", "train.fused_conv=true"],
    }

    def train(item):
        name, extra = item
        run_dir = tmp_path / name.replace(" ", "_").replace(",", "")
        # One epoch of the CPU recipe, its schedule run to the end: about 97.8% test accuracy.
        args = [
            "--config",
            "configs/fast_cpu.yaml",
            f"data.root={mnist_root}",
            "data.download=false",
            f"train.run_dir={run_dir}",
            "train.epochs=1",
            f"train.batch_size={BATCH}",
            "tracking.mode=disabled",
            *extra,
        ]
        assert_ok(run_pipeline(args, env=inductor_env))
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return name, json.loads(lines[-1])["test_accuracy"]

    with ThreadPoolExecutor(2) as pool:  # one thread per process, two processes at a time
        accuracy = dict(pool.map(train, variants.items()))
    reference = accuracy["fp32 eager, torch ops"]
    assert reference >= 0.96, accuracy
    for name, value in accuracy.items():
        assert abs(value - reference) <= TOLERANCE, f"{name}: {accuracy}"
