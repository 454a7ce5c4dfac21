"""torchvision ImageNet models (random init; load weights with ``pretrain.checkpoint``).

``width`` scales every stage of ResNet-18/50 (one multiplier or one per stage, 4 stages) and is
MobileNetV2's ``width_mult`` (one number). ``in_channels`` replaces the stem convolution.

torchvision is imported when one of these models is built, not when the registry is: importing
it imports ``torch._dynamo`` (through ``torchvision.ops``), about 2 s on a CPU host — every
``sosp-run`` process, every torchrun rank and every test subprocess paid it, whatever its model.
``ScaledResNet`` is made on first use and is an attribute of this module like a class defined in
it (:func:`__getattr__`), so a pickled model finds it.
"""
from __future__ import annotations

import functools

import torch.nn as nn

from ..errors import SospError
from . import layer_stage, register_model, scaled, stage_widths


@functools.cache
def _scaled_resnet() -> type:
    from torchvision.models.resnet import ResNet

    class ScaledResNet(ResNet):
        """torchvision's ResNet with per-stage width multipliers and a configurable stem."""

        def __init__(self, block, layers, num_classes: int, in_channels: int, width):
            super().__init__(block, layers, num_classes=num_classes)
            widths = [scaled(c, w) for c, w in zip((64, 128, 256, 512), stage_widths(width, 4))]
            if widths == [64, 128, 256, 512] and in_channels == 3:
                return
            self.inplanes = scaled(64, stage_widths(width, 4)[0])
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(self.inplanes)
            self.layer1 = self._make_layer(block, widths[0], layers[0])
            self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
            self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
            self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
            self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    ScaledResNet.__module__, ScaledResNet.__qualname__ = __name__, "ScaledResNet"
    return ScaledResNet


def __getattr__(name: str):
    if name == "ScaledResNet":
        return _scaled_resnet()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@register_model(4, layer_stage())
def resnet18(num_classes=1000, in_channels=3, width=1.0):
    from torchvision.models.resnet import BasicBlock
    return _scaled_resnet()(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, width)


@register_model(4, layer_stage())
def resnet50(num_classes=1000, in_channels=3, width=1.0):
    from torchvision.models.resnet import Bottleneck
    return _scaled_resnet()(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, width)


@register_model(1, lambda module_name: 0)
def mobilenet_v2(num_classes=1000, in_channels=3, width=1.0):
    if not isinstance(width, (int, float)):
        raise SospError(f"mobilenet_v2 takes one width multiplier, got width={list(width)}")
    from torchvision.models import mobilenet_v2 as tv_mobilenet_v2
    model = tv_mobilenet_v2(num_classes=num_classes, width_mult=float(width))
    if in_channels != 3:
        stem = model.features[0][0]
        model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, 2, 1, bias=False)
    return model
