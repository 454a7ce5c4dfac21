"""``random``: uniform random scores (the sanity baseline); same seed ⇒ same scores."""
from __future__ import annotations

import torch

from .base import Criterion, Saliency, SaliencyInput, register_criterion


@register_criterion
class RandomCriterion(Criterion):
    name = "random"

    def compute(self, inp: SaliencyInput) -> Saliency:
        gen = torch.Generator().manual_seed(inp.seed)
        return Saliency(torch.rand(inp.structures.num_structures, generator=gen))
