"""``sosp-report DIR``: every ``result.json`` under DIR → one pandas table (mean ± std over seeds).

Writes ``DIR/report.csv`` (one row per configuration, numeric mean / std / n columns) and
``DIR/report.md`` (the same table formatted as ``mean ± std``), and prints the Markdown.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from .errors import SospError

KEYS = ["dataset", "model", "method", "target", "scope", "prune_ratio"]
METRICS = ["top1_before", "top1_pruned", "top1_finetuned", "achieved_ratio", "params_reduction",
           "macs_reduction", "speedup_cpu_bs64", "saliency_seconds"]


def collect(root: Path) -> pd.DataFrame:
    paths = sorted(Path(root).rglob("result.json"))
    if not paths:
        raise SospError(f"no result.json under {root}")
    rows = []
    for p in paths:
        with open(p) as fh:
            r = json.load(fh)
        r["speedup_cpu_bs64"] = r["latency"]["cpu_bs64"]["speedup"]
        r["path"] = str(p.parent)
        rows.append(r)
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (0 for a single seed) and number of seeds per configuration."""
    grouped = df.groupby(KEYS, sort=True)[METRICS]
    mean, std = grouped.mean(), grouped.std(ddof=1).fillna(0.0)
    n = df.groupby(KEYS, sort=True)["seed"].nunique().rename("n")
    out = pd.concat([mean.add_suffix("_mean"), std.add_suffix("_std"), n], axis=1)
    return out.reset_index()


def to_markdown(table: pd.DataFrame) -> str:
    pct = {"achieved_ratio", "params_reduction", "macs_reduction"}
    shown = table[KEYS + ["n"]].copy()
    for m in METRICS:
        scale = 100.0 if m in pct else 1.0
        fmt = "{:.1f} ± {:.1f}" if m != "saliency_seconds" else "{:.2f} ± {:.2f}"
        if m == "speedup_cpu_bs64":
            fmt = "{:.2f} ± {:.2f}"
        shown[m] = [fmt.format(a * scale, b * scale)
                    for a, b in zip(table[f"{m}_mean"], table[f"{m}_std"])]
    return shown.to_markdown(index=False)


def write_report(root: Path) -> str:
    root = Path(root)
    table = summarize(collect(root))
    table.to_csv(root / "report.csv", index=False)
    md = to_markdown(table)
    (root / "report.md").write_text(md + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sosp-report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="folder searched recursively for result.json")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        print(f"sosp-report: error: {args.dir} is not a directory", file=sys.stderr)
        return 2
    try:
        print(write_report(args.dir))
    except SospError as exc:
        print(f"sosp-report: error: {exc}", file=sys.stderr)
        return 2
    print(f"\nwritten: {args.dir / 'report.csv'}, {args.dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
