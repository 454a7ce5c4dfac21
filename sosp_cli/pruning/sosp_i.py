"""``sosp_i``: SOSP-I (Nonnenmacher et al., ICLR 2022; DESIGN.md §3).

    λ_s = |g_s| + ½ Σ_s' |Q_ss'|        (method.combine=abs_sum, the default)
    λ_s = |−g_s + ½ Σ_s' |Q_ss'||       (abs_joint)

with the full S×S curvature Q: exact Gauss–Newton from per-sample gate Jacobians (C backward
passes per batch, R_n = A_n A_nᵀ; ``curvature=gn``), the Monte-Carlo Fisher with one sampled
label per example (``fisher_mc``), or the exact Hessian (``hessian``). Memory O(S² +
chunk_size·B·S): Q is summed one chunk of ``method.chunk_size`` classes' factor rows at a time
(:func:`.derivatives.curvature_matrix`).

``method.selection=greedy`` uses every correlation exactly: it grows the removed set M one
structure at a time, each step taking the s that least increases the quadratic model
m(M) = Σ_{t∈M} (−g_t) + ½ 1_Mᵀ Q 1_M. Adding s changes m by −g_s + ½ Q_ss + (Q 1_M)_s, and
a = Q 1_M is updated in O(S) per step. The score is the step at which s would be removed
(later = more important), so taking the lowest scores reproduces the greedy set. The growth
respects the prune guards (``SaliencyInput.removable``, from :func:`..selection.removal_caps`):
once a layer group has lost as many structures as they allow, its others are no longer
candidates, so a structure the selection would have to skip never enters M — every later step
is taken on the set that is really removed. They come after every candidate, in the order the
growth continues.
"""
from __future__ import annotations

import torch

from ..errors import SospError
from .base import Criterion, Saliency, SaliencyInput, register_criterion
from .derivatives import curvature_matrix


def greedy_order(g: torch.Tensor, q: torch.Tensor, group: torch.Tensor | None = None,
                 caps: list[int] | None = None) -> torch.Tensor:
    """Removal order minimising the quadratic model step by step; returns [S] step indices.
    With ``group`` (each structure's group index) and ``caps`` (per group, the most structures
    that may be removed), a structure is a candidate only while its group is under its cap."""
    S = len(g)
    # in float64 (the growth adds up to S columns), column by column: no float64 copy of Q
    a = torch.zeros(S, dtype=torch.float64)
    step_cost = -g.double() + 0.5 * q.diagonal().double()
    removed = torch.zeros(S, dtype=torch.bool)
    left = None if caps is None else torch.tensor(caps, dtype=torch.long)
    closed = torch.zeros(S, dtype=torch.bool) if left is None else left[group] <= 0
    order = torch.empty(S, dtype=torch.long)
    for step in range(S):
        delta = (step_cost + a).masked_fill(removed, float("inf"))
        if not bool((removed | closed).all()):
            delta = delta.masked_fill(closed, float("inf"))   # candidates first (module docstring)
        s = int(delta.argmin())
        order[s] = step
        if left is not None and not closed[s]:
            left[group[s]] -= 1
            if left[group[s]] == 0:
                closed |= group == group[s]
        removed[s] = True
        a += q[:, s]
    return order


def abs_row_sums(q: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """Σ_s' |Q_ss'| for every s, a block of rows at a time: no S×S temporary beside Q."""
    return torch.cat([q[i:i + rows].abs().sum(1) for i in range(0, len(q), rows)])


@register_criterion
class SospI(Criterion):
    name = "sosp_i"
    uses_data = True
    curvatures = ("gn", "fisher_mc", "hessian")
    per_sample_curvatures = ("gn", "fisher_mc")
    selections = ("score", "greedy")
    structure_limited = True

    def check_structures(self, num_structures: int) -> None:
        S = num_structures
        if S > self.cfg.max_structures:
            size = S * S * 4   # float32 bytes of Q, in the largest unit below them
            unit, base = next((u, b) for u, b in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
                              if size >= b)
            size = f"{size / base:.1f} {unit}"
            raise SospError(f"sosp_i needs an S×S matrix but this model has S={S} structures "
                            f"(> method.max_structures={self.cfg.max_structures}; Q alone: {size}); "
                            "use method=sosp_h, which scales like a first-order method")

    def compute(self, inp: SaliencyInput) -> Saliency:
        self.check_structures(inp.structures.num_structures)
        gen = torch.Generator().manual_seed(inp.seed)
        g, q = curvature_matrix(inp.model, inp.structures, inp.batches, inp.device,
                                self.cfg.curvature, self.cfg.chunk_size, gen)
        g, q = g.cpu(), q.cpu()
        r = abs_row_sums(q)
        if self.cfg.selection == "greedy":
            group = None if inp.removable is None else inp.structures.group_of()
            scores = greedy_order(g, q, group, inp.removable).float()
        else:
            scores = self.combine(g, r)
        return Saliency(scores, grad=g, second_order=r, matrix=q)
