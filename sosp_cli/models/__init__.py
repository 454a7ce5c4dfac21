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
_STAGES: dict[str, tuple[int, Callable[[str], int]]] = {}


def register_model(stages: int, stage_of: Callable[[str], int]):
    """Register a builder under its function name (the name used in configs and results).

    ``stages`` is the length of a per-stage width list; ``stage_of(module_name)`` says which
    stage a module belongs to (used to read layer-wise pruning ratios per stage)."""
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[fn.__name__] = fn
        _STAGES[fn.__name__] = (stages, stage_of)
        return fn
    return wrap


def num_stages(name: str) -> int:
    check_choice("model", name, _REGISTRY)
    return _STAGES[name][0]


def stage_of(name: str, module_name: str) -> int:
    """The width stage (0-based) that module ``module_name`` of model ``name`` belongs to."""
    check_choice("model", name, _REGISTRY)
    return _STAGES[name][1](module_name)


def layer_stage(prefix: str = "layer", first: int = 1):
    """Stage function for models whose stages are attributes ``layer1``, ``layer2``, ...;
    anything else (the stem) belongs to stage 0."""
    def stage(module_name: str) -> int:
        head = module_name.split(".")[0]
        if head.startswith(prefix) and head[len(prefix):].isdigit():
            return int(head[len(prefix):]) - first
        return 0
    return stage


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
