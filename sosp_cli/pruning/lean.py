"""Lean layers for gate-space derivatives: the same function, fewer operations.

Saliencies differentiate only with respect to the gates, never the weights, and run in eval
mode. Inside :func:`lean_layers`, every Conv2d / Linear / BatchNorm2d / BatchNorm1d computes exactly what it
computed before, but:

- weights are frozen (no weight-gradient bookkeeping);
- Conv2d and Linear go through an autograd Function whose forward-mode rule is the single
  product ``W·ẋ`` (PyTorch's generic rule also evaluates ``ẇ·x`` with a zero tangent ``ẇ``,
  a whole extra convolution per layer) and whose backward computes the input gradient only;
- eval-mode BatchNorm is the per-channel affine map ``x·γ/√(σ²+ε) + (β − μγ/√(σ²+ε))``, whose
  tangent is one multiplication. (BatchNorm on batch statistics, :func:`batch_statistics`,
  keeps its own forward, with frozen parameters.)

The tests compare every quantity computed this way with brute force on the untouched model.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import channel_shaped


# The autograd Functions here and in :mod:`.stacked` take ``ctx`` in ``forward`` (no separate
# ``setup_context``): PyTorch binds a ``setup_context``-style Function's arguments with
# ``inspect.signature`` on every call, ~50 µs, which is several per cent of a small layer's pass.


class FrozenConv(torch.autograd.Function):
    """y = conv2d(x; W, b) with W, b constants: jvp ẏ = conv2d(ẋ; W), vjp x̄ = convᵀ(ȳ; W)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.weight, ctx.args = weight, (stride, padding, dilation, groups)
        ctx.x_shape = x.shape
        ctx.set_materialize_grads(False)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def jvp(ctx, x_t, *_):
        stride, padding, dilation, groups = ctx.args
        return F.conv2d(x_t, ctx.weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        # x̄ = convᵀ(ȳ; W) is the transposed convolution with the same weight; output_padding
        # restores the rows / columns that a strided convolution never read. (Not
        # ``torch.nn.grad.conv2d_input``: it hands ATen an expanded dummy input, which the
        # oneDNN backward materialises with a full-size copy on every call.)
        weight, (stride, padding, dilation, groups) = ctx.weight, ctx.args
        extra = [n - ((m - 1) * s - 2 * p + d * (k - 1) + 1) for n, m, s, p, d, k in
                 zip(ctx.x_shape[2:], grad.shape[2:], stride, padding, dilation, weight.shape[2:])]
        gx = F.conv_transpose2d(grad, weight, None, stride, padding, extra, groups, dilation)
        return gx, None, None, None, None, None, None


class FrozenLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W, b constants: jvp ẏ = ẋ Wᵀ, vjp x̄ = ȳ W."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight
        return F.linear(x, weight, bias)

    @staticmethod
    def jvp(ctx, x_t, *_):
        return F.linear(x_t, ctx.weight)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.weight, None, None


def _conv_forward(module: nn.Conv2d):
    def forward(x):
        return FrozenConv.apply(x, module.weight, module.bias, module.stride, module.padding,
                                module.dilation, module.groups)
    return forward


def _linear_forward(module: nn.Linear):
    def forward(x):
        return FrozenLinear.apply(x, module.weight, module.bias)
    return forward


def bn_affine(module: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = x·scale + shift per channel: scale = γ/√(σ²+ε), shift = β − μ·scale."""
    invstd = torch.rsqrt(module.running_var + module.eps)
    scale = invstd if module.weight is None else module.weight * invstd
    shift = -module.running_mean * scale
    if module.bias is not None:
        shift = shift + module.bias
    return scale.detach(), shift.detach()


def bn_affine_views(module: nn.BatchNorm2d):
    """``views(ndim)``: :func:`bn_affine`'s (scale, shift) viewed to broadcast along dimension 1
    of an ``ndim``-d input — 4 for BatchNorm2d, 2 or 3 for BatchNorm1d ([B, C] or [B, C, L]) —
    made once per ``ndim``."""
    scale, shift = bn_affine(module)
    made = {}

    def views(ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if ndim not in made:
            made[ndim] = channel_shaped(scale, ndim), channel_shaped(shift, ndim)
        return made[ndim]
    return views


def _bn_forward(module: nn.BatchNorm2d):
    views = bn_affine_views(module)

    def forward(x):
        scale, shift = views(x.dim())
        # a product, then the shift added in place: ``torch.addcmul(shift, x, scale)`` does the
        # same in one kernel but, with its first argument broadcast, runs ~3x slower on CPU
        return (x * scale.to(x.dtype)).add_(shift.to(x.dtype))
    return forward


def layer_kind(module: nn.Module) -> str | None:
    """'conv' | 'linear' | 'bn' | 'bn_batch' for the layers whose forward can be replaced by a
    frozen one (exact types: a subclass may compute something else; zero-padded convolutions
    with explicit padding; 'bn': BatchNorm2d / BatchNorm1d with running statistics, 'bn_batch': BatchNorm
    without them, which normalises with the statistics of its input batch —
    :func:`batch_statistics`), else None."""
    if type(module) is nn.Conv2d:
        ok = module.padding_mode == "zeros" and not isinstance(module.padding, str)
        return "conv" if ok else None
    if type(module) is nn.Linear:
        return "linear"
    if type(module) in (nn.BatchNorm2d, nn.BatchNorm1d):
        if module.running_mean is None and module.running_var is None:
            return "bn_batch"
        return "bn" if module.track_running_stats else None
    return None


def uses_batch_statistics(model: nn.Module) -> bool:
    """True when a BatchNorm layer of ``model`` normalises with the statistics of its input
    batch (training mode, or no running statistics): the outputs of a batch then depend on
    which samples it holds, so it must not be split."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and
               (m.training or (m.running_mean is None and m.running_var is None))
               for m in model.modules())


def batch_statistics(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``inplace``: ``model`` itself, for a caller that owns a copy already)
    in eval mode (dropout off) whose BatchNorm layers normalise with the
    statistics of each batch they see, as in training, and never update running statistics
    (``torch.func.replace_all_batch_norm_modules_``: running statistics removed). Saliencies
    computed on it are those of ``saliency.batchnorm=batch`` (README, "BatchNorm statistics")."""
    work = (model if inplace else copy.deepcopy(model)).eval()
    torch.func.replace_all_batch_norm_modules_(work)
    return work


def _swap(model: nn.Module, builders: dict, swapped: list) -> None:
    for module in model.modules():
        kind = layer_kind(module)
        if kind in builders:
            swapped.append((module, module.__dict__.get("forward")))
            module.forward = builders[kind](module)


def eval_batchnorm_as_affine(model: nn.Module):
    """Within the block, every BatchNorm2d / BatchNorm1d with running statistics runs as
    x·scale + shift (:func:`bn_affine`), what it computes in eval mode (parameters frozen, as in
    :func:`swapped_forwards`)."""
    return swapped_forwards(model, {"bn": _bn_forward})


@contextlib.contextmanager
def swapped_forwards(model: nn.Module, builders: dict):
    """Within the block, every Conv2d / Linear / BatchNorm whose :func:`layer_kind` has a
    builder runs ``builders[kind](module)`` as its forward (the others keep theirs), and
    the model's parameters are frozen (gate-space derivatives never need weight gradients).
    Everything is restored on exit, also after an exception, including a forward an enclosing
    block had swapped in (nested blocks unwind in order)."""
    swapped, frozen = [], []
    try:
        with torch.no_grad():   # builders precompute constants (BatchNorm scale / shift)
            _swap(model, builders, swapped)
        for p in model.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(p)
        yield model
    finally:
        for module, previous in swapped:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        for p in frozen:
            p.requires_grad_(True)


@contextlib.contextmanager
def lean_layers(model: nn.Module):
    """Within the block, ``model`` (in eval mode) computes the same outputs with lean layers."""
    if model.training:
        raise ValueError("lean_layers needs the model in eval mode")
    if getattr(model, "_sosp_lean", False):  # already inside lean_layers: nothing to do
        yield model
        return
    with swapped_forwards(model, {"conv": _conv_forward, "linear": _linear_forward,
                                  "bn": _bn_forward}):
        model._sosp_lean = True
        try:
            yield model
        finally:
            del model._sosp_lean
