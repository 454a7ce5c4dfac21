"""Latency of sosp-run models side by side: a reference and pruned models, timed in turn.

Each argument is a sosp-run model file (``pretrained.pt``, ``pruned.pt``, ``finetuned.pt``, ...)
or a run folder, which stands for its ``pruned.pt``; the first is the reference (typically a
run's ``pretrained.pt``). Every repeat times one forward pass of each model in turn (the order
reversed every other repeat), in eval mode on the same input (the models' input shape, each of
``--batch-sizes``), so that a host whose speed drifts slows every model alike. Per model and batch size: the median milliseconds, and the
speed-up against the reference — the median of the per-repeat ratios — with the model's
parameters and MACs. The timing is ``result.json``'s (``sosp_cli.measure.latencies_in_turn``),
across runs: e.g. ``prune.round_to=1`` against ``8`` (README, "Budgets and selection").

    python scripts/compare_latency.py outputs/runs/A/pretrained.pt outputs/runs/A outputs/runs/B --batch-sizes 64 1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_saliency import cpu_name, positive, refuse_repeats  # noqa: E402

from sosp_cli.checkpoint import load_model  # noqa: E402
from sosp_cli.errors import SospError  # noqa: E402
from sosp_cli.measure import count_macs, count_params, latencies_in_turn  # noqa: E402
from sosp_cli.utils import unwritable  # noqa: E402


def model_file(arg: str) -> Path:
    path = Path(arg)
    return path / "pruned.pt" if path.is_dir() else path


def compare(models: dict[str, torch.nn.Module], shape: list[int], batch_size: int, repeats: int) -> list[dict]:
    """One row per model: median ms and the median per-repeat speed-up against the first
    (:func:`sosp_cli.measure.latencies_in_turn`, the timing of ``result.json``'s ``latency``)."""
    timed = latencies_in_turn(list(models.values()), torch.zeros(1, *shape), batch_size, repeats)
    return [{"model": name, "batch_size": batch_size, **t} for name, t in zip(models, timed)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="sosp-run model files or run folders; the first is the reference")
    parser.add_argument("--batch-sizes", type=positive(int), nargs="+", default=[64, 1])
    parser.add_argument("--repeats", type=positive(int), default=15)
    parser.add_argument("--threads", type=positive(int), default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    if len(args.models) < 2:
        parser.error("give a reference and at least one model to compare with it")
    refuse_repeats(parser, args.models, "model")
    if args.json and (why := unwritable(args.json)):
        parser.error(f"argument --json: {args.json} cannot be written ({why})")
    models, shapes = {}, {}
    for arg in args.models:
        try:
            model, record = load_model(model_file(arg))
        except SospError as exc:
            parser.error(f"{arg}: {exc}")
        models[arg], shapes[arg] = model.eval(), list(record["spec"]["input_shape"])
    if len({tuple(s) for s in shapes.values()}) > 1:
        parser.error("the models take different inputs: " + ", ".join(f"{a} {s}" for a, s in shapes.items()))
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = shapes[args.models[0]]
    example = torch.zeros(1, *shape)
    size = {a: (count_params(m), count_macs(m, example)) for a, m in models.items()}
    print(f"# CPU {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, input {shape}, "
          f"{args.repeats} repeats, reference {args.models[0]}")
    print("| model | params | MACs/image | batch | ms (median) | speed-up (paired median) |")
    print("|---|---|---|---|---|---|")
    rows = []
    for bs in args.batch_sizes:
        for row in compare(models, shape, bs, args.repeats):
            row["params"], row["macs"] = size[row["model"]]
            rows.append(row)
            print(f"| {row['model']} | {row['params']:,} | {row['macs']:,} | {bs} | {row['ms']:.2f} | "
                  f"{row['speedup']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "torch": torch.__version__,
                                               "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
