"""Pool saliency-benchmark runs: each method's ratio to Taylor, averaged over several runs.

One run of ``scripts/bench_saliency.py`` estimates, say, sosp_h / taylor within its host's noise
at that hour; on a shared 2-core virtual machine the runs' estimates scatter by a few per cent
from one hour to the next (README, "Saliency benchmark"), more than one run's interval shows.
This reads the ``--json`` files of several runs of one command and prints, per device, model,
number of classes and width, and per method timed with ``taylor``: the number of runs, the mean
of their paired ratios (``<method>/taylor_paired``, a run's median per-repeat ratio), a 95 %
Student-t interval of that mean over the runs (``sosp_cli.measure.mean_interval``; none from a
single run), the smallest and largest run, and the FLOPs ratio.

    python scripts/pool_bench.py docs/bench_saliency_cpu_xeon_fold*.json --methods sosp_h

Rows are grouped by the device's name, the model (files written before the script recorded it:
``resnet56``), the BatchNorm mode and whether its statistics were calibrated, the number of
classes, the width and S; runs with another batch
size, number of batches or input size are not told apart by files that predate those fields —
pool runs of one command.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_saliency import refuse_repeats  # noqa: E402

from sosp_cli.measure import mean_interval  # noqa: E402
from sosp_cli.utils import unwritable  # noqa: E402

RATIO = "/taylor_paired"


def read_run(path: str) -> dict:
    """A benchmark ``--json`` file; ValueError naming the file if it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{path} cannot be read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not data["rows"] or \
            not all(isinstance(r, dict) and "width" in r for r in data["rows"]):
        raise ValueError(f"{path} is not a bench_saliency.py --json file (no rows of widths)")
    return data


def pool(runs: dict[str, dict], methods: list[str] | None = None) -> list[dict]:
    """One row per (device, model, BatchNorm mode and calibration, classes, width, S) and method:
    the runs' paired ratios to Taylor pooled (see the module's docstring)."""
    groups: dict[tuple, dict[str, list]] = {}
    for path, data in runs.items():
        for r in data["rows"]:
            # files from before BatchNorm calibration have no such field: initial statistics
            bn = data.get("batchnorm", "running") + (", calibrated" if data.get("batchnorm_calibrated") else "")
            key = (data.get("device_name", "?"), data.get("model", "resnet56"), bn, r.get("classes", 10),
                   r["width"], r.get("S"))
            for method in (k[:-len(RATIO)] for k in r if k.endswith(RATIO)):
                groups.setdefault(key, {}).setdefault(method, []).append(
                    (path, r[method + RATIO], r.get(method + "/taylor_flops")))
    found = sorted({m for g in groups.values() for m in g})
    if not found:
        raise ValueError("no run has a method timed with taylor (columns <method>/taylor_paired)")
    for m in methods or ():
        if m not in found:
            raise ValueError(f"method {m!r} is in none of the runs; they have: {', '.join(found)}")
    rows = []
    for (device, model, batchnorm, classes, width, s), by_method in groups.items():
        for m, entries in sorted(by_method.items()):
            if methods and m not in methods:
                continue
            ratios = [v for _, v, _ in entries]
            flops = {round(f, 3) for _, _, f in entries if f is not None}
            rows.append({"device_name": device, "model": model, "batchnorm": batchnorm, "classes": classes,
                         "width": width, "S": s, "method": m, "runs": len(ratios),
                         "mean": statistics.fmean(ratios), "ci95": mean_interval(ratios), "min": min(ratios),
                         "max": max(ratios), "flops": sorted(flops), "files": [p for p, _, _ in entries]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="bench_saliency.py --json files, one per run")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all)")
    parser.add_argument("--json", default=None, help="also write the pooled rows to this file")
    args = parser.parse_args()
    refuse_repeats(parser, args.runs, "run")
    if args.json and (why := unwritable(args.json)):
        parser.error(f"argument --json: {args.json} cannot be written ({why})")
    try:
        rows = pool({p: read_run(p) for p in args.runs}, args.methods)
    except ValueError as exc:
        parser.error(str(exc))
    print("| device | model | BatchNorm | classes | width | S | method | runs | mean / taylor | 95 % CI (runs) "
          "| min – max | FLOPs / taylor |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ci = "{:.3f}–{:.3f}".format(*r["ci95"]) if r["ci95"] else "—"
        flops = ", ".join(f"{f:.3f}" for f in r["flops"]) or "—"
        print(f"| {r['device_name']} | {r['model']} | {r['batchnorm']} | {r['classes']} | ×{r['width']:g} | {r['S']} "
              f"| {r['method']} | {r['runs']} | {r['mean']:.3f} | {ci} "
              f"| {r['min']:.2f} – {r['max']:.2f} | {flops} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
