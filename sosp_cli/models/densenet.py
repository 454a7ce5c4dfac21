"""DenseNet-40 for CIFAR (Huang et al. 2017): growth rate 12, 3 dense blocks of 12
BN-ReLU-Conv3×3 layers (no bottleneck, no compression), transitions BN-ReLU-Conv1×1-AvgPool.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_model, scaled, stage_widths


class DenseLayer(nn.Module):
    def __init__(self, in_planes: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class Transition(nn.Module):
    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class CifarDenseNet(nn.Module):
    def __init__(self, depth: int, growth: int, num_classes: int, in_channels: int, width):
        super().__init__()
        n = (depth - 4) // 3
        widths = stage_widths(width, 3)
        planes = scaled(2 * growth, widths[0])
        self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        blocks = []
        for b, w in enumerate(widths):
            k = scaled(growth, w)
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(planes, k))
                planes += k
            blocks.append(nn.Sequential(*layers))
            if b < 2:
                blocks.append(Transition(planes, planes))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(planes)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _densenet_stage(module_name: str) -> int:
    """blocks.<k>: dense block k // 2 (its transition belongs to it); the stem to block 0."""
    parts = module_name.split(".")
    return int(parts[1]) // 2 if parts[0] == "blocks" else (0 if parts[0] == "conv1" else 2)


@register_model(3, _densenet_stage)
def densenet40(num_classes=10, in_channels=3, width=1.0):
    return CifarDenseNet(40, 12, num_classes, in_channels, width)
