"""``bn_scale``: BatchNorm scaling factors (Liu et al., "Learning Efficient Convolutional Networks
through Network Slimming", ICCV 2017).

score_s = mean over the BatchNorm layers normalising structure s of |γ_s| (one BN for a plain
conv channel; one per block for a residual channel; one per reader for a DenseNet channel,
whose BNs are pre-activation). With ``method.sparsity > 0`` the pretraining adds
``sparsity · Σ|γ|`` to the loss — the full Network Slimming recipe.
"""
from __future__ import annotations

import torch

from ..errors import SospError
from .base import Criterion, Saliency, SaliencyInput, register_criterion


@register_criterion
class BNScaleCriterion(Criterion):
    name = "bn_scale"

    def compute(self, inp: SaliencyInput) -> Saliency:
        S = inp.structures.num_structures
        total, count = torch.zeros(S), torch.zeros(S)
        modules = dict(inp.model.named_modules())
        for name, channels, gates in inp.structures.norm_sites:
            gamma = modules[name].weight.detach().abs().float().cpu()
            total.index_add_(0, gates, gamma[channels])
            count.index_add_(0, gates, torch.ones(len(gates)))
        if (count == 0).any():
            missing = inp.structures.names()[int((count == 0).nonzero()[0])]
            raise SospError(f"bn_scale needs a BatchNorm on every structure; '{missing}' has none")
        return Saliency(total / count)


@register_criterion
class SlimmingCriterion(BNScaleCriterion):
    """``slimming``: Network Slimming in full — ``bn_scale`` scores after pretraining with the
    L1 penalty ``method.sparsity · Σ|γ|`` (Liu et al. 2017; 1e-4 in the method's config)."""

    name = "slimming"

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.sparsity <= 0:
            raise SospError(f"slimming needs method.sparsity > 0 (got {cfg.sparsity}); without the "
                            "sparsity penalty it is method=bn_scale")
