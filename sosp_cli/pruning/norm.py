"""``l1`` / ``l2``: filter norms (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017).

score_s = Σ_p ‖W_p[s]‖₁ (l1) or (Σ_p ‖W_p[s]‖₂²)^½ (l2), summed over every producer p of the
structure (a residual structure has one producer per block that writes the summed channel).
"""
from __future__ import annotations

import torch

from .base import Criterion, Saliency, SaliencyInput, producer_weight_slices, register_criterion


class _NormCriterion(Criterion):
    p: int = 1

    def compute(self, inp: SaliencyInput) -> Saliency:
        scores = torch.zeros(inp.structures.num_structures)
        for idx, w in producer_weight_slices(inp.model, inp.structures):
            rows = w.flatten(1).float().cpu()
            scores[idx] += rows.abs().sum(1) if self.p == 1 else rows.pow(2).sum(1)
        return Saliency(scores if self.p == 1 else scores.sqrt())


@register_criterion
class L1Criterion(_NormCriterion):
    name = "l1"
    p = 1


@register_criterion
class L2Criterion(_NormCriterion):
    name = "l2"
    p = 2
