"""Gate-space derivatives of the saliency loss (DESIGN.md §3).

L(c) = (1/N) Σ_n CE(z_n(c), y_n): mean cross-entropy over the N saliency samples, as a function
of the gate vector c (all gates 1 = the unpruned model; DESIGN §2). With p_n = softmax(z_n),
J_n = ∂z_n/∂c and R_n = diag(p_n) − p_n p_nᵀ:

- gradient g = ∂L/∂c = (1/N) Σ_n J_nᵀ (p_n − e_{y_n})
- Gauss–Newton Q = (1/N) Σ_n J_nᵀ R_n J_n (PSD); exact Hessian H = ∂²L/∂c² (double backward)

Everything is computed batch by batch and summed, so the result equals the full-N quantity.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

from ..structures import StructureSet
from .lean import lean_layers


def _count(batches) -> int:
    return sum(len(y) for _, y in batches)


def _dtype(model: nn.Module) -> torch.dtype:
    """Gates and accumulators follow the model's floating dtype (float64 in the exactness tests)."""
    p = next(model.parameters(), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def _logits(model, ss: StructureSet, gates, x):
    """Gated logits, computed with lean layers (same values; see :mod:`.lean`)."""
    with lean_layers(model), ss.gated(model, gates):
        return model(x)


def gradient(model: nn.Module, ss: StructureSet, batches, device) -> torch.Tensor:
    """g = ∂L/∂c (DESIGN §3)."""
    dt = _dtype(model)
    n, g = _count(batches), torch.zeros(ss.num_structures, device=device, dtype=dt)
    for x, y in batches:
        c = torch.ones(ss.num_structures, device=device, dtype=dt, requires_grad=True)
        z = _logits(model, ss, c, x.to(device))
        g += torch.autograd.grad(F.cross_entropy(z, y.to(device), reduction="sum") / n, c)[0]
    return g


def batch_gradients(model: nn.Module, ss: StructureSet, batches, device) -> Iterator[torch.Tensor]:
    """∂L_b/∂c for each batch b, with L_b the batch's mean cross-entropy (first-order Taylor)."""
    dt = _dtype(model)
    for x, y in batches:
        c = torch.ones(ss.num_structures, device=device, dtype=dt, requires_grad=True)
        z = _logits(model, ss, c, x.to(device))
        yield torch.autograd.grad(F.cross_entropy(z, y.to(device)), c)[0]


def _dual_pass(model, ss: StructureSet, x, y, d, n: int, dt):
    """One forward pass with dual tensors (DESIGN §3): returns the logits z (with the reverse
    graph to the gates c recorded), c, and the cotangents (p − y)/N and R·(J d)/N."""
    c = torch.ones(ss.num_structures, device=x.device, dtype=dt, requires_grad=True)
    with fwAD.dual_level():
        z, jd = fwAD.unpack_dual(_logits(model, ss, fwAD.make_dual(c, d), x))
    p = torch.softmax(z.detach().to(dt), dim=1)
    jd = jd.detach().to(dt)
    r_jd = p * jd - p * (p * jd).sum(1, keepdim=True)          # R_n J_n d
    onehot = F.one_hot(y, p.shape[1]).to(p.dtype)
    return z, c, ((p - onehot) / n).to(z.dtype), (r_jd / n).to(z.dtype)


def curvature_product(model: nn.Module, ss: StructureSet, batches, direction: torch.Tensor,
                      device, curvature: str = "gn", batched_backward: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (g, Q·d) for one direction d without forming Q.

    ``gn`` (SOSP-H, DESIGN §3): one forward pass with dual tensors gives z and J·d and records
    the reverse graph; two backward passes from z with the cotangents (p − y)/N and R·(J d)/N
    return g and Jᵀ R J d (Q·d) — or one vmapped backward with ``batched_backward`` (measured
    no faster, on CPU nor on an H200: see the README's benchmark).
    ``hessian``: double backward, H·d = ∂(gᵀd)/∂c.
    """
    dt = _dtype(model)
    n, S = _count(batches), ss.num_structures
    g = torch.zeros(S, device=device, dtype=dt)
    qd = torch.zeros(S, device=device, dtype=dt)
    d = direction.to(device=device, dtype=dt)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        if curvature == "hessian":
            c = torch.ones(S, device=device, dtype=dt, requires_grad=True)
            z = _logits(model, ss, c, x)
            gb = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum") / n, c, create_graph=True)[0]
            hb = torch.autograd.grad(gb @ d, c)[0]
            g, qd = g + gb.detach(), qd + hb
            continue
        z, c, cot_g, cot_q = _dual_pass(model, ss, x, y, d, n, dt)
        if batched_backward:
            both = torch.autograd.grad(z, c, torch.stack([cot_g, cot_q]), is_grads_batched=True)[0]
            g, qd = g + both[0], qd + both[1]
        else:
            g = g + torch.autograd.grad(z, c, cot_g, retain_graph=True)[0]
            qd = qd + torch.autograd.grad(z, c, cot_q)[0]
    return g, qd


def joint_product(model: nn.Module, ss: StructureSet, batches, direction: torch.Tensor,
                  device) -> torch.Tensor:
    """−g + ½ Q·d (GN) with a single backward pass per batch: the cotangent
    −(p − y)/N + ½ R·(J d)/N. This is all ``combine=abs_joint`` needs."""
    dt = _dtype(model)
    n = _count(batches)
    out = torch.zeros(ss.num_structures, device=device, dtype=dt)
    d = direction.to(device=device, dtype=dt)
    for x, y in batches:
        z, c, cot_g, cot_q = _dual_pass(model, ss, x.to(device), y.to(device), d, n, dt)
        out += torch.autograd.grad(z, c, -cot_g + 0.5 * cot_q)[0]
    return out


def jacobian_factors(model: nn.Module, ss: StructureSet, batches, device, curvature: str = "gn",
                     chunk_size: int = 16, generator: torch.Generator | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (g_batch, F) per batch with Q = Σ_batches FᵀF (rows of F are factor rows).

    Per-sample gates c ∈ R^{B×S} make one backward return per-sample gate gradients
    J_nᵀ u_n. ``gn``: R_n = A_n A_nᵀ with A_n = diag(√p_n) − p_n √p_nᵀ, so with cotangent
    column k of A_n, Σ_k (J_nᵀ a_k)(J_nᵀ a_k)ᵀ = J_nᵀ R_n J_n: C backward passes per batch
    (``chunk_size`` classes per vmapped backward). ``fisher_mc``: one label ŷ_n ~ p_n per
    sample, u_n = p_n − e_ŷ, E[u uᵀ] = R_n: one backward.
    """
    dt = _dtype(model)
    n, S = _count(batches), ss.num_structures
    scale = 1.0 / math.sqrt(n)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        B = len(y)
        c = torch.ones(B, S, device=device, dtype=dt, requires_grad=True)
        z = _logits(model, ss, c, x)
        p = torch.softmax(z.detach().to(dt), dim=1)
        onehot = F.one_hot(y, p.shape[1]).to(p.dtype)
        g = torch.autograd.grad(z, c, (p - onehot).to(z.dtype) / n, retain_graph=True)[0].sum(0)
        if curvature == "fisher_mc":
            sampled = torch.multinomial(p.cpu(), 1, generator=generator).squeeze(1).to(device)
            u = p - F.one_hot(sampled, p.shape[1]).to(p.dtype)
            rows = torch.autograd.grad(z, c, u.to(z.dtype))[0]
            yield g, rows * scale
            continue
        sqrt_p = p.sqrt()
        C = p.shape[1]
        blocks = []
        for start in range(0, C, chunk_size):
            ks = torch.arange(start, min(C, start + chunk_size), device=device)
            # cotangent k for sample n: column k of A_n = √p_nk e_k − p_n √p_nk
            eye = F.one_hot(ks, C).to(p.dtype)                               # [K, C]
            cot = sqrt_p[:, ks].T[:, :, None] * (eye[:, None, :] - p[None])  # [K, B, C]
            last = start + chunk_size >= C
            rows = torch.autograd.grad(z, c, cot.to(z.dtype), is_grads_batched=True,
                                       retain_graph=not last)[0]
            blocks.append(rows.reshape(-1, S))
        yield g, torch.cat(blocks) * scale


def curvature_matrix(model: nn.Module, ss: StructureSet, batches, device, curvature: str = "gn",
                     chunk_size: int = 16, generator: torch.Generator | None = None,
                     diagonal_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (g, Q) with Q the full S×S curvature (or its diagonal when ``diagonal_only``)."""
    dt = _dtype(model)
    S = ss.num_structures
    if curvature == "hessian":
        return _hessian_matrix(model, ss, batches, device, chunk_size, diagonal_only)
    g = torch.zeros(S, device=device, dtype=dt)
    q = torch.zeros(S if diagonal_only else (S, S), device=device, dtype=dt)
    for gb, rows in jacobian_factors(model, ss, batches, device, curvature, chunk_size, generator):
        g += gb
        q += (rows * rows).sum(0) if diagonal_only else rows.T @ rows
    return g, q


def _hessian_matrix(model, ss: StructureSet, batches, device, chunk_size: int, diagonal_only: bool):
    """Exact gate Hessian, ``chunk_size`` Hessian-vector products per double backward."""
    dt = _dtype(model)
    n, S = _count(batches), ss.num_structures
    g = torch.zeros(S, device=device, dtype=dt)
    h = torch.zeros(S, S, device=device, dtype=dt)
    eye = torch.eye(S, device=device, dtype=dt)
    for x, y in batches:
        c = torch.ones(S, device=device, dtype=dt, requires_grad=True)
        z = _logits(model, ss, c, x.to(device))
        gb = torch.autograd.grad(F.cross_entropy(z, y.to(device), reduction="sum") / n, c,
                                 create_graph=True)[0]
        for start in range(0, S, chunk_size):
            block = eye[start:start + chunk_size]
            h[start:start + len(block)] += torch.autograd.grad(
                gb, c, block, is_grads_batched=True, retain_graph=True)[0]
        g += gb.detach()
    h = 0.5 * (h + h.T)
    return g, (h.diagonal().clone() if diagonal_only else h)
