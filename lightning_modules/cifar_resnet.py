"""The CIFAR ResNet of the randomized-smoothing papers: depth 6n + 2, BasicBlocks, 16/32/64 wide.

Module names are those of Cohen et al.'s ``locuslab/smoothing`` (``archs/cifar_resnet.py``), so
their checkpoints (keys ``1.module.<name>``) load once DataParallel's ``module.`` is dropped.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from certify.math.validation import UsageError


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (a 1x1 ``downsample`` on a stride)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            conv = nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)
            self.downsample = nn.Sequential(conv, nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)  # (B, planes, H', W')
        out = self.relu(self.bn1(self.conv1(x)))  # (B, planes, H', W')
        return self.relu(self.bn2(self.conv2(out)) + residual)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3 stages of n BasicBlocks each, depth = 6n + 2 (20, 110, ...)."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise UsageError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages = [(16, 16, 1), (16, 32, 2), (32, 64, 2)]  # (inplanes, planes, stride)
        for i, (inplanes, planes, stride) in enumerate(stages, start=1):
            blocks = [BasicBlock(inplanes, planes, stride)]
            blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 16, 32, 32)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64, 8, 8)
        return self.fc(self.avgpool(x).flatten(1))  # (B, num_classes)
