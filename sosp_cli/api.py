"""Public Python API: the parts of the runner without Hydra (for notebooks and external checks).

>>> model = create_model("resnet20", num_classes=10)
>>> x = torch.randn(8, 3, 32, 32); y = torch.randint(0, 10, (8,))
>>> scores = saliency(model, [(x, y)], "sosp_h", example_input=x[:1])
>>> small = prune(model, select(model, scores, 0.5, x[:1], target="flops").remove, x[:1])
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from .budget import CostModel
from .config import MethodConfig
from .errors import SospError, describe
from .models import create_model as _create_model, list_models
from .pruning import SaliencyInput, get_criterion, list_criteria, saliency_model
from .selection import Selection, removal_caps, select as _select, validate_guards
from .structures import StructureSet
from .surgery import check_removal, logit_gaps, remove_structures
from .utils import check_seed, check_torch_device, retain_freed_memory

__all__ = ["create_model", "list_models", "list_criteria", "structures", "saliency", "select", "mask",
           "prune", "check_gates", "retain_freed_memory"]


def create_model(name: str, num_classes: int = 10, in_channels: int = 3,
                 width: float | Sequence[float] = 1.0) -> nn.Module:
    """A registered model (``list_models()``) or ``torchvision.<name>`` (any torchvision
    classifier, width 1), randomly initialised."""
    return _create_model(name, num_classes, in_channels, width)


def structures(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Structure names ``"<producing module>:<channel>"`` in a stable order."""
    return StructureSet(model, example_input[:1].cpu()).names()


def saliency(model: nn.Module, batches: Iterable, method: str, example_input: torch.Tensor | None = None,
             seed: int = 0, device: str | torch.device | None = None, batchnorm: str = "running",
             tf32: bool = False, guards: dict | None = None, **options) -> dict[str, float]:
    """Score per structure (higher = keep) with the registered criterion ``method``.

    ``batches`` yields ``(inputs, targets)``, and is read into a list first (pass the batches
    to score, e.g. ``itertools.islice(loader, 8)``, not a whole training loader); the loss is the
    mean cross-entropy over all samples. ``options`` are :class:`sosp_cli.config.MethodConfig` fields (``combine``,
    ``curvature``, ``selection``, ``chunk_size``, ...). The model is scored in eval mode, on a
    copy; ``batchnorm='batch'``: with BatchNorm on each batch's statistics (``saliency.batchnorm``).
    On CUDA the float32 products run in IEEE float32 unless ``tf32=True`` (``saliency.tf32``).
    ``guards`` (``selection='greedy'`` only): the :func:`select` guards its growth stays within,
    e.g. ``{"min_channels": 2}`` (keys ``min_channels``, ``max_layer_ratio``, ``round_to``) —
    pass the same ones to :func:`select`.
    """
    batches = list(batches)
    _check_batches(batches)
    if example_input is None:
        if not batches:
            raise SospError("saliency() got no batches and no example_input: pass either")
        example_input = batches[0][0][:1]
    if device is None:
        p = next(model.parameters())
        device = p.device
    device = check_torch_device(device, "saliency() device")
    check_seed(seed, "saliency() seed")
    accepted = sorted(f.name for f in dataclasses.fields(MethodConfig) if f.name != "name")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SospError(f"saliency() got unknown option{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                        f"accepted: {', '.join(accepted)} (the method.* options)")
    cfg = MethodConfig(name=method, **options)
    criterion = get_criterion(cfg)
    limits = None if guards is None else _guards(guards, cfg.selection)
    criterion.check_batchnorm(batchnorm)
    work = copy.deepcopy(model).eval()
    ss = StructureSet(work.cpu(), example_input[:1].cpu())
    _check_targets(batches, work)
    work = saliency_model(work, batchnorm, batches, inplace=True)   # ``work`` is a copy already
    removable = None if limits is None else removal_caps(ss, None, **limits)
    sal = criterion.run(SaliencyInput(work.to(device), ss, batches, device, seed, tf32, removable=removable))
    return dict(zip(ss.names(), sal.scores.tolist()))


def _check_batches(batches: list) -> None:
    """One line for a batch that is not ``(inputs, targets)``: two tensors, one integer class
    index per input (rather than PyTorch's error from deep inside the loss)."""
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2
                and all(isinstance(t, torch.Tensor) for t in batch)):
            kind = f"{type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            raise SospError(f"saliency() batches[{i}] is a {kind}; each batch must be (inputs, targets), "
                            "two tensors")
        x, y = batch
        if y.dim() != 1 or len(y) != len(x) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise SospError(f"saliency() batches[{i}] has targets of shape {tuple(y.shape)} and dtype "
                            f"{y.dtype} for {len(x)} inputs; expected one integer class index per input")


def _check_targets(batches: list, model: nn.Module) -> None:
    """One line for a class index outside the model's outputs (one forward pass of one input)."""
    if not batches:
        return
    x = batches[0][0][:1].cpu()
    try:
        with torch.no_grad():
            z = model(x)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise SospError(f"saliency() batches[0]: the model does not run on inputs of shape "
                        f"{tuple(batches[0][0].shape)} ({describe(exc)})") from None
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        got = f"a tensor of shape {tuple(z.shape)}" if isinstance(z, torch.Tensor) else f"a {type(z).__name__}"
        raise SospError(f"saliency() needs a model that returns logits, a tensor [batch, classes]; "
                        f"this one returns {got}: wrap it so that it returns them")
    classes = z.shape[-1]
    for i, (_, y) in enumerate(batches):
        bad = y[(y < 0) | (y >= classes)]
        if len(bad):
            raise SospError(f"saliency() batches[{i}] has class index {int(bad[0])}; the model has "
                            f"{classes} outputs (indices 0 to {classes - 1})")


GUARDS = {"max_layer_ratio": 1.0, "min_channels": 1, "round_to": 1}   # select()'s defaults


def _guards(guards: dict, selection: str) -> dict:
    """``guards`` checked and completed with :func:`select`'s defaults (for
    :func:`selection.removal_caps`), before the model is copied."""
    if selection != "greedy":
        raise SospError(f"saliency() got guards={guards} with selection={selection!r}: only the "
                        "greedy growth (selection='greedy') reads them; pass them to select()")
    unknown = sorted(set(guards) - set(GUARDS))
    if unknown:
        raise SospError(f"saliency() got unknown guard{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                        f"accepted: {', '.join(GUARDS)}")
    limits = {**GUARDS, **guards}
    validate_guards(**limits)
    return limits


def select(model: nn.Module, scores: dict[str, float], ratio: float, example_input: torch.Tensor,
           target: str = "structures", scope: str = "global", min_channels: int = 1,
           max_layer_ratio: float = 1.0, normalize: str = "none", round_to: int = 1) -> Selection:
    """The structures ``sosp-run`` would remove for ``scores`` (:func:`saliency`'s, or your own:
    one per structure name, higher = keep): lowest first until ``ratio`` of ``target``
    (``structures|params|flops``) is gone, with the exact cost of each removal, the same
    ``prune.*`` options and guards (DESIGN §4, :func:`sosp_cli.selection.select`). Returns a
    :class:`~sosp_cli.selection.Selection`: ``.remove`` (names, for :func:`prune`), the achieved
    ratios and each layer group's, and ``.budget_met`` (False: the guards kept the selection
    short of ``ratio``)."""
    ss = StructureSet(model, example_input[:1].cpu())
    names = ss.names()
    missing, extra = [n for n in names if n not in scores], sorted(set(scores) - set(names))
    problems = [f"{what} {', '.join(found[:3])}{' ...' * (len(found) > 3)}"
                for what, found in (("missing", missing), ("not structures of it:", extra)) if found]
    if problems:
        raise SospError(f"select() needs one score per structure of this model ({len(names)}); "
                        + "; ".join(problems))
    values = torch.tensor([float(scores[n]) for n in names], dtype=torch.float64)
    return _select(values, ss, CostModel(model, ss, example_input[:1].cpu()), ratio, target, scope,
                   min_channels, max_layer_ratio, normalize, round_to=round_to)


def mask(model: nn.Module, remove: Iterable[str], example_input: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose forward pass runs with the gates of ``remove`` at 0."""
    work = copy.deepcopy(model)
    ss = StructureSet(work, example_input[:1].cpu())
    gates = torch.ones(ss.num_structures)
    gates[ss.indices_of(list(remove))] = 0.0
    return _Masked(work, ss, gates)


def prune(model: nn.Module, remove: Iterable[str], example_input: torch.Tensor) -> nn.Module:
    """A physically pruned copy of ``model`` (a genuinely smaller ``nn.Module``), checked to give
    the logits of :func:`mask`'s on ``example_input`` (DESIGN.md §2; a one-line
    :class:`SospError` if it does not, as :func:`check_gates` would measure)."""
    remove = list(remove)
    ss = StructureSet(model, example_input[:1].cpu())
    ss.indices_of(remove)  # validates the names
    pruned, _ = remove_structures(model, ss, remove, example_input[:1])
    check_removal(model, pruned, ss, remove, example_input, "the example input")
    return pruned


def check_gates(model: nn.Module, example_input: torch.Tensor, trials: int = 2, seed: int = 0) -> float:
    """The gate invariant (DESIGN.md §2) on ``model``, relative to what the removal does: over
    ``trials`` random removals (:meth:`StructureSet.random_removal`) and the rows of
    ``example_input``, in eval mode, max |z_masked − z_pruned| / max |z_dense − z_masked| — the
    share of the removals' effect on the logits that the gate model gets wrong (0: exact; inf if
    the removals changed no logit but the two still differ). Every registered model gives ≤ 1e-4
    in float32 (``tests/test_structures.py``); a model that does not (an operation mixing a
    structure's channels with others on the way to its gate sites) gets scores that are not
    about removing its structures. Raises :class:`SospError` for a model refused outright
    (GroupNorm / LayerNorm on a structure, a grouped convolution that structures would unbalance, ...)."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise SospError(f"check_gates() trials={trials!r}: expected an integer >= 1 (random removals to compare)")
    check_seed(seed, "check_gates() seed")
    work = copy.deepcopy(model).eval()
    ss = StructureSet(work, example_input[:1].cpu())
    generator = torch.Generator().manual_seed(seed)
    error, effect = 0.0, 0.0
    for _ in range(trials):
        remove = ss.random_removal(generator)
        pruned, _ = remove_structures(work, ss, remove, example_input[:1])
        gaps = logit_gaps(work, pruned, ss, remove, example_input)
        error, effect = max(error, gaps["error"]), max(effect, gaps["effect"])
    if effect == 0.0:
        return 0.0 if error == 0.0 else float("inf")
    return error / effect


class _Masked(nn.Module):
    def __init__(self, model: nn.Module, ss: StructureSet, gates: torch.Tensor):
        super().__init__()
        self.model, self.ss = model, ss
        self.register_buffer("gates", gates)

    def forward(self, x):
        with self.ss.gated(self.model, self.gates.to(x.device)):
            return self.model(x)
