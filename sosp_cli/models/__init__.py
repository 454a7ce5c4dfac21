"""Model registry: ``@register_model`` on a builder, ``create_model(name, ...)``, ``list_models()``.

Every builder takes ``num_classes``, ``in_channels`` and ``width``. ``width`` is either one
multiplier for every layer or a list with one multiplier per stage (CIFAR ResNets: 3 stages;
VGG: 5 stages; DenseNet: 3 dense blocks; torchvision ResNets: 4 stages), which the expand-prune
(bottleneck) experiment uses to widen single stages.

Any other torchvision classifier is available as ``torchvision.<name>`` (e.g.
``torchvision.efficientnet_b0``; ``torchvision.models.list_models()``): randomly initialised,
one stage, width 1 only; ``in_channels`` replaces its first convolution; GoogLeNet and Inception
v3 without their auxiliary classifiers.
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


TORCHVISION = "torchvision."
# torchvision builders' arguments for a classifier that sosp trains and prunes: GoogLeNet's and
# Inception v3's auxiliary classifiers off (in train mode they make the output a tuple), and
# their weight initialisation the one torchvision uses today, named (it warns when left unnamed)
TORCHVISION_KWARGS = {name: {"aux_logits": False, "init_weights": True} for name in ("googlenet", "inception_v3")}
# the auxiliary classifiers' weights in torchvision's weight files of those two (not loaded)
AUXILIARY_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


def check_model(name: str, width: float | Sequence[float] | None = None) -> None:
    """A registered model (with ``width``, when given, one multiplier > 0 or one per stage) or
    ``torchvision.<classifier>`` (then with width 1, when given), else a one-line SospError
    naming the value and what is accepted."""
    if not name.startswith(TORCHVISION):
        check_choice("model", name, _REGISTRY)
        if width is not None:
            stage_widths(width, _STAGES[name][0])
        return
    import torchvision
    if name[len(TORCHVISION):] not in torchvision.models.list_models(module=torchvision.models):
        raise SospError(f"torchvision has no classifier '{name[len(TORCHVISION):]}'; e.g. "
                        f"{TORCHVISION}efficientnet_b0, {TORCHVISION}mobilenet_v3_small "
                        "(torchvision.models.list_models())")
    if width is not None and (not isinstance(width, (int, float)) or width != 1):
        raise SospError(f"{name} has no width multiplier: width must be 1, got {width}")


def num_stages(name: str) -> int:
    check_model(name)
    return 1 if name.startswith(TORCHVISION) else _STAGES[name][0]


def stage_of(name: str, module_name: str) -> int:
    """The width stage (0-based) that module ``module_name`` of model ``name`` belongs to."""
    check_model(name)
    return 0 if name.startswith(TORCHVISION) else _STAGES[name][1](module_name)


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
    check_model(name, width)
    if num_classes < 2:
        raise SospError(f"num_classes={num_classes} must be at least 2")
    if name.startswith(TORCHVISION):
        return _torchvision_model(name, num_classes, in_channels, width)
    return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, width=width)


def _torchvision_model(name: str, num_classes: int, in_channels: int, width) -> nn.Module:
    """torchvision's classifier ``name`` (``torchvision.<name>``), randomly initialised, its first
    convolution replaced for ``in_channels`` other than 3."""
    import torchvision
    arch = name[len(TORCHVISION):]
    model = torchvision.models.get_model(arch, num_classes=num_classes, **TORCHVISION_KWARGS.get(arch, {}))
    if in_channels != 3:
        parent_name, stem = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        if stem.in_channels != 3 or stem.groups != 1:
            raise SospError(f"{name}: its first convolution '{parent_name}' does not read the image "
                            f"({stem.in_channels} input channels), so in_channels={in_channels} cannot replace it")
        parent = model.get_submodule(parent_name.rpartition(".")[0])
        setattr(parent, parent_name.rpartition(".")[2],
                nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding,
                          stem.dilation, bias=stem.bias is not None))
    return model


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
            raise SospError(f"width={width if isinstance(width, (int, float)) else list(width)}: "
                            f"every multiplier must be > 0, got {w}")
    return widths


def scaled(channels: int, multiplier: float) -> int:
    return max(1, int(round(channels * multiplier)))


from . import cifar_resnet, densenet, resnext, torchvision_models, vgg  # noqa: E402,F401  (registration)
