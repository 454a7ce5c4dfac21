"""``fpgm``: Filter Pruning via Geometric Median (He et al., CVPR 2019).

Filters near the geometric median of their layer are the most replaceable. With F_i the
structure's filter (the producers' output slices, concatenated), the score is the sum of
distances to the other filters of the same group, Σ_j ‖F_i − F_j‖₂ (the paper's approximation
of the distance to the geometric median); low = near the median = removed first.
Layer-local by definition: use ``prune.scope=local`` (the method's config sets it).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .base import Criterion, Saliency, SaliencyInput, producer_weight_slices, register_criterion


@register_criterion
class FPGMCriterion(Criterion):
    name = "fpgm"
    layer_local = True

    def compute(self, inp: SaliencyInput) -> Saliency:
        rows: dict[int, list[torch.Tensor]] = defaultdict(list)
        first: dict[int, torch.Tensor] = {}
        for idx, w in producer_weight_slices(inp.model, inp.structures):
            key = int(idx[0])
            first[key] = idx
            rows[key].append(w.flatten(1).double().cpu())
        scores = torch.zeros(inp.structures.num_structures, dtype=torch.float64)
        for key, parts in rows.items():
            filters = torch.cat(parts, dim=1)
            scores[first[key]] = torch.cdist(filters, filters).sum(1)
        return Saliency(scores.float())
