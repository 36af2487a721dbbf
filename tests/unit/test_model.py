"""LeNet as the tutorial defines it, and its variants."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import LeNet


def test_tutorial_lenet_layers_and_shapes():
    net = LeNet()
    text = str(net)
    for line in (
        "(conv1): Conv2d(1, 6, kernel_size=(5, 5)",
        "(conv2): Conv2d(6, 16, kernel_size=(5, 5)",
        "(fc1): Linear(in_features=400, out_features=120",
        "(fc2): Linear(in_features=120, out_features=84",
        "(fc3): Linear(in_features=84, out_features=10",
    ):
        assert line in text
    params = list(net.parameters())
    assert len(params) == 10
    assert params[0].shape == (6, 1, 5, 5)
    assert net.conv1.weight.shape == (6, 1, 5, 5)
    assert net(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    assert sum(p.numel() for p in params) == 61706  # the tutorial's count


def _tutorial_forward(net, x):
    """The forward pass exactly as the tutorial writes it: ReLU, then max-pool."""
    x = F.max_pool2d(F.relu(net.conv1(x)), (2, 2))
    x = F.max_pool2d(F.relu(net.conv2(x)), 2)
    x = torch.flatten(x, 1)
    x = F.relu(net.fc1(x))
    x = F.relu(net.fc2(x))
    return net.fc3(x)


@pytest.mark.parametrize("kernel_size", [5, 3])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_forward_and_gradients_equal_the_tutorial_order(kernel_size, layout):
    torch.manual_seed(0)
    net = LeNet(kernel_size).to(memory_format=layout)
    x = torch.randn(64, 1, 32, 32).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (64,))
    results = []
    for forward in (net, lambda inp: _tutorial_forward(net, inp)):
        net.zero_grad()
        out = forward(x)
        F.cross_entropy(out, y).backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)  # selections commute: bitwise the same values
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=0, msg=name)


def test_three_by_three_variant_has_576_inputs_to_fc1():
    net = LeNet(kernel_size=3)
    assert net.conv1.weight.shape == (6, 1, 3, 3)
    assert net.fc1.in_features == 16 * 6 * 6
    assert net(torch.randn(4, 1, 32, 32)).shape == (4, 10)


def test_wider_fc1_variant():
    net = LeNet(fc1_width=1200)
    assert (net.fc1.out_features, net.fc2.in_features) == (1200, 1200)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_unknown_kernel_size_is_refused():
    with pytest.raises(ValueError, match="kernel_size"):
        LeNet(kernel_size=7)


def test_variants_are_config_options(tmp_path):
    from pipeline.config.schema import load_config

    cfg = load_config(None, ["model.kernel_size=3", "model.fc1_width=1200"])
    net = LeNet(cfg.model.kernel_size, cfg.model.fc1_width)
    assert (net.fc1.in_features, net.fc1.out_features) == (576, 1200)
