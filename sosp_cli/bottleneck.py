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
    validate_run(_sub(cfg, stage_widths(cfg.model.width, stages), cfg.bottleneck.detect_ratio,
                      cfg.bottleneck.seeds[0], "structures"), here)


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


def run(cfg: RunConfig, out_dir: str | Path) -> dict:
    from .pipeline import run as run_one
    from .plots import bottleneck_figures

    _check_options(cfg)   # the rest of validate() is the detection run's, which run_one does first
    out = Path(out_dir)
    b = cfg.bottleneck
    stages = num_stages(cfg.model.name)
    base = stage_widths(cfg.model.width, stages)

    detect = run_one(_sub(cfg, base, b.detect_ratio, b.seeds[0], "structures"), out / "detect")
    spec = create_model(cfg.model.name, 10, 3, base)
    ss = StructureSet(spec.eval(), torch.zeros(1, 3, 32, 32))
    sizes = {g.root: g.size for g in ss.groups}
    ratios = stage_ratios(cfg.model.name, sizes, detect["layer_ratios"], stages)
    bottlenecks = sorted(range(stages), key=lambda s: ratios[s])[: b.num_widened]
    widened = [w * b.widen_factor if s in bottlenecks else w for s, w in enumerate(base)]
    uniform = [w * b.uniform_factor for w in base]
    override = "model.width=[" + ",".join(f"{w:g}" for w in widened) + "]"
    info = {"model": cfg.model.name, "method": cfg.method.name, "detect_ratio": b.detect_ratio,
            "stage_ratios": ratios, "bottleneck_stages": bottlenecks, "widths": {
                "original": base, "bottleneck": widened, "uniform": uniform}, "override": override}
    main = distributed.is_main()
    if main:
        save_json(info, out / "bottlenecks.json")
        log.info(f"[bottleneck] stage pruning ratios {[round(r, 3) for r in ratios]} → bottleneck "
                 f"stage(s) {bottlenecks}; widened model: {override}")

    rows, per_variant_ratios = [], {}
    for variant, width in info["widths"].items():
        for ratio in b.ratios:
            for seed in b.seeds:
                r = run_one(_sub(cfg, width, ratio, seed, "params"),
                            out / variant / f"r{ratio}_s{seed}")
                rows.append({"variant": variant, "prune_ratio": ratio, "seed": seed,
                             "params_after": r["params_after"], "params_before": r["params_before"],
                             "macs_after": r["macs_after"], "top1_before": r["top1_before"],
                             "top1_finetuned": r["top1_finetuned"]})
        # stage ratios of this variant at the detection budget (structures), first seed
        d = detect if variant == "original" else run_one(
            _sub(cfg, width, b.detect_ratio, b.seeds[0], "structures"), out / variant / "detect")
        groups = {g.root: g.size for g in StructureSet(
            create_model(cfg.model.name, 10, 3, width).eval(), torch.zeros(1, 3, 32, 32)).groups}
        per_variant_ratios[variant] = stage_ratios(cfg.model.name, groups, d["layer_ratios"], stages)
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
