"""``obd``: diagonal second-order saliency (C-OBD-like, after LeCun et al. 1990 / Wang et al.
2019; DESIGN.md §3):

    λ_s = |g_s| + ½ Q_ss               (combine=abs_sum; abs_joint: |−g_s + ½ Q_ss|)

Q_ss is exact, not estimated: the diagonal of the Gauss–Newton matrix from per-sample gate
Jacobians (C backward passes per batch; O(chunk_size·B·S) memory: each chunk's factor rows are
squared and summed before the next), of the Monte-Carlo Fisher (``curvature=fisher_mc``) or of
the exact Hessian (``curvature=hessian``, S Hessian-vector products — small models only — of
which only each chunk's diagonal is kept). Correlations between structures are ignored.
"""
from __future__ import annotations

import torch

from .base import Criterion, Saliency, SaliencyInput, register_criterion
from .derivatives import curvature_matrix


@register_criterion
class OBD(Criterion):
    name = "obd"
    uses_data = True
    curvatures = ("gn", "fisher_mc", "hessian")
    per_sample_curvatures = ("gn", "fisher_mc")

    def compute(self, inp: SaliencyInput) -> Saliency:
        gen = torch.Generator().manual_seed(inp.seed)
        g, diag = curvature_matrix(inp.model, inp.structures, inp.batches, inp.device,
                                   self.cfg.curvature, self.cfg.chunk_size, gen, diagonal_only=True)
        g, diag = g.cpu(), diag.cpu()
        return Saliency(self.combine(g, diag), grad=g, second_order=diag)
