"""One end-to-end run on CUDA without Hydra (for a lent GPU machine): digits, resnet56, sosp_h,
AMP + channels_last, plus one sosp_i saliency, printing result.json's main fields (one JSON line
per method).

    python scripts/gpu_check.py OUT_DIR                        # as scripts/gpu_session.sh runs it
    python scripts/gpu_check.py OUT_DIR --device cpu --smoke   # seconds on a CPU (the tests run it)

``--smoke`` shrinks the run as ``configs/debug/smoke.yaml`` does: digits at 16×16, 1 epoch of 2
batches to pretrain and of 1 to fine-tune, 32 saliency samples in batches of 16.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sosp_cli.config import RunConfig
from sosp_cli.pipeline import run

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
    if smoke:   # configs/debug/smoke.yaml
        cfg.dataset.image_size = 16
        cfg.schedule.pretrain.epochs = cfg.schedule.finetune.epochs = 1
        cfg.schedule.pretrain.max_batches, cfg.schedule.finetune.max_batches = 2, 1
        cfg.saliency.num_samples, cfg.saliency.batch_size = 32, 16
        cfg.latency_repeats = 1
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
    main(args.out_dir, args.device, args.smoke)
