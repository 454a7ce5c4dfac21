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
from .utils import float32_products


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
    through (a reshape to a fixed number of channels) fails here, with its name."""
    try:
        with torch.no_grad():
            pruned(example_input.to(_device(pruned)))
    except Exception as exc:
        raise SospError(f"the physically pruned {type(model).__name__} does not run "
                        f"({describe(exc)}): Torch-Pruning cannot remove its "
                        "structures") from exc


def logit_gaps(model: nn.Module, pruned: nn.Module, structures: StructureSet, remove: list[str],
               x: torch.Tensor) -> dict[str, float]:
    """The gate invariant (DESIGN.md §2) for one removal, on the inputs ``x``, in eval mode:
    ``error`` = max |z_masked − z_pruned| (``model`` with the gates of ``remove`` at 0 against the
    physically pruned ``pruned``), ``effect`` = max |z_dense − z_masked| (what the removal does),
    ``scale`` = max |z_dense|. Both models run on their own device, with CUDA's float32 products
    in IEEE float32 (TF32's rounding would differ between the masked and the smaller pruned
    convolutions), and are left in their mode."""
    gates = torch.ones(structures.num_structures)
    gates[structures.indices_of(remove)] = 0.0
    modes = model.training, pruned.training
    model.eval(), pruned.eval()
    try:
        with torch.no_grad(), float32_products(False):
            dense = model(x.to(_device(model))).float().cpu()
            with structures.gated(model, gates.to(_device(model))):
                masked = model(x.to(_device(model))).float().cpu()
            cut = pruned(x.to(_device(pruned))).float().cpu()
    finally:
        model.train(modes[0]), pruned.train(modes[1])
    return {"error": (masked - cut).abs().max().item(), "effect": (dense - masked).abs().max().item(),
            "scale": dense.abs().max().item()}


# a pruned model whose logits differ from the masked model's by more than this share of the
# removal's effect (or of 1e-3 of the logits, for a removal that changes next to nothing) is not
# the model the saliencies were computed for; float32 gives ≤ 6e-7 on every registered model (README: result.json)
GATE_TOLERANCE = 1e-3


def gate_error(gaps: dict[str, float]) -> float:
    """``error`` relative to the removal's ``effect``, floored at 1e-3 of the logits' ``scale``
    (removing channels that are 0 on these inputs changes the logits only by rounding)."""
    floor = max(gaps["effect"], 1e-3 * gaps["scale"])
    if floor == 0.0:
        return 0.0 if gaps["error"] == 0.0 else float("inf")
    return gaps["error"] / floor


def check_removal(model: nn.Module, pruned: nn.Module, structures: StructureSet, remove: list[str],
                  x: torch.Tensor, inputs: str, prefix: str = "") -> float:
    """:func:`gate_error` of this removal on ``x`` (described as ``inputs`` in the error); a
    one-line :class:`SospError` above :data:`GATE_TOLERANCE`."""
    gaps = logit_gaps(model, pruned, structures, remove, x)
    error = gate_error(gaps)
    if error > GATE_TOLERANCE:
        raise SospError(f"{prefix}the physically pruned {type(model).__name__} differs from the "
                        f"masked one by {gaps['error']:.3g} in its logits, where the removal changed "
                        f"them by {gaps['effect']:.3g} ({inputs}): the gates are not the removal of "
                        "these structures (DESIGN.md §2), so saliencies are not about removing them")
    return error


def replay(model: nn.Module, history: list, example_input: torch.Tensor) -> nn.Module:
    """Apply a saved pruning history to a freshly built (unpruned) model, in place."""
    model.eval()
    dg = dependency_graph(model, example_input)
    dg.load_pruning_history(history)
    return model


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
