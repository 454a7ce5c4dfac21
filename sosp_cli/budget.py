"""Exact parameter and MAC cost of removing structures (DESIGN.md §4, ``prune.target``).

Removing a channel shrinks every layer of its coupled group: the producers lose an output
filter, the consumers lose an input slice, BatchNorms and depthwise convs lose a channel. A
conv or linear layer costs ``k · out · in / G`` parameters (``k`` = kernel area, G = groups; a
grouped conv's structures take a channel from every group, so the count stays a whole number)
and ``k · out · in · H·W / G`` MACs, a product of two channel counts — so removing structures
from two groups that meet in one layer is not additive. :class:`CostModel` keeps the current channel
counts of every layer and returns the exact cost change of removing one more structure, which
the selection uses to stop at the first structure that reaches a params / FLOPs target. The
totals agree with ``count_params`` and ``FlopCounterMode`` on the physically pruned model
(a test checks this for the registered models).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .measure import count_macs, count_params
from .structures import StructureSet, is_depthwise


@dataclass
class _Layer:
    name: str
    params_per_pair: int            # kernel area: weights per (output, input) channel pair if dense
    macs_per_pair: int              # MACs per such pair (kernel area × H·W)
    bias: bool
    groups: int                     # a grouped conv's groups (1 otherwise): it connects 1/groups of the pairs
    out_count: dict = field(default_factory=dict)   # structure → #output channels it owns here
    in_count: dict = field(default_factory=dict)    # structure → #input channels it owns here
    out_now: int = 0                                # current channel counts
    in_now: int = 0


class CostModel:
    """Current parameter / MAC totals of a model as structures are removed one by one."""

    def __init__(self, model: nn.Module, ss: StructureSet, example_input: torch.Tensor):
        modules = dict(model.named_modules())
        spatial = _output_areas(model, example_input)
        self.params_total = count_params(model)
        self.macs_total = count_macs(model, example_input)
        self.params_now, self.macs_now = self.params_total, self.macs_total
        self.layers: list[_Layer] = []
        self.touch: dict[int, list[tuple[_Layer, int, int]]] = defaultdict(list)
        self.linear_params = torch.zeros(ss.num_structures, dtype=torch.long)
        self.linear_macs = torch.zeros(ss.num_structures, dtype=torch.long)
        produced: dict[str, list[int]] = defaultdict(list)   # layer → structure of each out channel
        for g in ss.groups:
            for p in g.producers:
                produced[p] = g.structure_of(torch.arange(g.channels)).tolist()
        for name, module in modules.items():
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            if is_depthwise(module):   # one filter per channel, cost linear in the channel count
                per = module.weight[0].numel() + (1 if module.bias is not None else 0)
                macs = module.weight[0].numel() * spatial.get(name, 1)
                for s in self._depthwise_structures(ss, name):
                    self.linear_params[s] += per
                    self.linear_macs[s] += macs
                continue
            weight = module.weight
            k = weight[0, 0].numel()
            groups = module.groups if isinstance(module, nn.Conv2d) else 1
            outs, ins = weight.shape[0], weight.shape[1] * groups
            layer = _Layer(name, k, k * spatial.get(name, 1), module.bias is not None, groups)
            for s in produced.get(name, []):
                layer.out_count[s] = layer.out_count.get(s, 0) + 1
            site = ss.sites.get(name)
            if site is not None:
                for s in site.gates.tolist():
                    layer.in_count[s] = layer.in_count.get(s, 0) + 1
            layer.out_now, layer.in_now = outs, ins
            for s in set(layer.out_count) | set(layer.in_count):
                self.touch[s].append((layer, layer.out_count.get(s, 0), layer.in_count.get(s, 0)))
            self.layers.append(layer)
        for name, channels, gates in ss.norm_sites:
            self.linear_params.index_add_(0, gates, torch.full((len(gates),), 2, dtype=torch.long))

    @staticmethod
    def _depthwise_structures(ss: StructureSet, name: str) -> list[int]:
        for g in ss.groups:
            if name in g.depthwise:
                return g.structure_of(torch.arange(g.channels)).tolist()
        return []

    def removal_cost(self, s: int) -> tuple[int, int]:
        """(params, MACs) removed by taking structure ``s`` out of the current model."""
        params, macs = int(self.linear_params[s]), int(self.linear_macs[s])
        for layer, n_out, n_in in self.touch[s]:
            # out·in − (out − n_out)(in − n_in) channel pairs disappear; a grouped conv connects
            # 1/G of them (its structures hold a multiple of G channels: a whole number)
            pairs = n_out * layer.in_now + n_in * layer.out_now - n_out * n_in
            params += layer.params_per_pair * pairs // layer.groups + (n_out if layer.bias else 0)
            macs += layer.macs_per_pair * pairs // layer.groups
        return params, macs

    def removal_cost_of(self, block: list[int]) -> tuple[int, int]:
        """(params, MACs) removed by taking every structure of ``block`` out together: the sum
        of their costs removed one after the other (exact where they meet in one layer); the
        model's counts are left as they are."""
        params, macs, done = 0, 0, []
        try:
            for s in block:
                p, m = self.removal_cost(s)
                self._shrink(s, 1)
                done.append(s)
                params, macs = params + p, macs + m
        finally:
            for s in done:
                self._shrink(s, -1)
        return params, macs

    def _shrink(self, s: int, sign: int) -> None:
        for layer, n_out, n_in in self.touch[s]:
            layer.out_now -= sign * n_out
            layer.in_now -= sign * n_in

    def remove(self, s: int) -> tuple[int, int]:
        """Remove ``s``; returns its (params, MACs) cost. Exact for layers touched by two groups."""
        params, macs = self.removal_cost(s)
        self._shrink(s, 1)
        self.params_now -= params
        self.macs_now -= macs
        return params, macs


def _output_areas(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Output H·W of every conv (1 for linear layers) on one example input."""
    areas, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(
                lambda m, i, o, name=name: areas.__setitem__(name, o.shape[-1] * o.shape[-2])))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(example_input[:1])
    model.train(was_training)
    for h in handles:
        h.remove()
    return areas
