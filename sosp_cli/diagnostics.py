"""Does the second-order model predict what pruning does? (``prune.diagnostics=true``)

For the removed set M (gate change δ = −1_M, DESIGN §3) on the saliency samples:

- ``predicted_first_order``  = gᵀδ = −Σ_{s∈M} g_s
- ``predicted_second_order`` = gᵀδ + ½ δᵀQδ = −Σ_{s∈M} g_s + ½ 1_Mᵀ Q 1_M, with Q·1_M from one
  extra curvature-vector product (the method's curvature: GN, or the Hessian for
  ``curvature=hessian``)
- ``real`` = L(gates with M at 0) − L(dense), the loss change of the masked model before
  fine-tuning.

For a seeded sample of single structures it also compares the predicted increase
−g_s + ½ Q_ss with the real one and reports their Spearman rank correlation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .pruning.derivatives import curvature_product
from .structures import StructureSet


@torch.no_grad()
def masked_loss(model, ss: StructureSet, batches, gates: torch.Tensor, device) -> float:
    total, n = 0.0, 0
    for x, y in batches:
        with ss.gated(model, gates.to(device)):
            total += F.cross_entropy(model(x.to(device)), y.to(device), reduction="sum").item()
        n += len(y)
    return total / n


def loss_prediction(model, ss: StructureSet, batches, remove_idx: torch.Tensor, device,
                    curvature: str = "gn", samples: int = 32, seed: int = 0) -> dict:
    curvature = curvature if curvature in ("gn", "hessian") else "gn"
    S = ss.num_structures
    ones = torch.ones(S)
    base = masked_loss(model, ss, batches, ones, device)
    m = torch.zeros(S)
    m[remove_idx] = 1.0
    g, qm = curvature_product(model, ss, batches, m, device, curvature)
    g, qm = g.cpu().double(), qm.cpu().double()
    md = m.double()
    gates = ones.clone()
    gates[remove_idx] = 0.0
    out = {"curvature": curvature, "removed": int(m.sum()),
           "predicted_first_order": float(-(g @ md)),
           "predicted_second_order": float(-(g @ md) + 0.5 * md @ qm),
           "real": masked_loss(model, ss, batches, gates, device) - base}
    k = min(samples, S)
    if k >= 3:
        pick = torch.randperm(S, generator=torch.Generator().manual_seed(seed))[:k]
        predicted, real = [], []
        for s in pick.tolist():
            e = torch.zeros(S)
            e[s] = 1.0
            _, qe = curvature_product(model, ss, batches, e, device, curvature)
            predicted.append(float(-g[s] + 0.5 * qe[s].double().cpu()))
            gates = ones.clone()
            gates[s] = 0.0
            real.append(masked_loss(model, ss, batches, gates, device) - base)
        from scipy.stats import spearmanr   # here: importing scipy.stats costs every process ~1 s
        rho = spearmanr(predicted, real).statistic
        out.update({"single_structures": k, "single_spearman": float(rho),
                    "single_predicted": predicted, "single_real": real})
    return out
