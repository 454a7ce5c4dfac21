"""One end-to-end run on CUDA without Hydra (for a lent GPU machine): digits, resnet56, sosp_h,
AMP + channels_last, plus one sosp_i saliency, printing result.json's main fields."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from sosp_cli.config import RunConfig
from sosp_cli.pipeline import run


def main(out_dir: str) -> None:
    cfg = RunConfig()
    cfg.model.name = "resnet56"
    cfg.method.name = "sosp_h"
    cfg.device = "cuda"
    cfg.amp = True
    cfg.channels_last = True
    cfg.schedule.pretrain.epochs = 10
    cfg.schedule.pretrain.lr = 0.05
    cfg.schedule.pretrain.scheduler = "cosine"
    cfg.schedule.finetune.epochs = 5
    cfg.schedule.finetune.lr = 0.01
    cfg.schedule.finetune.scheduler = "cosine"
    cfg.pretrain.cache_dir = str(Path(out_dir) / "cache")
    for method in ("sosp_h", "sosp_i"):
        cfg.method.name = method
        r = run(cfg, Path(out_dir) / method)
        keep = ["method", "device", "top1_before", "top1_pruned", "top1_finetuned", "params_reduction",
                "macs_reduction", "saliency_seconds", "saliency_peak_memory_mb"]
        print(json.dumps({k: r[k] for k in keep}))


if __name__ == "__main__":
    main(sys.argv[1])
