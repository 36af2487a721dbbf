"""torch.compile on real gloo ranks: compiled DDP (the model, or the whole step) on two ranks
still averages gradients, ending where one rank eager does. (torch.compile on CPU compiles C++: a
compiler is needed, as CI installs. fp16 refused on CPU: tests/unit/test_speed.py.)"""

import pytest
import torch

from helpers import max_diff, tiny_run, write_tiny_mnist

BATCH = 512  # configs/fast_cpu.yaml's; both modes compile graphs of it, the second reuses some


@pytest.fixture(scope="module")
def inductor_env(tmp_path_factory):
    """One compile cache for this module: identical graphs are compiled once."""
    return {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path_factory.mktemp("inductor"))}


@pytest.fixture(scope="module")
def tiny_4096(tmp_path_factory):
    return write_tiny_mnist(tmp_path_factory.mktemp("tiny-4096"), n_train=4096)


@pytest.fixture(scope="module")
def eager_references(tiny_4096, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eager")
    full = tiny_run(tiny_4096, tmp / "full", nproc=1, batch=2 * BATCH)
    # What a rank would end with if the all-reduce were lost: its own half batch.
    half = tiny_run(tiny_4096, tmp / "half", nproc=1, batch=BATCH)
    return full, half


@pytest.mark.parametrize("mode", ["model", "step"])
def test_compiled_ddp_on_two_ranks_matches_one_rank_eager(
    tiny_4096, tmp_path, mode, eager_references, inductor_env
):
    full, half = eager_references
    two = tiny_run(
        tiny_4096,
        tmp_path,
        nproc=2,
        batch=2 * BATCH,
        extra=[f"train.compile={mode}"],
        env=inductor_env,
    )
    # Compiled kernels round differently from eager ones, far less than a missing all-reduce.
    assert max_diff(full, half) > 1e-3
    for k in full:
        torch.testing.assert_close(two[k], full[k], rtol=1e-4, atol=2e-5, msg=k)
