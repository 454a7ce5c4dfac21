"""Surgery: physical removal of structures, and reloading a pruned model (DESIGN.md §4).

Removal goes through Torch-Pruning: for every group with structures to remove, the group of
the root module's output channels is pruned, which cuts every coupled producer, BatchNorm,
depthwise conv and consumer input slice. The Torch-Pruning *pruning history* (module name,
out/in, indices) is the pruning plan: replayed on a freshly built model it rebuilds the pruned
architecture, so a checkpoint is ``{model spec, history, state_dict}`` and reloads without the
original weights.
"""
from __future__ import annotations

import copy
from collections import defaultdict

import torch
import torch.nn as nn

from .errors import SospError, describe
from .structures import StructureSet, dependency_graph


def remove_structures(model: nn.Module, structures: StructureSet, remove: list[str],
                      example_input: torch.Tensor) -> tuple[nn.Module, list]:
    """Return a physically pruned deep copy of ``model`` and its pruning history."""
    pruned = copy.deepcopy(model)
    was_training = pruned.training
    pruned.eval()
    modules = dict(pruned.named_modules())
    by_root: dict[str, set[int]] = defaultdict(set)
    for name in remove:
        root, _, j = name.rpartition(":")
        by_root[root].add(int(j))
    groups = {g.root: g for g in structures.groups}
    for root, js in by_root.items():
        if root not in groups:
            raise SospError(f"unknown structure group '{root}'")
        if len(js) >= groups[root].size:
            raise SospError(f"removing every channel of '{root}' would disconnect the network")
    # a structure's root channels: one, or one per channel group (grouped convs, structures.py)
    by_root_channels = {root: sorted(c for j in js for c in groups[root].channels_of(j))
                        for root, js in by_root.items()}
    dg = dependency_graph(pruned, example_input.to(_device(pruned)))
    # groups are pruned one at a time; each get_pruning_group maps indices through the
    # *current* concatenation offsets, so earlier cuts are accounted for.
    for root, channels in by_root_channels.items():
        module = modules[root]
        fn = dg.get_pruner_of_module(module).prune_out_channels
        group = dg.get_pruning_group(module, fn, channels)
        group.prune()
    _check_runs(pruned, model, example_input)
    pruned.train(was_training)
    return pruned, dg.pruning_history()


def _check_runs(pruned: nn.Module, model: nn.Module, example_input: torch.Tensor) -> None:
    """One forward pass of the pruned model: a layer whose removal Torch-Pruning cannot carry
    through (a reshape by channel groups, as in a channel shuffle) fails here, with its name."""
    try:
        with torch.no_grad():
            pruned(example_input.to(_device(pruned)))
    except Exception as exc:
        raise SospError(f"the physically pruned {type(model).__name__} does not run "
                        f"({describe(exc)}): Torch-Pruning cannot remove its "
                        "structures") from exc


def replay(model: nn.Module, history: list, example_input: torch.Tensor) -> nn.Module:
    """Apply a saved pruning history to a freshly built (unpruned) model, in place."""
    model.eval()
    dg = dependency_graph(model, example_input)
    dg.load_pruning_history(history)
    return model


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
