"""One training loop for pretraining and fine-tuning, and evaluation (top-1 / top-5).

Resumable per epoch: after every epoch the model, optimizer, scheduler and history are saved
atomically to ``checkpoint_path``; a restarted run continues from there. Each epoch reseeds the
data-order generator and the augmentation RNG from ``(seed, epoch)``, so a resumed run sees
exactly the batches of an uninterrupted one.

``across_ranks`` (several processes, :mod:`.distributed`): the model trains wrapped in
``DistributedDataParallel`` on this rank's share of every global batch (the loader is
:func:`.data.make_loader` with ``across_ranks``), losses and accuracies are summed across ranks,
and only rank 0 writes the metrics and the checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import KEPT, read_torch
from .config import TrainConfig
from .errors import OtherConfig, SospError, check_choice
from .utils import append_jsonl, jsonl_row, save_text, save_torch

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("multistep", "cosine", "constant")
LOG_REFRESH_S = 60.0
log = logging.getLogger(__name__)


def bar_refresh(stream=None, environ=os.environ) -> dict:
    """tqdm's keyword for how often a progress bar redraws. tqdm redraws up to 10 times a
    second; into a file (a SLURM or ``nohup`` log, CI) every redraw is kept, so a CIFAR-schedule
    run would write ~10⁵ of them. Off a terminal the bar redraws once every ``LOG_REFRESH_S``
    seconds (a long epoch still shows its progress); ``TQDM_MININTERVAL`` in the environment
    (tqdm's own setting) always wins."""
    stream = sys.stderr if stream is None else stream
    if "TQDM_MININTERVAL" in environ or getattr(stream, "isatty", lambda: False)():
        return {}
    return {"mininterval": LOG_REFRESH_S}


def _param_groups(model: nn.Module, cfg: TrainConfig):
    if not cfg.no_decay_bn_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": cfg.weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            exempt = name == "bias" or isinstance(module, nn.modules.batchnorm._BatchNorm)
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
    groups = _param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step schedule: linear warmup, then multistep (milestones as fractions of training),
    cosine to zero, or constant."""
    check_choice("scheduler", cfg.scheduler, SCHEDULERS)
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = cfg.warmup_epochs * steps_per_epoch
    milestones = [int(m * total) if m <= 1 else int(m * steps_per_epoch) for m in cfg.milestones]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "cosine":
            t = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if cfg.scheduler == "multistep":
            return cfg.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _accuracy_counts(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top.eq(targets[:, None])
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, channels_last: bool = False,
             max_batches: int | None = None, across_ranks: bool = False) -> dict:
    """Mean cross-entropy, top-1 and top-5 accuracy (in %) of ``model`` in eval mode.
    ``across_ranks``: ``loader`` holds this rank's share of the split
    (:func:`.distributed.shard_dataset`); the sums are summed across ranks."""
    was_training = model.training
    model.eval()
    loss, top1, top5, n = 0.0, 0, 0, 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x).float()
        loss += F.cross_entropy(out, y, reduction="sum").item()
        c1, c5 = _accuracy_counts(out, y)
        top1, top5, n = top1 + c1, top5 + c5, n + len(y)
    model.train(was_training)
    if across_ranks:
        loss, top1, top5, n = distributed.all_sum_numbers(loss, top1, top5, n)
    if n == 0:
        raise SospError("evaluation split is empty")
    return {"loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def bn_l1(model: nn.Module) -> torch.Tensor:
    """Σ|γ| over all BatchNorm layers (the Network Slimming sparsity term, Liu et al. 2017)."""
    terms = [m.weight.abs().sum() for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def amp_enabled(amp: bool, device: torch.device) -> bool:
    """Mixed precision trains on CUDA only (``amp=true`` elsewhere trains in float32)."""
    return amp and device.type == "cuda"


class _BatchNormState:
    """Under AMP: every BatchNorm buffer (running mean / var, batch count) as it was before the
    current step, put back when the step's loss is not finite. The GradScaler skips such a step's
    update, but its forward pass has already folded that batch's statistics — NaN or inf — into
    the running ones, which would leave the evaluated (and pruned) network NaN."""

    def __init__(self, model: nn.Module):
        self.buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        for b in m.buffers()]
        self.saved = [b.clone() for b in self.buffers]

    def take(self) -> None:
        if self.buffers:   # one fused copy per dtype (a few kernels), not one per buffer
            torch._foreach_copy_(self.saved, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.saved)


def _train_step(net, model, x, y, optimizer, scaler, use_amp: bool, label_smoothing: float,
                bn_sparsity: float, scale: float | None = None) -> tuple[float, int, bool, float | None]:
    """One optimisation step of ``net`` (``model``, or ``model`` wrapped in DDP). ``scale``: under
    AMP, the GradScaler's scale before the step (its value after the previous one, so that it is
    read once per step, at the end, where the loss is read anyway: each read waits for the GPU).
    Returns (mean loss, correct predictions, whether the GradScaler skipped the update, its scale
    now). A function of its own so that the step's outputs and graph are released before the
    next step's forward pass."""
    with torch.autocast(x.device.type, enabled=use_amp):
        out = net(x)
        loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
    total = loss + bn_sparsity * bn_l1(model) if bn_sparsity else loss
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()
    # the scaler lowers its scale exactly when it found a non-finite gradient and skipped the step
    after = scaler.get_scale() if use_amp else None
    return loss.item(), int(out.argmax(1).eq(y).sum()), use_amp and after < scale, after


def train(model: nn.Module, train_loader, val_loader, cfg: TrainConfig, device: torch.device,
          stage: str, metrics_path: Path | None = None, checkpoint_path: Path | None = None,
          seed: int = 0, amp: bool = False, channels_last: bool = False,
          bn_sparsity: float = 0.0, across_ranks: bool = False, key: str | None = None,
          setting: str = "") -> list[dict]:
    """Train ``model`` in place; returns the per-epoch history (also appended to metrics.jsonl).
    ``across_ranks``: data-parallel over the process group (module docstring). ``key``: the
    config this training belongs to, written into its checkpoint; a checkpoint of another key is
    not resumed (a one-line error, the file kept). ``val_loader`` None: no validation after each
    epoch (its metrics are None; ``dataset.val_size=0``). A training that diverges stops with a
    one-line error (:func:`_diverged`; ``setting``, e.g. ``schedule.pretrain``, names its
    options there)."""
    check_train_config(cfg)
    with bn_momentum(model, cfg.bn_momentum):
        return _train(model, train_loader, val_loader, cfg, device, stage, metrics_path, checkpoint_path,
                      seed, amp, channels_last, bn_sparsity, across_ranks, key, setting)


def _diverged(stage: str, what: str, cfg: TrainConfig, setting: str) -> SospError:
    """The one-line error of a training whose loss is no longer finite. Nothing of the epoch is
    written (no checkpoint, no metrics row); the epochs before it stay as they were."""
    k = f"{setting}." if setting else ""
    return SospError(f"{stage} diverged: {what} ({k}lr={cfg.lr}); lower {k}lr or raise "
                     f"{k}warmup_epochs (now {cfg.warmup_epochs})")


def check_train_config(cfg: TrainConfig, key: str = "") -> None:
    """A one-line SospError for the first value of ``cfg`` that training would refuse or
    misread; ``key`` prefixes the names (``schedule.pretrain``), so the CLI can check both stages
    before anything runs."""
    k = f"{key}." if key else ""

    def need(ok: bool, name: str, accepted: str) -> None:
        if not ok:
            raise SospError(f"{k}{name}={getattr(cfg, name)} must be {accepted}")

    def number(value) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)

    check_choice(f"{k}optimizer", cfg.optimizer, OPTIMIZERS)
    check_choice(f"{k}scheduler", cfg.scheduler, SCHEDULERS)
    need(cfg.epochs >= 0, "epochs", ">= 0")
    need(cfg.batch_size >= 1, "batch_size", ">= 1")
    need(number(cfg.lr) and cfg.lr >= 0, "lr", "a number >= 0")
    need(number(cfg.momentum) and 0 <= cfg.momentum < 1, "momentum", "in [0, 1)")
    need(number(cfg.weight_decay) and cfg.weight_decay >= 0, "weight_decay", "a number >= 0")
    need(number(cfg.gamma) and cfg.gamma > 0, "gamma", "a number > 0")
    need(cfg.warmup_epochs >= 0, "warmup_epochs", ">= 0")
    need(number(cfg.label_smoothing) and 0 <= cfg.label_smoothing <= 1, "label_smoothing", "in [0, 1]")
    need(cfg.max_batches is None or cfg.max_batches >= 1, "max_batches", ">= 1 or null (every batch)")
    need(all(number(m) and m >= 0 for m in cfg.milestones), "milestones",
         "numbers >= 0 (fractions of training up to 1, epochs above)")
    check_bn_momentum(cfg.bn_momentum, f"{k}bn_momentum")


def check_bn_momentum(momentum, key: str = "bn_momentum") -> None:
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                 or not 0 < momentum <= 1):
        raise SospError(f"{key}={momentum}: expected a number in (0, 1] or null (the model's own)")


@contextlib.contextmanager
def bn_momentum(model: nn.Module, momentum: float | None):
    """Every BatchNorm of ``model`` with running-statistics momentum ``momentum`` inside the
    block, its own again after it (None: unchanged). A short schedule needs it for models whose
    own momentum is small — torchvision's MobileNetV3 (0.01) and MNASNet (0.0003) keep their
    running statistics near their initial mean 0 / variance 1 over a few hundred steps, so the
    eval-mode network (the one scored and pruned) is not the one trained."""
    check_bn_momentum(momentum)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    own = [m.momentum for m in norms]
    try:
        if momentum is not None:
            for m in norms:
                m.momentum = float(momentum)
        yield
    finally:
        for m, value in zip(norms, own):
            m.momentum = value


def sync_stage_rows(path: Path, stage: str, history: list[dict]) -> None:
    """Make ``stage``'s rows of the metrics file the epochs a (re)started training keeps — its
    checkpoint's ``history``, none when it starts afresh — so that a run killed between an epoch's
    checkpoint and its metrics row, or after a row of an epoch whose checkpoint it never wrote,
    neither loses nor repeats a row on resume. Other stages' rows stay as they are, in order;
    the file is rewritten (atomically) only when it differs."""
    path = Path(path)
    rows, torn = [], 0
    for line in path.read_text().splitlines() if path.exists() else []:
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:   # a row cut short by a kill while it was written
            torn += 1
    if torn:
        log.warning(f"{path}: dropped {torn} unreadable line(s), cut short when a run was stopped")
    wanted = [r for r in rows if r.get("stage") != stage] + list(history)
    if rows == wanted and not torn:
        return
    save_text("".join(jsonl_row(r) for r in wanted), path)


def _train(model, train_loader, val_loader, cfg: TrainConfig, device, stage, metrics_path, checkpoint_path,
           seed, amp, channels_last, bn_sparsity, across_ranks, key, setting) -> list[dict]:
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    steps = len(train_loader) if cfg.max_batches is None else min(cfg.max_batches, len(train_loader))
    if steps == 0 and cfg.epochs > 0:
        raise SospError(f"{setting + '.' if setting else ''}batch_size={cfg.batch_size}: the {stage} "
                        "training loader yields no batch, so an epoch would take no step (fewer "
                        "samples than one batch, the partial batch dropped?)")
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps)
    use_amp = amp_enabled(amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    net = model
    if across_ranks:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    main = distributed.is_main()
    history, start = [], 0
    resume = checkpoint_path is not None and Path(checkpoint_path).exists()
    if across_ranks:   # rank 0 writes the checkpoint: its answer holds for every rank
        resume = distributed.broadcast_object(resume)
    if resume:
        state = read_torch(checkpoint_path, hint=KEPT)
        if key is not None and state.get("key", key) != key:   # (no key: made before keys were written)
            raise OtherConfig(checkpoint_path, state["key"], key, partial=stage)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history, start = state["history"], state["epoch"] + 1
    if main and metrics_path is not None:
        sync_stage_rows(metrics_path, stage, history)
    bn_state = _BatchNormState(model) if use_amp else None
    scale = scaler.get_scale() if use_amp else None   # after a resume: the checkpoint's
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(seed * 100003 + epoch)
        if getattr(train_loader, "generator", None) is not None:
            train_loader.generator.manual_seed(seed * 100003 + epoch)
        model.train()
        t0, loss_sum, correct, n, skipped = time.time(), 0.0, 0, 0, 0
        bar = tqdm(train_loader, total=steps, desc=f"{stage} {epoch + 1}/{cfg.epochs}",
                   leave=False, dynamic_ncols=True, disable=not main, **bar_refresh())
        for i, (x, y) in enumerate(bar):
            if i >= steps:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if bn_state is not None:
                bn_state.take()
            step_loss, step_correct, step_skipped, scale = _train_step(
                net, model, x, y, optimizer, scaler, use_amp, cfg.label_smoothing, bn_sparsity, scale)
            # the schedule follows the steps taken, skipped by AMP or not; PyTorch warns when the
            # first step is a skipped one, as if the two calls were in the wrong order
            if step_skipped:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)`", UserWarning)
                    scheduler.step()
            else:
                scheduler.step()
            skipped += step_skipped
            # a non-finite loss: the step's gradients, and so every weight after it, are not
            # finite either — except under AMP, whose GradScaler skips such a step: its
            # BatchNorm statistics are put back too, and it is left out of the epoch's loss and
            # accuracy (counted in amp_skipped_steps); the checks after the epoch catch a model
            # ruined anyway. Checked per step in one process (every rank sees the same numbers
            # only at the epoch's end, summed)
            if not math.isfinite(step_loss):
                if use_amp:
                    bn_state.restore()
                    continue
                if not across_ranks:
                    bar.close()
                    raise _diverged(stage, f"the training loss is {step_loss} at epoch {epoch + 1}, "
                                    f"batch {i + 1}", cfg, setting)
            loss_sum += step_loss * len(y)
            correct += step_correct
            n += len(y)
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{100 * correct / n:.1f}", refresh=False)
        bar.close()   # also after ``max_batches``: the epoch's line below is not drawn over a bar
        if across_ranks:
            loss_sum, correct, n = distributed.all_sum_numbers(loss_sum, correct, n)
            distributed.broadcast_buffers(model)   # every rank: the model rank 0 evaluates and saves
        val = None if val_loader is None else \
            evaluate(model, val_loader, device, channels_last, across_ranks=across_ranks)
        # the network as evaluated (and scored, and pruned) gives non-finite logits: weights grown
        # past float range while every step's loss was still finite; or, under several
        # processes, a non-finite step (the sums are every rank's: every rank stops here)
        if val is not None and not math.isfinite(val["loss"]):
            raise _diverged(stage, f"the validation loss is {val['loss']} after epoch {epoch + 1}", cfg, setting)
        if not math.isfinite(loss_sum):
            raise _diverged(stage, f"the training loss is {loss_sum} in epoch {epoch + 1}", cfg, setting)
        if n == 0:   # under AMP, every step's loss was non-finite and skipped (on every rank)
            raise _diverged(stage, f"the training loss is not finite at any step of epoch {epoch + 1} "
                            f"(AMP's GradScaler skipped all {skipped})", cfg, setting)
        record = {"stage": stage, "epoch": epoch + 1, "train_loss": loss_sum / n,
                  "train_top1": 100.0 * correct / n,
                  **{f"val_{k}": None if val is None else val[k] for k in ("loss", "top1", "top5")},
                  "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0}
        if use_amp:   # steps whose update the GradScaler skipped (a non-finite gradient)
            record["amp_skipped_steps"] = skipped
        history.append(record)
        if not main:
            continue
        # checkpoint first: an epoch that is printed and in metrics.jsonl is one a resume keeps
        if checkpoint_path is not None:
            save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                        "history": history, "epoch": epoch, "key": key}, checkpoint_path)
        if metrics_path is not None:
            append_jsonl(record, metrics_path)
        log.info(f"[{stage}] epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.3f} "
                 f"train {record['train_top1']:.1f}%" + ("" if val is None else f" val {val['top1']:.1f}%")
                 + (f" ({skipped} steps skipped by AMP)" if skipped else ""))
    return history
