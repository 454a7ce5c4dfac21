"""Selection: which structures to remove, given scores and a budget (DESIGN.md §4).

``scope=global`` ranks every structure of every layer together (the SOSP setting) and removes
the lowest-scoring ``round(ratio · S)``; ``scope=local`` removes ``floor(ratio · size)`` from
every structure group. Either way no group keeps fewer than ``min_channels`` channels: a
structure that would break that is skipped (the *guard*), which is counted and reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import SospError, check_choice
from .structures import StructureSet


@dataclass
class Selection:
    remove: list[str]
    requested_ratio: float
    achieved_ratio: float
    guard_skipped: int                      # structures the min_channels guard kept
    layer_ratios: dict[str, float] = field(default_factory=dict)  # group root → fraction removed


def validate_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise SospError(f"prune.ratio={ratio} is outside [0, 1); pass a fraction of structures "
                        "to remove, e.g. prune.ratio=0.5")


def select(scores: torch.Tensor, ss: StructureSet, ratio: float, min_channels: int = 1,
           scope: str = "global") -> Selection:
    validate_ratio(ratio)
    check_choice("prune.scope", scope, ("global", "local"))
    if min_channels < 1:
        raise SospError(f"prune.min_channels={min_channels} must be >= 1 (a layer is never emptied)")
    S = ss.num_structures
    if scores.shape != (S,):
        raise SospError(f"expected {S} scores, got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise SospError("saliency scores contain NaN; check the model and data")
    group = ss.group_of()
    sizes = torch.tensor([g.size for g in ss.groups])
    removed = torch.zeros(len(ss.groups), dtype=torch.long)
    chosen: list[int] = []
    skipped = 0
    if scope == "global":
        quota = [int(round(ratio * S))]
        order = [torch.sort(scores, stable=True).indices.tolist()]
        owners = [None]
    else:
        quota = [int(ratio * g.size) for g in ss.groups]
        order = [(g.offset + torch.sort(scores[g.offset:g.offset + g.size], stable=True).indices).tolist()
                 for g in ss.groups]
        owners = list(range(len(ss.groups)))
    for want, candidates, _ in zip(quota, order, owners):
        taken = 0
        for s in candidates:
            if taken >= want:
                break
            gi = int(group[s])
            if sizes[gi] - removed[gi] <= min_channels:
                skipped += 1
                continue
            removed[gi] += 1
            chosen.append(s)
            taken += 1
    names = ss.names()
    return Selection(remove=[names[i] for i in sorted(chosen)], requested_ratio=ratio,
                     achieved_ratio=len(chosen) / S, guard_skipped=skipped,
                     layer_ratios={g.root: float(removed[i]) / g.size for i, g in enumerate(ss.groups)})
