"""CIFAR ResNeXt-29 of Xie et al., "Aggregated Residual Transformations for Deep Neural
Networks" (CVPR 2017, §5.3 and Table 7): a 3×3 stem of 64 channels, 3 stages of 3 bottleneck
blocks (1×1 → grouped 3×3 with cardinality C → 1×1), output widths 256 / 512 / 1024, the
bottleneck width d of each group 64 / 128 / 256 (``resnext29_8x64d``: C = 8, d = 64 in the
first stage; 34.4 M parameters at width 1), strides 1 / 2 / 2, global average pooling.

``width`` scales the stem, the output widths and d (one multiplier or one per stage); the
cardinality stays C. Shortcuts: identity when shapes match, otherwise a 1×1 convolution with
the block's stride followed by BatchNorm (the paper's projection shortcut); the stem, stages,
pooling and initialisation are the CIFAR ResNets' (:class:`.cifar_resnet.CifarStages`).
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from . import layer_stage, register_model, scaled, stage_widths
from .cifar_resnet import CifarStages, shortcut


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
        self.shortcut = shortcut(in_planes, out_planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNeXt(CifarStages):
    def __init__(self, cardinality: int, group_width: int, num_classes: int, in_channels: int, width,
                 blocks_per_stage: int = 3):
        widths = stage_widths(width, 3)
        d = [scaled(group_width * 2 ** stage, w) for stage, w in enumerate(widths)]
        outputs = [scaled(256 * 2 ** stage, w) for stage, w in enumerate(widths)]
        super().__init__(in_channels, scaled(64, widths[0]), outputs, blocks_per_stage,
                         lambda in_planes, stage, stride: ResNeXtBlock(in_planes, cardinality, d[stage],
                                                                       outputs[stage], stride),
                         num_classes)


@register_model(3, layer_stage())
def resnext29_8x64d(num_classes=10, in_channels=3, width=1.0):
    return CifarResNeXt(8, 64, num_classes, in_channels, width)
