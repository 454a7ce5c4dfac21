"""CIFAR ResNets of He et al. (2016), depth 6n+2, stage widths 16/32/64.

Variant: "option B" shortcuts — identity when shapes match, otherwise a 1×1 convolution with
stride 2 followed by BatchNorm (as in Torch-Pruning's CIFAR ResNet-56 reference).
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from . import layer_stage, register_model, scaled, stage_widths


def shortcut(in_planes: int, planes: int, stride: int) -> nn.Module:
    """Option B: identity when shapes match, otherwise a 1×1 convolution with the block's stride
    followed by BatchNorm."""
    if stride == 1 and in_planes == planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut(in_planes, planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarStages(nn.Module):
    """The CIFAR layout of ResNet and ResNeXt: a 3×3 stem conv + BN + ReLU, three stages
    ``layer1``–``layer3`` of ``blocks_per_stage`` residual blocks (stride 2 at the first block of
    the second and third), global average pooling and one linear classifier; convolutions
    initialised with Kaiming-normal (fan-out). ``make_block(in_planes, stage, stride)`` builds a
    block of stage ``stage`` whose output has ``stage_outputs[stage]`` channels."""

    def __init__(self, in_channels: int, stem: int, stage_outputs, blocks_per_stage: int,
                 make_block, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        layers, in_planes = [], stem
        for stage, planes in enumerate(stage_outputs):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(make_block(in_planes, stage, 2 if (stage > 0 and i == 0) else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class CifarResNet(CifarStages):
    def __init__(self, depth: int, num_classes: int, in_channels: int, width):
        assert (depth - 2) % 6 == 0, "CIFAR ResNet depth must be 6n+2"
        widths = [scaled(c, w) for c, w in zip((16, 32, 64), stage_widths(width, 3))]
        super().__init__(in_channels, widths[0], widths, (depth - 2) // 6,
                         lambda in_planes, stage, stride: BasicBlock(in_planes, widths[stage], stride),
                         num_classes)


@register_model(3, layer_stage())
def resnet20(num_classes=10, in_channels=3, width=1.0):
    return CifarResNet(20, num_classes, in_channels, width)


@register_model(3, layer_stage())
def resnet32(num_classes=10, in_channels=3, width=1.0):
    return CifarResNet(32, num_classes, in_channels, width)


@register_model(3, layer_stage())
def resnet56(num_classes=10, in_channels=3, width=1.0):
    return CifarResNet(56, num_classes, in_channels, width)


@register_model(3, layer_stage())
def resnet110(num_classes=10, in_channels=3, width=1.0):
    return CifarResNet(110, num_classes, in_channels, width)
