"""LeNet as the PyTorch "Neural Networks" tutorial defines it, and its two common variants.

A plain `nn.Module`: no distributed code, no device choice. Input is 1x32x32 (MNIST's 28x28
padded by 2 on each side).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_pool_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """One stage of LeNet: convolution, 2x2 max-pool, ReLU.

    The tutorial writes max_pool2d(relu(conv(x))). ReLU and max-pooling commute (ReLU keeps
    order), so pooling first gives the same values and the same gradients while ReLU and its
    backward touch a quarter of the elements: a tenth of a CPU step.
    """
    return F.relu(F.max_pool2d(conv(x), 2))


class LeNet(nn.Module):
    """conv1 1->6, conv2 6->16 (kxk), ReLU, 2x2 max-pool after each; fc1 -> fc2 84 -> fc3 10."""

    def __init__(self, kernel_size: int = 5, fc1_width: int = 120, num_classes: int = 10):
        super().__init__()
        if kernel_size not in (3, 5):
            raise ValueError(f"kernel_size must be 3 or 5, not {kernel_size}")
        self.conv1 = nn.Conv2d(1, 6, kernel_size)
        self.conv2 = nn.Conv2d(6, 16, kernel_size)
        side = ((32 - kernel_size + 1) // 2 - kernel_size + 1) // 2  # 5 for 5x5, 6 for 3x3
        self.fc1 = nn.Linear(16 * side * side, fc1_width)
        self.fc2 = nn.Linear(fc1_width, 84)
        self.fc3 = nn.Linear(84, num_classes)
        # How each stage runs: torch's ops, or pipeline.speed.kernels.conv_pool_relu (fused CPU
        # kernels with the same values and gradients). Not a parameter: checkpoints ignore it.
        self.conv_pool_relu: Callable[[nn.Conv2d, torch.Tensor], torch.Tensor] = conv_pool_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_pool_relu(self.conv1, x)
        x = self.conv_pool_relu(self.conv2, x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
