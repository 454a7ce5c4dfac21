"""``sosp-report DIR``: every ``result.json`` under DIR → one table (mean ± std over seeds) + plots.

Writes into DIR: ``report.csv`` (one row per configuration: numeric mean / std columns and the
number of seeds ``n``), ``report.md`` (the same as ``mean ± std``, a single seed's value alone;
with ``--reference FILE.csv``
also the published numbers for the same datasets and models, marked as cited), and PNG plots:
accuracy vs MAC reduction and vs parameters per (dataset, model), layer-wise pruning ratios,
and saliency time / memory vs width when the sweep varies the width.

A row is one configuration: :data:`KEYS`, plus every setting in which the collected runs differ
— of :data:`VARIED_KEYS` (result.json's own fields) and of each run's saved config
(``.hydra/config.yaml``, read with OmegaConf; a dotted column such as ``method.selection`` or
``saliency.num_samples``) — so runs of different settings are never averaged as if seeds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from .errors import SospError, describe
from .selection import TARGET_NOUNS
from .utils import atomic_write, save_text

KEYS = ["dataset", "model", "width", "method", "target", "scope", "prune_ratio"]
# settings that become key columns when the collected runs differ in them (a sweep over
# ``method.curvature=gn,hessian`` gives two rows, not one row averaging both as if seeds)
VARIED_KEYS = ["combine", "curvature", "stack_batch", "saliency_batchnorm", "normalize", "steps", "round_to",
               "experiment", "device", "processes"]
# saved-config entries that are result.json fields already (under these names), or that do not
# change what a run computes: neither becomes a config column
CONFIG_AS_FIELD = {"dataset.name": "dataset", "model.name": "model", "model.width": "width",
                   "method.name": "method", "prune.target": "target", "prune.scope": "scope",
                   "prune.ratio": "prune_ratio", "method.combine": "combine", "method.curvature": "curvature",
                   "method.stack_batch": "stack_batch", "saliency.batchnorm": "saliency_batchnorm",
                   "prune.normalize": "normalize", "prune.steps": "steps", "prune.round_to": "round_to",
                   "seed": "seed", "experiment_name": "experiment", "device": "device"}
CONFIG_IGNORED = {"pretrain.cache_dir", "pretrain.use_cache", "dataset.root", "dataset.download",
                  "dataset.num_workers", "note", "latency_repeats", "prune.diagnostics",
                  "prune.diagnostics_samples", "method.max_structures", "method.chunk_size"}
CONFIG_FILE = Path(".hydra") / "config.yaml"
CONFIG_TOP = ("amp", "channels_last", "task")   # the config columns without a dot in their name
METRICS = ["top1_before", "top1_pruned", "top1_finetuned", "achieved_ratio", "params_reduction",
           "macs_reduction", "speedup_cpu_bs64", "speedup_cuda_bs64", "saliency_seconds"]
PERCENT = {"achieved_ratio", "params_reduction", "macs_reduction"}
REFERENCE_COLUMNS = ["method", "dataset", "model", "baseline_top1", "pruned_top1", "source"]


# what a result.json must hold to be a row (the others have defaults for older results)
REQUIRED = ["dataset", "model", "method", "scope", "prune_ratio", "seed", "latency"] + [
    m for m in METRICS if not m.startswith("speedup")]


def _read_result(path: Path) -> dict:
    """``path`` as a result dict, or a one-line SospError naming the file and what is wrong
    (a report that left a point out would show fewer seeds than were run, without saying so)."""
    try:
        r = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SospError(f"{path} is not a readable result ({type(exc).__name__}: {exc}); "
                        "move it out of the folder or rerun that point") from None
    missing = [k for k in REQUIRED if k not in r] if isinstance(r, dict) else ["(not a JSON object)"]
    if missing:
        raise SospError(f"{path} is not a sosp-run result: it lacks {', '.join(missing)}; "
                        "move it out of the folder or rerun that point")
    return r


def flat_settings(tree, prefix: str = "") -> dict[str, str]:
    """``{"a.b": "value"}`` for a nested dict (lists and values as text, comparable across runs)."""
    if not isinstance(tree, dict):
        return {prefix: json.dumps(tree) if isinstance(tree, list) else str(tree)}
    out = {}
    for k, v in tree.items():
        out.update(flat_settings(v, f"{prefix}{k}" + ("." if isinstance(v, dict) else "")))
    return out


def run_config(result: Path, root: Path) -> dict[str, str]:
    """The settings of the run that wrote ``result`` (a result.json), flattened: its folder's
    ``.hydra/config.yaml``, or the nearest one above it within ``root`` (the runs of one
    ``task=bottleneck`` job share their job's); {} if there is none (a result written through
    the API), or if it cannot be read."""
    from omegaconf import OmegaConf
    root = Path(root).resolve()
    for folder in Path(result).resolve().parents:
        if (folder / CONFIG_FILE).is_file():
            try:
                tree = OmegaConf.to_container(OmegaConf.load(folder / CONFIG_FILE), resolve=False)
            except Exception:   # noqa: BLE001 - a damaged config: the run is reported without its settings
                return {}
            return {k: v for k, v in flat_settings(tree).items() if k not in CONFIG_AS_FIELD and k not in CONFIG_IGNORED}
        if folder == root or root not in folder.parents:
            return {}
    return {}


def config_columns(df: pd.DataFrame) -> list[str]:
    """The saved-config columns of ``df`` (:func:`run_config`: dotted names, and :data:`CONFIG_TOP`)."""
    return [c for c in df.columns if "." in c or c in CONFIG_TOP]


def collect(root: Path) -> pd.DataFrame:
    paths = sorted(Path(root).rglob("result.json"))
    if not paths:
        raise SospError(f"no result.json under {root}")
    rows = []
    for p in paths:
        r = _read_result(p)
        r.update(run_config(p, root))
        for kind in ("cpu_bs64", "cuda_bs64"):
            r[f"speedup_{kind}"] = r["latency"].get(kind, {}).get("speedup", float("nan"))
        r.setdefault("target", "structures")
        r.setdefault("saliency_batchnorm", "running")   # results written before the options
        r.setdefault("stack_batch", "auto")
        r.setdefault("round_to", 1)
        r.setdefault("processes", 1)
        r["width"] = json.dumps(r.get("width", 1.0))
        r["path"] = str(p.parent)
        rows.append(r)
    df = pd.DataFrame(rows)
    return df.fillna({c: "?" for c in config_columns(df)})   # a run without a saved config


def key_columns(df: pd.DataFrame) -> list[str]:
    """:data:`KEYS`, plus the :data:`VARIED_KEYS` and saved-config columns whose value differs
    between the rows of ``df`` (a config column: between the runs that have a saved config)."""
    known = [df[k][df[k] != "?"] for k in config_columns(df)]
    return KEYS + [k for k in VARIED_KEYS if k in df and df[k].astype(str).nunique() > 1] + [
        k.name for k in known if k.astype(str).nunique() > 1]


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (0 for a single seed) and number of seeds per configuration."""
    keys = key_columns(df)
    grouped = df.groupby(keys, sort=True, dropna=False)[METRICS]
    mean, std = grouped.mean(), grouped.std(ddof=1).fillna(0.0)
    n = df.groupby(keys, sort=True, dropna=False)["seed"].nunique().rename("n")
    return pd.concat([mean.add_suffix("_mean"), std.add_suffix("_std"), n], axis=1).reset_index()


def to_markdown(table: pd.DataFrame) -> str:
    shown = table[key_columns(table) + ["n"]].copy()
    for m in METRICS:
        if table[f"{m}_mean"].isna().all():
            continue
        scale = 100.0 if m in PERCENT else 1.0
        digits = 2 if m.startswith(("speedup", "saliency")) else 1
        # one seed has no spread: its mean alone, not "± 0.0" (report.csv keeps std 0 and n)
        shown[m] = [f"{a * scale:.{digits}f}" + (f" ± {b * scale:.{digits}f}" if n > 1 else "")
                    for a, b, n in zip(table[f"{m}_mean"], table[f"{m}_std"], table["n"])]
    return shown.to_markdown(index=False)


def reference_table(path: Path, measured: pd.DataFrame) -> pd.DataFrame:
    """Published rows for the datasets / models of the measured table ("resnet56 (option B)"
    matches ``resnet56``)."""
    if Path(path).is_dir():
        raise SospError(f"--reference {path} is a folder; pass a CSV file (docs/reference_results.csv)")
    if not Path(path).is_file():
        raise SospError(f"--reference {path} does not exist")
    try:
        ref = pd.read_csv(path)
    except ValueError as exc:   # empty, not text (UnicodeDecodeError), not CSV (ParserError)
        raise SospError(f"--reference {path} is not a readable CSV ({describe(exc)})") from None
    missing = [c for c in REFERENCE_COLUMNS if c not in ref.columns]
    if missing:
        raise SospError(f"--reference {path} lacks column '{missing[0]}'; expected at least "
                        f"{', '.join(REFERENCE_COLUMNS)}")
    base = ref["model"].astype(str).str.split().str[0].str.lower()
    keep = ref["dataset"].isin(measured["dataset"].unique()) & base.isin(measured["model"].unique())
    out = ref[keep].copy()
    out.insert(0, "cited", "yes")
    return out


# a sweep point that failed with a one-line error leaves it in its folder (``sosp-run -m``)
FAILED_FILE = "error.txt"


def failed_points(root: Path) -> list[str]:
    """``<point folder>: <error>`` for every failed sweep point below ``root``."""
    root = Path(root)
    return [f"{f.parent.relative_to(root)}: {f.read_text().strip()}" for f in sorted(root.rglob(FAILED_FILE))]


def short_points(df: pd.DataFrame, root: Path) -> list[str]:
    """``<run folder>: <achieved> of <target> removed, <requested> asked`` for every run whose
    layer guards stopped the selection short of its budget (result.json ``budget_met`` false)."""
    if "budget_met" not in df:
        return []
    rows = df[df["budget_met"].eq(False)]   # (None / NaN: a result from before the field)
    return [f"{Path(r.path).relative_to(root)}: {100 * r.achieved_ratio:.1f} % of the "
            f"{TARGET_NOUNS[r.target]} removed, {100 * r.prune_ratio:.1f} % asked" for r in rows.itertuples()]


def write_report(root: Path, reference: Path | None = None) -> str:
    from .plots import accuracy_curves, layer_ratio_bars, saliency_time_vs_width

    root = Path(root)
    df = collect(root)
    table = summarize(df)
    cited = None if reference is None else reference_table(reference, df)   # refused before anything is written
    atomic_write(root / "report.csv", lambda tmp: table.to_csv(tmp, index=False))
    md = to_markdown(table)
    if cited is not None:
        atomic_write(root / "report_cited.csv", lambda tmp: cited.to_csv(tmp, index=False))
        md += "\n\nPublished results (cited, not measured here):\n\n" + (
            cited.to_markdown(index=False) if len(cited) else f"none in {reference} for these datasets and models")
    short = short_points(df, root)
    if short:
        md += ("\n\nBudget not met (the layer guards stopped the selection short; each run.log says "
               "which): these rows average the ratios achieved, not the ratio asked:\n\n"
               + "\n".join(f"- {line}" for line in short))
    save_text(md + "\n", root / "report.md")
    pruned = df[df["method"] != "none"]
    figures = accuracy_curves(df, root) + layer_ratio_bars(pruned, root) + saliency_time_vs_width(df, root)
    return md + "\n\nplots: " + ", ".join(p.name for p in figures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sosp-report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="folder searched recursively for result.json")
    parser.add_argument("--reference", type=Path, default=None,
                        help="CSV of published results to show beside the measured rows")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        print(f"sosp-report: error: {args.dir} is not a directory", file=sys.stderr)
        return 2
    try:
        print(write_report(args.dir, args.reference))
    except SospError as exc:
        print(f"sosp-report: error: {exc}", file=sys.stderr)
        return 2
    print(f"\nwritten: {args.dir / 'report.csv'}, {args.dir / 'report.md'}")
    failed = failed_points(args.dir)
    if failed:
        print(f"\nnot in the report, {len(failed)} failed sweep point(s):\n" + "\n".join(f"  {f}" for f in failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
