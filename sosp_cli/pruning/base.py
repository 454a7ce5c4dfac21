"""The criterion interface: one score per structure, higher = more important (keep).

Every criterion is a class registered under a short stable name (``@register_criterion``) —
the name used in ``method=...``, results tables and tests. ``compute`` receives a
:class:`SaliencyInput` and returns a :class:`Saliency` (the scores, plus the first- and
second-order quantities a second-order method computed, for diagnostics).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from .. import distributed
from ..config import MethodConfig
from ..errors import SospError, check_choice
from ..structures import StructureSet
from .derivatives import HALF_WITH_BATCH_STATISTICS, STACK_BATCH, check_chunk_size
from .lean import batch_statistics
from ..utils import float32_products

_CRITERIA: dict[str, type["Criterion"]] = {}
COMBINE = ("abs_sum", "abs_joint", "second_only")
# method.curvature of any method: a first-order method's run reads it too, for the second-order
# prediction of prune.diagnostics (fisher_mc counts as gn there: :mod:`sosp_cli.diagnostics`)
CURVATURES = ("gn", "fisher_mc", "hessian")
SELECTIONS = ("score", "greedy")
BATCHNORM = ("running", "batch")   # saliency.batchnorm: the statistics BatchNorm normalises with


@dataclass
class SaliencyInput:
    model: nn.Module                 # in eval mode, on ``device`` (:func:`saliency_model`)
    structures: StructureSet
    batches: list                    # [(inputs, targets)], the N saliency samples
    device: torch.device
    seed: int = 0
    tf32: bool = False               # saliency.tf32: TensorFloat-32 products on CUDA (Criterion.run)
    across_ranks: bool = False       # several processes: each takes its share of ``batches`` (Criterion.run)
    # per layer group, the most structures the selection may remove (selection.removal_caps);
    # read by sosp_i's greedy selection, which grows the removed set within them. None: no limit
    removable: list[int] | None = None


@dataclass
class Saliency:
    scores: torch.Tensor             # [S], higher = keep
    grad: torch.Tensor | None = None          # g = ∂L/∂c, when computed
    second_order: torch.Tensor | None = None  # the per-structure curvature term r_s
    matrix: torch.Tensor | None = None        # full S×S curvature (sosp_i)
    extras: dict = field(default_factory=dict)


class Criterion:
    """Base class. Subclasses set ``name`` and implement ``compute``."""

    name: ClassVar[str] = ""
    layer_local: ClassVar[bool] = False      # scores only comparable within one layer group
    curvatures: ClassVar[tuple[str, ...]] = ()  # accepted ``method.curvature`` values
    # curvatures built from per-sample gate Jacobians J_n: undefined when BatchNorm's batch
    # statistics make every logit depend on every sample's gates (saliency.batchnorm=batch)
    per_sample_curvatures: ClassVar[tuple[str, ...]] = ()
    uses_data: ClassVar[bool] = False        # scores from the saliency batches (not the weights alone)
    selections: ClassVar[tuple[str, ...]] = ("score",)   # accepted ``method.selection`` values

    def __init__(self, cfg: MethodConfig):
        """Every ``method.*`` value is checked whichever method reads it, so a typo never passes
        unnoticed; ``method.selection=greedy`` is refused for a method that cannot grow the
        removed set on a curvature matrix (it would silently rank by score instead)."""
        self.cfg = cfg
        check_choice("method.combine", cfg.combine, COMBINE)
        check_choice("method.stack_batch", cfg.stack_batch, STACK_BATCH)
        check_chunk_size(cfg.chunk_size)
        check_choice(f"method.curvature for {self.name}", cfg.curvature, self.curvatures or CURVATURES)
        check_choice("method.selection", cfg.selection, SELECTIONS)
        if cfg.selection not in self.selections:
            raise SospError(f"method.selection={cfg.selection} is not accepted for {self.name}: greedy "
                            "selection grows the removed set on sosp_i's S×S curvature matrix, which "
                            f"{self.name} does not compute; use method=sosp_i, or method.selection=score")
        if isinstance(cfg.max_structures, bool) or not isinstance(cfg.max_structures, int) \
                or cfg.max_structures < 1:
            raise SospError(f"method.max_structures={cfg.max_structures!r}: expected an integer >= 1 "
                            "(sosp_i's largest S for its S×S matrix)")
        if isinstance(cfg.sparsity, bool) or not isinstance(cfg.sparsity, (int, float)) \
                or not 0 <= cfg.sparsity < float("inf"):
            raise SospError(f"method.sparsity={cfg.sparsity}: expected a number >= 0 (the L1 penalty "
                            "on BatchNorm γ during pretraining; 0 = none)")

    # compute() refuses models with too many structures (check_structures): the pipeline
    # checks the dense model before it pretrains, so a refused run costs no training
    structure_limited: ClassVar[bool] = False

    def compute(self, inp: SaliencyInput) -> Saliency:
        raise NotImplementedError

    def check_structures(self, num_structures: int) -> None:
        """One-line error when this criterion cannot score a model of ``num_structures``."""

    def run(self, inp: SaliencyInput) -> Saliency:
        """:meth:`compute` with float32 convolutions and matrix products in IEEE float32 on CUDA,
        or in TensorFloat-32 when ``inp.tf32`` (:func:`sosp_cli.utils.float32_products`): what
        the pipeline, the API and the benchmark call. ``inp.across_ranks`` (several processes,
        :mod:`sosp_cli.distributed`): every rank computes on its share of the batches and the
        sums over samples are summed across ranks, so every rank returns the scores of all
        batches (every rank must call it)."""
        if self.uses_data and not inp.batches:
            raise SospError(f"method {self.name} scores structures on saliency batches, and none "
                            "were given: pass at least one (inputs, targets) batch")
        sharded = inp.across_ranks and distributed.active()
        if sharded:
            inp = dataclasses.replace(inp, batches=distributed.shard(inp.batches), across_ranks=False)
        with distributed.summing(sharded), float32_products(inp.tf32):
            return self.compute(inp)

    def check_batchnorm(self, mode: str) -> None:
        """One-line error unless ``saliency.batchnorm=mode`` is accepted with this criterion."""
        check_choice("saliency.batchnorm", mode, BATCHNORM)
        if mode == "batch" and self.cfg.curvature in self.per_sample_curvatures:
            raise SospError(
                f"saliency.batchnorm=batch is not accepted for {self.name} with method.curvature="
                f"{self.cfg.curvature}: its per-sample gate Jacobians are undefined when batch "
                "statistics couple the samples of a batch; use saliency.batchnorm=running, or "
                "method.curvature=hessian")
        if mode == "batch" and self.cfg.stack_batch == "half":
            raise SospError(HALF_WITH_BATCH_STATISTICS)

    def combine(self, g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """First- and second-order terms into one score (DESIGN §3, ``method.combine``):
        abs_sum |g_s| + ½|r_s| (the default, an upper bound on the loss change);
        abs_joint |−g_s + ½ r_s| (the quadratic model's predicted change);
        second_only ½|r_s|."""
        if self.cfg.combine == "abs_sum":
            return g.abs() + 0.5 * r.abs()
        if self.cfg.combine == "abs_joint":
            return (-g + 0.5 * r).abs()
        return 0.5 * r.abs()


def saliency_model(model: nn.Module, batchnorm: str, batches, inplace: bool = False) -> nn.Module:
    """The model a saliency is computed on (DESIGN §3), in eval mode: ``running`` — the model
    itself, BatchNorm on its running statistics (the network that will be pruned); ``batch`` —
    a copy whose BatchNorm normalises each saliency batch with that batch's statistics, as in
    training, running statistics neither used nor updated (:func:`.lean.batch_statistics`;
    ``inplace``: ``model`` itself, converted, for a caller that already owns a copy)."""
    check_choice("saliency.batchnorm", batchnorm, BATCHNORM)
    if batchnorm == "running":
        return model.eval()
    for k, (_, y) in enumerate(batches, 1):
        if len(y) < 2:
            raise SospError(f"saliency.batchnorm=batch normalises each saliency batch with its own "
                            f"statistics, and batch {k} has {len(y)} sample: choose saliency."
                            "num_samples and saliency.batch_size so that every batch has at least 2")
    return batch_statistics(model, inplace)


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    _CRITERIA[cls.name] = cls
    return cls


def list_criteria() -> list[str]:
    return sorted(_CRITERIA)


def get_criterion(cfg: MethodConfig) -> Criterion:
    check_choice("method", cfg.name, _CRITERIA)
    return _CRITERIA[cfg.name](cfg)


def producer_weight_slices(model: nn.Module, ss: StructureSet):
    """Yield (global structure indices [k], weight rows [k, ...]) for every producer of every
    group: the output-channel slices of the conv/linear layers that write each structure (a
    structure of a grouped conv's group, one channel per channel group: its G filters
    concatenated, ``[k, G · filter size]``)."""
    modules = dict(model.named_modules())
    for grp in ss.groups:
        idx = torch.arange(grp.offset, grp.offset + grp.size)
        for name in grp.producers:
            w = modules[name].weight.detach()
            if w.shape[0] != grp.channels:
                raise SospError(f"producer '{name}' has {w.shape[0]} outputs, group '{grp.root}' "
                                f"has {grp.channels} channels")
            # row j + k·size is channel group k's filter of structure j (StructureGroup.channels_of)
            yield idx, w.reshape(grp.channel_groups, grp.size, -1).transpose(0, 1).reshape(grp.size, -1)
