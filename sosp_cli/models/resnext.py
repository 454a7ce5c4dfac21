"""CIFAR ResNeXt-29 of Xie et al., "Aggregated Residual Transformations for Deep Neural
Networks" (CVPR 2017, §5.3 and Table 7): a 3×3 stem of 64 channels, 3 stages of 3 bottleneck
blocks (1×1 → grouped 3×3 with cardinality C → 1×1), output widths 256 / 512 / 1024, the
bottleneck width d of each group 64 / 128 / 256 (``resnext29_8x64d``: C = 8, d = 64 in the
first stage; 34.4 M parameters at width 1), strides 1 / 2 / 2, global average pooling.

``width`` scales the stem, the output widths and d (one multiplier or one per stage); the
cardinality stays C. Shortcuts: identity when shapes match, otherwise a 1×1 convolution with
the block's stride followed by BatchNorm (the paper's projection shortcut).
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from . import layer_stage, register_model, scaled, stage_widths


class ResNeXtBlock(nn.Module):
    def __init__(self, in_planes: int, cardinality: int, group_width: int, out_planes: int, stride: int):
        super().__init__()
        inner = cardinality * group_width
        self.conv1 = nn.Conv2d(in_planes, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNeXt(nn.Module):
    def __init__(self, cardinality: int, group_width: int, num_classes: int, in_channels: int, width,
                 blocks_per_stage: int = 3):
        super().__init__()
        widths = stage_widths(width, 3)
        self.conv1 = nn.Conv2d(in_channels, scaled(64, widths[0]), 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.conv1.out_channels)
        layers, in_planes = [], self.conv1.out_channels
        for stage, w in enumerate(widths):
            d, out = scaled(group_width * 2 ** stage, w), scaled(256 * 2 ** stage, w)
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(ResNeXtBlock(in_planes, cardinality, d, out, 2 if (stage > 0 and i == 0) else 1))
                in_planes = out
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


@register_model(3, layer_stage())
def resnext29_8x64d(num_classes=10, in_channels=3, width=1.0):
    return CifarResNeXt(8, 64, num_classes, in_channels, width)
