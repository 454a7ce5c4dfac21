"""Gate-space derivatives of the saliency loss (DESIGN.md §3).

L(c) = (1/N) Σ_n CE(z_n(c), y_n): mean cross-entropy over the N saliency samples, as a function
of the gate vector c (all gates 1 = the unpruned model; DESIGN §2). With p_n = softmax(z_n),
J_n = ∂z_n/∂c and R_n = diag(p_n) − p_n p_nᵀ:

- gradient g = ∂L/∂c = (1/N) Σ_n J_nᵀ (p_n − e_{y_n})
- Gauss–Newton Q = (1/N) Σ_n J_nᵀ R_n J_n (PSD); exact Hessian H = ∂²L/∂c² (double backward)

Everything is computed batch by batch and summed, so the result equals the full-N quantity.
Under several processes (:mod:`sosp_cli.distributed`, inside ``summing()``) each rank sums over
its share of the batches and N and every returned sum are summed across ranks before return.
"""
from __future__ import annotations

import contextlib
import math
import re
import warnings
import weakref
from typing import Iterator

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import summed, summed_count
from ..errors import SospError, check_choice
from ..structures import StructureSet
from ..utils import load_jvp_decompositions
from .lean import lean_layers, uses_batch_statistics
from .paired import paired_dual
from .stacked import Unsupported, stacked_dual


def _count(batches) -> int:
    """N, the number of saliency samples (over all ranks: :func:`.distributed.summed_count`)."""
    return summed_count(sum(len(y) for _, y in batches))


def _dtype(model: nn.Module) -> torch.dtype:
    """Gates and accumulators follow the model's floating dtype (float64 in the exactness tests)."""
    p = next(model.parameters(), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def _logits(model, ss: StructureSet, gates, x, unit: bool = False):
    """Gated logits, computed with lean layers (same values; see :mod:`.lean`). ``unit``: the
    gates are all 1 and only first reverse-mode derivatives are taken (``StructureSet.gated``)."""
    with lean_layers(model), ss.gated(model, gates, unit=unit):
        return model(x)


# Each pass below runs in a function of its own: its logits, and through them its autograd graph,
# are released before the next pass starts. Kept alive as loop variables, a finished pass's
# graph made the next forward pass's peak memory ~40 % higher (measured on ResNet-56, CPU).


def _gate_gradient(model, ss: StructureSet, x, y, denominator: int, dt, device) -> torch.Tensor:
    """∂(Σ_batch CE / denominator)/∂c of one batch."""
    c = torch.ones(ss.num_structures, device=device, dtype=dt, requires_grad=True)
    z = _logits(model, ss, c, x.to(device), unit=True)
    return torch.autograd.grad(F.cross_entropy(z, y.to(device), reduction="sum") / denominator, c)[0]


def gradient(model: nn.Module, ss: StructureSet, batches, device) -> torch.Tensor:
    """g = ∂L/∂c (DESIGN §3)."""
    dt = _dtype(model)
    n, g = _count(batches), torch.zeros(ss.num_structures, device=device, dtype=dt)
    for x, y in batches:
        g += _gate_gradient(model, ss, x, y, n, dt, device)
    return summed(g)


def batch_gradients(model: nn.Module, ss: StructureSet, batches, device) -> Iterator[torch.Tensor]:
    """∂L_b/∂c for each batch b, with L_b the batch's mean cross-entropy (first-order Taylor)."""
    dt = _dtype(model)
    for x, y in batches:
        yield _gate_gradient(model, ss, x, y, len(y), dt, device)


def _cotangents(z, jd, y, n: int, dt):
    """(p − y)/N and R·(J d)/N for logits z and their derivative jd = J·d (DESIGN §3)."""
    p = torch.softmax(z.detach().to(dt), dim=1)
    jd = jd.detach().to(dt)
    r_jd = p * jd - p * (p * jd).sum(1, keepdim=True)          # R_n J_n d
    onehot = F.one_hot(y, p.shape[1]).to(p.dtype)
    return ((p - onehot) / n).to(z.dtype), (r_jd / n).to(z.dtype)


# models found to call a function without a stacked-dual rule (they use forward-mode AD)
_NOT_STACKABLE: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
DUAL_MODES = ("auto", "stacked", "forward_ad")
# rows of one stacked pass (``method.stack_batch``): each batch whole (2B rows) or in two halves
# of B rows, or one paired pass (primal and tangent as two tensors of B rows); ``auto``: paired
# on CPU, else whole, in halves from the batch on where a whole pass ran out of GPU memory
STACK_BATCH = ("auto", "half", "pair", "whole")
HALF_WITH_BATCH_STATISTICS = (
    "method.stack_batch=half is not accepted with saliency.batchnorm=batch: a half batch has "
    "other BatchNorm statistics than the batch; use method.stack_batch=auto, pair or whole")


def _check_stack_batch(model: nn.Module, stack_batch: str) -> None:
    check_choice("method.stack_batch", stack_batch, STACK_BATCH)
    if stack_batch == "half" and uses_batch_statistics(model):
        raise SospError(HALF_WITH_BATCH_STATISTICS)


def stackable(model: nn.Module) -> bool:
    """False once the model has been found to need the forward-mode AD fallback."""
    return model not in _NOT_STACKABLE


# ``method.stack_batch=auto`` by device type: ``pair`` where passes are bound by arithmetic and
# memory traffic (CPU: README, "Saliency benchmark"); elsewhere (CUDA, where a CIFAR pass is
# bound by kernel launches, which ``pair`` doubles) ``whole``, in halves after an out-of-memory
AUTO_LAYOUT = {"cpu": "pair"}


def _stacked_products(model, ss: StructureSet, batches, d, n: int, dt, device, stack_batch: str):
    """(g, Q·d) from stacked passes (:mod:`.stacked`): per pass one forward over [x; 0] and one
    backward with the cotangent [(p − y)/N; R J d/N]; or paired ones (:mod:`.paired`).

    ``stack_batch='whole'``: one pass of 2B rows per batch — one pass's kernel launches and fixed
    cost per batch, twice a first-order pass's transient activations. ``'half'``: each batch in
    two halves, so a stacked pass has exactly the tensor shapes (and activation memory) of a
    first-order pass on the batch: the same arithmetic in twice the passes. ``'pair'``: one pass
    per batch with primal and tangent as two tensors of B rows — every kernel twice, with a
    first-order pass's shapes, and nothing copied. ``'auto'`` (default): :data:`AUTO_LAYOUT`'s
    choice for the device, else whole; when a whole pass runs out of GPU memory, that batch and
    the rest of the call are taken in halves (a warning says so) — except with BatchNorm on
    batch statistics (``saliency.batchnorm=batch``), where a half batch would have other
    statistics. Raises :class:`.stacked.Unsupported` (before any result) when the model needs
    forward-mode AD."""
    g = torch.zeros(ss.num_structures, device=device, dtype=dt)
    qd = torch.zeros_like(g)
    if stack_batch == "auto":
        stack_batch = AUTO_LAYOUT.get(torch.device(device).type, "auto")
    if stack_batch == "pair":
        with paired_dual(model, ss, d, dt) as forward:
            for x, y in batches:
                both = _paired_pass(forward, x.to(device), y.to(device), n, dt)
                g += both[0]
                qd += both[1]
        return g, qd
    whole = stack_batch != "half"
    fallback = stack_batch == "auto" and not uses_batch_statistics(model)
    with stacked_dual(model, ss, d, dt) as forward:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            both = None
            if whole:
                try:
                    both = _stacked_pass(forward, x, y, n, dt)
                except torch.cuda.OutOfMemoryError:   # is torch.OutOfMemoryError in torch >= 2.5; this name is in all
                    if not fallback:
                        raise
                    whole = False
                    warnings.warn(f"a stacked SOSP-H pass of {2 * len(y)} rows ran out of memory: "
                                  "this call takes its batches in halves (method.stack_batch=half)",
                                  stacklevel=3)
            if both is None:   # outside the ``except`` block: its traceback holds the failed pass
                half = (len(y) + 1) // 2
                both = sum(_stacked_pass(forward, xh, yh, n, dt)
                           for xh, yh in zip(x.split(half), y.split(half)))
            g += both[0]
            qd += both[1]
    return g, qd


def _stacked_pass(forward, x, y, n: int, dt) -> torch.Tensor:
    """[g_b; (Q·d)_b] of one stacked pass."""
    z2, gates2 = forward(x)
    cot_g, cot_q = _cotangents(z2[:len(y)], z2[len(y):], y, n, dt)
    return torch.autograd.grad(z2, gates2, torch.cat([cot_g, cot_q]))[0]


def _paired_pass(forward, x, y, n: int, dt) -> torch.Tensor:
    """[g_b; (Q·d)_b] of one paired pass (:mod:`.paired`)."""
    z, jd, gates2 = forward(x)
    cot_g, cot_q = _cotangents(z, jd, y, n, dt)
    return torch.autograd.grad((z, jd), gates2, (cot_g, cot_q))[0]


def _forward_ad_pass(model, ss: StructureSet, x, y, d, n: int, dt):
    """One forward pass with dual tensors (forward-mode AD): returns the logits z (with the
    reverse graph to the gates c recorded), c, and the cotangents (p − y)/N and R·(J d)/N."""
    c = torch.ones(ss.num_structures, device=x.device, dtype=dt, requires_grad=True)
    load_jvp_decompositions()
    with fwAD.dual_level():
        z, jd = fwAD.unpack_dual(_logits(model, ss, fwAD.make_dual(c, d), x))
    return (z, c) + _cotangents(z, jd, y, n, dt)


def curvature_product(model: nn.Module, ss: StructureSet, batches, direction: torch.Tensor,
                      device, curvature: str = "gn", dual: str = "auto", stack_batch: str = "auto"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (g, Q·d) for one direction d without forming Q.

    ``gn`` (SOSP-H, DESIGN §3), per batch: z and J·d from one forward pass, then g = Jᵀ(p − y)/N
    and Q·d = Jᵀ R (J d)/N. ``dual='stacked'``: one forward pass over the 2B rows [x; 0] and one
    backward pass returning both products (:mod:`.stacked`); ``'forward_ad'``: dual tensors and
    two backward passes; ``'auto'`` (default): stacked unless the model calls a function that
    has no stacked rule; ``stack_batch``: the rows of a stacked pass (:func:`_stacked_products`).
    ``hessian``: double backward, H·d = ∂(gᵀd)/∂c.
    """
    if dual not in DUAL_MODES:
        raise SospError(f"dual={dual!r}: expected one of {', '.join(DUAL_MODES)}")
    _check_stack_batch(model, stack_batch)
    dt = _dtype(model)
    n, S = _count(batches), ss.num_structures
    d = direction.to(device=device, dtype=dt)
    if curvature == "hessian":
        return _summed(*_hessian_product(model, ss, batches, d, n, dt, device))
    if dual == "stacked" or (dual == "auto" and stackable(model)):
        try:
            return _summed(*_stacked_products(model, ss, batches, d, n, dt, device, stack_batch))
        except Unsupported as exc:
            if dual == "stacked":
                raise SospError(f"dual='stacked': the model calls {exc}, which has no stacked-dual "
                                "rule; use dual='auto' or 'forward_ad'") from None
            _NOT_STACKABLE[model] = str(exc)
            warnings.warn(f"{type(model).__name__} calls {exc}, which has no stacked-dual rule: its "
                          "Gauss-Newton products use forward-mode AD from now on (exact, but slower "
                          "and with ~3x the activation memory; pruning/stacked.py lists the rules)", stacklevel=2)
    g = torch.zeros(S, device=device, dtype=dt)
    qd = torch.zeros(S, device=device, dtype=dt)
    for x, y in batches:
        gb, qb = _forward_ad_products(model, ss, x.to(device), y.to(device), d, n, dt)
        g += gb
        qd += qb
    return _summed(g, qd)


def _summed(*sums: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sums over this rank's batches → sums over all batches (:func:`.distributed.summed`)."""
    return tuple(summed(t) for t in sums)


def _forward_ad_products(model, ss: StructureSet, x, y, d, n: int, dt):
    """(g_b, (Q·d)_b) of one batch on the forward-mode AD path: two backward passes."""
    z, c, cot_g, cot_q = _forward_ad_pass(model, ss, x, y, d, n, dt)
    return (torch.autograd.grad(z, c, cot_g, retain_graph=True)[0],
            torch.autograd.grad(z, c, cot_q)[0])


@contextlib.contextmanager
def second_derivatives():
    """Around the second backward of the exact Hessian's products: PyTorch lacks the second
    derivative of a few functions — e.g. ``hardsigmoid`` where its output multiplies an
    activation, as in MobileNetV3's squeeze-and-excitation blocks — and says so in a
    RuntimeError; here that is one line naming the function and the curvature that needs none."""
    try:
        yield
    except RuntimeError as exc:
        missing = re.search(r"derivative for (\S+) is not implemented", str(exc))
        if missing is None:
            raise
        raise SospError(f"method.curvature=hessian differentiates the model twice, and PyTorch has no "
                        f"derivative for {missing.group(1)} (the backward of a function this model "
                        "calls); use method.curvature=gn (the Gauss–Newton matrix, the default), "
                        "which needs first derivatives only") from None


def check_second_derivatives(model: nn.Module, ss: StructureSet, example: torch.Tensor) -> None:
    """One Hessian-vector product on ``example`` (class 0): a model with a function that PyTorch
    cannot differentiate twice is refused in one line (:func:`second_derivatives`) before it is
    trained, not at its saliency. Which functions it calls does not depend on the weights."""
    dt = _dtype(model)
    y = torch.zeros(len(example), dtype=torch.long, device=example.device)
    _hessian_vector_batch(model, ss, example.to(dt), y,
                          torch.ones(ss.num_structures, dtype=dt, device=example.device), 1, dt)


def _hessian_product(model, ss: StructureSet, batches, d, n: int, dt, device):
    """(g, H·d) by double backward: H·d = ∂(gᵀd)/∂c."""
    g = torch.zeros(ss.num_structures, device=device, dtype=dt)
    qd = torch.zeros_like(g)
    for x, y in batches:
        gb, hb = _hessian_vector_batch(model, ss, x.to(device), y.to(device), d, n, dt)
        g += gb
        qd += hb
    return g, qd


def _differentiable_gradient(model, ss: StructureSet, x, y, n: int, dt):
    """(c, g_b) of one batch with g_b = ∂(Σ_batch CE / N)/∂c built with ``create_graph``, for
    second derivatives by double backward."""
    c = torch.ones(ss.num_structures, device=x.device, dtype=dt, requires_grad=True)
    z = _logits(model, ss, c, x)
    return c, torch.autograd.grad(F.cross_entropy(z, y, reduction="sum") / n, c, create_graph=True)[0]


def _hessian_vector_batch(model, ss: StructureSet, x, y, d, n: int, dt):
    c, gb = _differentiable_gradient(model, ss, x, y, n, dt)
    with second_derivatives():
        return gb.detach(), torch.autograd.grad(gb @ d, c)[0]


def joint_product(model: nn.Module, ss: StructureSet, batches, direction: torch.Tensor,
                  device, stack_batch: str = "auto") -> torch.Tensor:
    """−g + ½ Q·d (GN), all ``combine=abs_joint`` needs. Stacked: from :func:`curvature_product`
    (the backward pass carries both row blocks anyway); forward-mode AD fallback: one backward
    pass per batch with the cotangent −(p − y)/N + ½ R·(J d)/N."""
    if stackable(model):
        g, qd = curvature_product(model, ss, batches, direction, device, stack_batch=stack_batch)
        return -g + 0.5 * qd
    _check_stack_batch(model, stack_batch)
    dt = _dtype(model)
    n = _count(batches)
    out = torch.zeros(ss.num_structures, device=device, dtype=dt)
    d = direction.to(device=device, dtype=dt)
    for x, y in batches:
        out += _forward_ad_joint(model, ss, x.to(device), y.to(device), d, n, dt)
    return summed(out)


def _forward_ad_joint(model, ss: StructureSet, x, y, d, n: int, dt) -> torch.Tensor:
    z, c, cot_g, cot_q = _forward_ad_pass(model, ss, x, y, d, n, dt)
    return torch.autograd.grad(z, c, -cot_g + 0.5 * cot_q)[0]


def jacobian_factors(model: nn.Module, ss: StructureSet, batches, device, curvature: str = "gn",
                     chunk_size: int = 16, generator: torch.Generator | None = None
                     ) -> Iterator[tuple[torch.Tensor, Iterator[torch.Tensor]]]:
    """Yield (g_batch, blocks) per batch with Q = Σ_batches Σ_blocks FᵀF (the rows of a block F
    are factor rows); consume ``blocks`` before the next batch.

    Per-sample gates c ∈ R^{B×S} make one backward return per-sample gate gradients
    J_nᵀ u_n. ``gn``: R_n = A_n A_nᵀ with A_n = diag(√p_n) − p_n √p_nᵀ, so with cotangent
    column k of A_n, Σ_k (J_nᵀ a_k)(J_nᵀ a_k)ᵀ = J_nᵀ R_n J_n: C backward passes per batch,
    ``chunk_size`` classes per vmapped backward, each chunk one block of chunk_size·B rows — so
    a batch never holds its C·B factor rows at once (memory O(S² + chunk_size·B·S), not
    O(C·B·S), which is C·B/S times Q's size: 5.6× for ImageNet's C = 1000, B = 64, ResNet-50).
    ``fisher_mc``: one label ŷ_n ~ p_n per sample, u_n = p_n − e_ŷ, E[u uᵀ] = R_n: one backward,
    one block of B rows.
    """
    if uses_batch_statistics(model):
        raise SospError("per-sample gate Jacobians are undefined when BatchNorm normalises with "
                        "batch statistics (they couple the samples of a batch): use "
                        "saliency.batchnorm=running, or curvature='hessian'")
    dt = _dtype(model)
    n = _count(batches)
    for x, y in batches:
        yield _jacobian_factor_batch(model, ss, x.to(device), y.to(device), n, dt, curvature,
                                     chunk_size, generator)


def check_chunk_size(chunk_size: int) -> None:
    """One-line error unless ``method.chunk_size`` (classes or directions per backward) is >= 1."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise SospError(f"method.chunk_size={chunk_size!r}: expected an integer >= 1 (classes or "
                        "Hessian directions per vmapped backward pass; fewer use less memory)")


def _jacobian_factor_batch(model, ss: StructureSet, x, y, n: int, dt, curvature: str,
                           chunk_size: int, generator):
    """(g_batch, blocks) of one batch (:func:`jacobian_factors`); ``blocks`` computes each
    block when it is asked for, on the batch's retained graph."""
    device, S = x.device, ss.num_structures
    scale = 1.0 / math.sqrt(n)
    c = torch.ones(len(y), S, device=device, dtype=dt, requires_grad=True)
    z = _logits(model, ss, c, x, unit=True)
    p = torch.softmax(z.detach().to(dt), dim=1)
    onehot = F.one_hot(y, p.shape[1]).to(p.dtype)
    g = torch.autograd.grad(z, c, (p - onehot).to(z.dtype) / n, retain_graph=True)[0].sum(0)
    if curvature == "fisher_mc":
        sampled = torch.multinomial(p.cpu(), 1, generator=generator).squeeze(1).to(device)
        u = p - F.one_hot(sampled, p.shape[1]).to(p.dtype)
        return g, iter([torch.autograd.grad(z, c, u.to(z.dtype))[0] * scale])
    return g, _gauss_newton_blocks(z, c, p, chunk_size, scale)


def _gauss_newton_blocks(z, c, p, chunk_size: int, scale: float) -> Iterator[torch.Tensor]:
    """Factor rows J_nᵀ a_k (a_k column k of A_n), ``chunk_size`` classes k per vmapped backward."""
    sqrt_p = p.sqrt()
    C, S = p.shape[1], c.shape[1]
    for start in range(0, C, chunk_size):
        ks = torch.arange(start, min(C, start + chunk_size), device=p.device)
        # cotangent k for sample n: column k of A_n = √p_nk e_k − p_n √p_nk
        eye = F.one_hot(ks, C).to(p.dtype)                               # [K, C]
        cot = sqrt_p[:, ks].T[:, :, None] * (eye[:, None, :] - p[None])  # [K, B, C]
        last = start + chunk_size >= C
        rows = torch.autograd.grad(z, c, cot.to(z.dtype), is_grads_batched=True,
                                   retain_graph=not last)[0]
        yield rows.reshape(-1, S).mul_(scale)


def curvature_matrix(model: nn.Module, ss: StructureSet, batches, device, curvature: str = "gn",
                     chunk_size: int = 16, generator: torch.Generator | None = None,
                     diagonal_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (g, Q) with Q the full S×S curvature (or its diagonal when ``diagonal_only``),
    summed block by block in place: besides Q, one block of factor rows (or of Hessian rows) at
    a time."""
    check_chunk_size(chunk_size)
    dt = _dtype(model)
    S = ss.num_structures
    if curvature == "hessian":
        return _hessian_matrix(model, ss, batches, device, chunk_size, diagonal_only)
    g = torch.zeros(S, device=device, dtype=dt)
    q = torch.zeros(S if diagonal_only else (S, S), device=device, dtype=dt)
    for gb, blocks in jacobian_factors(model, ss, batches, device, curvature, chunk_size, generator):
        g += gb
        for rows in blocks:
            if diagonal_only:
                q += rows.square().sum(0)
            else:
                # Q += FᵀF without an S×S temporary (``out=``, not ``addmm_``, which
                # torch.utils.flop_counter does not count)
                torch.addmm(q, rows.T, rows, out=q)
    return _summed(g, q)


def _hessian_rows_batch(model, ss: StructureSet, x, y, n: int, dt, chunk_size: int, h,
                        diagonal_only: bool):
    """Add one batch's Hessian (or its diagonal) to ``h``, ``chunk_size`` Hessian-vector products
    H e_i per double backward (rows i of H, H symmetric); return the batch's g."""
    c, gb = _differentiable_gradient(model, ss, x, y, n, dt)
    S = ss.num_structures
    for start in range(0, S, chunk_size):
        idx = torch.arange(start, min(S, start + chunk_size), device=x.device)
        with second_derivatives():
            rows = torch.autograd.grad(gb, c, F.one_hot(idx, S).to(dt), is_grads_batched=True,
                                       retain_graph=True)[0]
        block = slice(start, start + len(idx))
        h[block] += rows.diagonal(start) if diagonal_only else rows   # H_ii: rows[k, start + k]
    return gb.detach()


def _hessian_matrix(model, ss: StructureSet, batches, device, chunk_size: int, diagonal_only: bool):
    """Exact gate Hessian (S×S, symmetrised) or its diagonal (O(chunk_size·S) besides it)."""
    dt = _dtype(model)
    n, S = _count(batches), ss.num_structures
    g = torch.zeros(S, device=device, dtype=dt)
    h = torch.zeros(S if diagonal_only else (S, S), device=device, dtype=dt)
    for x, y in batches:
        g += _hessian_rows_batch(model, ss, x.to(device), y.to(device), n, dt, chunk_size, h,
                                 diagonal_only)
    g, h = _summed(g, h)
    return g, (h if diagonal_only else _symmetrised_(h))


def _symmetrised_(h: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """(H + Hᵀ)/2 in place, a block pair at a time: no S×S temporary beside H."""
    S = len(h)
    for i in range(0, S, block):
        for j in range(i, S, block):
            mean = (h[i:i + block, j:j + block] + h[j:j + block, i:i + block].T) * 0.5
            h[i:i + block, j:j + block] = mean
            h[j:j + block, i:i + block] = mean.T
    return h
