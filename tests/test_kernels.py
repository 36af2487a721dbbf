"""The fused conv1 -> max-pool -> ReLU CPU kernel gives torch's values and gradients: exactly
where float sums are exact (integer data, full of ties), to rounding elsewhere; NaN spreads as
in torch; it falls back to torch's ops where it does not apply; and a machine that cannot build
it trains with torch's ops after one warning."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline import kernels
from pipeline.model import LeNet

from conftest import TINY_ARGS, assert_ok, run_pipeline


@pytest.fixture(scope="module", autouse=True)
def built():
    missing = kernels.toolchain_problem()
    if missing:
        pytest.skip(f"the fused kernel cannot be built here: {missing}")
    problem = kernels.load()
    assert problem is None, problem  # a compiler is here: the kernel must build


def reference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.relu(F.max_pool2d(conv(x), 2))


def conv1(k: int, integer: bool = False) -> nn.Conv2d:
    conv = nn.Conv2d(1, 6, k).to(memory_format=torch.channels_last)
    if integer:
        with torch.no_grad():
            conv.weight.copy_(torch.randint(-2, 3, conv.weight.shape))
            conv.bias.copy_(torch.randint(-2, 3, conv.bias.shape))
    return conv


def both(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor):
    """(output, weight grad, bias grad) from the kernel and from torch's ops."""
    out = []
    for f in (kernels.conv1_pool_relu, reference):
        conv.zero_grad()
        y = f(conv, x)
        y.backward(grad)
        out.append((y, conv.weight.grad.clone(), conv.bias.grad.clone()))
    return out


@pytest.mark.parametrize("k", [5, 3])
def test_integer_data_gives_torchs_exact_values_and_gradients(k):
    torch.manual_seed(k)
    conv = conv1(k, integer=True)
    # Small integers: every sum is exact, so ties (equal window values) are exact too, and
    # the kernel must pick the same winner as max_pool2d for the gradients to agree.
    x = torch.randint(-1, 2, (37, 1, 32, 32)).float()
    x[:, :, :8] = 1.0  # constant rows: whole windows of ties
    grad = torch.randint(-3, 4, (37, 6, (32 - k + 1) // 2, (32 - k + 1) // 2)).float()
    (y, gw, gb), (y_ref, gw_ref, gb_ref) = both(conv, x, grad)
    assert y.is_contiguous(memory_format=torch.channels_last)  # what conv2 reads without a copy
    assert torch.equal(y, y_ref)
    assert (y == 0).float().mean() > 0.1  # ReLU's cut is exercised
    assert torch.equal(gw, gw_ref)
    assert torch.equal(gb, gb_ref)


@pytest.mark.parametrize("threads", [1, 2])
def test_random_data_matches_torch_to_rounding(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        conv = conv1(5)
        x = F.pad(torch.randn(64, 1, 28, 28), (2, 2, 2, 2), value=-0.42)  # MNIST's padding
        grad = torch.randn(64, 6, 14, 14)
        (y, gw, gb), (y_ref, gw_ref, gb_ref) = both(conv, x, grad)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-4, atol=1e-3)


def test_nan_spreads_as_in_torch():
    torch.manual_seed(0)
    conv = conv1(5)
    x = torch.randn(4, 1, 32, 32)
    x[1, 0, 10, 10] = float("nan")
    with torch.no_grad():
        y, y_ref = kernels.conv1_pool_relu(conv, x), reference(conv, x)
    assert y.isnan().any()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_an_input_that_needs_its_gradient_gets_it_from_torchs_ops():
    torch.manual_seed(0)
    conv = conv1(5)
    x = torch.randn(8, 1, 32, 32, requires_grad=True)
    kernels.conv1_pool_relu(conv, x).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    reference(conv, x).sum().backward()
    assert torch.equal(grad, x.grad)


def test_under_bf16_autocast_it_runs_in_fp32():
    torch.manual_seed(0)
    conv = conv1(5)
    x = torch.randn(8, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.conv1_pool_relu(conv, x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, reference(conv, x), rtol=1e-5, atol=1e-5)


def test_lenet_with_the_kernel_is_lenet():
    torch.manual_seed(0)
    plain = LeNet().to(memory_format=torch.channels_last)
    fused = LeNet().to(memory_format=torch.channels_last)
    fused.load_state_dict(plain.state_dict())
    fused.conv1_pool_relu = kernels.conv1_pool_relu
    x = torch.randn(16, 1, 32, 32)
    y = torch.randint(0, 10, (16,))
    for net in (plain, fused):
        F.cross_entropy(net(x), y).backward()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert set(fused.state_dict()) == set(plain.state_dict())  # checkpoints are unchanged


def test_a_machine_that_cannot_build_it_trains_with_torchs_ops(tiny_mnist, tmp_path):
    proc = run_pipeline(
        [*TINY_ARGS, f"data.root={tiny_mnist}", f"train.run_dir={tmp_path / 'run'}"],
        env={"CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")},
    )
    assert_ok(proc)
    warnings = [line for line in proc.stderr.splitlines() if "fused conv1 kernel" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: "), proc.stderr
    assert "train.fused_conv1=false" in warnings[0]
    assert "test acc" in proc.stdout + proc.stderr
