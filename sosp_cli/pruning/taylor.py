"""``taylor``: first-order Taylor importance (Molchanov et al., "Importance Estimation for Neural
Network Pruning", CVPR 2019), in gate space:

score_s = (1/B) Σ_b (∂L_b/∂c_s)², with L_b the mean cross-entropy of saliency batch b.
One forward and one backward pass per batch — the cost reference for SOSP-H.
"""
from __future__ import annotations

import torch

from ..distributed import summed, summed_count
from .base import Criterion, Saliency, SaliencyInput, register_criterion
from .derivatives import _dtype, batch_gradients


@register_criterion
class TaylorCriterion(Criterion):
    name = "taylor"
    uses_data = True

    def compute(self, inp: SaliencyInput) -> Saliency:
        # in the gradients' dtype (the model's: float64 models sum in float64)
        total = torch.zeros(inp.structures.num_structures, device=inp.device, dtype=_dtype(inp.model))
        count = 0
        for gb in batch_gradients(inp.model, inp.structures, inp.batches, inp.device):
            total += gb.pow(2)
            count += 1
        total, count = summed(total), summed_count(count)   # over all ranks' batches (distributed)
        return Saliency((total / max(count, 1)).cpu())
