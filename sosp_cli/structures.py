"""Structures: what is pruned together, found from the dependency graph (DESIGN.md §2).

A structure is one output channel of a conv (or unit of a linear layer) together with every
channel coupled to it: Torch-Pruning's ``DependencyGraph`` follows residual additions (one
structure spans every producer of the summed channel) and concatenations (one structure, many
consumers, with the index shifted by the concatenation offset). The stem's input channels and
the classifier's outputs are never structures.

Grouped convolutions (ResNeXt, RegNet; groups G > 1, not depthwise) keep G equal groups only if
every group loses the same channel positions, so in a Torch-Pruning group that holds one (as
input or output) a structure is one channel *position*: with C root channels, structure j is
channels j, j + C/G, ..., j + (G−1)·C/G — one at position j of every group (G = the least
common multiple of the groups of the grouped convs in the group). This is Torch-Pruning's own
group-aligned pruning, whose ``prune_in_channels`` keeps the same positions in every group;
a grouped conv whose channels are not laid out so (e.g. behind a concatenation that shifts
them) is refused in one line. Channels split into P equal parts that meet again element-wise (a
GLU written as chunk + multiply) take the same layout: channel j of every part reaches one
channel together, so structure j is channels j, j + C/P, ... (``_split_parts``); a grouped conv
over the parts' C/P channels counts P·G channel groups (``_structure_group``).

What Torch-Pruning maps a structure's channels through but cannot remove them from — a GLU, a
slice with fixed bounds, a function along the channels that it traces as element-wise (softmax,
flip, a reduction, a matrix product over the channels, a padding of the channels, ...), a
mapping onto channels a layer does not have — is refused when the structures are built (``_check_mapped``).
What the names in the graph do not show is then tested numerically: the channels a gate site
reads for a structure carry that structure's channels only (``_check_channels_stay_apart``).

Each structure s has a gate c_s. The gate multiplies the channel where it enters every
channel-mixing weight layer that reads it (a Conv2d that is not depthwise, or a Linear: the
``prune_in_channels`` items of the Torch-Pruning group). BatchNorm, activations, pooling and
depthwise convs on the way belong to the structure but are not gate sites, so c_s = 0 gives
exactly the logits of the physically pruned model (tested for every registered model).

Gating the *input* of a consumer is the same as scaling its weight's input slice, so
``∂L/∂c_s = θ_sᵀ∇L`` and, because every weight element is scaled by at most one gate,
``∂²L/∂c_s∂c_s' = θ_sᵀ H θ_s'`` exactly.
"""
from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwad
import torch.nn as nn
import torch_pruning as tp

from .errors import SospError, describe
from .utils import channel_shaped, load_jvp_decompositions


@dataclass
class StructureGroup:
    """Channels coupled by the graph; each channel of the root is one structure, or with
    ``channel_groups`` G > 1 (a grouped conv in the group) each channel position of G groups."""

    root: str                      # qualified name of the module whose output channels are pruned
    size: int                      # number of structures in the group
    offset: int                    # index of structure 0 in the global structure order
    producers: list[str] = field(default_factory=list)   # conv/linear layers writing the channel
    consumers: list[str] = field(default_factory=list)   # channel-mixing layers reading it
    depthwise: list[str] = field(default_factory=list)   # depthwise convs on the way (not gate sites)
    channel_groups: int = 1        # G: root channels per structure (module docstring)

    @property
    def channels(self) -> int:
        """Number of root channels: ``size · channel_groups``."""
        return self.size * self.channel_groups

    def channels_of(self, j: int) -> list[int]:
        """The root channels of structure j of this group: j, j + size, ..., one per channel group."""
        return [j + k * self.size for k in range(self.channel_groups)]

    def structure_of(self, root_channels: torch.Tensor) -> torch.Tensor:
        """Global structure index of each root channel (``offset + channel mod size``)."""
        return self.offset + root_channels % self.size

    def names(self) -> list[str]:
        return [f"{self.root}:{i}" for i in range(self.size)]


@dataclass
class GateSite:
    """Where gates enter one consumer: input channel ``channels[k]`` is scaled by gate ``gates[k]``."""

    in_features: int
    channels: torch.Tensor         # LongTensor of input-channel indices of the consumer
    gates: torch.Tensor            # LongTensor of global structure indices
    _lookup: dict = field(default_factory=dict, repr=False)

    def lookup(self, num_structures: int, device) -> torch.Tensor:
        """Per input channel, its index in the extended gate vector (S = "no gate": constant 1)."""
        key = (num_structures, str(device))
        if key not in self._lookup:
            table = torch.full((self.in_features,), num_structures, dtype=torch.long)
            table[self.channels] = self.gates
            self._lookup[key] = table.to(device)
        return self._lookup[key]


class StructureSet:
    """All structures of a model, in a stable order, with their gate sites."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor,
                 ignored: list[str] | None = None):
        modules = dict(model.named_modules())
        ignored = list(ignored) if ignored is not None else [classifier_name(model)]
        for name in ignored:
            if name not in modules:
                raise SospError(f"ignored layer '{name}' is not a module of the model")
        was_training = model.training
        model.eval()
        dg = dependency_graph(model, example_input)
        model.train(was_training)
        names = {m: n for n, m in modules.items()}
        _refuse_channel_normalisation(dg, names, {modules[n] for n in ignored})
        self.groups: list[StructureGroup] = []
        # BatchNorm layers normalising each structure: (name, channel indices, structure indices)
        self.norm_sites: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        sites: dict[str, tuple[int, list[int], list[int]]] = {}
        offset = 0
        produced: dict[str, torch.Tensor] = {}   # producer → structure of each output (-1: none)
        for group in dg.get_all_groups(ignored_layers=[modules[n] for n in ignored],
                                       root_module_types=(nn.Conv2d, nn.Linear)):
            root = names[group[0].dep.target.module]
            sg = _structure_group(root, len(group[0].idxs), offset, group, names, dg)
            for item in group.items:
                module = item.dep.target.module
                _check_mapped(item, dg, root, names)
                structure = sg.structure_of(torch.tensor([int(r) for r in item.root_idxs], dtype=torch.long))
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                    self.norm_sites.append((names[module], torch.tensor([int(i) for i in item.idxs]),
                                            structure))
                    continue
                if isinstance(module, _UNGATED_CONVOLUTIONS) and not isinstance(module, nn.Conv2d):
                    raise _ungated_layer_error(module, names[module], root)
                if not isinstance(module, (nn.Conv2d, nn.Linear)):
                    continue
                mname = names[module]
                if is_depthwise(module):
                    if mname not in sg.depthwise:  # part of the structure, not a gate site
                        sg.depthwise.append(mname)
                    continue
                if dg.is_out_channel_pruning_fn(item.dep.handler):
                    if mname not in sg.producers:
                        sg.producers.append(mname)
                    produced.setdefault(mname, torch.full((_channel_count(module, True),), -1))[
                        torch.tensor([int(i) for i in item.idxs], dtype=torch.long)] = structure
                    continue
                in_features = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
                _, chans, gates = sites.setdefault(mname, (in_features, [], []))
                chans.extend(int(i) for i in item.idxs)
                gates.extend(structure.tolist())
                if mname not in sg.consumers:
                    sg.consumers.append(mname)
            self.groups.append(sg)
            offset += sg.size
        self.num_structures = offset
        self.sites = {n: GateSite(f, torch.tensor(c, dtype=torch.long), torch.tensor(g, dtype=torch.long))
                      for n, (f, c, g) in sites.items()}
        gated = torch.zeros(self.num_structures, dtype=torch.bool)
        for name, site in self.sites.items():
            if len(set(site.channels.tolist())) != len(site.channels):
                raise SospError(f"input channels of '{name}' belong to two structures; "
                                "the gate model cannot represent this layer")
            gated[site.gates] = True
            module = modules[name]
            if is_grouped(module):
                _check_group_aligned(name, module, "input", site.lookup(self.num_structures, "cpu"))
        for name, table in produced.items():
            if is_grouped(modules[name]):
                _check_group_aligned(name, modules[name], "output", table)
        if not bool(gated.all()):
            first = self.names()[int((~gated).nonzero()[0])]
            raise SospError(f"structure '{first}' reaches no Conv2d or Linear layer that reads "
                            "it (its channels are outputs of the model, or Torch-Pruning does not "
                            "follow them to the layer that reads them), so its gate would change "
                            "nothing and its removal would change the model's outputs "
                            "(DESIGN.md §2)")

        _check_channels_stay_apart(self, model, example_input, produced)

    def names(self) -> list[str]:
        return [n for g in self.groups for n in g.names()]

    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names())}

    def indices_of(self, structure_names) -> torch.Tensor:
        index = self.index()
        unknown = [n for n in structure_names if n not in index]
        if unknown:
            raise SospError(f"unknown structure '{unknown[0]}'; names look like "
                            f"'{self.names()[0]}' (see structures(model, x))")
        return torch.tensor(sorted(index[n] for n in structure_names), dtype=torch.long)

    def random_removal(self, generator: torch.Generator) -> list[str]:
        """A random set of structure names to remove: from each group a uniformly drawn number
        of its channels, at most all but one (a removal that leaves every layer connected)."""
        remove = []
        for g in self.groups:
            k = int(torch.randint(0, g.size, (1,), generator=generator))
            remove += [f"{g.root}:{i}" for i in torch.randperm(g.size, generator=generator)[:k].tolist()]
        return remove

    def group_of(self) -> torch.Tensor:
        """LongTensor of length S: the group index of every structure."""
        return torch.cat([torch.full((g.size,), i, dtype=torch.long) for i, g in enumerate(self.groups)])

    @contextlib.contextmanager
    def gated(self, model: nn.Module, gates: torch.Tensor, unit: bool = False):
        """Run ``model`` with gates ``c`` (shape ``[S]``, or ``[B, S]`` for one gate vector per
        sample, which makes per-sample gate gradients the per-sample Jacobians).

        ``unit=True`` is for first derivatives at c = 1 (the caller guarantees every gate is 1):
        the forward pass skips the multiplication by 1 and the backward pass returns the input
        gradient unchanged; gate gradients are the same. Not for forward-mode or second
        derivatives (they need the product c·x)."""
        if gates.shape[-1] != self.num_structures:
            raise ValueError(f"expected {self.num_structures} gates, got shape {tuple(gates.shape)}")
        # slot S of the extended gate vector holds a constant 1 for channels of no structure
        ones = torch.ones(*gates.shape[:-1], 1, dtype=gates.dtype, device=gates.device)
        extended = torch.cat([gates, ones], dim=-1)
        if gates.dim() == 1:
            extended = extended.unsqueeze(0)
        with self.site_hooks(model, lambda lookup, _: _gate_hook(lookup, extended, unit), gates.device):
            yield model

    @contextlib.contextmanager
    def site_hooks(self, model: nn.Module, make_hook, device):
        """Within the block, every gate site (consumer module) runs the forward pre-hook
        ``make_hook(lookup, module)``; ``lookup`` maps the site's input channels to gate slots
        (slot S: channels of no structure). Hooks are removed on exit, also after an exception."""
        modules = dict(model.named_modules())
        handles = []
        try:
            for name, site in self.sites.items():
                module = modules[name]
                if isinstance(module, nn.Linear):   # runs first: the gate hooks gate dimension 1
                    handles.append(module.register_forward_pre_hook(_flat_input_check(name)))
                hook = make_hook(site.lookup(self.num_structures, device), module)
                handles.append(module.register_forward_pre_hook(hook))
            yield model
        finally:
            for h in handles:
                h.remove()


# what a structure's channels may pick up from other structures' on their way to a gate site,
# relative to what they carry (float32 rounding: ~1e-7; channel mixing: the mixing weights)
MIXING_TOLERANCE = 1e-3


def _check_channels_stay_apart(ss: StructureSet, model: nn.Module, example_input: torch.Tensor,
                               produced: dict[str, torch.Tensor]) -> None:
    """The gate model's premise (DESIGN.md §2), tested numerically on ``example_input``: every
    channel a gate site reads for structure s is a function of s's channels alone — the producers'
    outputs reach it through per-channel operations only (BatchNorm, activations, pooling,
    depthwise convs, additions of channels of the same structure). Forward-mode AD, twice: each
    producer's output channel of structure s gets the tangent r_s (random, one per structure; a
    second draw r'_s) times a fixed random field n (the same in both draws: a constant would
    vanish in an instance normalisation), and every gate site records the tangent t it reads
    and passes its input on without one, so that tangents go from producers to the first layers
    reading them only. Then t_i / r_s(i) = t'_i / r'_s(i) at every channel i (r = 1 for channels
    of no structure, which must not pick up a tangent either). An operation that mixes
    channels, which the name-based refusals of ``_check_mapped`` do not know (a channel shuffle
    by reshape, a custom autograd function with a forward-mode rule), breaks the equality and is
    refused in one line. A model with a function that has no forward-mode rule is not tested
    here (``check_gates`` measures it)."""
    load_jvp_decompositions()
    generator = torch.Generator().manual_seed(0)
    draws = [1.0 + torch.rand(ss.num_structures + 1, generator=generator, dtype=torch.float64)
             for _ in range(2)]
    for r in draws:
        r[-1] = 1.0          # slot S: channels of no structure
    noise: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        seen = [_site_tangents(ss, model, example_input[:1], produced, r, noise, generator) for r in draws]
    except (_Untestable, NotImplementedError, RuntimeError):
        return   # a function without a forward-mode rule (a custom autograd function without
        # jvp: NotImplementedError; an ATen function: RuntimeError): not testable here
    finally:
        model.train(was_training)
    names = ss.names()
    for name, site in ss.sites.items():
        t, t2 = seen[0].get(name), seen[1].get(name)
        if t is None or t2 is None:
            continue
        slots = site.lookup(ss.num_structures, "cpu")
        u = t.double().cpu() / channel_shaped(draws[0][slots], t.dim())
        u2 = t2.double().cpu() / channel_shaped(draws[1][slots], t2.dim())
        scale = max(u.abs().max().item(), u2.abs().max().item())
        gap = (u - u2).abs()
        if not math.isfinite(scale) or scale == 0.0 or gap.max().item() <= MIXING_TOLERANCE * scale:
            continue    # (a model with non-finite weights is refused where it is scored)
        channel = int(gap.transpose(0, 1).reshape(gap.shape[1], -1).amax(1).argmax())
        slot = int(slots[channel])
        which = ("of no structure, carries structures' channels" if slot == ss.num_structures else
                 f"gated as structure '{names[slot]}', carries other structures' channels too")
        raise SospError(f"input channel {channel} of '{name}', {which} (by "
                        f"{gap.max().item() / scale:.2g} of what it carries, measured by "
                        "forward-mode AD on the example input): an operation between the layers "
                        "writing it and this one mixes channels in a way Torch-Pruning traces as "
                        "element-wise (a channel shuffle, a custom function), so a gate at 0 would "
                        "not be the removal of a structure (DESIGN.md §2)")


def _site_tangents(ss: StructureSet, model: nn.Module, x: torch.Tensor, produced: dict[str, torch.Tensor],
                   r: torch.Tensor, noise: dict[str, torch.Tensor], generator: torch.Generator) -> dict:
    """One forward-mode pass of :func:`_check_channels_stay_apart`: every producer's output
    channel of structure s gets the tangent r_s·n (``noise[name]``, drawn on the first pass), and
    every gate site's input tangent is recorded and removed. Returns {site: tangent or None}."""
    modules = dict(model.named_modules())
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(param.device, param.dtype if x.is_floating_point() else x.dtype)
    reads: dict[str, torch.Tensor | None] = {}

    def inject(name, table):
        def hook(module, args, out):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            _require_channels_on_dim_one(module, out)
            primal = fwad.unpack_dual(out).primal
            if name not in noise:
                noise[name] = torch.randn(primal.shape, generator=generator, dtype=torch.float64)
            return fwad.make_dual(primal, (noise[name] * channel_shaped(r[table], out.dim())).to(primal))
        return hook

    def record(name):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            _require_channels_on_dim_one(module, args[0])
            primal, tangent = fwad.unpack_dual(args[0])
            reads[name] = None if tangent is None else tangent.detach().clone()
            return (primal,) + tuple(args[1:])
        return hook

    from .pruning.lean import eval_batchnorm_as_affine   # (a cycle at import time)

    handles = []
    try:
        for name, table in produced.items():
            extended = torch.where(table >= 0, table, torch.tensor(ss.num_structures))
            handles.append(modules[name].register_forward_hook(inject(name, extended)))
        for name in ss.sites:
            handles.append(modules[name].register_forward_pre_hook(record(name)))
        # eval-mode BatchNorm as x·scale + shift: the same function, whose forward-mode rule
        # costs two element-wise operations instead of ATen's batch_norm decomposition (~30×)
        with torch.no_grad(), fwad.dual_level(), eval_batchnorm_as_affine(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return reads


class _Untestable(Exception):
    """A model :func:`_check_channels_stay_apart` cannot test."""


def _require_channels_on_dim_one(module: nn.Module, x: torch.Tensor) -> None:
    """:class:`_Untestable` for a linear layer whose input or output ``x`` is not [batch,
    features]: its features are on the last dimension (refused at the gate sites)."""
    if isinstance(module, nn.Linear) and x.dim() != 2:
        raise _Untestable


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise conv: one filter per channel (part of a structure, not a gate site)."""
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels > 1


def is_grouped(module: nn.Module) -> bool:
    """A grouped conv that is not depthwise (ResNeXt, RegNet): its structures take one channel
    position of every group (module docstring)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and not is_depthwise(module)


def _structure_group(root: str, channels: int, offset: int, group, names: dict,
                     dg: tp.DependencyGraph) -> StructureGroup:
    """The structure group of a Torch-Pruning group of ``channels`` root channels: one structure
    per channel, or per channel position when grouped convs are in the group, or when the
    channels are split into equal parts that meet again (module docstring). A grouped conv with
    G groups over n = C/P of the channels (it reads or writes the parts of a split: P root
    channels per channel of its own) needs P·G root channels per structure: structure j is then
    channel position j of each of its groups, with the channels of every part that meet there."""
    grouped = {}
    for it in group.items:
        module = it.dep.target.module
        if is_grouped(module):
            n = _channel_count(module, dg.is_out_channel_pruning_fn(it.dep.handler))
            per_channel = channels // n if n < channels and channels % n == 0 else 1
            grouped[names[module]] = (module.groups, module.groups * per_channel)
    g = math.lcm(*(factor for _, factor in grouped.values()), _split_parts(root, channels, group))
    if channels % g:
        first = next(iter(grouped))
        raise SospError(f"the {channels} channels of '{root}' cannot be split into {g} equal "
                        f"channel groups for grouped convolution '{first}' (groups="
                        f"{grouped[first][0]}); structures of grouped convolutions take one channel "
                        "position of every group")
    return StructureGroup(root=root, size=channels // g, offset=offset, channel_groups=g)


_CHANNEL_SPLITS = (tp.ops._SplitOp, tp.ops._UnbindOp)


def _split_parts(root: str, channels: int, group) -> int:
    """P when the root's channels are split into P equal parts that meet again element-wise
    (a GLU written ``a, b = h.chunk(2, 1); a * b.sigmoid()``: P = 2), else 1.

    There channel j of one part and channel j of every other part reach the same channel of a
    later layer, so they are removed together: one structure is channels j, j + C/P, ..., the
    layout of channel groups (module docstring). Torch-Pruning's groups keep one root channel
    per reached channel (``Group.add_and_merge``), so the coupling is found by following its
    dependency graph from the root as ``get_pruning_group`` does, keeping every root channel."""
    if not any(isinstance(it.dep.target.module, _CHANNEL_SPLITS) for it in group.items):
        return 1
    start = group[0].dep
    first = [tp._helpers._HybridIndex(idx=i, root_idx=i) for i in range(channels)]
    stack, seen = [(start.target, start.handler, first)], set()
    reached: dict[tuple, set[int]] = {}   # (node, pruning function, channel) → root channels
    while stack:
        node, handler, idxs = stack.pop()
        for dep in node.dependencies:
            if not dep.is_triggered_by(handler):
                continue
            mapped = idxs
            for mapping in dep.index_mapping:
                if mapping is not None:
                    mapped = mapping(mapped)
            key = (dep.target, dep.handler, tuple(mapped))
            if not mapped or key in seen:
                continue
            seen.add(key)
            for i in mapped:
                reached.setdefault((dep.target, dep.handler, i.idx), set()).add(i.root_idx)
            stack.append((dep.target, dep.handler, mapped))
    together = {frozenset(r) for r in reached.values() if len(r) > 1}
    if not together:
        return 1
    parts = max(len(t) for t in together)
    size = channels // parts
    for t in together:
        j = min(t)
        if channels % parts or set(t) != {j + k * size for k in range(parts)}:
            shown = ", ".join(str(c) for c in sorted(t)[:4])
            raise SospError(f"channels {shown} of '{root}' reach one channel of a later layer "
                            f"together, not as channels j, j + {size}, ... of {parts} equal parts "
                            "would, so sosp cannot make structures of them; supported: parts of "
                            "equal size combined element-wise, as in a, b = x.chunk(2, 1); "
                            "a * b.sigmoid()")
    return parts


def _check_mapped(item, dg: tp.DependencyGraph, root: str, names: dict) -> None:
    """Refuse what Torch-Pruning maps a structure's channels through but cannot remove them from:
    a GLU; a function along the channels, a padding of them or a matrix product over them, all of
    which it traces as element-wise; a slice with fixed bounds or a split at fixed sizes; and any
    mapping onto channels a layer does not have (it mis-traces some splits, e.g. chunks
    concatenated in another order)."""
    module, fn = item.dep.target.module, item.dep.target.grad_fn
    if isinstance(module, tp.ops._ElementWiseOp):
        _check_elementwise(fn, len(item.idxs), root)
    if isinstance(module, tp.ops._SplitOp) and fn is not None and fn.name().startswith("SplitWithSizes") \
            and _saved_dim_is_channels(fn):
        sizes = list(fn._saved_split_sizes)
        raise SospError(f"torch.split splits the channels of '{root}' at the fixed sizes {sizes}, "
                        "which cannot follow a removal (the pruned model would not run); "
                        "supported: parts of equal size (x.chunk(2, 1))")
    if isinstance(module, tp.ops._SliceOp) and module.dim == 1:
        raise SospError(f"the channels of '{root}' are sliced with fixed bounds "
                        f"({_slice_text(module)}), which would select other channels once some "
                        "are removed; supported: parts of equal size (x.chunk(2, 1))")
    if module not in names or not item.idxs:
        return
    outputs = dg.is_out_channel_pruning_fn(item.dep.handler)
    count = _channel_count(module, outputs)
    if count is not None and max(item.idxs) >= count:
        raise SospError(f"Torch-Pruning maps {len(item.idxs)} channels of '{root}' onto the "
                        f"{count} {'output' if outputs else 'input'} channels of "
                        f"'{names[module] or type(module).__name__}': an operation between them "
                        "changes or reorders the channels in a way it does not trace, so their "
                        "structures cannot be gated")


def _check_elementwise(fn, channels: int, root: str) -> None:
    """Refuse an operation on ``channels`` channels of ``root`` that Torch-Pruning traces as
    element-wise (autograd function ``fn``) but that is not: a GLU, a function along the
    channels, a padding of them, a matrix product over them (:func:`_check_mapped`)."""
    if fn is None:
        return
    if "Glu" in fn.name():
        raise SospError(f"a GLU (F.glu / nn.GLU) halves the channels of '{root}', which "
                        "Torch-Pruning does not map to the layer reading them; write it as "
                        "a, b = x.chunk(2, 1); a * b.sigmoid(), which sosp prunes as structures of "
                        "two channels")
    if _combines_channels(fn, channels):
        raise SospError(f"{fn.name()} combines the channels of '{root}' "
                        "(a softmax, cumulative sum, flip, roll, sort, gather or reduction along "
                        "dimension 1), which Torch-Pruning traces as element-wise: a gate at 0 "
                        "would not be the removal of a channel (DESIGN.md §2)")
    if _pads_channels(fn):
        raise SospError(f"{fn.name()} pads the channels of '{root}' (F.pad on "
                        "the dimension before H and W, as an option-A shortcut or "
                        "F.local_response_norm does), which Torch-Pruning traces as element-wise: "
                        "channel j would be gated where it is not, and the padding's fixed width "
                        "cannot follow a removal (DESIGN.md §2); supported instead: a 1×1 "
                        "convolution shortcut (option B, as sosp's CIFAR ResNets have), BatchNorm")
    if channels in _contracted_sizes(fn):
        raise SospError(f"{fn.name()} is a matrix product over a dimension of "
                        f"{channels}, the number of channels of '{root}' (as in attention or a "
                        "Gram matrix over channels), which Torch-Pruning traces as element-wise: "
                        "it mixes the channels, so a gate at 0 would not be the removal of a "
                        "channel (DESIGN.md §2)")


# autograd functions that combine values along the dimensions they save (``_saved_dim`` or
# ``_saved_dims``; without one, as a full reduction, along every dimension)
_ALONG_A_DIMENSION = {
    "Softmax", "LogSoftmax", "Cumsum", "Cumprod", "Cummax", "Cummin", "Logcumsumexp", "Flip",
    "Roll", "Mean", "Sum", "Nansum", "Prod", "Max", "Min", "Amax", "Amin", "Norm",
    "LinalgVectorNorm", "Std", "Var", "StdMean", "VarMean", "Logsumexp", "Sort", "Topk",
    "Kthvalue", "Median", "Nanmedian", "Mode", "IndexSelect", "Gather"}


def _function_name(grad_fn) -> str:
    """``SoftmaxBackward0`` → ``Softmax``: the function an autograd node is the backward of."""
    return re.sub(r"Backward\d*$", "", grad_fn.name())


def _signed(dim: int) -> int:
    """A dimension as autograd saves it (negative ones wrapped to unsigned 64 bits), signed."""
    return dim - 2 ** 64 if dim >= 2 ** 63 else dim


def _combines_channels(grad_fn, channels: int) -> bool:
    """Whether the autograd function ``grad_fn`` combines values along dimension 1 (the channels
    of a conv's [B, C, H, W] output, the features of a linear layer's [B, F]) of a tensor with
    at least ``channels`` there, as far as the sizes it saves tell (tokens [B, T, F]: T < F
    channels read on the last dimension, which gated linear layers refuse)."""
    if grad_fn is None or _function_name(grad_fn) not in _ALONG_A_DIMENSION:
        return False
    saved = getattr(grad_fn, "_saved_dim", getattr(grad_fn, "_saved_dims", None))
    if saved is None:
        return True                                    # a reduction over every dimension
    dims = [_signed(d) for d in (saved if isinstance(saved, tuple) else (saved,))]
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    if sizes is None:
        tensor = getattr(grad_fn, "_saved_self", None)
        if tensor is None and "Softmax" in grad_fn.name():
            tensor = getattr(grad_fn, "_saved_result", None)
        sizes = None if tensor is None else tensor.shape
    rank = None if sizes is None else len(sizes)
    if rank is not None and (rank < 2 or sizes[1] < channels):
        return False
    return any(_is_dim_one(d, rank) for d in dims)


def _is_dim_one(dim: int, rank: int | None) -> bool:
    """Whether ``dim`` (signed: :func:`_signed`) is dimension 1 of a tensor of ``rank``
    dimensions (unknown rank: only a non-negative 1 is known to be)."""
    return dim == 1 or (rank is not None and dim == 1 - rank)


# matrix products: (saved operand, a dimension it sums over); what ``@`` and einsum run, and
# attention, whose weights sum over the query's and key's features and the value's positions
_PRODUCTS = {
    "Mm": (("self", -1), ("mat2", -2)), "Bmm": (("self", -1), ("mat2", -2)),
    "Addmm": (("mat1", -1), ("mat2", -2)), "Baddbmm": (("batch1", -1), ("batch2", -2)),
    "Addbmm": (("batch1", -1), ("batch2", -2)), "Mv": (("self", -1), ("vec", -1)),
    "Addmv": (("mat", -1), ("vec", -1)), "Dot": (("self", -1), ("tensor", -1)),
    "Vdot": (("self", -1), ("other", -1)),
    "ScaledDotProductAttention": (("query", -1), ("key", -1), ("value", -2))}


def _contracted_sizes(grad_fn) -> set[int]:
    """The sizes of the dimensions a matrix product (mm, bmm, addmm, ..., scaled dot-product
    attention) sums over, from the operands or sizes its autograd function saved; empty for any
    other function, for a product with a weight (a linear layer), or if it saved nothing."""
    if grad_fn is None:
        return set()
    name = _function_name(grad_fn)
    name = "ScaledDotProductAttention" if name.startswith("ScaledDotProduct") else name
    if name not in _PRODUCTS or _multiplies_a_parameter(grad_fn):
        return set()
    found = set()
    for operand, dim in _PRODUCTS[name]:
        sizes = getattr(grad_fn, f"_saved_{operand}_sym_sizes", None)
        if sizes is None:
            try:
                tensor = getattr(grad_fn, f"_saved_{operand}", None)
            except RuntimeError:                      # not saved (the other operand needs no grad)
                tensor = None
            sizes = None if not isinstance(tensor, torch.Tensor) else tensor.shape
        if sizes is not None and len(sizes) >= -dim:
            found.add(int(sizes[dim]))
    return found


def _pads_channels(grad_fn) -> bool:
    """Whether ``grad_fn`` is a constant padding (``F.pad``) of dimension −3 or an earlier one:
    the channels of an [B, C, H, W] image (F.pad's pairs run from the last dimension; spatial
    padding has at most two), or the channels of F.local_response_norm's [B, 1, C, H, W] view."""
    if grad_fn is None or not grad_fn.name().startswith("ConstantPadNd"):
        return False
    pad = tuple(getattr(grad_fn, "_saved_pad", ()))
    return any(pad[4:])


_VIEWS = {"T", "Transpose", "Permute", "View", "UnsafeView", "Reshape", "ReshapeAlias", "Expand",
          "Unsqueeze", "Squeeze", "Alias", "Clone", "ToCopy"}


def _multiplies_a_parameter(grad_fn) -> bool:
    """Whether an operand of ``grad_fn`` is a parameter, seen through views (a transpose, a
    reshape): the product of a linear layer on a 3-d input, which Torch-Pruning does not
    attribute to the layer and the gate-site check names instead."""
    for fn, _ in grad_fn.next_functions:
        while fn is not None and _function_name(fn) in _VIEWS:
            fn = fn.next_functions[0][0]
        if fn is not None and "AccumulateGrad" in fn.name():
            return True
    return False


def _saved_dim_is_channels(grad_fn) -> bool:
    """Whether the dimension ``grad_fn`` saved (``_saved_dim``, negative ones as torch stores them:
    wrapped to unsigned 64 bits) is dimension 1 of its input (``_saved_self_sym_sizes``)."""
    return _is_dim_one(_signed(grad_fn._saved_dim), len(grad_fn._saved_self_sym_sizes))


def _channel_count(module: nn.Module, outputs: bool) -> int | None:
    if isinstance(module, nn.Conv2d):
        return module.out_channels if outputs else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if outputs else module.in_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    return None


def _slice_text(op) -> str:
    """``x[:, a:b]`` as the model wrote it (torch records an open end as a huge number)."""
    start = "" if not op.start else op.start
    end = "" if op.end is None or op.end >= 2 ** 62 else op.end
    step = "" if op.step in (None, 1) else f":{op.step}"
    return f"x[:, {start}:{end}{step}]"


def _check_group_aligned(name: str, module: nn.Conv2d, side: str, structure: torch.Tensor) -> None:
    """A grouped conv stays a grouped conv after any removal only if every one of its groups
    holds the same structures at the same positions (its ``side`` channels: ``structure[i]`` is
    the structure of channel i, or a value for "none"), which Torch-Pruning's pruning of grouped
    convs assumes (it keeps the same positions in every group)."""
    table = structure.reshape(module.groups, -1)
    if not bool((table == table[:1]).all()):
        raise SospError(f"the {side} channels of grouped convolution '{name}' (groups="
                        f"{module.groups}) do not hold the same structures at the same position of "
                        "every group, so removing a structure would unbalance its groups; supported: "
                        "grouped convs whose channels are read in group order")


def _flat_input_check(name: str):
    """Pre-hook refusing a linear gate site whose input is not [batch, features]: gates act on
    dimension 1, the channels of a conv's input, which a linear layer on [B, ..., features]
    (tokens, channels-last maps) does not read as its features."""

    def hook(module, args):
        if args[0].dim() != 2:
            raise SospError(f"linear layer '{name}' reads a {args[0].dim()}-d input of shape "
                            f"{tuple(args[0].shape)}; a gated linear layer must read [batch, "
                            "features] (flatten before it)")

    return hook


def _gate_hook(lookup: torch.Tensor, extended: torch.Tensor, unit: bool = False):
    """Pre-hook multiplying the consumer's input channels by their gates (DESIGN.md §2)."""

    def hook(module, args):
        x = args[0]
        scale = extended[:, lookup].to(x.dtype)
        scale = scale.reshape(scale.shape + (1,) * (x.dim() - 2))
        return ((_UnitGate.apply(x, scale) if unit else x * scale),) + tuple(args[1:])

    return hook


class _UnitGate(torch.autograd.Function):
    """x·c at c = 1 (DESIGN §2): forward x, backward x̄ = ȳ and c̄ = Σ ȳ·x over the dimensions
    that c broadcasts along — the gradients of x·c at c = 1, without the multiplications by 1."""

    @staticmethod
    def forward(ctx, x, scale):   # ctx in forward: see the note in pruning/lean.py
        ctx.save_for_backward(x)
        ctx.scale_shape = scale.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad, torch.mul(grad, x).sum_to_size(ctx.scale_shape)


def dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, traced through autograd on one input."""
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        try:
            # a tuple: Torch-Pruning first tries model(*example_inputs), which on a tensor would
            # trace the model on its first example unbatched ([C, H, W]: dimension 1 not the channels)
            return tp.DependencyGraph().build_dependency(model, example_inputs=(example_input,))
        except SospError:
            raise
        except Exception as exc:   # a model Torch-Pruning cannot trace (e.g. a reshape it cannot map)
            try:                   # ... or one that does not run on this input at all
                with torch.no_grad():
                    model(example_input)
            except Exception as own:
                weight = next(model.parameters(), None)
                if weight is not None and weight.dtype != example_input.dtype:
                    hint = (f"the input is {example_input.dtype}, the model's parameters are "
                            f"{weight.dtype}: convert the input")
                else:
                    hint = "it may need larger images (dataset.image_size)"
                raise SospError(f"{type(model).__name__} does not run on an input of shape "
                                f"{tuple(example_input.shape)} ({describe(own)}); {hint}") from own
            raise SospError(f"Torch-Pruning could not build the dependency graph of "
                            f"{type(model).__name__} on an input of shape "
                            f"{tuple(example_input.shape)} ({describe(exc)})") from exc


_CHANNEL_NORMS = (nn.GroupNorm, nn.LayerNorm)


def _normalisation_error(norm: nn.Module, name: str, producer: str) -> SospError:
    """(DESIGN.md §2: a gate at 0 must be the removal of the channel)"""
    return SospError(f"{type(norm).__name__} '{name}' normalises the channels of '{producer}' "
                     "together, so a gate at 0 is not the removal of a channel (DESIGN.md §2); "
                     "supported normalisations: BatchNorm and InstanceNorm (each channel on its own)")


# convolutions other than Conv2d (transposed, 1-d, 3-d): a structure's channels read by one would
# not be gated there (a gate at 0 would not be their removal), and written by one, not removed
# from its weights by the gate model
_UNGATED_CONVOLUTIONS = nn.modules.conv._ConvNd


def _ungated_layer_error(module: nn.Module, name: str, root: str) -> SospError:
    kind = type(module).__name__
    return SospError(
        f"{kind} '{name}' reads or writes the channels of the structures of '{root}', and sosp "
        "gates channels only where Conv2d and Linear layers read them (DESIGN.md §2): a gate at 0 "
        f"would not be the removal of those channels, so a model with a {kind} beside a pruned "
        "layer is not supported")


def _refuse_channel_normalisation(dg: tp.DependencyGraph, names: dict, ignored: set) -> None:
    """Refuse a GroupNorm / LayerNorm that reads the channels of a convolution or linear layer
    (through element-wise operations, reshapes, per-channel layers and depthwise convolutions):
    such a layer's channels are a structure's (unless the layer is ignored, as the classifier),
    and the normalisation's statistics span them. Checked on the graph before the groups are
    built, because Torch-Pruning's grouping can take minutes and tens of GiB on a model that
    reshapes its channels into windows (torchvision's Swin: > 10 GiB at 64 × 64)."""
    for module, node in dg.module2node.items():
        if not isinstance(module, _CHANNEL_NORMS):
            continue
        todo, seen = list(node.inputs), set()
        while todo:
            producer = todo.pop()
            if producer in seen:
                continue
            seen.add(producer)
            m = producer.module
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not is_depthwise(m):
                if m not in ignored:
                    raise _normalisation_error(module, names[module], names[m])
                continue
            todo.extend(producer.inputs)


def classifier_name(model: nn.Module) -> str:
    """The last Conv2d/Linear registered in the model: its outputs are the logits."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            last = name
    if last is None:
        raise SospError("model has no Conv2d or Linear layer to prune")
    return last
