"""SOSP-H's and SOSP-I's gate-space products on a GPU against forward-mode AD on the CPU, on every
registered model (for a lent GPU machine; on a CPU-only host ``--device cpu`` runs the same
comparisons on the CPU).

Per model, with the tests' float64 set-up (random BatchNorm statistics, unsaturated softmax;
``tests/test_stacked.py``) and d = 1 (SOSP-H's direction, DESIGN §3):
- reference: (g, Q·1) by forward-mode AD in float64 on the CPU (``dual='forward_ad'``);
- ``whole`` / ``half`` / ``pair``: the stacked and paired passes (``dual='stacked'``) in float64 on ``--device``;
- ``rowsum``: the row sums of SOSP-I's exact Gauss–Newton matrix Q (``curvature_matrix``) on
  ``--device`` in float64 — SOSP-H's v must equal them (issue 3);
- ``float32``: the stacked pass in float32 with channels_last tensors on ``--device``, products
  in IEEE float32 (``saliency.tf32=false``, the default), against the float64 reference;
  ``tf32``: the same with TensorFloat-32 products (``saliency.tf32=true``; on a CPU, the same);
- ``api``: SOSP-H's scores from ``sosp_cli.api.saliency`` in float32 (the default precision)
  against |g| + ½|Q·1| of the reference.
Relative error = max |a − b| / max |b|. Exits 1 if a float64 error exceeds 1e-8, or a float32
one in IEEE float32 exceeds 1e-4.

    python scripts/gpu_exactness.py --device cuda --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_stacked import WIDTH, float64_model, rel_err  # noqa: E402  (the tests' float64 set-up)

from sosp_cli import api  # noqa: E402
from sosp_cli.pruning.derivatives import curvature_matrix, curvature_product, stackable  # noqa: E402
from sosp_cli.structures import StructureSet  # noqa: E402
from sosp_cli.utils import float32_products, unwritable  # noqa: E402

FLOAT64_TOL, FLOAT32_TOL = 1e-8, 1e-4


def check(name: str, device: torch.device, batch: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 5, (batch,))
    model = float64_model(api.create_model(name, num_classes=5, width=WIDTH.get(name, 0.25)), x)
    ss = StructureSet(model, x[:1])
    ones = torch.ones(ss.num_structures, dtype=torch.float64)
    g_ref, q_ref = curvature_product(model, ss, [(x, y)], ones, "cpu", dual="forward_ad")
    row = {"model": name, "S": ss.num_structures}
    on_device = copy.deepcopy(model).to(device)
    data = [(x.to(device), y.to(device))]
    for mode in ("whole", "half", "pair"):
        g, q = curvature_product(on_device, ss, data, ones, device, dual="stacked", stack_batch=mode)
        row[f"{mode}_g"], row[f"{mode}_q"] = rel_err(g.cpu(), g_ref), rel_err(q.cpu(), q_ref)
    row["stackable"] = stackable(on_device)
    _, q_full = curvature_matrix(on_device, ss, data, device)
    row["rowsum_q"] = rel_err(q_full.sum(1).cpu(), q_ref)
    row["symmetric"] = rel_err(q_full.T.cpu(), q_full.cpu())
    single = copy.deepcopy(model).float().to(device, memory_format=torch.channels_last)
    data32 = [(x.float().to(device, memory_format=torch.channels_last), y.to(device))]
    for label, tf32 in (("float32", False), ("tf32", True)):
        with float32_products(tf32):
            g, q = curvature_product(single, ss, data32, ones.float(), device, dual="stacked")
        row[f"{label}_g"], row[f"{label}_q"] = rel_err(g.double().cpu(), g_ref), rel_err(q.double().cpu(), q_ref)
    scores = api.saliency(single, data32, "sosp_h", example_input=x[:1].float(), device=device)
    row["api"] = rel_err(torch.tensor(list(scores.values()), dtype=torch.float64),
                         g_ref.abs() + 0.5 * q_ref.abs())   # DESIGN §3, combine=abs_sum
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=api.list_models(), choices=api.list_models())
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.batch < 1:
        parser.error(f"argument --batch: {args.batch} must be >= 1")
    if args.json and (why := unwritable(args.json)):   # refused now, not after the checks have run
        parser.error(f"argument --json: {args.json} cannot be written ({why})")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# device {device} ({name}), torch {torch.__version__}")
    rows, failed = [], []
    for model in args.models:
        row = check(model, device, args.batch)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if max(row[k] for k in ("whole_g", "whole_q", "half_g", "half_q", "pair_g", "pair_q", "rowsum_q", "symmetric")) > FLOAT64_TOL \
                or max(row[k] for k in ("float32_g", "float32_q", "api")) > FLOAT32_TOL:
            failed.append(model)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(device), "device_name": name, "torch": torch.__version__,
                       "rows": rows}, fh, indent=2)
    if failed:
        print(f"FAILED (relative error > {FLOAT64_TOL} in float64 or > {FLOAT32_TOL} in float32): "
              f"{', '.join(failed)}")
        return 1
    print(f"all float64 errors ≤ {FLOAT64_TOL}, IEEE float32 errors ≤ {FLOAT32_TOL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
