"""The criterion interface: one score per structure, higher = more important (keep).

Every criterion is a class registered under a short stable name (``@register_criterion``) —
the name used in ``method=...``, results tables and tests. ``compute`` receives a
:class:`SaliencyInput` and returns a :class:`Saliency` (the scores, plus the first- and
second-order quantities a second-order method computed, for diagnostics).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from ..config import MethodConfig
from ..errors import SospError, check_choice
from ..structures import StructureSet

_CRITERIA: dict[str, type["Criterion"]] = {}
COMBINE = ("abs_sum", "abs_joint", "second_only")


@dataclass
class SaliencyInput:
    model: nn.Module                 # in eval mode, on ``device``
    structures: StructureSet
    batches: list                    # [(inputs, targets)], the N saliency samples
    device: torch.device
    seed: int = 0


@dataclass
class Saliency:
    scores: torch.Tensor             # [S], higher = keep
    grad: torch.Tensor | None = None          # g = ∂L/∂c, when computed
    second_order: torch.Tensor | None = None  # the per-structure curvature term r_s
    matrix: torch.Tensor | None = None        # full S×S curvature (sosp_i)
    extras: dict = field(default_factory=dict)


class Criterion:
    """Base class. Subclasses set ``name`` and implement ``compute``."""

    name: ClassVar[str] = ""
    layer_local: ClassVar[bool] = False      # scores only comparable within one layer group
    curvatures: ClassVar[tuple[str, ...]] = ()  # accepted ``method.curvature`` values

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg
        check_choice("method.combine", cfg.combine, COMBINE)
        if self.curvatures:
            check_choice(f"method.curvature for {self.name}", cfg.curvature, self.curvatures)

    def compute(self, inp: SaliencyInput) -> Saliency:
        raise NotImplementedError

    def combine(self, g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """First- and second-order terms into one score (DESIGN §3, ``method.combine``):
        abs_sum |g_s| + ½|r_s| (the default, an upper bound on the loss change);
        abs_joint |−g_s + ½ r_s| (the quadratic model's predicted change);
        second_only ½|r_s|."""
        if self.cfg.combine == "abs_sum":
            return g.abs() + 0.5 * r.abs()
        if self.cfg.combine == "abs_joint":
            return (-g + 0.5 * r).abs()
        return 0.5 * r.abs()


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    _CRITERIA[cls.name] = cls
    return cls


def list_criteria() -> list[str]:
    return sorted(_CRITERIA)


def get_criterion(cfg: MethodConfig) -> Criterion:
    check_choice("method", cfg.name, _CRITERIA)
    return _CRITERIA[cfg.name](cfg)


def producer_weight_slices(model: nn.Module, ss: StructureSet):
    """Yield (global structure indices, weight rows [k, ...]) for every producer of every group:
    the output-channel slices of the conv/linear layers that write each structure."""
    modules = dict(model.named_modules())
    for grp in ss.groups:
        idx = torch.arange(grp.offset, grp.offset + grp.size)
        for name in grp.producers:
            w = modules[name].weight.detach()
            if w.shape[0] != grp.size:
                raise SospError(f"producer '{name}' has {w.shape[0]} outputs, group '{grp.root}' "
                                f"has {grp.size} channels")
            yield idx, w
