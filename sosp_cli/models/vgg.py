"""CIFAR VGG with BatchNorm (Simonyan & Zisserman 2015; the CIFAR variant of Li et al. 2017):
3×3 conv-BN-ReLU blocks, 5 max-pool stages, global average pooling, one linear classifier.
"""
from __future__ import annotations

import torch.nn as nn

from . import register_model, scaled, stage_widths

_STAGES = {
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


class CifarVGG(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int, width):
        super().__init__()
        layers, c_in = [], in_channels
        for stage, w in zip(_STAGES[depth], stage_widths(width, 5)):
            for c in stage:
                c_out = scaled(c, w)
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                           nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _vgg_stage(depth: int):
    """features.<i> → the max-pool stage it is in (each stage: n × (conv, BN, ReLU) + pool)."""
    bounds, i = [], 0
    for stage in _STAGES[depth]:
        i += 3 * len(stage) + 1
        bounds.append(i)

    def stage(module_name: str) -> int:
        parts = module_name.split(".")
        if parts[0] != "features":
            return len(bounds) - 1
        index = int(parts[1])
        return next(k for k, b in enumerate(bounds) if index < b)
    return stage


@register_model(5, _vgg_stage(16))
def vgg16(num_classes=10, in_channels=3, width=1.0):
    return CifarVGG(16, num_classes, in_channels, width)


@register_model(5, _vgg_stage(19))
def vgg19(num_classes=10, in_channels=3, width=1.0):
    return CifarVGG(19, num_classes, in_channels, width)
