"""One end-to-end run on CUDA without Hydra (for a lent GPU machine): digits, resnet56, sosp_h,
AMP + channels_last, plus one sosp_i saliency, printing result.json's main fields (one JSON line
per method); then, on CUDA, an AMP training with a NaN batch (:func:`amp_skip_check`: one JSON
line).

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
    if device == "cuda":   # AMP trains on CUDA only (the tests run the check with AMP let onto the CPU)
        rows.append(amp_skip_check(device))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def amp_skip_check(device: str) -> dict:
    """Two epochs of AMP training (float16 on CUDA) whose 2nd epoch's 2nd batch holds a NaN: the
    GradScaler must skip that step, its BatchNorm statistics must be put back, and the run must
    go on with finite weights and epoch losses (README, "What stops a run")."""
    import torch
    from sosp_cli.config import TrainConfig
    from sosp_cli.data import load_dataset, make_loader
    from sosp_cli.models import create_model
    from sosp_cli.train import train

    splits = load_dataset("digits", image_size=16)
    batches = list(make_loader(splits.train, 32, True, seed=0, drop_last=True))[:3]
    spoiled = [(x.clone().index_fill_(0, torch.tensor([0]), float("nan")), y) for x, y in batches[1:2]]
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 1, 0.25)
    epochs = iter([batches, batches[:1] + spoiled + batches[2:]])

    class Loader:   # the clean batches, then the same with the 2nd spoiled
        def __len__(self):
            return 3

        def __iter__(self):   # a generator: an epoch begins at its first batch (tqdm calls iter twice)
            yield from next(epochs)

    history = train(model, Loader(), None, TrainConfig(epochs=2, batch_size=32, lr=0.05),
                    torch.device(device), "amp-check", amp=True)
    return {"check": "amp_skip", "device": device,
            "amp_skipped_steps": [h.get("amp_skipped_steps") for h in history],
            "train_loss": [h["train_loss"] for h in history],
            "finite": all(bool(torch.isfinite(t).all()) for t in model.state_dict().values())}


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
