"""One end-to-end run on CUDA without Hydra (for a lent GPU machine): digits, resnet56, sosp_h,
AMP + channels_last, plus one sosp_i saliency, printing result.json's main fields (one JSON line
per method).

    python scripts/gpu_check.py OUT_DIR                        # as scripts/gpu_session.sh runs it
    python scripts/gpu_check.py OUT_DIR --device cpu --smoke   # seconds on a CPU (the tests run it)

``--smoke`` shrinks the run with the sizes of ``configs/debug/smoke.yaml`` (digits at 16×16, a few
batches), read from that file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from sosp_cli.config import RunConfig
from sosp_cli.errors import SospError
from sosp_cli.pipeline import run

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "debug" / "smoke.yaml"
FIELDS = ["method", "device", "top1_before", "top1_pruned", "top1_finetuned", "params_reduction",
          "macs_reduction", "saliency_seconds", "saliency_peak_memory_mb"]


def main(out_dir: str, device: str = "cuda", smoke: bool = False) -> list[dict]:
    cfg = RunConfig()
    cfg.model.name = "resnet56"
    cfg.device = device
    cfg.amp = True             # CUDA training only: ignored on a CPU
    cfg.channels_last = True
    for stage, epochs, lr in ((cfg.schedule.pretrain, 10, 0.05), (cfg.schedule.finetune, 5, 0.01)):
        stage.epochs, stage.lr, stage.scheduler = epochs, lr, "cosine"
    if smoke:   # the values of configs/debug/smoke.yaml (its `defaults` picks digits, as here already)
        sizes = OmegaConf.load(SMOKE)
        sizes.pop("defaults")
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg), sizes))
    cfg.pretrain.cache_dir = str(Path(out_dir) / "cache")
    rows = []
    for method in ("sosp_h", "sosp_i"):
        cfg.method.name = method
        r = run(cfg, Path(out_dir) / method)
        rows.append({k: r[k] for k in FIELDS})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="seconds on a CPU (configs/debug/smoke.yaml's sizes)")
    args = parser.parse_args()
    try:
        main(args.out_dir, args.device, args.smoke)
    except SospError as exc:
        parser.error(str(exc))
