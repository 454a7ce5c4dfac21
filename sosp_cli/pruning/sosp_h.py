"""``sosp_h``: SOSP-H (Nonnenmacher et al., ICLR 2022; DESIGN.md §3).

    λ_s = |g_s| + ½ |(Q·1)_s|          (method.combine=abs_sum, the default)
    λ_s = |−g_s + ½ (Q·1)_s|           (abs_joint)

with g = ∂L/∂c and Q the Gauss–Newton matrix (1/N) Σ_n J_nᵀ R_n J_n (``curvature=gn``) or the
exact gate Hessian (``curvature=hessian``). v = Q·1 = Σ_s' Q_ss' carries the correlation of s
with every structure of every layer, yet Q is never formed: per batch, one forward pass over
the stacked rows [x; 0] gives z and J·1 (:mod:`.stacked`; forward-mode AD for models with a
function it has no rule for), and one backward pass returns g and Jᵀ R J 1 together
(:func:`derivatives.curvature_product`). ``method.stack_batch``: ``whole`` (``auto``'s choice on
a GPU) runs one pass of 2B rows per batch; ``half`` takes each batch in two halves, so every
pass has the shapes and activation memory of a first-order pass (twice the passes); ``pair``
(``auto``'s choice on a CPU) runs one pass with primal and tangent as two tensors of B rows
(:mod:`.paired`); ``auto`` switches to halves for the rest of a call when a whole pass runs out
of GPU memory. Memory O(parameters + activations of one batch), like Taylor; cost two
first-order passes' arithmetic.
"""
from __future__ import annotations

import torch

from .base import Criterion, Saliency, SaliencyInput, register_criterion
from .derivatives import curvature_product, joint_product


@register_criterion
class SospH(Criterion):
    name = "sosp_h"
    uses_data = True
    curvatures = ("gn", "hessian")

    def compute(self, inp: SaliencyInput) -> Saliency:
        ones = torch.ones(inp.structures.num_structures)
        if self.cfg.combine == "abs_joint" and self.cfg.curvature == "gn":
            # |−g + ½ Q·1| needs only the sum: one backward pass per batch instead of two
            joint = joint_product(inp.model, inp.structures, inp.batches, ones, inp.device,
                                  self.cfg.stack_batch).cpu()
            return Saliency(joint.abs())
        g, v = curvature_product(inp.model, inp.structures, inp.batches, ones, inp.device,
                                 self.cfg.curvature, stack_batch=self.cfg.stack_batch)
        g, v = g.cpu(), v.cpu()
        return Saliency(self.combine(g, v), grad=g, second_order=v)
