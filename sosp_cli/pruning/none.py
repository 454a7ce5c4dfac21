"""``none``: the dense baseline — no structure is removed (the pipeline skips selection)."""
from __future__ import annotations

import torch

from .base import Criterion, Saliency, SaliencyInput, register_criterion


@register_criterion
class NoPruning(Criterion):
    name = "none"

    def compute(self, inp: SaliencyInput) -> Saliency:
        return Saliency(torch.ones(inp.structures.num_structures))
