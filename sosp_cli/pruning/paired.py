"""Paired dual evaluation: the rules of :mod:`.stacked`, with primal and tangent as two tensors.

The stacked pass carries an activation as one tensor of 2B rows ``[x₀; x₁]``, so that each
layer is one kernel on twice a first-order pass's rows. Here (``method.stack_batch=pair``) the
model holds the primal x₀ itself — B rows, the tensor a first-order pass holds — and its tangent
x₁ rides along as an attribute of it; every rule of :mod:`.stacked` (DESIGN §3: the tangent is the
linearisation at the primal rows, gate site c·x₀ / c·x₁ + d·x₀, the tangent injection L(x₀) added
by the layer at a gate site with d = 1, nothing before the first gate site) is applied to the
two tensors in turn, with the same kernels. The arithmetic is the stacked pass's; what differs:

- no kernel runs on 2B rows: each has a first-order pass's shapes (on this host's CPU a 2B-row
  convolution or element-wise kernel is not always twice as fast per row as a B-row one);
- a ReLU's primal output is a tensor of its own, which its backward and the gate site reading
  it keep as it is — the stacked pass copies the primal rows out of its 2B output, so that the
  2B rows can be freed; here nothing is copied, and nothing kept for the backward pass is a
  tangent (``tests/test_stacked.py`` checks it on every model);
- the tangent of a bias-free convolution or linear layer is left to the reader of its output
  (:func:`_defer`): eval-mode BatchNorm, the usual one, computes it as one convolution of x₁ with
  the BatchNorm scale folded into the weight (:class:`_Folded`), plus the injection
  L(x₀)·scale = the primal's x₀·scale (:func:`_inject`), so that neither the tangent's forward
  nor its backward pass has a BatchNorm multiplication of its own; any other reader computes
  L x₁ (+ L x₀) first (:func:`tangent`);
- twice the kernel launches of ``whole`` (those of ``half``): where a pass is launch-bound (a
  GPU at CIFAR sizes) ``whole`` is the faster one.

The backward pass is, as in the stacked pass, the primal vector-Jacobian product for each of
the two cotangents — each rule's backward maps ḡ₀ and ḡ₁ through the Jacobian at the primal
rows; linear functions of the activations (additions, concatenation, views, pooling by
averages, frozen convolutions) are applied to each tensor with autograd, which gives exactly
that; the gate sites send ḡ₀, ḡ₁ to the rows 0, 1 of a [2, S] gate tensor. So one backward pass
from (z, J·d) with the cotangents ((p − y)/N, R J d/N) returns g and Q·d.

Tangents are attached with :func:`_dual` and read with :func:`tangent`; an activation changed in
place by anything but a rule here has a stale tangent, which :func:`tangent` refuses. Saved
tensors are detached aliases (:func:`_kept`): the Python object of a saved tensor would
otherwise stay alive, and with it the tangent attached to it.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..structures import StructureSet
from .lean import FrozenConv, FrozenLinear, bn_affine_views, channel_shaped, swapped_forwards
from .stacked import (_ADD, _ATTRIBUTES, _METADATA, Unsupported, _add_untracked, _AvgPool,
                      in_place, split_inplace, _bn_jacobian, _clamp_mask, _flat, _gate_hooks, _name,
                      _detached, _slope, dispatch, handler_table, shift_rule,
                      value_and_slope, zeros_of)


def tangent(x) -> torch.Tensor | None:
    """The tangent of the activation ``x``; None if it has none (before the first gate site, or
    not an activation). Raises :class:`Unsupported` if ``x`` was changed in place since its
    tangent was attached (by a function without a rule here)."""
    entry = _entry(x)
    if entry is None:
        return None
    if entry[2] is not None:   # left to the reader (_defer): L x₁, plus the injection L x₀ = x
        y1 = entry[2].tangent(x)
        _dual(x, y1)
        return y1
    return entry[0]


def _entry(x):
    """(tangent, version, :class:`_Pending` or None) of ``x``, or None (:func:`tangent`)."""
    entry = getattr(x, "_sosp_tangent", None) if isinstance(x, torch.Tensor) else None
    if entry is not None and entry[1] != x._version:
        raise Unsupported("an in-place change of an activation by a function without a paired rule")
    return entry


def _dual(y0: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
    """``y0`` with the tangent ``y1`` attached (as of ``y0``'s current version)."""
    y0._sosp_tangent = (y1, y0._version, None)
    return y0


class _Pending:
    """The tangent L x₁ (+ the injection L x₀ when ``inject``) of a bias-free convolution or
    linear layer L, not computed yet: its reader computes it (:func:`_defer`)."""

    __slots__ = ("x1", "layer", "weight", "rest", "inject")

    def __init__(self, x1, layer, weight, rest, inject):
        self.x1, self.layer, self.weight, self.rest, self.inject = x1, layer, weight, rest, inject

    def tangent(self, injection: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """L x₁ (bias-free; with ``scale``, with the weight W·scale per output channel:
        :class:`_Folded`), plus ``injection`` — L x₀, times ``scale`` if given — when the layer
        injects (:func:`_inject`)."""
        if scale is None:
            y1 = self.layer.apply(self.x1, self.weight, None, *self.rest)
        else:
            y1 = _Folded.apply(self.x1, self, scale)
        if self.inject:
            _inject(y1, injection)
        return y1


def _defer(y0: torch.Tensor, pending: _Pending) -> torch.Tensor:
    """``y0`` = L x₀ with its tangent left to its reader: eval-mode BatchNorm computes it with
    its scale folded into L's weight (:func:`_bn_forward`), any other reader as it is
    (:func:`tangent`)."""
    y0._sosp_tangent = (None, y0._version, pending)
    return y0


def _inject(y1: torch.Tensor, v: torch.Tensor) -> None:
    """y₁ += v, untracked: the tangent injection L(x₀) of a layer at a gate site with d = 1
    (DESIGN §3), the direction's term — the backward pass of the tangent maps ḡ₁ through the
    Jacobian at the primal only, so it never reaches v."""
    with torch.no_grad():
        y1.add_(v)


def _kept(t: torch.Tensor) -> torch.Tensor:
    """A detached alias of ``t`` to save for the backward pass: same storage and version counter
    (an in-place change is still detected), no attached tangent kept alive. ``t`` is marked, so
    that an in-place addition into it is refused (:meth:`_PairedMode.linear`)."""
    t._sosp_saved = True
    return t.detach()


def _not_kept(x: torch.Tensor) -> None:
    """Raise :class:`Unsupported` if ``x``, about to be changed in place, is kept for the backward
    pass (:func:`_kept`): the forward-mode AD path then computes the pass."""
    if getattr(x, "_sosp_saved", False):
        raise Unsupported("an activation called in place on a tensor kept for the backward pass")


def _own(t: torch.Tensor) -> torch.Tensor:
    """A result of a two-output rule that is a view of a tensor the rule made (forward mode's
    primal, a gathered tangent) as a tensor of its own to autograd, on the same memory: autograd
    refuses in-place changes of a view returned by a Function with several outputs, and a model
    may change a rule's output in place (EfficientNetV2's ``result += input`` after a SiLU)."""
    return t.detach() if t._is_view() else t


def _gate_gradients(g0, g1, x0) -> torch.Tensor:
    """c̄_k = Σ_{rows, positions} ḡ_k·x₀ for both cotangents: [2, C] (:func:`.stacked._gate_gradients`)."""
    dims = (0,) + tuple(range(2, x0.dim()))
    return torch.stack([torch.mul(g0, x0).sum(dims), torch.mul(g1, x0).sum(dims)])


class _Gate(torch.autograd.Function):
    """Gate site at c = 1 (:class:`.stacked._Gate`): out₀ = x₀, out₁ = x₁ + d·x₀ (x₁ itself with
    ``direction`` None: the consuming layer adds the injection); backward x̄_k = ḡ_k,
    c̄_k = Σ ḡ_k·x₀."""

    @staticmethod
    def forward(ctx, x0, x1, gates2, direction):
        ctx.save_for_backward(_kept(x0))
        if direction is None:
            return x0.view_as(x0), x1.view_as(x1)
        return x0.view_as(x0), torch.addcmul(x1, x0, channel_shaped(direction, x0.dim(), 1))

    @staticmethod
    def backward(ctx, g0, g1):
        (x0,) = ctx.saved_tensors
        return g0, g1, _gate_gradients(g0, g1, x0), None


class _FirstGate(torch.autograd.Function):
    """Gate site reading an activation without a tangent (:class:`.stacked._FirstGate`):
    out = (x₀, d·x₀); backward x̄ = ḡ₀, c̄_k = Σ ḡ_k·x₀."""

    @staticmethod
    def forward(ctx, x, gates2, direction):
        ctx.save_for_backward(x.detach().clone())   # the model may still change x in place
        return x.view_as(x), x * channel_shaped(direction, x.dim(), 1)

    @staticmethod
    def backward(ctx, g0, g1):
        (x0,) = ctx.saved_tensors
        return g0, _gate_gradients(g0, g1, x0), None


def _frozen(ctx, layer, x, weight, rest):
    """``layer``'s forward (:class:`.lean.FrozenConv` / ``FrozenLinear``, bias-free) in the
    Function of ``ctx``, whose backward then receives both cotangents as tensors (zeros where
    one is unused)."""
    y = layer.forward(ctx, x, weight, None, *rest)
    ctx.set_materialize_grads(True)
    ctx.layer, ctx.rest = layer, len(rest)
    return y


def _input_gradients(ctx, *grads):
    """The layer's input gradient (its transposed map) of each of ``grads``."""
    return [ctx.layer.backward(ctx, g)[0] for g in grads]


class _FirstInjecting(torch.autograd.Function):
    """Gate site with d = 1 on every input channel of a bias-free convolution or linear layer L
    whose input x₀ has no tangent (:class:`.stacked._FirstInjectingConv`): (L x₀, L x₀), one
    evaluation of L; backward x̄_k = Lᵀ ḡ_k, c̄_k = Σ x̄_k·x₀, x₀'s own gradient x̄₀."""

    @staticmethod
    def forward(ctx, x, gates, layer, weight, *rest):
        y = _frozen(ctx, layer, x, weight, rest)
        ctx.save_for_backward(x.detach().clone())   # the model may still change x in place
        return y, y.clone()

    @staticmethod
    def backward(ctx, g0, g1):
        (x0,) = ctx.saved_tensors
        gx0, gx1 = _input_gradients(ctx, g0, g1)
        return (gx0, _gate_gradients(gx0, gx1, x0), None, None) + (None,) * ctx.rest


class _Diagonal(torch.autograd.Function):
    """Element-wise f with Jacobian D = diag(f′(x₀)) at the primal (:class:`.stacked._Diagonal`):
    ``primal(x₀)`` returns y₀ = f(x₀) and the one tensor ``apply_d(v, saved, out)`` needs to
    write D·v; tangent D·x₁, backward D·ḡ_k. For clamps ``saved`` is y₀ itself (ReLU: :func:`_relu`)."""

    @staticmethod
    def forward(ctx, x0, x1, primal, apply_d):
        y0, saved = primal(x0)
        y1 = torch.empty_like(x1)
        apply_d(x1, saved, y1)
        ctx.save_for_backward(_kept(saved))
        ctx.apply_d = apply_d
        return _own(y0), y1

    @staticmethod
    def backward(ctx, g0, g1):
        (saved,) = ctx.saved_tensors
        out = [torch.empty_like(g0), torch.empty_like(g1)]   # tensors of their own (accumulated in place)
        ctx.apply_d(g0, saved, out[0])
        ctx.apply_d(g1, saved, out[1])
        return out[0], out[1], None, None


def _diagonal(mode, x, primal, apply_d):
    return _dual(*_Diagonal.apply(x, mode.tangent(x), primal, apply_d))


def _relu(mode, x, inplace=False):
    """ReLU as two ATen operations with their own (C++) autograd nodes, no Python Function:
    y₀ = relu(x₀), whose backward masks ḡ₀ with y₀, and the tangent y₁ = x₁·1[x₀ > 0] =
    ``threshold_backward(x₁, y₀, 0)`` (:func:`.stacked._relu_mask`), whose backward with respect
    to x₁ is the same mask on ḡ₁. It reads y₀ detached (:func:`_kept`), so no gradient flows
    from the tangent into the primal, and what it keeps for the backward pass is y₀. Called in
    place, it changes x₀ in place (ATen's ``relu_``), the tangent being a new tensor."""
    x1 = mode.tangent(x)
    with torch._C.DisableTorchFunction():
        if inplace:    # relu_, inplace=True: x itself becomes y₀ (.stacked.in_place)
            _not_kept(x)
            y0 = torch.relu_(x)
        else:
            y0 = torch.relu(x)
        return _dual(y0, torch.ops.aten.threshold_backward(x1, _kept(y0), 0.0))


def _clamped(mode, x, lo: float, hi: float, inplace: bool):
    def primal(x0):
        y0 = torch.clamp(x0, lo, hi)
        return y0, y0
    return in_place(mode, x, _diagonal(mode, x, primal, _clamp_mask(lo, hi)), inplace)


def _hardtanh(mode, x, min_val=-1.0, max_val=1.0, inplace=False):
    return _clamped(mode, x, float(min_val), float(max_val), inplace)


def _relu6(mode, x, inplace=False):
    return _clamped(mode, x, 0.0, 6.0, inplace)


def _elementwise(func):
    """Smooth element-wise f: y₀ = f(x₀) and f′(x₀) by one forward-mode evaluation at x₀."""

    def handler(mode, x, *args, **kwargs):
        args, inplace = split_inplace(args, kwargs)

        def primal(x0):
            return value_and_slope(func, x0, args, kwargs)
        return in_place(mode, x, _diagonal(mode, x, primal, _slope), inplace)
    return handler


class _MaxPool(torch.autograd.Function):
    """Max pooling (:class:`.stacked._MaxPool`): y₀ with its argmax i, tangent x₁ gathered at i;
    backward: each ḡ_k scattered to i. Keeps i only."""

    @staticmethod
    def forward(ctx, x0, x1, args, kwargs):
        y0, idx = F.max_pool2d(x0, *args, **kwargs, return_indices=True)
        y1 = _own(x1.flatten(2).gather(2, idx.flatten(2)).view_as(y0))
        ctx.save_for_backward(idx)
        ctx.in_shape = x0.shape
        return y0, y1

    @staticmethod
    def backward(ctx, g0, g1):
        (idx,) = ctx.saved_tensors
        index = idx.flatten(2)
        return tuple(g.new_zeros(ctx.in_shape).flatten(2).scatter_add_(2, index, g.flatten(2)).view(ctx.in_shape)
                     for g in (g0, g1)) + (None, None)


def _max_pool2d(mode, x, *args, **kwargs):
    if kwargs.pop("return_indices", False) or (len(args) > 5 and args[5]):
        raise Unsupported("max_pool2d(return_indices=True)")
    return _dual(*_MaxPool.apply(x, mode.tangent(x), args[:5], kwargs))


def _pooled(func, backward):
    """Average pooling, linear: :class:`.stacked._AvgPool` (keeps nothing) on each tensor."""
    def handler(mode, x, *args, **kwargs):
        x1 = mode.tangent(x)
        return _dual(*(_AvgPool.apply(t, func, backward, args, kwargs) for t in (x, x1)))
    return handler


class _Product(torch.autograd.Function):
    """a·b of two activations (:class:`.stacked._Product`): out₀ = a₀·b₀, out₁ = a₁·b₀ + a₀·b₁;
    backward ā_k = ḡ_k·b₀, b̄_k = ḡ_k·a₀, summed over what was broadcast. Keeps a₀ and b₀."""

    @staticmethod
    def forward(ctx, a0, a1, b0, b1):
        ctx.save_for_backward(_kept(a0), _kept(b0))
        return a0 * b0, torch.addcmul(a1 * b0, a0, b1)

    @staticmethod
    def backward(ctx, g0, g1):
        a0, b0 = ctx.saved_tensors
        ga, gb = ((g0 * b0, g1 * b0), (g0 * a0, g1 * a0))
        return (ga[0].sum_to_size(a0.shape), ga[1].sum_to_size(a0.shape),
                gb[0].sum_to_size(b0.shape), gb[1].sum_to_size(b0.shape))


def _constant(mode, t) -> bool:
    """``t`` is a constant of the pass: a number, or a tensor without a tangent that is not an
    activation of the batch's B rows (one without a tangent yet; a constant of B rows read as
    one is exact too: its tangent is 0). (:func:`.stacked._constant`)"""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return True
    return _entry(t) is None and t.shape[0] != mode.rows


def _activation_and_constant(mode, func, a, b):
    """(activation, constant) of a binary function with one constant operand, else None (two
    activations); the call has a tangent somewhere, so the activation carries it."""
    ca, cb = _constant(mode, a), _constant(mode, b)
    if not (ca or cb):
        return None
    if ca and cb:
        raise Unsupported(f"{_name(func)} of tensors that are not activations")
    return (b, a) if ca else (a, b)


def _mul(mode, a, b):
    """a·b: the product rule (:class:`_Product`) when both are activations (one without a
    tangent has the tangent 0); with a constant the linear map on each tensor
    (:func:`.stacked._mul`)."""
    pair = _activation_and_constant(mode, torch.mul, a, b)
    with torch._C.DisableTorchFunction():
        if pair is None:
            a1, b1 = mode.tangents((a, b))
            return _dual(*_Product.apply(a, a1, b, b1))
        x, w = pair[0], _detached(pair[1])
        return _dual(torch.mul(x, w), torch.mul(mode.tangent(x), w))


def _div(mode, a, b, rounding_mode=None):
    """a / c with a constant c: the linear map on each tensor (:func:`.stacked._div`)."""
    pair = _activation_and_constant(mode, torch.div, a, b)
    if pair is None or pair[0] is not a or rounding_mode is not None:
        raise Unsupported("div by an activation, of a constant, or with rounding")
    with torch._C.DisableTorchFunction():
        return _dual(torch.div(a, _detached(b)), torch.div(mode.tangent(a), _detached(b)))


def _shifted(mode, func, x, c, call):
    """Addition or subtraction with a constant c (:func:`.stacked._shifted`): primal f(x₀) as it
    is, tangent L(x₁) — ``func`` with c as zeros."""
    return _dual(call(x, c), call(mode.tangent(x), zeros_of(c)))


class _Handles:
    """The removable handles of the hooks on both tensors of an activation, as one."""

    def __init__(self, *handles):
        self.handles = handles

    def remove(self):
        for h in self.handles:
            h.remove()


def _register_hook(mode, x, hook):
    """A gradient hook on an activation is called on each tensor's gradient (the two backward
    passes' of forward-mode AD); a tangent left to the reader is computed first."""
    with torch._C.DisableTorchFunction():
        return _Handles(x.register_hook(hook), tangent(x).register_hook(hook))


_HANDLERS = handler_table(_relu, _hardtanh, _relu6, _max_pool2d, _pooled, _register_hook, _elementwise, _mul,
                          _div, shift_rule(_activation_and_constant, _shifted))
_INPLACE = {torch.Tensor.add_, torch.Tensor.__iadd__}
_OUT_OF_PLACE = {torch.Tensor.__iadd__: torch.add}
_OUT_OF_PLACE_TANGENT = {torch.Tensor.add_: torch.add}


class _PairedMode(TorchFunctionMode):
    """Dispatches the model's functional calls to their paired rules (module docstring): a call
    on no activation with a tangent runs as it is (before the first gate site, constants)."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows

    def tangent(self, x) -> torch.Tensor:
        t = tangent(x)
        if t is None:
            raise Unsupported("an element-wise function applied to a tensor that is not an activation")
        return t

    def write_back(self, x, out):
        """``x`` changed in place to ``out`` (an activation called in place,
        :func:`.stacked.in_place`): the primal copied into it, ``out``'s tangent attached."""
        _not_kept(x)
        t1 = tangent(out)
        with torch._C.DisableTorchFunction():
            x.copy_(out)
        return _dual(x, t1)

    def tangents(self, items):
        """``items`` (args or kwargs, nested) with every tensor replaced by its tangent, zeros for
        one without a tangent (an activation of B rows before the first gate site)."""
        if isinstance(items, dict):
            return {k: self.tangents(v) for k, v in items.items()}
        if isinstance(items, (list, tuple)):
            return type(items)(self.tangents(v) for v in items)
        if isinstance(items, torch.Tensor):
            t = tangent(items)
            return torch.zeros_like(items) if t is None else t
        return items

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA or getattr(func, "__self__", None) in _ATTRIBUTES:
            return func(*args, **kwargs)
        flat = _flat(args) + _flat(list(kwargs.values()))
        if not any(_entry(a) is not None for a in flat):
            return func(*args, **kwargs)       # no tangent yet
        return dispatch(self, _HANDLERS, func, args, kwargs)

    def linear(self, func, args, kwargs):
        """A function linear in the activations, applied to the primals and to the tangents."""
        tensors = [a for a in _flat(args) + _flat(list(kwargs.values())) if isinstance(a, torch.Tensor)]
        if (func in _ADD and len(tensors) < 2) or any(t.dim() == 0 or t.shape[0] != self.rows for t in tensors):
            raise Unsupported(f"{_name(func)} with a constant or across the batch")
        if func in _INPLACE and tangent(args[0]) is None:
            raise Unsupported("Tensor.add_ of an activation with a tangent into one without")
        # ``a += b`` reaches the mode as ``Tensor.add_`` (as ``__iadd__`` on some torch versions:
        # then computed out of place, Python rebinds ``a``); an in-place addition into a tensor a
        # rule keeps for the backward pass (a ReLU's or clamp's output, a gate site's input) is
        # refused, as the stacked rules' copies need not be
        func = _OUT_OF_PLACE.get(func, func)
        if func is torch.Tensor.add_ and getattr(args[0], "_sosp_saved", False):
            raise Unsupported("Tensor.add_ into an activation kept for the backward pass")
        with torch._C.DisableTorchFunction():
            carried = [t1 for t1 in map(tangent, tensors) if t1 is not None]
            if func in _ADD and len(carried) < len(tensors):
                # x + y with y not tangent-carrying: the tangent is x's (a copy: it may be changed in place)
                (t1,) = carried
                out1 = t1 if func in _INPLACE else t1.clone()
            else:
                # an in-place addition's tangent is a new tensor: the old one may be the input
                # of a layer whose tangent is not computed yet (_defer), which must read it as it was
                out1 = _OUT_OF_PLACE_TANGENT.get(func, func)(*self.tangents(args), **self.tangents(kwargs))
            out0 = func(*args, **kwargs)
        if not isinstance(out0, torch.Tensor) or out0.dim() == 0 or out0.shape[0] != self.rows:
            raise Unsupported(f"{_name(func)} with a constant or across the batch")
        return _dual(out0, out1)


def _affine(module: nn.Module, state: dict, layer, rest: tuple, inject: bool, bias, channel_dim: int):
    """Paired convolution / linear layer (``layer``: :class:`.lean.FrozenConv` / ``FrozenLinear``,
    ``rest`` its arguments after weight and bias): without a tangent, :class:`_FirstInjecting`
    where a gate site with d = 1 left this layer its gates, else the layer as it is; with one,
    the frozen layer on the primal, and on the tangent its linear part — plus the injection
    L x₀ (``inject``: d = 1 on every input channel) — left to the reader when the layer has no
    bias (:func:`_defer`). The bias goes to the primal only."""
    weight = module.weight

    def forward(x):
        with torch._C.DisableTorchFunction():
            x1 = tangent(x)
            if x1 is None:
                gates = state["pending"].pop(module, None)
                if gates is None:
                    return type(module).forward(module, x)
                y0, y1 = _FirstInjecting.apply(x, gates, layer, weight, *rest)
                return _dual(y0, y1) if bias is None else _biased(y0, y1, bias, channel_dim)
            y0 = layer.apply(x, weight, None, *rest)
            pending = _Pending(x1, layer, weight, rest, inject)
            if bias is None:
                return _defer(y0, pending)
            return _biased(y0, pending.tangent(y0), bias, channel_dim)
    return forward


def _biased(y0, y1, bias, channel_dim: int) -> torch.Tensor:
    """The pair (y₀ + bias, y₁): a bias moves the primal only."""
    _add_untracked(y0, channel_shaped(bias, y0.dim(), channel_dim))
    return _dual(y0, y1)


def _conv_forward(module: nn.Conv2d, state: dict, inject: bool):
    return _affine(module, state, FrozenConv, (module.stride, module.padding, module.dilation, module.groups),
                   inject, module.bias, 1)


def _linear_forward(module: nn.Linear, state: dict, inject: bool):
    return _affine(module, state, FrozenLinear, (), inject, module.bias, -1)


def _bn_forward(module: nn.BatchNorm2d, state: dict):
    """Eval-mode BatchNorm, x·scale + shift: primal x₀·scale + shift, tangent x₁·scale. A tangent
    its convolution or linear layer L left to it (:func:`_defer`) is computed as L with the
    weight W·scale (per output channel, :class:`_Folded`) on L's input tangent, plus the
    injection L(x₀)·scale = x₀·scale — so that no BatchNorm multiplication of the tangent runs,
    forward or backward (ḡ₁ goes through (W·scale)ᵀ)."""
    views = bn_affine_views(module)

    def forward(x):
        with torch._C.DisableTorchFunction():
            scale, shift = views(x.dim())
            s = scale.to(x.dtype)
            entry = _entry(x)
            y0 = x * s
            if entry is None:
                return y0.add_(shift.to(x.dtype))
            pending = entry[2]
            # the BatchNorm's channels are L's output channels: a convolution's, or a linear
            # layer's on [B, features] (not on [B, L, features], where BatchNorm1d reads dim 1)
            if pending is not None and (pending.layer is FrozenConv or x.dim() == 2):
                y1 = pending.tangent(y0, views(1)[0])    # injection L(x₀)·scale: y₀ before the shift
            else:
                y1 = tangent(x) * s
            return _dual(y0.add_(shift.to(x.dtype)), y1)
    return forward


class _Folded(torch.autograd.Function):
    """L x₁ with L's weight W·scale (``scale`` per output channel): a pending tangent
    (:class:`_Pending`) computed by the BatchNorm that reads it (:func:`_bn_forward`); backward
    (W·scale)ᵀ ḡ₁. W·scale is made again for the backward pass instead of kept: a weight's size
    is below its activation's, and the pass keeps no copy of the weights."""

    @staticmethod
    def forward(ctx, x1, pending, scale):
        ctx.layer, ctx.scale, ctx.unscaled = pending.layer, scale, pending.weight
        y1 = pending.layer.forward(ctx, x1, _scaled(pending.weight, scale), None, *pending.rest)
        ctx.weight = None       # the layer's forward kept W·scale: free it until the backward pass
        return y1

    @staticmethod
    def backward(ctx, grad):
        ctx.weight = _scaled(ctx.unscaled, ctx.scale)
        try:
            return ctx.layer.backward(ctx, grad)[0], None, None
        finally:
            ctx.weight = None


def _scaled(weight, scale):
    """W·scale per output channel (dimension 0 of a convolution's or linear layer's weight)."""
    return weight * channel_shaped(scale.to(weight.dtype), weight.dim(), 0)


class _BatchStatNorm(torch.autograd.Function):
    """BatchNorm on the statistics of the primal (:class:`.stacked._BatchStatNorm`): primal
    γ·x̂ + β, tangent γ·P(x₁), backward γ·P(ḡ_k) (P: the Jacobian of x₀ ↦ x̂, symmetric)."""

    @staticmethod
    def forward(ctx, x0, x1, weight, bias, eps):
        y0, mean, invstd = torch.ops.aten.native_batch_norm(x0, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(_kept(x0), weight, mean, invstd)
        ctx.eps = eps
        return y0, _bn_jacobian(x1, x0, weight, mean, invstd, eps)

    @staticmethod
    def backward(ctx, g0, g1):
        x0, weight, mean, invstd = ctx.saved_tensors
        return (_bn_jacobian(g0, x0, weight, mean, invstd, ctx.eps),
                _bn_jacobian(g1, x0, weight, mean, invstd, ctx.eps), None, None, None)


def _bn_batch_forward(module: nn.BatchNorm2d, state: dict):
    def forward(x):
        with torch._C.DisableTorchFunction():
            x1 = tangent(x)
            if x1 is None:
                return type(module).forward(module, x)
            return _dual(*_BatchStatNorm.apply(x, x1, module.weight, module.bias, module.eps))
    return forward


def _builders(state: dict, injecting: set) -> dict:
    return {"conv": lambda m: _conv_forward(m, state, inject=m in injecting),
            "linear": lambda m: _linear_forward(m, state, inject=m in injecting),
            "bn": lambda m: _bn_forward(m, state), "bn_batch": lambda m: _bn_batch_forward(m, state)}


def _gate(x, gates, direction):
    return _dual(*_Gate.apply(x, tangent(x), gates, direction))


def _first_gate(x, gates, direction):
    return _dual(*_FirstGate.apply(x, gates, direction))


@contextlib.contextmanager
def paired_dual(model: nn.Module, ss: StructureSet, direction: torch.Tensor, dtype: torch.dtype):
    """Within the block, ``forward(x)`` returns (z, J·d, gates [2, S]) at c = 1 (d = ``direction``,
    in ``dtype`` like the model), and a backward pass from (z, J·d) with cotangents (u, w) puts
    Jᵀu in row 0 and Jᵀw in row 1 of the gates' gradient (:func:`.stacked.stacked_dual`, whose
    contract this is, with the logits and their derivative as two tensors). Raises
    :class:`Unsupported` if the model calls a function without a paired rule."""
    if model.training:
        raise ValueError("paired dual evaluation needs the model in eval mode")
    current = {}
    direction = direction.to(dtype)
    with _gate_hooks(model, ss, current, direction, lambda x: tangent(x) is not None,
                     _gate, _first_gate) as injecting, \
            swapped_forwards(model, _builders(current, injecting)):

        def forward(x: torch.Tensor):
            gates2 = torch.ones(2, ss.num_structures, device=x.device, dtype=dtype, requires_grad=True)
            current["ext"] = torch.cat([gates2, gates2.new_ones(2, 1)], dim=1)
            current["pending"] = {}
            with _PairedMode(x.shape[0]):
                z = model(x)
            if current["pending"]:
                raise Unsupported("a gated layer did not run the paired forward")
            jd = tangent(z)
            if jd is None or z.dim() != 2:
                raise Unsupported("model output is not one logits tensor with a tangent")
            del z._sosp_tangent
            return z, jd, gates2
        yield forward
