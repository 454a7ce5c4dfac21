"""Model registry: ``@register_model`` on a builder, ``create_model(name, ...)``, ``list_models()``.

Every builder takes ``num_classes``, ``in_channels`` and ``width``. ``width`` is either one
multiplier for every layer or a list with one multiplier per stage (CIFAR ResNets: 3 stages;
VGG: 5 stages; DenseNet: 3 dense blocks; torchvision ResNets: 4 stages), which the expand-prune
(bottleneck) experiment uses to widen single stages.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch.nn as nn

from ..errors import SospError, check_choice

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its function name (the name used in configs and results)."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 10, in_channels: int = 3,
                 width: float | Sequence[float] = 1.0) -> nn.Module:
    check_choice("model", name, _REGISTRY)
    if num_classes < 2:
        raise SospError(f"num_classes={num_classes} must be at least 2")
    return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, width=width)


def stage_widths(width: float | Sequence[float], num_stages: int) -> list[float]:
    """Expand a width spec into one multiplier per stage, validating it."""
    if isinstance(width, (int, float)):
        widths = [float(width)] * num_stages
    else:
        widths = [float(w) for w in width]
        if len(widths) != num_stages:
            raise SospError(f"width={list(width)} has {len(widths)} entries; this model has "
                            f"{num_stages} stages (give one number or {num_stages})")
    for w in widths:
        if w <= 0:
            raise SospError(f"width multiplier {w} must be > 0")
    return widths


def scaled(channels: int, multiplier: float) -> int:
    return max(1, int(round(channels * multiplier)))


from . import cifar_resnet, densenet, torchvision_models, vgg  # noqa: E402,F401  (registration)
