"""``hrank``: feature-map rank (Lin et al., "HRank: Filter Pruning using High-Rank Feature Map",
CVPR 2020).

score_s = mean over the saliency images of rank(M_s), with M_s the H×W feature map of structure
s as it enters its first consumer (after BatchNorm / activation / residual addition — the map
the next layer reads). Low-rank maps carry little information and are removed first.
Layer-local by definition: use ``prune.scope=local`` (the method's config sets it).
"""
from __future__ import annotations

import torch

from ..distributed import summed, summed_count
from .base import Criterion, Saliency, SaliencyInput, register_criterion


@register_criterion
class HRankCriterion(Criterion):
    name = "hrank"
    uses_data = True
    layer_local = True

    @torch.no_grad()
    def compute(self, inp: SaliencyInput) -> Saliency:
        ss = inp.structures
        S = ss.num_structures
        # the first consumer input channel where each structure appears
        where: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        seen = torch.zeros(S, dtype=torch.bool)
        for name, site in ss.sites.items():
            new = ~seen[site.gates]
            if new.any():
                where[name] = (site.channels[new], site.gates[new])
                seen[site.gates[new]] = True
        total = torch.zeros(S, dtype=torch.float64)
        modules = dict(inp.model.named_modules())
        handles = []

        def hook_for(channels, gates):
            def hook(module, args):
                x = args[0][:, channels.to(args[0].device)]
                if x.dim() == 2:
                    ranks = (x != 0).double()
                else:
                    ranks = torch.linalg.matrix_rank(x.double()).double()
                total.index_add_(0, gates, ranks.sum(0).cpu())
            return hook

        for name, (channels, gates) in where.items():
            handles.append(modules[name].register_forward_pre_hook(hook_for(channels, gates)))
        try:
            n = 0
            for x, _ in inp.batches:
                inp.model(x.to(inp.device))
                n += len(x)
        finally:
            for h in handles:
                h.remove()
        total, n = summed(total.to(inp.device)).cpu(), summed_count(n)   # over all ranks' batches
        return Saliency((total / max(n, 1)).float())
