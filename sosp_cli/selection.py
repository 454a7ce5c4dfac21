"""Selection: which structures to remove, for every method the same code (DESIGN.md §4).

Budget: ``target=structures|params|flops`` and ``ratio`` — remove structures in order until that
fraction of the *original* model's structures / parameters / MACs is gone. The cut stops at the
structure that crosses the target — taken if that lands closer to the target than stopping
short, so the achieved ratio is within half a structure's cost of the request (a residual
channel of an early stage can cost several % of the MACs of a small model). Costs are exact
(:class:`budget.CostModel`): removing a channel also shrinks its consumers.

Order: ``scope=global`` ranks every structure of every layer together by score (the SOSP
setting); ``scope=local`` takes structures in order of their rank *within* their layer group
divided by the group's size, so every group loses the same fraction (±1 channel).
``normalize=layer_mean|layer_max`` divides each group's scores by their mean / max first.

Rounding: with ``round_to=k`` every group that loses structures keeps a multiple of k of them
(per channel group for a grouped convolution: its channels per group), as Torch-Pruning's
``round_to`` — the channel counts that CPU and GPU kernels run fastest on (README, "Budgets and
selection"). A group then loses structures only in blocks: its first block takes it down to a
multiple of k, every later block is k structures, and a block is removed when the walk has
reached all of its members (the group's lowest-ranked ones), at their summed cost — so the
achieved ratio is within half a block's cost of the target. ``k = 1`` is the plain walk.

Guards: no group keeps fewer than ``min_channels`` channels, and no group loses more than
``max_layer_ratio`` of its original channels (:func:`removal_caps`: per group, the most
structures a selection may remove). A structure the guards keep is skipped, counted
(``guard_skipped``) and reported. When the guards keep so much that the walk runs out of
structures before the budget, the selection says so (``budget_met`` False): the achieved ratio is
then short of the request by more than the rounding above, and the runner warns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .budget import CostModel
from .errors import SospError, check_choice
from .structures import StructureSet

TARGETS = ("structures", "params", "flops")
TARGET_NOUNS = {"structures": "structures", "params": "parameters", "flops": "MACs"}   # for messages


@dataclass
class Selection:
    remove: list[str]
    target: str
    requested_ratio: float
    achieved_ratio: float                   # fraction of the original total of ``target`` removed
    structures_ratio: float                 # fraction of the original structures removed
    params_ratio: float
    flops_ratio: float
    guard_skipped: int                      # structures the guards kept although they ranked for removal
    layer_ratios: dict[str, float] = field(default_factory=dict)  # group root → fraction removed
    budget_met: bool = True                 # False: the guards ran the walk out before the budget


@dataclass
class Originals:
    """The unpruned model's totals, against which every step's budget is measured."""

    structures: int
    params: int
    macs: int
    group_sizes: dict[str, int]


def validate_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise SospError(f"prune.ratio={ratio} is outside [0, 1); pass a fraction to remove, "
                        "e.g. prune.ratio=0.5")


def validate(ratio: float, target: str, scope: str, min_channels: int, max_layer_ratio: float,
             normalize: str, round_to: int = 1) -> None:
    validate_ratio(ratio)
    check_choice("prune.target", target, TARGETS)
    check_choice("prune.scope", scope, ("global", "local"))
    check_choice("prune.normalize", normalize, ("none", "layer_mean", "layer_max"))
    validate_guards(min_channels, max_layer_ratio, round_to)


def validate_guards(min_channels: int, max_layer_ratio: float, round_to: int = 1) -> None:
    """The layer guards (and ``round_to``), one line for a bad one."""
    if min_channels < 1:
        raise SospError(f"prune.min_channels={min_channels} must be >= 1 (a layer is never emptied)")
    if not 0.0 < max_layer_ratio <= 1.0:
        raise SospError(f"prune.max_layer_ratio={max_layer_ratio} must be in (0, 1]")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise SospError(f"prune.round_to={round_to!r} must be an integer >= 1 (every pruned group "
                        "keeps a multiple of it; 1 = any count)")


def originals_of(cost: CostModel, ss: StructureSet) -> Originals:
    return Originals(ss.num_structures, cost.params_total, cost.macs_total,
                     {g.root: g.size for g in ss.groups})


def removal_caps(ss: StructureSet, originals: Originals | None, min_channels: int,
                 max_layer_ratio: float, round_to: int = 1) -> list[int]:
    """Per layer group (``ss.groups`` order): the most structures the guards let a selection
    remove from the current model — it keeps ``min_channels`` and loses at most
    ``max_layer_ratio`` of its original size, counted with what earlier steps removed — rounded
    down so that the group keeps a count :func:`select`'s ``round_to`` blocks can reach (a
    multiple of ``round_to``, or all it has now)."""
    caps = []
    for g in ss.groups:
        orig = originals.group_sizes.get(g.root, g.size) if originals else g.size
        # the guard compares an integer with max_layer_ratio · orig, so its floor is exact
        cap = max(0, min(g.size - min_channels, math.floor(max_layer_ratio * orig) - (orig - g.size)))
        if cap and round_to > 1:
            cap = max(0, g.size - math.ceil((g.size - cap) / round_to) * round_to)
        caps.append(cap)
    return caps


def normalized(scores: torch.Tensor, ss: StructureSet, how: str) -> torch.Tensor:
    if how == "none":
        return scores
    out = scores.clone().double()
    for g in ss.groups:
        part = out[g.offset:g.offset + g.size]
        scale = part.abs().mean() if how == "layer_mean" else part.abs().max()
        out[g.offset:g.offset + g.size] = part / scale.clamp_min(1e-30)
    return out


def order(scores: torch.Tensor, ss: StructureSet, scope: str) -> list[int]:
    """Structures in removal order (lowest score first; ties by index)."""
    if scope == "global":
        return torch.sort(scores, stable=True).indices.tolist()
    keys = torch.empty(ss.num_structures, dtype=torch.float64)
    for g in ss.groups:
        ranks = torch.empty(g.size, dtype=torch.float64)
        ranks[torch.sort(scores[g.offset:g.offset + g.size], stable=True).indices] = \
            torch.arange(1, g.size + 1, dtype=torch.float64)
        keys[g.offset:g.offset + g.size] = ranks / g.size
    return torch.sort(keys, stable=True).indices.tolist()


def select(scores: torch.Tensor, ss: StructureSet, cost: CostModel, ratio: float,
           target: str = "structures", scope: str = "global", min_channels: int = 1,
           max_layer_ratio: float = 1.0, normalize: str = "none",
           originals: Originals | None = None, round_to: int = 1) -> Selection:
    """Choose the structures to remove from the current model so that, counted against
    ``originals`` (default: the current model), ``ratio`` of ``target`` is removed."""
    validate(ratio, target, scope, min_channels, max_layer_ratio, normalize, round_to)
    S = ss.num_structures
    if scores.shape != (S,):
        raise SospError(f"expected {S} scores, got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise SospError("saliency scores contain NaN; check the model and data")
    orig = originals or originals_of(cost, ss)
    total = {"structures": orig.structures, "params": orig.params, "flops": orig.macs}
    removed = {"structures": orig.structures - S, "params": orig.params - cost.params_now,
               "flops": orig.macs - cost.macs_now}
    goal = ratio * total[target] - 1e-9 * total[target]  # reached when removed >= ratio · total
    group = ss.group_of().tolist()
    size_now = [g.size for g in ss.groups]
    size_orig = [orig.group_sizes.get(g.root, g.size) for g in ss.groups]
    caps = removal_caps(ss, orig, min_channels, max_layer_ratio, round_to)
    chosen, skipped = [], 0
    reached = [[] for _ in ss.groups]   # per group: structures the walk passed, not yet removed
    closer_short = False                 # stopped just short of the budget, as the closer cut
    for s in order(normalized(scores, ss, normalize), ss, scope):
        if removed[target] >= goal:
            break
        gi = group[s]
        reached[gi].append(s)
        if len(reached[gi]) < (size_now[gi] % round_to or round_to):
            continue   # the group's block is not complete yet (module docstring: rounding)
        block, reached[gi] = reached[gi], []
        n = len(block)
        if ss.groups[gi].size - size_now[gi] + n > caps[gi]:
            skipped += n
            continue
        params, macs = cost.removal_cost_of(block)
        step = {"structures": n, "params": params, "flops": macs}[target]
        if removed[target] + step - goal > goal - removed[target]:
            closer_short = True
            break  # stopping short of the target is closer to it than taking the block
        for t in block:
            cost.remove(t)
        removed["structures"] += n
        removed["params"] += params
        removed["flops"] += macs
        size_now[gi] -= n
        chosen += block
    names = ss.names()
    ratios = {k: removed[k] / total[k] for k in TARGETS}
    return Selection(remove=[names[i] for i in sorted(chosen)], target=target, requested_ratio=ratio,
                     achieved_ratio=ratios[target], structures_ratio=ratios["structures"],
                     params_ratio=ratios["params"], flops_ratio=ratios["flops"], guard_skipped=skipped,
                     layer_ratios={g.root: 1 - size_now[i] / size_orig[i] for i, g in enumerate(ss.groups)},
                     budget_met=closer_short or removed[target] >= goal)   # else the walk ran out
