"""Expand-prune: bottleneck detection (the SOSP paper's Fig. 3; DESIGN.md §4).

1. *Detect*: prune the trained original model globally (``method``, by default sosp_h) by
   ``detect_ratio`` of its structures and read the pruning ratio of every width stage
   (structures removed / structures of the stage).
2. The ``num_widened`` stages with the lowest ratio are the bottlenecks (pruning keeps most of
   them): widen exactly those by ``widen_factor``; as the control, widen every stage by
   ``uniform_factor``.
3. Train the original, bottleneck-widened and uniformly widened models, prune each to the
   ``ratios`` grid of parameter fractions (``prune.target=params``), fine-tune; every seed.
4. Report top-1 vs parameters per variant (mean ± std over seeds) and the per-stage pruning
   ratios: ``bottleneck.csv``, ``bottleneck.md``, ``bottleneck.png``; the detected stages and
   the widened width are saved in ``bottlenecks.json`` and printed as the override to type.

Every sub-run is an ordinary run directory below the experiment's folder, so a killed
experiment resumes where it stopped, and pretrained models are shared through the cache.
Under several processes every rank runs every sub-run (:mod:`.pipeline`) and rank 0 writes
the reports.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import pandas as pd
import torch

from . import distributed
from .config import RunConfig
from .errors import SospError
from .models import create_model, num_stages, stage_of, stage_widths
from .structures import StructureSet
from .utils import atomic_write, check_seed, save_json, save_text

log = logging.getLogger(__name__)


def stage_ratios(model_name: str, groups: dict[str, int], layer_ratios: dict[str, float],
                 stages: int) -> list[float]:
    """Fraction of each stage's structures removed, from per-group ratios and group sizes."""
    removed, total = [0.0] * stages, [0] * stages
    for root, size in groups.items():
        s = stage_of(model_name, root)
        removed[s] += layer_ratios.get(root, 0.0) * size
        total[s] += size
    return [r / t if t else 0.0 for r, t in zip(removed, total)]


def _sub(cfg: RunConfig, width, ratio: float, seed: int, target: str) -> RunConfig:
    sub = copy.deepcopy(cfg)
    sub.task = "prune"
    sub.model.width = width
    sub.prune.ratio, sub.prune.target, sub.seed = ratio, target, seed
    return sub


def validate(cfg: RunConfig, here: bool = True) -> None:
    """Every check that needs no data: the ``bottleneck.*`` options, then everything the
    detection run would refuse (:func:`sosp_cli.pipeline.validate` on its config; ``here`` as
    there)."""
    from .pipeline import validate as validate_run

    _check_options(cfg)
    stages = num_stages(cfg.model.name)
    validate_run(_detect_run(cfg, stage_widths(cfg.model.width, stages)), here)


def _check_options(cfg: RunConfig) -> None:
    """The ``bottleneck.*`` options, one line for a bad one."""
    b = cfg.bottleneck
    stages = num_stages(cfg.model.name)
    if stages < 2:
        raise SospError(f"model {cfg.model.name} has one width stage; the bottleneck experiment "
                        "needs a model with several (CIFAR ResNets, VGG, DenseNet, ResNet-18/50)")
    if not 1 <= b.num_widened < stages:
        raise SospError(f"bottleneck.num_widened={b.num_widened} must be in [1, {stages - 1}]")
    if not b.seeds or not b.ratios:
        raise SospError("bottleneck.seeds and bottleneck.ratios must not be empty")
    check_seed(list(b.seeds), "bottleneck.seeds")
    if not 0.0 <= b.detect_ratio < 1.0:
        raise SospError(f"bottleneck.detect_ratio={b.detect_ratio} is outside [0, 1): the fraction "
                        "of structures the detection run removes")
    if not all(0.0 <= r < 1.0 for r in b.ratios):
        raise SospError(f"bottleneck.ratios={list(b.ratios)} must hold fractions of parameters "
                        "removed in [0, 1)")
    for key in ("widen_factor", "uniform_factor"):
        if not getattr(b, key) > 0:
            raise SospError(f"bottleneck.{key}={getattr(b, key)} must be > 0")


def _detect_run(cfg: RunConfig, width) -> RunConfig:
    """A detection run: ``detect_ratio`` of the structures, the first seed."""
    return _sub(cfg, width, cfg.bottleneck.detect_ratio, cfg.bottleneck.seeds[0], "structures")


DETECT = Path("detect")   # the original model's detection run, below the experiment's folder


def sub_runs(cfg: RunConfig, widths: dict) -> list[tuple[str, RunConfig, Path]]:
    """Every run of the experiment's grid as (variant, its config, its folder below the
    experiment's), in the order :func:`run` runs them: per variant its parameter budgets × seeds,
    then its detection run (the stage ratios of its figure; the original's is :data:`DETECT`)."""
    b, runs = cfg.bottleneck, []
    for variant, width in widths.items():
        runs += [(variant, _sub(cfg, width, ratio, seed, "params"), Path(variant, f"r{ratio}_s{seed}"))
                 for ratio in b.ratios for seed in b.seeds]
        runs.append((variant, _detect_run(cfg, width), DETECT if variant == "original" else Path(variant, "detect")))
    return runs


def plan(cfg: RunConfig, detect: dict) -> dict:
    """The widths of the three variants from the detection run's result (its per-group pruning
    ratios): the ``num_widened`` stages pruned least are the bottlenecks (module docstring)."""
    b = cfg.bottleneck
    stages = num_stages(cfg.model.name)
    base = stage_widths(cfg.model.width, stages)
    ratios = stage_ratios(cfg.model.name, _group_sizes(cfg, base), detect["layer_ratios"], stages)
    bottlenecks = sorted(range(stages), key=lambda s: ratios[s])[: b.num_widened]
    widened = [w * b.widen_factor if s in bottlenecks else w for s, w in enumerate(base)]
    uniform = [w * b.uniform_factor for w in base]
    override = "model.width=[" + ",".join(f"{w:g}" for w in widened) + "]"
    return {"model": cfg.model.name, "method": cfg.method.name, "detect_ratio": b.detect_ratio,
            "stage_ratios": ratios, "bottleneck_stages": bottlenecks, "widths": {
                "original": base, "bottleneck": widened, "uniform": uniform}, "override": override}


def _group_sizes(cfg: RunConfig, width) -> dict[str, int]:
    """Structures per group of the model at ``width``."""
    model = create_model(cfg.model.name, 10, 3, width).eval()
    return {g.root: g.size for g in StructureSet(model, torch.zeros(1, 3, 32, 32)).groups}


def check_folder(cfg: RunConfig, out: Path) -> None:
    """:func:`sosp_cli.pipeline.check_folder` for every sub-run folder the experiment would
    run: the detection run, and every run of the original and uniform variants; the bottleneck
    variant's too once the detection run has its result (its widths come from it)."""
    from .pipeline import check_folder as check_run, load_result

    out = Path(out)
    base = stage_widths(cfg.model.width, num_stages(cfg.model.name))
    check_run(_detect_run(cfg, base), out / DETECT)
    widths = {"original": base, "uniform": [w * cfg.bottleneck.uniform_factor for w in base]}
    if distributed.broadcast_object((out / DETECT / "result.json").exists()):
        widths = plan(cfg, load_result(out / DETECT / "result.json"))["widths"]
    for _, sub, folder in sub_runs(cfg, widths):
        check_run(sub, out / folder)


def run(cfg: RunConfig, out_dir: str | Path, accepted=None) -> dict:
    """The whole experiment in ``out_dir``. A folder holding a sub-run of another config is
    refused before anything runs (:func:`check_folder`); then ``accepted(out)`` is called (rank
    0), as :func:`sosp_cli.pipeline.run` calls it."""
    from .data import check_dataset_present
    from .pipeline import run as run_one
    from .plots import bottleneck_figures

    validate(cfg)   # a bad value, or a missing dataset, is named before the folder's artefacts
    check_dataset_present(cfg.dataset.name, cfg.dataset.root, cfg.dataset.download)
    out = Path(out_dir)
    stages = num_stages(cfg.model.name)
    check_folder(cfg, out)
    main = distributed.is_main()
    if accepted is not None and main:
        accepted(out)

    detect = run_one(_detect_run(cfg, stage_widths(cfg.model.width, stages)), out / DETECT)
    info = plan(cfg, detect)
    if main:
        save_json(info, out / "bottlenecks.json")
        log.info(f"[bottleneck] stage pruning ratios {[round(r, 3) for r in info['stage_ratios']]} → "
                 f"bottleneck stage(s) {info['bottleneck_stages']}; widened model: {info['override']}")

    rows, per_variant_ratios = [], {}
    for variant, sub, folder in sub_runs(cfg, info["widths"]):
        r = detect if folder == DETECT else run_one(sub, out / folder)
        if sub.prune.target == "params":
            rows.append({"variant": variant, "prune_ratio": sub.prune.ratio, "seed": sub.seed,
                         "params_after": r["params_after"], "params_before": r["params_before"],
                         "macs_after": r["macs_after"], "top1_before": r["top1_before"],
                         "top1_finetuned": r["top1_finetuned"]})
        else:   # the variant's stage ratios at the detection budget (structures), first seed
            per_variant_ratios[variant] = stage_ratios(cfg.model.name, _group_sizes(cfg, sub.model.width),
                                                       r["layer_ratios"], stages)
    df = pd.DataFrame(rows)
    table = df.groupby(["variant", "prune_ratio"]).agg(
        params_after=("params_after", "mean"), top1_mean=("top1_finetuned", "mean"),
        top1_std=("top1_finetuned", "std"), n=("seed", "nunique")).reset_index().fillna(0.0)
    if main:
        atomic_write(out / "bottleneck.csv", lambda tmp: table.to_csv(tmp, index=False))
        md = table.to_markdown(index=False)
        save_text(md + "\n", out / "bottleneck.md")
        bottleneck_figures(df, per_variant_ratios, out)
        save_json({**info, "variant_stage_ratios": per_variant_ratios}, out / "bottlenecks.json")
        log.info(md)
    return {"bottlenecks": info, "table": table.to_dict(orient="records")}
