"""Report figures (PNG, matplotlib, no display needed).

- accuracy vs FLOPs (MAC) reduction and vs remaining parameters: one line per method, mean
  over seeds with a ±1 std band;
- layer-wise pruning ratio bars: one bar group per structure group (in network order), one
  colour per method;
- saliency time vs width multiplier, one line per method (the scaling experiment);
- bottleneck experiment: accuracy vs parameters per model variant, and per-stage ratios.

"Per method" is per configuration (:func:`series_labels`): a method whose runs differ in a
setting of the report's table (``method.curvature=gn,hessian``, ``prune.round_to=1,8``, two
widths, ...) gets a line / colour per value, named by it ("sosp_h curvature=hessian"), so that
no figure averages two settings as if they were seeds.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .report import key_columns  # noqa: E402
from .utils import atomic_write  # noqa: E402

# what a saliency's time and memory do not depend on (the scaling figure averages over them)
NOT_SALIENCY = {"prune_ratio", "target", "scope", "normalize", "steps", "round_to"}


def series_labels(df: pd.DataFrame, skip=()) -> pd.Series:
    """Each row's line / colour label: its method, plus ``key=value`` for every setting of the
    report's table (:func:`.report.key_columns`) but those in ``skip`` that differs between that
    method's rows."""
    labels = df["method"].astype(str)
    for _, rows in df.groupby("method", sort=False):
        for k in key_columns(rows):
            if k != "method" and k not in skip and rows[k].astype(str).nunique() > 1:
                labels.loc[rows.index] += f" {k}=" + rows[k].astype(str)
    return labels


def _lines(ax, df: pd.DataFrame, x: str, y: str, by: str, x_scale: float = 1.0,
           point: str = "prune_ratio"):
    """One line per ``by`` value; one point per ``point`` value (e.g. the requested ratio): the
    mean of ``x`` and of ``y`` over seeds, with a ±1 std band of ``y``."""
    for key, part in df.groupby(by, sort=True):
        stats = part.groupby(point).agg(x=(x, "mean"), mean=(y, "mean"), std=(y, "std"))
        stats = stats.fillna(0.0).sort_values("x")
        xs = stats["x"].to_numpy() * x_scale
        ax.plot(xs, stats["mean"], marker="o", label=str(key))
        ax.fill_between(xs, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.2)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path


def accuracy_curves(df: pd.DataFrame, out: Path) -> list[Path]:
    """Top-1 after fine-tuning vs MAC reduction and vs parameters, per (dataset, model)."""
    written = []
    for (dataset, model), part in df.groupby(["dataset", "model"], sort=True):
        part = part.assign(series=series_labels(part, {"dataset", "model", "prune_ratio"}))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        _lines(axes[0], part, "macs_reduction", "top1_finetuned", "series", 100.0)
        axes[0].set_xlabel("MAC (FLOPs) reduction [%]")
        _lines(axes[1], part, "params_after", "top1_finetuned", "series", 1e-6)
        axes[1].set_xlabel("parameters [M]")
        for ax in axes:
            ax.set_ylabel("top-1 after fine-tuning [%]")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=8)
        fig.suptitle(f"{dataset} / {model}")
        written.append(_save(fig, out / f"accuracy_{dataset}_{model}.png"))
    return written


def layer_ratio_bars(df: pd.DataFrame, out: Path) -> list[Path]:
    """Mean fraction removed per structure group, one colour per method (one figure per
    dataset / model / target / ratio)."""
    written = []
    keys = ["dataset", "model", "target", "prune_ratio"]
    for key, part in df.groupby(keys, sort=True):
        part = part.assign(series=series_labels(part, keys))
        methods = sorted(part["series"].unique())
        groups = list(part.iloc[0]["layer_ratios"].keys())
        if not groups:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(groups) * max(1, len(methods)) / 3), 4))
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            rows = part[part["series"] == method]["layer_ratios"]
            means = pd.DataFrame(list(rows)).reindex(columns=groups).mean()
            ax.bar([g + i * width for g in range(len(groups))], means.to_numpy() * 100, width, label=method)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        ax.set_xticklabels(groups, rotation=90, fontsize=6)
        ax.set_ylabel("channels removed [%]")
        ax.set_title("layer-wise pruning ratios: " + " / ".join(str(k) for k in key))
        ax.legend(fontsize=7)
        written.append(_save(fig, out / ("layer_ratios_" + "_".join(str(k) for k in key) + ".png")))
    return written


def saliency_time_vs_width(df: pd.DataFrame, out: Path) -> list[Path]:
    widths = pd.to_numeric(df["width"], errors="coerce")
    if widths.isna().any() or widths.nunique() < 2:
        return []
    df = df.assign(width_value=widths, series=series_labels(df, NOT_SALIENCY | {"width"}))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    _lines(axes[0], df, "width_value", "saliency_seconds", "series", point="width_value")
    axes[0].set_ylabel("saliency time [s]")
    _lines(axes[1], df, "width_value", "saliency_peak_memory_mb", "series", point="width_value")
    axes[1].set_ylabel("saliency peak memory [MiB]")
    for ax in axes:
        ax.set_xlabel("width multiplier")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    return [_save(fig, out / "saliency_scaling.png")]


def bottleneck_figures(df: pd.DataFrame, stage_ratios: dict[str, list[float]], out: Path) -> list[Path]:
    """The paper's Fig. 3 panels: accuracy vs parameters per variant; per-stage pruning ratios."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _lines(axes[0], df, "params_after", "top1_finetuned", "variant", 1e-6)
    axes[0].set_xlabel("parameters after pruning [M]")
    axes[0].set_ylabel("top-1 after fine-tuning [%]")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    names = list(stage_ratios)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ratios = stage_ratios[name]
        axes[1].bar([s + i * width for s in range(len(ratios))], [100 * r for r in ratios], width, label=name)
    stages = len(next(iter(stage_ratios.values()), []))
    axes[1].set_xticks([s + width * (len(names) - 1) / 2 for s in range(stages)])
    axes[1].set_xticklabels([str(s) for s in range(stages)])
    axes[1].set_xlabel("stage")
    axes[1].set_ylabel("structures removed at the detection budget [%]")
    axes[1].legend()
    return [_save(fig, out / "bottleneck.png")]
