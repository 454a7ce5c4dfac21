"""Which torchvision classifiers sosp can prune, and on which SOSP-H path: a survey of models
outside the registry through the public API.

Per model (randomly initialised, 10 classes, ``--batch`` images of ``--size`` × ``--size``, in
float64 with the tests' set-up: random BatchNorm statistics and an unsaturated softmax,
``tests/test_stacked.py``):
- ``S``: its structures (``StructureSet``), or the one-line reason it is refused (a
  LayerNorm on a structure's channels, a graph Torch-Pruning cannot trace, grouped convolutions
  whose channels a structure would take unequally from their groups, ...);
- ``gate_error``: ``api.check_gates`` — max |z_masked − z_pruned| / max |z_dense − z_masked| over
  two random removals (DESIGN.md §2's gate invariant; 0 = pruning removes exactly what the gates
  at 0 removed), or the one-line reason the pruned copy is refused;
- ``sosp_h_path``: ``pair`` when SOSP-H's Gauss–Newton product runs on the stacked/paired pass
  (every function the model calls has a rule, ``pruning/stacked.py``), else ``forward mode``
  with the function that has no rule (``reason``); ``pair_error``: max relative error of the
  pair pass's g and Q·1 (DESIGN §3, d = 1) against forward-mode AD, which is always exact;
- ``seconds``: the wall time of the model's survey.
The summary line counts the models that prune exactly (gate error ≤ 1e-6) and run SOSP-H on the
pair path within 1e-8 of forward mode.

    python scripts/survey_models.py --json docs/model_survey.json --markdown docs/model_survey.md
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_saliency import cpu_name  # noqa: E402
from test_stacked import float64_model, rel_err  # noqa: E402  (the tests' float64 set-up)

from sosp_cli import api  # noqa: E402
from sosp_cli.errors import SospError  # noqa: E402
from sosp_cli.utils import unwritable  # noqa: E402
from sosp_cli.models import TORCHVISION_KWARGS  # noqa: E402
from sosp_cli.pruning.derivatives import curvature_product  # noqa: E402
from sosp_cli.structures import StructureSet  # noqa: E402

# the smallest classifier of each torchvision family (--models all: every classifier)
FAMILIES = ["alexnet", "vgg11_bn", "resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d",
            "densenet121", "squeezenet1_1", "googlenet", "inception_v3", "mobilenet_v2",
            "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5", "efficientnet_b0",
            "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x0_5",
            "convnext_tiny", "vit_b_32", "swin_t", "swin_v2_t", "maxvit_t"]
# inputs smaller than these do not run through the model (MaxViT: 7 × 7 windows at stride 32)
MIN_SIZE = {"inception_v3": 75, "maxvit_t": 224}
GATE_TOL, PATH_TOL = 1e-6, 1e-8
FIELDS = ("model", "params_M", "size", "S", "gate_error", "sosp_h_path", "pair_error", "reason", "seconds")


def torchvision_names() -> list[str]:
    import torchvision
    return torchvision.models.list_models(module=torchvision.models)


def build(name: str, size: int) -> torch.nn.Module:
    """torchvision's ``name`` with 10 classes for ``size`` × ``size`` inputs (a ViT's and MaxViT's
    input size is a constructor argument), as ``create_model("torchvision.<name>")`` builds it
    (``TORCHVISION_KWARGS``: GoogLeNet and Inception v3 without auxiliary classifiers)."""
    import torchvision
    kwargs = {"image_size": size} if name.startswith("vit_") else {"input_size": (size, size)} if name.startswith("maxvit") else {}
    return torchvision.models.get_model(name, num_classes=10, **kwargs, **TORCHVISION_KWARGS.get(name, {}))


def survey(name: str, size: int = 64, batch: int = 2, max_params: float | None = None) -> dict:
    """One model's row (:data:`FIELDS`; a refused model's ``S`` or later fields are None and
    ``reason`` says why; a model of more than ``max_params`` million parameters is skipped)."""
    start = time.perf_counter()
    size = max(size, MIN_SIZE.get(name, 0))
    torch.manual_seed(0)
    row = dict.fromkeys(FIELDS)
    row.update(model=name, size=size)
    try:
        model = build(name, size).eval()
    except Exception as exc:   # e.g. a ViT whose patch size does not divide the input
        row.update(reason=f"does not build for {size} × {size} inputs ({type(exc).__name__}: {exc})",
                   seconds=round(time.perf_counter() - start, 1))
        return row
    row["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    if max_params is not None and row["params_M"] > max_params:
        row.update(reason=f"skipped: {row['params_M']} M parameters > --max-params {max_params:g}",
                   seconds=round(time.perf_counter() - start, 1))
        return row
    model = model.double()
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,))
    try:
        model = float64_model(model, x)
        ss = StructureSet(model, x[:1])
        row["S"] = ss.num_structures
        row["gate_error"] = api.check_gates(model, x)
        ones = torch.ones(ss.num_structures, dtype=torch.float64)
        g_ref, q_ref = curvature_product(model, ss, [(x, y)], ones, "cpu", dual="forward_ad")
        try:
            g, q = curvature_product(model, ss, [(x, y)], ones, "cpu", dual="stacked", stack_batch="pair")
            row["sosp_h_path"], row["pair_error"] = "pair", max(rel_err(g, g_ref), rel_err(q, q_ref))
        except SospError as exc:
            row["sosp_h_path"], row["reason"] = "forward mode", str(exc)
    except SospError as exc:
        row["reason"] = str(exc)
    except Exception as exc:   # not one of ours: a bug to report, in the row, not a stopped survey
        row["reason"] = f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def exact(row: dict) -> bool:
    """Prunes exactly and runs SOSP-H on the pair path within :data:`PATH_TOL` of forward mode."""
    return row["gate_error"] is not None and row["gate_error"] <= GATE_TOL and \
        row["sosp_h_path"] == "pair" and row["pair_error"] <= PATH_TOL


def markdown(rows: list[dict]) -> str:
    def number(v):
        return "–" if v is None else f"{v:.1e}" if isinstance(v, float) else str(v)
    lines = ["| model | params (M) | input | S | gate error | SOSP-H path | pair vs forward mode | reason |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reason = (r["reason"] or "").replace("|", "\\|")
        lines.append(f"| {r['model']} | {'–' if r['params_M'] is None else r['params_M']} | {r['size']}² | {number(r['S'])} | "
                     f"{number(r['gate_error'])} | {r['sosp_h_path'] or '–'} | {number(r['pair_error'])} | {reason} |")
    return "\n".join(lines) + "\n"


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=FAMILIES,
                        help="torchvision classifiers, or 'all' (default: one per family)")
    parser.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    parser.add_argument("--batch", type=int, default=2, help="images per model (default 2)")
    parser.add_argument("--max-params", type=float, default=None,
                        help="skip models of more parameters (millions): several float64 copies are held")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    names = torchvision_names()
    if args.models == ["all"]:
        args.models = names
    for name in args.models:
        if name not in names:
            parser.error(f"--models {name}: torchvision has no classifier '{name}' "
                         f"(torchvision.models.list_models(), or 'all')")
    if args.size < 32:
        parser.error(f"--size {args.size}: must be >= 32 (the models downsample by 32)")
    if args.batch < 1:
        parser.error(f"--batch {args.batch}: must be >= 1")
    if args.max_params is not None and args.max_params <= 0:
        parser.error(f"--max-params {args.max_params:g}: must be > 0")
    for option in ("json", "markdown"):   # refused now, not after the survey has run
        path = getattr(args, option)
        if path and (why := unwritable(path)):
            parser.error(f"--{option} {path}: cannot be written ({why})")
    return args


def main(argv=None) -> list[dict]:
    args = parse(argv)
    warnings.filterwarnings("ignore", module="torch_pruning")   # its notes on unwrapped parameters
    import torchvision
    header = (f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, torchvision {torchvision.__version__}, float64, {args.batch} images "
              f"per model, random initialisation")
    print(f"# {header}")
    rows = []
    for name in args.models:
        rows.append(survey(name, args.size, args.batch, args.max_params))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__,
                                               "rows": rows}, indent=2) + "\n")
    table = markdown(rows)
    if args.markdown:
        Path(args.markdown).write_text(f"# torchvision classifiers: structures, gate invariant, SOSP-H path\n\n{header}, "
                                       f"written by `python scripts/survey_models.py {' '.join(argv or sys.argv[1:])}` "
                                       f"(fields: the script's docstring)\n\n{table}")
    print(table)
    print(f"{sum(map(exact, rows))} of {len(rows)} models prune exactly (gate error ≤ {GATE_TOL}) and "
          f"run SOSP-H on the pair path within {PATH_TOL} of forward mode")
    return rows


if __name__ == "__main__":
    main()
