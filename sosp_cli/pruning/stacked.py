"""Stacked dual evaluation: logits z and the directional derivative J·d in one forward pass.

SOSP-H needs, per batch, z, J·d (a forward-mode product along the gate direction d, DESIGN §3)
and two reverse products through the *primal* Jacobian: g = Jᵀ(p − y)/N and Q·d = Jᵀ R (J d)/N.
Forward-mode AD (``torch.autograd.forward_ad``) computes J·d alongside z, but pays per layer for
dual-tensor bookkeeping, and the two reverse products then need two backward passes.

Here the network runs once on a batch of 2B rows ``[x; 0]``: rows 0..B−1 carry the primal
activations, rows B..2B−1 the tangent. Every operation acts on the tangent rows as its
linearisation at the primal rows:

- linear maps with no bias, row by row (convolutions, linear layers, average pools, sums of two
  activations, concatenation along channels, flatten): unchanged;
- biases (convolution, linear, eval-mode BatchNorm shift) are added to the primal rows only;
- BatchNorm without running statistics (``saliency.batchnorm=batch``) normalises with the
  statistics of the primal rows, and maps the tangent rows by its Jacobian there
  (:class:`_BatchStatNorm`); such a batch must not be split;
- ReLU / ReLU6 / Hardtanh pass the tangent where the *primal* input is inside the linear
  range; max pooling gathers the tangent at the primal argmax; other element-wise functions
  (tanh, sigmoid, softplus, SiLU, GELU, ...) multiply the tangent by f'(primal);
- a product a·b of two activations (a squeeze-and-excitation block's x·s(x), broadcasting):
  primal a₀·b₀, tangent a₁·b₀ + a₀·b₁ (the product rule), backward ḡ_k·b₀ and ḡ_k·a₀ for each
  row block; a product with a constant (a number, a layer scale) or a quotient by one is a
  linear map, unchanged; differences and negations of activations are linear too;
- adding or subtracting a constant (``x + 3``, ``1 − x``) is affine: its linear part on all
  rows, the offset on the primal rows only, as a bias;
- a gradient hook registered on an activation (``Tensor.register_hook``) is called on each
  row block's gradient separately, as on the two backward passes of forward-mode AD;
- gate site of structure s (DESIGN §2): primal ``c·x₀``, tangent ``c·x₁ + d·x₀`` (product rule).
  When the consumer is a convolution or linear layer L and d = 1 on all its input channels
  (SOSP-H's direction), L(x₁ + x₀) = L(x₁) + L(x₀): the layer adds its own primal output
  (without bias) to its tangent rows, one in-place addition instead of a copied, injected input.

Before the first gate site the tangent is zero, so the pass starts on the B rows of x alone:
every function runs unchanged on a B-row activation (it has no tangent to carry, and nothing
before a gate site depends on the gates), a gate site reading one makes the stacked rows
``[x₀; d·x₀]``, and a B-row activation that meets a stacked one in a row-wise linear function
(a residual addition, a concatenation) joins it as ``[x₀; 0]``. A convolution or linear layer L
at such a site with d = 1 computes L(x₀) once for both row blocks (:class:`_FirstInjectingConv`):
the layers before the first gate sites and the tangent of the first gated layers cost nothing
(SOSP-H's pass: a first-order pass's arithmetic on the primal rows, and less than that on the
tangent rows; ``tests/test_bench.py`` checks the FLOPs).

The backward pass needs the primal rows only (ReLU masks, gate inputs, batch-statistics
BatchNorm inputs): ReLU / ReLU6 / Hardtanh keep their output's primal rows, which the gate site
reading that output shares, BatchNorm a copy of its input's (:func:`_primal_rows`), smooth
element-wise functions f'(x₀), products both factors' primal rows, max pooling its argmax,
average pooling nothing; each rule's
backward returns a tensor of its own (autograd then sums gradients in place). So the 2B stacked
rows are freed during the forward pass and a stacked pass keeps what a first-order pass on its
primal rows keeps (``tests/test_stacked.py`` checks that nothing saved holds 2B rows).

The custom gate function's backward sends each row block's cotangent to its own row of a
[2, S] gate tensor through the primal Jacobian only (the ``d·x₀`` term is the direction, not a
function of the gates), so one backward pass with the stacked cotangent ``[(p − y)/N; R J d/N]``
returns g (row 0) and Q·d (row 1) — exactly the two products, no second-order cross term.

Every PyTorch function the model calls while stacked is checked against a list of functions
whose rule above is known; anything else (BatchNorm3d, attention, a quotient by an
activation, indexing along the batch, ...) raises :class:`Unsupported` and
the caller falls back to forward-mode AD, which is always exact. The brute-force tests check
both paths on every registered model. (:mod:`.paired` applies the same rules with the two row
blocks as two tensors of B rows: ``method.stack_batch=pair``.)
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..structures import StructureSet
from ..utils import load_jvp_decompositions
from .lean import FrozenConv, FrozenLinear, bn_affine_views, channel_shaped, layer_kind, swapped_forwards


class Unsupported(Exception):
    """The model calls a function without a stacked-dual rule (use forward-mode AD instead)."""


def _split(t: torch.Tensor) -> torch.Tensor:
    """[2B, ...] → [2, B, ...] (a view: row block 0 = primal, row block 1 = tangent)."""
    return torch.unflatten(t, 0, (2, -1))


def _primal(t: torch.Tensor) -> torch.Tensor:
    """Rows 0..B−1 of a stacked [2B, ...] tensor (a view; one slice, cheaper than ``_split(t)[0]``)."""
    return t[:t.shape[0] // 2]


def _tangent(t: torch.Tensor) -> torch.Tensor:
    """Rows B..2B−1 of a stacked [2B, ...] tensor (a view)."""
    return t[t.shape[0] // 2:]


class _Gate(torch.autograd.Function):
    """Gate site at c = 1 (DESIGN §2; the stacked pass is only ever evaluated there):
    out₀ = c·x₀ = x₀, out₁ = c·x₁ + d·x₀ = x₁ + d·x₀. With ``direction`` None the forward is
    the identity (a view) and the consuming layer adds the injection to its output instead
    (:func:`_add_primal_to_tangent`).

    Backward (per row block k, with ḡ_k its cotangent): x̄_k = c·ḡ_k = ḡ_k and
    c̄_k = Σ_{rows, positions} ḡ_k·x₀ — the primal vector-Jacobian product for each block."""

    @staticmethod
    def forward(ctx, x, gates2, direction):
        ctx.save_for_backward(_primal_rows(x))
        if direction is None:
            return x.view_as(x)
        xs, out = _split(x), torch.empty_like(x)
        outs = _split(out)
        outs[0].copy_(xs[0])
        torch.addcmul(xs[1], xs[0], channel_shaped(direction, x.dim(), 1), out=outs[1])
        return out

    @staticmethod
    def backward(ctx, grad):
        (x0,) = ctx.saved_tensors
        return grad, _gate_gradients(grad, x0), None


class _FirstGate(torch.autograd.Function):
    """Gate site reading an activation x₀ of B rows (no tangent yet, module docstring):
    out = [c·x₀; d·x₀] = [x₀; d·x₀] at c = 1. Backward as :class:`_Gate`'s:
    c̄_k = Σ ḡ_k·x₀ per row block, x̄ = ḡ₀ (the primal block: x₀ has no tangent rows)."""

    @staticmethod
    def forward(ctx, x, gates2, direction):
        ctx.save_for_backward(x.detach().clone())   # the model may still change x in place
        return torch.cat([x, x * channel_shaped(direction, x.dim(), 1)])

    @staticmethod
    def backward(ctx, grad):
        (x0,) = ctx.saved_tensors
        return _primal(grad), _gate_gradients(grad, x0), None


def _gate_gradients(grad: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """c̄_k = Σ_{rows, positions} ḡ_k·x₀ for both row blocks k of the stacked cotangent ``grad``
    at a gate site's output: [2, C], the primal vector-Jacobian product for each block."""
    dims = (1,) + tuple(range(3, grad.dim() + 1))
    return torch.mul(_split(grad), x0).sum(dims)


class _FirstInjectingConv(torch.autograd.Function):
    """Gate site with d = 1 on every input channel of a bias-free convolution L whose input x₀
    has B rows (no tangent yet): primal L(c·x₀) = L(x₀), tangent L(d·x₀) = L(x₀) at c = 1 —
    one convolution of B rows, output ``[L(x₀); L(x₀)]``. Backward: x̄_k = Lᵀ(ḡ_k) for both row
    blocks (:class:`.lean.FrozenConv`'s input gradient) and c̄_k = Σ x̄_k·x₀; x₀'s own
    gradient is the primal block's, as at :class:`_FirstGate`."""

    @staticmethod
    def forward(ctx, x, gates, weight, stride, padding, dilation, groups):
        y = FrozenConv.forward(ctx, x, weight, None, stride, padding, dilation, groups)
        ctx.save_for_backward(x.detach().clone())
        return torch.cat([y, y])

    @staticmethod
    def backward(ctx, grad):
        (x0,) = ctx.saved_tensors
        gx = FrozenConv.backward(ctx, grad)[0]
        return (_primal(gx), _gate_gradients(gx, x0)) + (None,) * 5


class _FirstInjectingLinear(torch.autograd.Function):
    """:class:`_FirstInjectingConv` for a bias-free linear layer: output ``[x₀Wᵀ; x₀Wᵀ]``,
    backward x̄_k = ḡ_k W (:class:`.lean.FrozenLinear`'s input gradient), c̄_k = Σ_rows x̄_k·x₀."""

    @staticmethod
    def forward(ctx, x, gates, weight):
        y = FrozenLinear.forward(ctx, x, weight, None)
        ctx.save_for_backward(x.detach().clone())
        return torch.cat([y, y])

    @staticmethod
    def backward(ctx, grad):
        (x0,) = ctx.saved_tensors
        gx = FrozenLinear.backward(ctx, grad)[0]
        return _primal(gx), _gate_gradients(gx, x0), None


def _add_primal_to_tangent(y: torch.Tensor) -> torch.Tensor:
    """y₁ += y₀ in place, for a bias-free linear layer L whose input is a gate site with d = 1
    on every input channel: the gated tangent input is x₁ + x₀, and L(x₁ + x₀) = L(x₁) + L(x₀)
    = y₁ + y₀. One addition on the output replaces the copy and the injection of :class:`_Gate`
    on the input. The added term is the direction, not a function of the gates, so the
    backward pass is the layer's own (identity here)."""
    _tangent(y).add_(_primal(y))   # not ``+=`` on the view: that also assigns the result back (a copy)
    return y


class _InjectingConv(FrozenConv):
    """:class:`.lean.FrozenConv` (no bias) followed by :func:`_add_primal_to_tangent`."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        return _add_primal_to_tangent(FrozenConv.forward(ctx, x, weight, None, stride, padding, dilation, groups))


class _InjectingLinear(FrozenLinear):
    """:class:`.lean.FrozenLinear` (no bias) followed by :func:`_add_primal_to_tangent`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        return _add_primal_to_tangent(FrozenLinear.forward(ctx, x, weight, None))


class _Diagonal(torch.autograd.Function):
    """An element-wise function f on stacked rows: its Jacobian at the primal rows is a
    diagonal D = diag(f′(x₀)). Primal y₀ = f(x₀) (computed by the caller), tangent D·x₁, backward
    D·ḡ_k for both row blocks. ``apply_d(v, saved, out)`` writes D·v into ``out`` from ``saved``,
    one B-row tensor of the caller's (broadcast over the row blocks), the only thing kept for
    the backward pass: the stacked rows are freed as soon as the forward pass is done with them,
    so a stacked pass holds what a first-order pass on its primal rows holds. ``y0`` None: D·x₀
    is the primal (ReLU), so one call of ``apply_d`` on both row blocks gives primal and tangent.

    Each result is written into a tensor of its own: ATen's node for ``threshold_backward`` on
    the [2, B, ...] view (the earlier ReLU rule) returned its input gradient as a view, which
    autograd cannot accumulate into in place, so at every residual branch point the two 2B-row
    gradients were added into a third tensor (8 of the 9 per stage in ResNet-56)."""

    @staticmethod
    def forward(ctx, x, y0, saved, apply_d):
        xs, out = _split(x), torch.empty_like(x)
        outs = _split(out)
        if y0 is None:
            apply_d(xs, saved, outs)
        else:
            outs[0].copy_(y0)
            apply_d(xs[1], saved, outs[1])
        ctx.save_for_backward(saved)
        ctx.apply_d = apply_d
        return out

    @staticmethod
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        out = torch.empty_like(grad)   # not a view: autograd can accumulate into it in place
        ctx.apply_d(_split(grad), saved, _split(out))
        return out, None, None, None


def _relu_mask(v, y0, out):
    """v·1[x₀ > 0] = ``threshold_backward(v, y₀, 0)`` with y₀ = relu(x₀) (y₀ > 0 exactly where
    x₀ > 0): one fused ATen kernel; for v = x₀ it is relu(x₀) itself."""
    torch.ops.aten.threshold_backward.grad_input(v, y0, 0.0, grad_input=out)


def _clamp_mask(lo: float, hi: float):
    """v·1[lo < x₀ < hi] from y₀ = clamp(x₀, lo, hi) (lo < y₀ < hi exactly where lo < x₀ < hi):
    ``hardtanh_backward``, one fused ATen kernel."""
    def apply_d(v, y0, out):
        torch.ops.aten.hardtanh_backward.grad_input(v, y0, lo, hi, grad_input=out)
    return apply_d


def _slope(v, slope, out):
    """v·f′(x₀), f′(x₀) given."""
    torch.mul(v, slope, out=out)


def split_inplace(args: tuple, kwargs: dict) -> tuple[tuple, bool]:
    """(args without a trailing positional ``inplace``, whether the activation was called in
    place): ``F.silu(x, True)``, ``F.elu(x, 1.0, True)``, ``inplace=True`` (popped from ``kwargs``)."""
    inplace = bool(kwargs.pop("inplace", False))
    if args and isinstance(args[-1], bool):
        inplace, args = inplace or args[-1], args[:-1]
    return args, inplace


def in_place(mode, x, out, inplace: bool):
    """The result of an activation: with ``inplace``, written into its input ``x``, which is
    returned (``mode.write_back``) — a model may go on with ``x`` and drop the result
    (``self.relu(x)`` as a statement, ``x.relu_()``); the rules here compute new tensors."""
    return mode.write_back(x, out) if inplace and out is not x else out


def _relu(mode, x, inplace=False):
    """ReLU on stacked rows (:class:`_Diagonal` with D = 1[x₀ > 0]); it keeps y₀ = relu(x₀), B
    rows of their own, which the output remembers for a gate site reading it (:func:`_primal_rows`)."""
    x = mode.check(x)
    with torch.no_grad():
        y0 = torch.relu(_primal(x))
    return in_place(mode, x, _kept_primal(_Diagonal.apply(x, None, y0, _relu_mask), y0), inplace)


def _primal_rows(x: torch.Tensor) -> torch.Tensor:
    """The primal rows of the stacked ``x`` as a tensor of their own, for a backward pass: the
    copy :func:`_relu` made of its output's (if ``x`` is that output, unchanged since), else a
    new one. (A view would keep all 2B rows of ``x`` alive until the backward pass.)"""
    kept = getattr(x, "_sosp_primal", None)
    if kept is not None and kept[1] == x._version:
        return kept[0]
    return _primal(x).detach().clone()


def _kept_primal(out: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    """``out`` remembers its primal rows ``y0`` (a tensor of their own) for a gate site reading
    it (:func:`_primal_rows`), as long as ``out`` is not changed in place."""
    out._sosp_primal = (y0, out._version)
    return out


def _clamped(mode, x, lo: float, hi: float, inplace: bool):
    """Hardtanh / ReLU6 (:class:`_Diagonal` with D = 1[lo < x₀ < hi]): ReLU's rule with an
    upper bound; it keeps y₀ = clamp(x₀, lo, hi), shared with a gate site reading the output."""
    x = mode.check(x)
    with torch.no_grad():
        y0 = torch.clamp(_primal(x), lo, hi)
    return in_place(mode, x, _kept_primal(_Diagonal.apply(x, y0, y0, _clamp_mask(lo, hi)), y0), inplace)


def _hardtanh(mode, x, min_val=-1.0, max_val=1.0, inplace=False):
    return _clamped(mode, x, float(min_val), float(max_val), inplace)


def _relu6(mode, x, inplace=False):
    return _clamped(mode, x, 0.0, 6.0, inplace)


class _MaxPool(torch.autograd.Function):
    """Max pooling: primal y₀ = maxpool(x₀) with its argmax i (flat positions in each input
    plane), tangent x₁ gathered at i; backward: each row block's ḡ_k scattered to i and summed
    (overlapping windows add up, as in ATen's backward). Keeps i only — not the input, which
    ATen's max-pool node would keep, and which here is the 2B stacked rows."""

    @staticmethod
    def forward(ctx, x, args, kwargs):
        xs = _split(x)
        y0, idx = F.max_pool2d(xs[0], *args, **kwargs, return_indices=True)
        y1 = xs[1].flatten(2).gather(2, idx.flatten(2)).view_as(y0)
        ctx.save_for_backward(idx)
        ctx.in_shape = x.shape
        return torch.cat([y0, y1])

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.in_shape)   # a tensor of its own (accumulated in place)
        index = idx.flatten(2).expand((2,) + idx.flatten(2).shape)
        _split(out).flatten(3).scatter_add_(3, index, _split(grad).flatten(3))
        return out, None, None


def _max_pool2d(mode, x, *args, **kwargs):
    if kwargs.pop("return_indices", False) or (len(args) > 5 and args[5]):
        raise Unsupported("max_pool2d(return_indices=True)")
    return _MaxPool.apply(mode.check(x), args[:5], kwargs)


def _avg_pool2d_backward(grad, x, kernel_size, stride=None, padding=0, ceil_mode=False,
                         count_include_pad=True, divisor_override=None):
    """Input gradient of ``F.avg_pool2d(x, ...)`` (same arguments), by ATen's kernel."""
    return torch.ops.aten.avg_pool2d_backward(grad, x, kernel_size, [] if stride is None else stride,
                                              padding, ceil_mode, count_include_pad, divisor_override)


def _adaptive_avg_pool2d_backward(grad, x, output_size):
    """Input gradient of ``F.adaptive_avg_pool2d(x, output_size)``, by ATen's kernel."""
    return torch.ops.aten._adaptive_avg_pool2d_backward(grad, x)


class _AvgPool(torch.autograd.Function):
    """Average pooling, a linear map applied row by row: both row blocks as they are. ATen's
    nodes keep their input — here the 2B stacked rows — only for its shape, so the backward
    runs ATen's backward kernel on an uninitialised tensor of that shape and layout (the input gradient
    of a linear map does not depend on the point), keeping no activation."""

    @staticmethod
    def forward(ctx, x, func, backward, args, kwargs):
        ctx.spec = (backward, args, kwargs, x.shape, x.stride())
        return func(x, *args, **kwargs)

    @staticmethod
    def backward(ctx, grad):
        backward, args, kwargs, shape, stride = ctx.spec
        like_x = torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device)
        return backward(grad, like_x, *args, **kwargs), None, None, None, None


def _pooled(func, backward):
    def handler(mode, x, *args, **kwargs):
        return _AvgPool.apply(mode.check(x), func, backward, args, kwargs)
    return handler


def value_and_slope(func, x0: torch.Tensor, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x₀) and f′(x₀) = f′(x₀)·1 of an element-wise f in one forward-mode evaluation."""
    load_jvp_decompositions()
    return torch.func.jvp(lambda t: func(t, *args, **kwargs), (x0,), (torch.ones_like(x0),))


def _elementwise(func):
    """Smooth element-wise f: y₀ = f(x₀) and f′(x₀) by forward-mode AD of f at x₀
    (:class:`_Diagonal` with D = diag(f′(x₀)), which it keeps)."""

    def handler(mode, x, *args, **kwargs):
        args, inplace = split_inplace(args, kwargs)
        x = mode.check(x)
        x0 = _primal(x).detach()
        # f(x₀) and f′(x₀) = f′(x₀)·1 in one forward-mode evaluation: nothing saved, no backward
        y0, slope = value_and_slope(func, x0, args, kwargs)
        return in_place(mode, x, _Diagonal.apply(x, y0, slope, _slope), inplace)
    return handler


def _register_hook(mode, x, hook):
    """A gradient hook on a stacked activation is called once per row block, with that block's
    gradient: what it sees, and returns, on the forward-mode AD path's two backward passes."""
    mode.check(x)

    def per_block(grad):
        blocks = [hook(g) for g in _split(grad)]
        if all(b is None for b in blocks):
            return None
        return torch.cat([g if b is None else b for g, b in zip(_split(grad), blocks)])
    with torch._C.DisableTorchFunction():
        return x.register_hook(per_block)


_ELEMENTWISE = [torch.tanh, torch.Tensor.tanh, torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid,
                F.tanh, F.softplus, F.silu, F.gelu, F.elu, F.leaky_relu, F.hardswish,
                F.hardsigmoid, F.mish]


class _Product(torch.autograd.Function):
    """a·b of two stacked activations, broadcasting as ``torch.mul`` does (a squeeze-and-excitation
    block's x·s(x), a square): the product rule at the primal rows, out₀ = a₀·b₀ and
    out₁ = a₁·b₀ + a₀·b₁; backward, for each row block k, the primal vector-Jacobian product
    ā_k = ḡ_k·b₀ and b̄_k = ḡ_k·a₀, each summed over the dimensions it was broadcast along. Keeps
    a₀ and b₀ (B rows each), no stacked rows."""

    @staticmethod
    def forward(ctx, a, b):
        a0, b0 = _primal_rows(a), _primal_rows(b)
        ctx.save_for_backward(a0, b0)
        return torch.cat([a0 * b0, torch.addcmul(_tangent(a) * b0, a0, _tangent(b))])

    @staticmethod
    def backward(ctx, grad):
        a0, b0 = ctx.saved_tensors
        g = _split(grad)
        return tuple((g * other).sum_to_size((2,) + own.shape).flatten(0, 1)
                     for own, other in ((a0, b0), (b0, a0)))


def _constant(mode, t) -> bool:
    """``t`` is a constant of the pass: a number, or a tensor that is no activation — neither
    stacked rows with an autograd history (a stacked activation descends from the gates, so a
    layer scale of 2B channels is a constant) nor B rows (an activation without a tangent yet;
    a constant of B rows read as one is exact too: its tangent is 0)."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return True
    return not (mode.stacked(t) and t.grad_fn is not None) and 2 * t.shape[0] != mode.rows


def _detached(t):
    """A constant as an operand: a tensor detached (its gradient is not needed, and autograd
    would keep the stacked rows for it), a number as it is."""
    return t.detach() if isinstance(t, torch.Tensor) else t


def _activation_and_constant(mode, func, a, b):
    """(activation, constant) of a binary function with one constant operand, else None (both
    activations); Unsupported if neither operand carries a tangent."""
    ca, cb = _constant(mode, a), _constant(mode, b)
    if not (ca or cb):
        return None
    x = b if ca else a
    if ca and cb or not mode.stacked(x):
        raise Unsupported(f"{_name(func)} of tensors that are not activations")
    return x, (a if ca else b)


def _mul(mode, a, b):
    """a·b: the product rule (:class:`_Product`) when both are activations (one of B rows as
    [x₀; 0]); with a constant (:func:`_constant`: a number, a layer scale) a linear map of the
    stacked rows, as it is."""
    pair = _activation_and_constant(mode, torch.mul, a, b)
    with torch._C.DisableTorchFunction():
        if pair is None:
            return _Product.apply(*mode.joined((a, b)))
        return torch.mul(pair[0], _detached(pair[1]))


def _div(mode, a, b, rounding_mode=None):
    """a / c with a constant c (:func:`_constant`): a linear map of the stacked rows, as it is.
    A quotient by an activation or with rounding has no rule."""
    pair = _activation_and_constant(mode, torch.div, a, b)
    if pair is None or pair[0] is not a or rounding_mode is not None:
        raise Unsupported("div by an activation, of a constant, or with rounding")
    with torch._C.DisableTorchFunction():
        return torch.div(a, _detached(b))


def shift_rule(activation_and_constant, apply):
    """The handler maker ``shift(func)`` of additions and subtractions (:data:`_SHIFTS`) of a
    representation: two activations, ``mode.linear``; an activation x and a constant c,
    ``apply(mode, func, x, c, call)`` with ``call(t, k)`` = ``func`` with t in x's place and k in
    c's (an affine function of x: ``call(t, 0)`` its linear part, ``call(0, c)`` its offset)."""
    def shift(func):
        def handler(mode, a, b, **kwargs):
            pair = activation_and_constant(mode, func, a, b)
            if pair is None:
                return mode.linear(func, (a, b), kwargs)
            x = pair[0]

            def call(t, k):
                with torch._C.DisableTorchFunction():
                    out = func(t, k, **kwargs) if x is a else func(k, t, **kwargs)
                if not isinstance(out, torch.Tensor) or (t is x and (out.dim() == 0 or out.shape[0] != x.shape[0])):
                    raise Unsupported(f"{_name(func)} with a constant across the batch")
                return out
            return apply(mode, func, x, _detached(pair[1]), call)
        return handler
    return shift


def zeros_of(c):
    """The zero of a constant operand: zeros of its shape, or 0 for a number."""
    return torch.zeros_like(c) if isinstance(c, torch.Tensor) else 0


def _shifted(mode, func, x, c, call):
    """Addition or subtraction with a constant c (:func:`_constant`; ``x + 3``, ``1 − x``,
    ``torch.add(x, c, alpha=a)``): an affine function f(x) = L(x) + f(0) of the activation x. Its
    linear part L (``func`` with c as zeros) on all stacked rows, tracked — the tangent's rule and
    the backward's — and the offset f(0) added to the primal rows only, untracked, as a bias
    (:func:`_add_to_primal_rows`)."""
    offset = call(torch.zeros((), dtype=x.dtype, device=x.device), c)
    return _add_to_primal_rows(call(x, zeros_of(c)), offset)


# binary functions with a rule for a constant operand (:func:`_shift`, :func:`_mul`, :func:`_div`)
_SHIFTS = (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.sub,
           torch.Tensor.sub, torch.Tensor.__sub__, torch.Tensor.__rsub__)
_DIVS = (torch.div, torch.Tensor.div, torch.Tensor.__truediv__)


def _in_place_call(handler):
    """The handler of an activation's in-place variant (``relu_``, ``hardtanh_``)."""
    return lambda mode, x, *args: handler(mode, x, *args, inplace=True)


def handler_table(relu, hardtanh, relu6, max_pool2d, pooled, register_hook, elementwise, mul,
                  div, shift) -> dict:
    """PyTorch function → rule ``handler(mode, x, *args, **kwargs)`` of a representation of the
    dual activations (the stacked rows here; :mod:`.paired`), from its rules: ``pooled(func,
    backward)`` and ``elementwise(func)`` make the handlers of average pooling and of the smooth
    functions :data:`_ELEMENTWISE`; ``mul(mode, a, b)`` is the product and ``div`` the quotient
    (out of place); ``shift(func)`` makes the handler of an addition or subtraction
    (:data:`_SHIFTS`), with a constant or of two activations."""
    return {torch.mul: mul, torch.Tensor.mul: mul, torch.Tensor.__mul__: mul, torch.Tensor.__rmul__: mul,
            **{f: div for f in _DIVS}, **{f: shift(f) for f in _SHIFTS},
            F.relu: relu, torch.relu: relu, torch.Tensor.relu: relu,
            **{f: _in_place_call(relu) for f in (F.relu_, torch.relu_, torch.Tensor.relu_)},
            F.hardtanh: hardtanh, F.hardtanh_: _in_place_call(hardtanh), F.relu6: relu6, F.max_pool2d: max_pool2d,
            F.avg_pool2d: pooled(F.avg_pool2d, _avg_pool2d_backward),
            F.adaptive_avg_pool2d: pooled(F.adaptive_avg_pool2d, _adaptive_avg_pool2d_backward),
            torch.Tensor.register_hook: register_hook,
            **{f: elementwise(f) for f in _ELEMENTWISE}}


_HANDLERS = handler_table(_relu, _hardtanh, _relu6, _max_pool2d, _pooled, _register_hook, _elementwise, _mul,
                          _div, shift_rule(_activation_and_constant, _shifted))

# functions that act row by row and linearly on activations: valid on the stacked rows as they
# are, provided every tensor argument is an activation and the result keeps the row count
# (out-of-place sums and differences have handlers, :data:`_SHIFTS`, which call ``mode.linear``
# for two activations)
_ROWWISE_LINEAR = {
    torch.Tensor.add_, torch.Tensor.__iadd__,
    torch.neg, torch.Tensor.neg, torch.Tensor.__neg__, torch.cat, torch.concat, torch.flatten, torch.Tensor.flatten,
    torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.contiguous,
    torch.Tensor.mean, torch.mean, torch.Tensor.sum, torch.sum, torch.Tensor.squeeze,
    torch.Tensor.unsqueeze,
}
# sums: linear in the activations only with two of them (one: a constant shift, :data:`_SHIFTS`)
_ADD = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__,
        torch.Tensor.__radd__, torch.Tensor.__iadd__}
# attribute reads that do not touch values (``x.T``, ``x.data``, ... are not among them)
# (``grad_fn``, ``is_leaf``: read by instrumentation such as ``FlopCounterMode``'s module tracker)
_ATTRIBUTES = {torch.Tensor.shape, torch.Tensor.dtype, torch.Tensor.device, torch.Tensor.ndim,
               torch.Tensor.is_cuda, torch.Tensor.requires_grad, torch.Tensor.layout,
               torch.Tensor.grad_fn, torch.Tensor.is_leaf}
_METADATA = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.__len__,
             torch.Tensor.is_floating_point, torch.Tensor.is_contiguous, torch.Tensor.__format__}


class _StackedMode(TorchFunctionMode):
    """Dispatches the model's functional calls to their stacked-dual rules (module docstring):
    ``rows`` = 2B rows make a stacked activation; a call on none runs as it is (B-row
    activations before the first gate site, constants)."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows

    def stacked(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == self.rows

    def check(self, x):
        if not self.stacked(x):
            raise Unsupported("an element-wise function applied to a tensor that is not an activation")
        return x

    def write_back(self, x, out):
        """``x`` changed in place to ``out`` (an activation called in place, :func:`in_place`);
        the stacked rules keep copies of what they need for the backward pass, not ``x``. The
        primal rows ``out`` remembers for a gate site (:func:`_kept_primal`) are now ``x``'s."""
        with torch._C.DisableTorchFunction():
            x.copy_(out)
        kept = getattr(out, "_sosp_primal", None)
        return x if kept is None or kept[1] != out._version else _kept_primal(x, kept[0])

    def joined(self, items):
        """``items`` (args or kwargs, nested) with every B-row tensor — no tangent — as the
        stacked ``[x₀; 0]``, to meet stacked activations in a row-wise linear function."""
        if isinstance(items, dict):
            return {k: self.joined(v) for k, v in items.items()}
        if isinstance(items, (list, tuple)):
            return type(items)(self.joined(v) for v in items)
        if isinstance(items, torch.Tensor) and items.dim() > 0 and 2 * items.shape[0] == self.rows:
            return torch.cat([items, torch.zeros_like(items)])
        return items

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA or getattr(func, "__self__", None) in _ATTRIBUTES:
            return func(*args, **kwargs)
        if not (args and self.stacked(args[0])) and \
                not any(self.stacked(a) for a in _flat(args) + _flat(list(kwargs.values()))):
            # no tangent yet: the function as it is; it must not make a tensor of 2B rows,
            # which later calls would read as stacked
            out = func(*args, **kwargs)
            if any(self.stacked(t) for t in _flat([out])):
                raise Unsupported(f"{_name(func)} making {self.rows} rows from a batch of {self.rows // 2}")
            return out
        return dispatch(self, _HANDLERS, func, args, kwargs)

    def linear(self, func, args, kwargs):
        """A function linear in the activations, on the stacked rows as they are."""
        if func is torch.Tensor.add_ and not self.stacked(args[0]):
            raise Unsupported("Tensor.add_ of a stacked activation into one without a tangent")
        args, kwargs = self.joined(args), self.joined(kwargs)
        tensors = [a for a in _flat(args) + _flat(list(kwargs.values())) if isinstance(a, torch.Tensor)]
        out = func(*args, **kwargs)
        if not tensors or (func in _ADD and len(tensors) < 2) or any(t.dim() == 0 or t.shape[0] != self.rows for t in tensors) or \
                not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != self.rows:
            raise Unsupported(f"{_name(func)} with a constant or across the batch")
        return out


def dispatch(mode, handlers: dict, func, args, kwargs):
    """The rule of ``func`` on dual activations, in ``mode`` (a representation's TorchFunctionMode):
    its handler, eval-mode dropout (the identity), ``mode.linear(func, args, kwargs)`` for the
    functions that act row by row and linearly (:data:`_ROWWISE_LINEAR`); anything else raises
    :class:`Unsupported`."""
    handler = handlers.get(func)
    if handler is not None:
        return handler(mode, *args, **kwargs)
    if func is F.dropout and not kwargs.get("training", args[2] if len(args) > 2 else True):
        return args[0]
    if func in _ROWWISE_LINEAR:
        return mode.linear(func, args, kwargs)
    raise Unsupported(_name(func))


def _flat(items) -> list:
    out = []
    for a in items:
        out.extend(_flat(a) if isinstance(a, (list, tuple)) else [a])
    return out


def _name(func) -> str:
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", "") == "__get__" and hasattr(owner, "__name__"):
        return f"Tensor.{owner.__name__} (attribute)"
    return getattr(func, "__qualname__", None) or repr(func)


def _add_to_primal_rows(y: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Add ``values`` (a bias or BatchNorm shift, shaped to broadcast over one row block) to
    the primal rows of the stacked activation ``y`` in place, and nothing to the tangent rows
    (an offset has no derivative). Recorded by no autograd node: adding a constant leaves every
    derivative as it is, and the op that produced ``y`` did not save it. (One in-place addition
    on B rows; a broadcast [2, 1, C, ...] offset over all 2B rows, or ``addcmul`` with it,
    costs 1.5-3x more.)"""
    _add_untracked(_primal(y), values)
    return y


def _add_untracked(t: torch.Tensor, values: torch.Tensor) -> None:
    """``t += values`` in place, recorded by no autograd node (an offset: :func:`_add_to_primal_rows`)."""
    with torch.no_grad():
        t.add_(values.to(t.dtype))   # ``to``: the tensor itself when the dtypes agree


def _with_bias(module: nn.Module, state: dict, forward, first, bias, channel_dim: int):
    """Stacked affine layer: the bias-free (linear) map on all rows, the bias on primal rows.
    On an input of B rows (no tangent yet): ``first(x, gates)`` when a gate site with d = 1
    left this layer its gates (:func:`_gate_hooks`), else the layer as it is (``module``'s own
    forward, through the frozen weights)."""
    def stacked(x):
        with torch._C.DisableTorchFunction():
            if 2 * x.shape[0] == state["rows"]:
                gates = state["pending"].pop(module, None)
                if gates is None:
                    return type(module).forward(module, x)
                y = first(x, gates)
            else:
                y = forward(x)
            return y if bias is None else _add_to_primal_rows(y, channel_shaped(bias, y.dim(), channel_dim))
    return stacked


def _conv_forward(module: nn.Conv2d, state: dict, inject: bool = False):
    conv = _InjectingConv if inject else FrozenConv
    args = (module.stride, module.padding, module.dilation, module.groups)
    return _with_bias(module, state, lambda x: conv.apply(x, module.weight, None, *args),
                      lambda x, gates: _FirstInjectingConv.apply(x, gates, module.weight, *args),
                      module.bias, 1)


def _linear_forward(module: nn.Linear, state: dict, inject: bool = False):
    linear = _InjectingLinear if inject else FrozenLinear
    return _with_bias(module, state, lambda x: linear.apply(x, module.weight, None),
                      lambda x, gates: _FirstInjectingLinear.apply(x, gates, module.weight),
                      module.bias, -1)


def _bn_forward(module: nn.BatchNorm2d, state: dict):
    views = bn_affine_views(module)

    def forward(x):
        with torch._C.DisableTorchFunction():
            scale, shift = views(x.dim())
            if 2 * x.shape[0] == state["rows"]:   # no tangent yet: the affine map itself
                return (x * scale.to(x.dtype)).add_(shift.to(x.dtype))
            return _add_to_primal_rows(x * scale.to(x.dtype), shift)
    return forward


class _BatchStatNorm(torch.autograd.Function):
    """BatchNorm on the statistics of the primal rows (``saliency.batchnorm=batch``; Ioffe &
    Szegedy 2015, their backward formula). Per channel, over the M = B·H·W primal values:
    μ = mean(x₀), σ² = mean((x₀ − μ)²), x̂ = (x₀ − μ)/√(σ² + ε); primal γ·x̂ + β. The Jacobian of
    x₀ ↦ γ·x̂ is the operator v ↦ γ·(v − mean(v) − x̂·mean(x̂·v))/√(σ² + ε) (means per channel over
    the batch: the statistics couple the samples), which is symmetric — so the tangent γ·P(x₁)
    and the backward γ·P(ḡ_k) of both row blocks (the primal vector-Jacobian product) are each
    one call of ATen's fused BatchNorm backward kernel (~10× faster on CPU than the formula
    written as tensor operations)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        xs, out = _split(x), torch.empty_like(x)
        outs = _split(out)
        mean, invstd = x.new_empty(0), x.new_empty(0)
        torch.ops.aten.native_batch_norm.out(xs[0], weight, bias, None, None, True, 0.0, eps,
                                             out=outs[0], save_mean=mean, save_invstd=invstd)
        ctx.save_for_backward(_primal_rows(x), weight, mean, invstd)
        ctx.eps = eps
        outs[1].copy_(_bn_jacobian(xs[1], xs[0], weight, mean, invstd, eps))
        return out

    @staticmethod
    def backward(ctx, grad):
        x0, weight, mean, invstd = ctx.saved_tensors
        return torch.cat([_bn_jacobian(g, x0, weight, mean, invstd, ctx.eps) for g in _split(grad)]), \
            None, None, None


def _bn_jacobian(v, x0, weight, mean, invstd, eps):
    """γ·(v − mean(v) − x̂·mean(x̂·v))/√(σ² + ε), per channel, with the statistics of x₀
    (:class:`_BatchStatNorm`): ATen's BatchNorm input gradient for the output gradient v."""
    return torch.ops.aten.native_batch_norm_backward(v, x0, weight, None, None, mean, invstd, True,
                                                     eps, [True, False, False])[0]


def _bn_batch_forward(module: nn.BatchNorm2d, state: dict):
    def forward(x):   # γ, β are frozen by ``swapped_forwards``, like the convolutions' weights
        with torch._C.DisableTorchFunction():
            if 2 * x.shape[0] == state["rows"]:   # no tangent yet: BatchNorm itself
                return type(module).forward(module, x)
            return _BatchStatNorm.apply(x, module.weight, module.bias, module.eps)
    return forward


@contextlib.contextmanager
def _gate_hooks(model: nn.Module, ss: StructureSet, current: dict, direction: torch.Tensor,
                has_tangent=None, gate=None, first_gate=None):
    """Every gate site runs :class:`_Gate` on its input, with the gates ``current["ext"]`` of the
    pass being run (:class:`_FirstGate` on an input without a tangent). Yields the set of sites
    whose tangent injection their own layer adds to its output (:func:`_add_primal_to_tangent`):
    convolutions and linear layers with d = 1 on every input channel (SOSP-H's d = 1 on all
    structures). ``has_tangent(x)``, ``gate(x, gates, d)``, ``first_gate(x, gates, d)``: another
    representation's (:mod:`.paired`); by default the stacked rows'."""
    has_tangent = has_tangent or (lambda x: 2 * x.shape[0] != current["rows"])
    gate, first_gate = gate or _Gate.apply, first_gate or _FirstGate.apply
    dext = torch.cat([direction, direction.new_zeros(1)])           # slot S: channels of no structure
    injecting = set()

    def make_hook(lookup, module):
        d = dext[lookup]
        if layer_kind(module) in ("conv", "linear") and bool((d == 1).all()):
            injecting.add(module)
            d = None

        def hook(module, args):
            x = args[0]
            with torch._C.DisableTorchFunction():
                gates = current["ext"][:, lookup]
                if has_tangent(x):
                    return (gate(x, gates, d),) + args[1:]
                if d is None:    # the layer gates its input itself (_FirstInjectingConv)
                    current["pending"][module] = gates
                    return None
                return (first_gate(x, gates, d),) + args[1:]
        return hook
    with ss.site_hooks(model, make_hook, direction.device):
        yield injecting


def _builders(state: dict, injecting: set) -> dict:
    """The stacked layer builders for :func:`.lean.swapped_forwards`, reading the pass's
    ``state``; convolutions and linear layers in ``injecting`` add the tangent injection."""
    return {"conv": lambda m: _conv_forward(m, state, inject=m in injecting),
            "linear": lambda m: _linear_forward(m, state, inject=m in injecting),
            "bn": lambda m: _bn_forward(m, state), "bn_batch": lambda m: _bn_batch_forward(m, state)}


@contextlib.contextmanager
def stacked_dual(model: nn.Module, ss: StructureSet, direction: torch.Tensor, dtype: torch.dtype):
    """Within the block, ``forward(x)`` returns (stacked logits [2B, C], gates [2, S]) at c = 1:
    rows :B are z, rows B: are J·d (d = ``direction``, on its device, in ``dtype`` like the
    model), and a backward pass from the logits with cotangent ``[u; w]`` puts Jᵀu in row 0 and
    Jᵀw in row 1 of the gates' gradient. ``forward`` raises :class:`Unsupported` if the model
    calls a function without a stacked rule. Layers and hooks are set up once for all the passes
    of the block; the model is left as it was on exit, also after an exception."""
    if model.training:
        raise ValueError("stacked dual evaluation needs the model in eval mode")
    current = {}
    direction = direction.to(dtype)
    with _gate_hooks(model, ss, current, direction) as injecting, \
            swapped_forwards(model, _builders(current, injecting)):

        def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            gates2 = torch.ones(2, ss.num_structures, device=x.device, dtype=dtype, requires_grad=True)
            current["ext"] = torch.cat([gates2, gates2.new_ones(2, 1)], dim=1)
            current["rows"], current["pending"] = 2 * x.shape[0], {}
            with _StackedMode(current["rows"]):
                z2 = model(x)          # B rows: the tangent starts at the first gate site
            if current["pending"]:
                raise Unsupported("a gated layer did not run the stacked forward")
            if not isinstance(z2, torch.Tensor) or z2.dim() != 2 or z2.shape[0] != current["rows"]:
                raise Unsupported("model output is not one logits tensor of the stacked rows")
            return z2, gates2
        yield forward
