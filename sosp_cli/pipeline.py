"""The pipeline: pretrain → saliency → prune → fine-tune, one run directory (DESIGN.md §5).

Each stage writes its artefact atomically (``pretrained.pt``, ``saliency.pt``, ``pruned.pt``,
``finetuned.pt``) tagged with a fingerprint of the config it depends on. A stage whose
artefact exists with the same fingerprint is skipped, so a killed run resumes (training also
resumes per epoch); an artefact made by a different config is never overwritten — the run
stops with an error instead. Pretrained models are shared through a content-addressed cache
(key: dataset / model / pretrain schedule / seed / sparsity), guarded by a file lock, so a
sweep over methods and ratios pretrains once.

Under several processes (``torchrun``, :mod:`.distributed`) every rank runs every stage — the
training data-parallel, the saliency on its share of the batches, summed across ranks — and
rank 0 alone writes the artefacts; whether a stage's artefact exists is rank 0's answer, so all
ranks skip or run the same stages.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from . import distributed
from .checkpoint import (FORMAT, KEPT, build_from_record, check_checkpoint_path, load_weights_into, not_finite,
                         model_record, read_torch, save_model)
from .config import RunConfig
from .diagnostics import loss_prediction
from .data import check_dataset_options, load_dataset, make_loader, take_batches
from .errors import OtherConfig, SospError, check_choice
from .measure import PeakMemory, count_macs, count_params, latencies_in_turn
from .models import create_model
from .pruning import SaliencyInput, get_criterion, saliency_model
from .pruning.derivatives import check_second_derivatives
from .budget import CostModel
from .selection import (TARGET_NOUNS, Originals, originals_of, removal_caps, select,
                        validate as validate_selection)
from .structures import StructureSet
from .surgery import check_removal, remove_structures
from .train import check_train_config, evaluate, train
from .utils import (DEVICES, atomic_write, check_seed, float32_products, fingerprint, make_folder, resolve_device,
                    save_json, save_torch, seed_everything)


log = logging.getLogger(__name__)


def _asdict(x):
    return dataclasses.asdict(x)


def pretrain_key(cfg: RunConfig) -> str:
    data = {k: v for k, v in _asdict(cfg.dataset).items() if k not in ("num_workers", "root", "download")}
    return fingerprint(data, _asdict(cfg.model), _asdict(cfg.schedule.pretrain), cfg.seed,
                       cfg.method.sparsity, cfg.pretrain.checkpoint)


def saliency_key(cfg: RunConfig) -> str:
    sal = _asdict(cfg.saliency)
    method = _asdict(cfg.method)
    # defaults keep the keys of runs made before these options existed
    if sal["batchnorm"] == "running":
        del sal["batchnorm"]
    if not sal["tf32"]:
        del sal["tf32"]
    if method["stack_batch"] == "auto":
        del method["stack_batch"]
    if cfg.method.selection == "greedy":   # the greedy growth stays within the guards' caps
        p = cfg.prune
        return fingerprint(pretrain_key(cfg), method, sal, {"removable": [p.min_channels, p.max_layer_ratio,
                                                                         p.round_to]})
    return fingerprint(pretrain_key(cfg), method, sal)


def prune_key(cfg: RunConfig) -> str:
    prune = {k: v for k, v in _asdict(cfg.prune).items() if not k.startswith("diagnostics")}
    if cfg.prune.steps == 1:
        prune.pop("step_epochs")
    if prune["round_to"] == 1:   # the default keeps the keys of runs made before it existed
        del prune["round_to"]
    return fingerprint(saliency_key(cfg), prune)


def _between_steps(cfg: RunConfig) -> list[dict]:
    """With fine-tuning between ``prune.steps``' rounds (``prune.step_epochs`` > 0), every round
    after the first scores and prunes a model that ``schedule.finetune`` trained: its settings
    (all but ``epochs``) are part of those rounds' keys. Without it, nothing (the keys of runs
    made before stay as they were)."""
    if cfg.prune.steps > 1 and cfg.prune.step_epochs > 0:
        return [{k: v for k, v in _asdict(cfg.schedule.finetune).items() if k != "epochs"}]
    return []


def step_key(cfg: RunConfig, step: int) -> str:
    """Key of round ``step``'s pruned model (``pruned_step<step>.pt``, the last: ``pruned.pt``)."""
    return fingerprint(prune_key(cfg), step, *_between_steps(cfg))


def finetune_key(cfg: RunConfig) -> str:
    return fingerprint(prune_key(cfg), _asdict(cfg.schedule.finetune))


def saliency_file(step: int) -> str:
    """The file of round ``step``'s scores."""
    return "saliency.pt" if step == 1 else f"saliency_step{step}.pt"


def pruned_file(step: int, steps: int) -> str:
    """The file of round ``step``'s pruned model (the last round's: ``pruned.pt``)."""
    return "pruned.pt" if step == steps else f"pruned_step{step}.pt"


def step_saliency_key(cfg: RunConfig, step: int) -> str:
    """Key of round ``step``'s scores: the dense model's (step 1), else of the model the rounds
    before it pruned."""
    return saliency_key(cfg) if step == 1 else \
        fingerprint(prune_key(cfg), "saliency", step, *_between_steps(cfg))


def artefacts(cfg: RunConfig) -> list[tuple[str, str, str | None]]:
    """Every file in which a run of ``cfg`` keeps its stages' work, as (name, the key it
    carries, the stage of a partial training resumed per epoch — else None): the names the
    stages below write, read by :func:`check_folder`."""
    k, pretrained, finetuned = cfg_steps(cfg), pretrain_key(cfg), finetune_key(cfg)
    files = [("pretrained.pt", pretrained, None), ("pretrain_last.pt", pretrained, "pretrain")]
    for step in range(1, k + 1):
        files += [(saliency_file(step), step_saliency_key(cfg, step), None),
                  (pruned_file(step, k), step_key(cfg, step), None)]
        if step < k:
            files.append((f"step{step}_last.pt", step_key(cfg, step), f"step{step}-finetune"))
    return files + [("finetuned.pt", finetuned, None), ("finetune_last.pt", finetuned, "finetune")]


def check_folder(cfg: RunConfig, out: Path) -> None:
    """Refuse a run folder holding an artefact of another config (:func:`artefacts`) before
    anything runs or is written: a stage would refuse it anyway (:func:`_load_stage`), but only
    after the stages before it had run — and ``sosp-run`` writes its record of the config
    (``.hydra/``) only into a folder this accepts. Rank 0 reads the files (the tensors mapped,
    not read); every rank raises."""
    other = None
    if distributed.is_main():
        for name, key, partial in artefacts(cfg):
            path = Path(out) / name
            if not path.exists():
                continue
            record = read_torch(path, hint=KEPT, mmap=True)
            found = _key_in(record)
            if found != key and not (partial and found is None):   # a partial training's
                other = OtherConfig(path, found, key, partial)       # without one predates keys
                break
    other = distributed.broadcast_object(other)
    if other is not None:
        raise other


def _key_in(record) -> str | None:
    """The key an artefact carries (None if it has none); what it is, if not an artefact."""
    return record.get("key") if isinstance(record, dict) else type(record).__name__


def _load_stage(path: Path, key: str):
    """Return the artefact at ``path`` if it was made for ``key``; None if absent (rank 0 decides,
    so that under several processes every rank skips or runs the same stages)."""
    if not distributed.broadcast_object(path.exists()):
        return None
    record = read_torch(path, hint=KEPT)
    if _key_in(record) != key:
        raise OtherConfig(path, _key_in(record), key)
    return record


def validate(cfg: RunConfig, here: bool = True) -> None:
    """Every check that needs no data, before anything is written or read from the run folder
    (an artefact there of another config would otherwise be reported before the bad value).
    ``here=False``: the run will run on another machine (a SLURM sweep checked where it is
    submitted), whose devices and files this one cannot answer for."""
    from .models import TORCHVISION, check_model

    check_dataset_options(cfg.dataset.name, cfg.dataset.image_size, cfg.dataset.val_size,
                          cfg.dataset.num_workers, cfg.dataset.split_seed)
    check_model(cfg.model.name, cfg.model.width)
    check_seed(cfg.seed)
    if cfg.pretrain.checkpoint and here:
        check_checkpoint_path(cfg.pretrain.checkpoint)
    if cfg.model.name.startswith(TORCHVISION):
        # a model outside the registry may be refused (a LayerNorm on its channels, a graph
        # Torch-Pruning cannot trace, ...): say so before pretraining it, from its structures on a dummy input
        size = cfg.dataset.image_size
        StructureSet(create_model(cfg.model.name, 10, 3, cfg.model.width).eval(), torch.zeros(1, 3, size, size))
    for stage in ("pretrain", "finetune"):
        check_train_config(getattr(cfg.schedule, stage), f"schedule.{stage}")
    p = cfg.prune
    validate_selection(p.ratio, p.target, p.scope, p.min_channels, p.max_layer_ratio, p.normalize,
                       p.round_to)
    cfg_steps(cfg)
    if p.step_epochs < 0:
        raise SospError(f"prune.step_epochs={p.step_epochs} must be >= 0")
    if p.diagnostics_samples < 0 or p.diagnostics_samples in (1, 2):
        raise SospError(f"prune.diagnostics_samples={p.diagnostics_samples} must be 0 (no "
                        "single-structure check) or >= 3 (a Spearman correlation needs 3 points)")
    if cfg.latency_repeats < 1:
        raise SospError(f"latency_repeats={cfg.latency_repeats} must be >= 1")
    if here:
        resolve_device(cfg.device)   # also refuses device=cuda where no CUDA device is
    else:
        check_choice("device", cfg.device, DEVICES)
    criterion = get_criterion(cfg.method)
    if cfg.method.selection == "greedy" and (p.scope != "global" or p.normalize != "none"):
        # its scores are the steps at which the greedy growth removes each structure: the
        # removed set is a prefix of that one global order, which these options would reorder
        bad = [f"prune.{key}={value}" for key, value, fits in
               (("scope", p.scope, "global"), ("normalize", p.normalize, "none")) if value != fits]
        raise SospError(f"method.selection=greedy removes a prefix of one global removal order; "
                        f"{' and '.join(bad)} would reorder it by layer: use prune.scope=global "
                        "prune.normalize=none with it")
    if criterion.layer_local and p.scope != "local":
        raise SospError(f"method {cfg.method.name} is layer-local (its scores compare only within "
                        f"one layer); prune.scope={p.scope} is not accepted, use prune.scope=local")
    s = cfg.saliency
    if s.num_samples < 1 or s.batch_size < 1:
        raise SospError(f"saliency.num_samples={s.num_samples} and saliency.batch_size="
                        f"{s.batch_size} must be >= 1")
    criterion.check_batchnorm(s.batchnorm)
    if s.batchnorm == "batch" and (s.batch_size < 2 or s.num_samples % s.batch_size == 1):
        raise SospError(f"saliency.batchnorm=batch normalises each saliency batch with its own "
                        f"statistics, and saliency.num_samples={s.num_samples} in batches of "
                        f"saliency.batch_size={s.batch_size} leaves a batch of 1 sample: choose "
                        "them so that every batch has at least 2")


def _check_training_batches(cfg: RunConfig, images: int) -> None:
    """Before anything trains: a stage that will train gets at least one step per epoch — an
    epoch drops its last, partial batch, so a batch larger than the training split is none."""
    stages = [("finetune", cfg.schedule.finetune.epochs > 0 or cfg.prune.step_epochs > 0)]
    if not cfg.pretrain.checkpoint:
        stages.insert(0, ("pretrain", cfg.schedule.pretrain.epochs > 0))
    for stage, trains in stages:
        size = getattr(cfg.schedule, stage).batch_size
        if trains and size > images:
            raise SospError(f"schedule.{stage}.batch_size={size} is more than the {images} training images "
                            f"of {cfg.dataset.name}: an epoch would take no step (it drops its last, "
                            f"partial batch); use at most {images}")


class Run:
    """State shared by the stages of one run."""

    def __init__(self, cfg: RunConfig, out_dir: Path):
        self.cfg, self.out = cfg, Path(out_dir)
        self.device = distributed.init_from_env(resolve_device(cfg.device))
        self.ranks = distributed.active()   # several processes: data-parallel stages (module docstring)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        elif cfg.amp and distributed.is_main():   # the one setting that a CPU run would drop silently
            log.warning(f"[run] amp=true: mixed precision trains on CUDA only; this run trains on "
                        f"{self.device.type} in float32")
        self.splits = load_dataset(cfg.dataset.name, cfg.dataset.root, cfg.dataset.download,
                                   cfg.dataset.image_size, cfg.dataset.val_size,
                                   cfg.dataset.split_seed, cfg.dataset.augment)
        s = self.splits
        _check_training_batches(cfg, len(s.train))
        self.input_shape = [s.in_channels, s.image_size, s.image_size]
        self.example = torch.zeros(1, *self.input_shape)
        self.spec = {"model": cfg.model.name, "num_classes": s.num_classes,
                     "in_channels": s.in_channels, "width": cfg.model.width,
                     "input_shape": self.input_shape}
        pin = self.device.type == "cuda"
        workers = cfg.dataset.num_workers
        shard = distributed.shard_dataset   # under several processes each rank evaluates its share
        # no held-out images (dataset.val_size=0: train on the whole training set, as the papers'
        # CIFAR schedules do): no validation after each epoch
        self.val_loader = make_loader(shard(s.val), 256, False, num_workers=workers, pin_memory=pin) \
            if len(s.val) else None
        self.test_loader = make_loader(shard(s.test), 256, False, num_workers=workers, pin_memory=pin)
        self.metrics = self.out / "metrics.jsonl"

    def train_loader(self, batch_size: int):
        return make_loader(self.splits.train, batch_size, True, seed=self.cfg.seed,
                           num_workers=self.cfg.dataset.num_workers,
                           pin_memory=self.device.type == "cuda", drop_last=True,
                           across_ranks=self.ranks)

    def evaluate(self, model) -> dict:
        return evaluate(model.to(self.device), self.test_loader, self.device, self.cfg.channels_last,
                        across_ranks=self.ranks)

    def fit(self, model, tcfg, stage: str, checkpoint: Path, key: str, bn_sparsity: float = 0.0):
        """Train ``model`` for the stage whose artefact has ``key`` (its checkpoint carries it)."""
        return train(model, self.train_loader(tcfg.batch_size), self.val_loader, tcfg, self.device,
                     stage, self.metrics, checkpoint, self.cfg.seed, self.cfg.amp,
                     self.cfg.channels_last, bn_sparsity, across_ranks=self.ranks, key=key,
                     setting="schedule.pretrain" if stage == "pretrain" else "schedule.finetune")

    def save(self, record, path: Path) -> None:
        """Write an artefact (rank 0 only; every rank goes on with ``record`` in memory)."""
        if distributed.is_main():
            save_torch(record, path)

    def remove(self, path: Path) -> None:
        if distributed.is_main():
            path.unlink(missing_ok=True)


def stage_pretrain(run: Run) -> torch.nn.Module:
    cfg, key = run.cfg, pretrain_key(run.cfg)
    path = run.out / "pretrained.pt"
    record = _load_stage(path, key)
    if record is None:
        if cfg.pretrain.checkpoint:
            model = create_model(cfg.model.name, run.spec["num_classes"], run.spec["in_channels"],
                                 cfg.model.width)
            load_weights_into(model, cfg.pretrain.checkpoint)
            record = model_record(model, run.spec, key=key, source=str(cfg.pretrain.checkpoint))
            run.save(record, path)
        elif cfg.pretrain.use_cache:
            cache = Path(cfg.pretrain.cache_dir) / f"{cfg.dataset.name}_{cfg.model.name}_{key}.pt"
            main = distributed.is_main()
            problem = None
            if main:
                try:
                    make_folder(cache.parent, f"pretrain.cache_dir={cfg.pretrain.cache_dir}")
                except SospError as exc:
                    problem = str(exc)
            problem = distributed.broadcast_object(problem)   # every rank stops, not rank 0 alone
            if problem:
                raise SospError(f"{problem}; give a writable folder, or pretrain.use_cache=false")
            with distributed.file_lock(str(cache) + ".lock"):   # against other runs sharing the cache
                if not distributed.broadcast_object(cache.exists()):
                    _train_fresh(run, key, cache, cache.with_suffix(".partial.pt"))
            if main:
                try:   # a cached file cut short or spoiled is named, never copied into the run
                    _check_cached(cache, key)
                    atomic_write(path, lambda tmp: shutil.copyfile(cache, tmp))
                except SospError as exc:
                    problem = str(exc)
            problem = distributed.broadcast_object(problem)   # every rank stops, not rank 0 alone
            if problem:
                raise SospError(problem)
            record = torch.load(path, map_location="cpu", weights_only=False)
        else:
            _train_fresh(run, key, path, run.out / "pretrain_last.pt")
            distributed.barrier()
            record = torch.load(path, map_location="cpu", weights_only=False)
    return build_from_record(record)


def _check_cached(cache: Path, key: str) -> None:
    """A one-line error unless ``cache`` holds the pretrained model its name says (its key)."""
    again = f"; delete it to pretrain again (it is in pretrain.cache_dir={cache.parent})"
    record = read_torch(cache, hint=again, mmap=True)
    found = _key_in(record)
    if found != key or record.get("format") != FORMAT:
        raise SospError(f"{cache} is not the pretrained model its name says (key {found} != {key}){again}")


def _train_fresh(run: Run, key: str, path: Path, partial: Path) -> None:
    cfg = run.cfg
    seed_everything(cfg.seed)
    model = create_model(cfg.model.name, run.spec["num_classes"], run.spec["in_channels"], cfg.model.width)
    history = run.fit(model, cfg.schedule.pretrain, "pretrain", partial, key, cfg.method.sparsity)
    if distributed.is_main():
        save_model(path, model.cpu(), run.spec, key=key, history_metrics=history)
    run.remove(partial)


def stage_saliency(run: Run, model, ss: StructureSet, step: int = 1,
                   originals: Originals | None = None) -> dict:
    """Scores of the current model (step 1: the dense model; step k: after k−1 prune steps,
    ``originals`` the dense model's totals, for the guards that sosp_i's greedy growth obeys)."""
    cfg = run.cfg
    key = step_saliency_key(cfg, step)
    path = run.out / saliency_file(step)
    record = _load_stage(path, key)
    if record is not None:
        return record
    criterion = get_criterion(cfg.method)
    available = len(run.splits.train_eval)
    if cfg.saliency.num_samples > available and step == 1 and distributed.is_main():
        log.warning(f"[saliency] saliency.num_samples={cfg.saliency.num_samples} is more than the "
                    f"{available} training images: the saliency uses all {available}")
    batches = take_batches(run.splits.train_eval, cfg.saliency.num_samples, cfg.saliency.batch_size,
                           seed=cfg.seed)
    model = saliency_model(model.to(run.device), cfg.saliency.batchnorm, batches)
    p = cfg.prune
    removable = None if cfg.method.selection != "greedy" else \
        removal_caps(ss, originals, p.min_channels, p.max_layer_ratio, p.round_to)
    with PeakMemory(run.device) as peak:
        t0 = time.perf_counter()
        sal = criterion.run(SaliencyInput(model, ss, batches, run.device, cfg.seed, cfg.saliency.tf32,
                                          across_ranks=run.ranks, removable=removable))
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    _check_finite_scores(sal.scores, model, cfg.method.name, step)
    record = {"key": key, "method": cfg.method.name, "names": ss.names(),
              "scores": sal.scores.detach().cpu(), "seconds": seconds,
              "peak_memory_mb": peak.mb, "num_samples": sum(len(y) for _, y in batches),
              "grad": None if sal.grad is None else sal.grad.cpu(),
              "second_order": None if sal.second_order is None else sal.second_order.cpu()}
    run.save(record, path)
    if record["names"] != ss.names():
        raise SospError(f"{path} names other structures than this model has")
    return record


def _check_finite_scores(scores: torch.Tensor, model, method: str, step: int) -> None:
    """A one-line error, before anything is written, for scores with a NaN (none can be ranked),
    naming what is not finite: a weight (a training that diverged) or the saliency's own
    arithmetic on finite weights."""
    nan = int(torch.isnan(scores).sum())
    if not nan:
        return
    spoiled = not_finite(model.state_dict())
    scored = "the dense model" if step == 1 else f"the model of round {step}"
    cause = (f"its '{spoiled}' is not finite (a training that diverged)" if spoiled else
             "its weights are finite, its loss or derivatives on the saliency batches are not")
    raise SospError(f"{method} scores of {scored} are NaN for {nan} of {len(scores)} structures: {cause}; "
                    "nothing was written")


def stage_prune(run: Run, model) -> tuple[dict, dict]:
    """``prune.steps`` rounds of saliency → selection → removal (→ ``prune.step_epochs`` of
    fine-tuning); each round removes an equal share of the budget, counted against the dense
    model. Returns (saliency record of step 1, record of the final pruned model)."""
    cfg, k = run.cfg, cfg_steps(run.cfg)
    ss = StructureSet(model.cpu().eval(), run.example)
    dense_cost = CostModel(model.cpu(), ss, run.example)
    originals = originals_of(dense_cost, ss)
    first_saliency, current, history, record = None, model, [], None
    diagnostics = None   # of the first step's selection, carried into every later step's record
    seconds = []         # each round's saliency time; a step's record holds those up to it
    gate_errors = []     # each round's gate_error (surgery.py); likewise
    for step in range(1, k + 1):
        key = step_key(cfg, step)
        path = run.out / pruned_file(step, k)
        record = _load_stage(path, key)
        if step == 1:
            first_saliency = stage_saliency(run, current, ss)
        if record is not None:
            if cfg.prune.diagnostics and _other_diagnostics(record.get("diagnostics"), cfg, originals):
                # asked for on a folder pruned without them (or with another number of single
                # structures): computed now, on the dense model and the first step's selection,
                # which do not depend on them
                if step == 1:
                    diagnostics = _diagnostics(run, current, ss, record["selection"]["remove"])
                record["diagnostics"] = diagnostics
                run.save(record, path)
            current, history = build_from_record(record), record["history"]
            diagnostics = record.get("diagnostics")
            seconds = list(record.get("saliency_seconds_steps") or [])   # absent: made before it existed
            gate_errors = list(record.get("gate_error_steps") or [])
            continue
        if step > 1:
            ss = StructureSet(current.cpu().eval(), run.example)
        sal = first_saliency if step == 1 else stage_saliency(run, current, ss, step, originals)
        seconds = seconds + [sal["seconds"]]
        ratio = 0.0 if cfg.method.name == "none" else cfg.prune.ratio * step / k
        p = cfg.prune
        cost = dense_cost if step == 1 else CostModel(current.cpu(), ss, run.example)
        sel = select(sal["scores"], ss, cost, ratio, p.target,
                     p.scope, p.min_channels, p.max_layer_ratio, p.normalize, originals, p.round_to)
        if distributed.is_main():
            _log_guards(sel, p, step, k)
        if p.diagnostics and step == 1:
            diagnostics = _diagnostics(run, current, ss, sel.remove)
        pruned, new = remove_structures(current.cpu(), ss, sel.remove, run.example)
        gate_errors = gate_errors + [_check_pruned(run, current, pruned, ss, sel.remove, step)]
        history = history + new
        if step < k and p.step_epochs > 0:
            tcfg = dataclasses.replace(cfg.schedule.finetune, epochs=p.step_epochs)
            run.fit(pruned, tcfg, f"step{step}-finetune", run.out / f"step{step}_last.pt", key)
            run.remove(run.out / f"step{step}_last.pt")
        record = model_record(pruned.cpu(), run.spec, history, key=key, step=step,
                              selection=dataclasses.asdict(sel), diagnostics=diagnostics,
                              saliency_seconds_steps=seconds, gate_error_steps=gate_errors,
                              removed_structures=originals.structures - ss.num_structures + len(sel.remove))
        run.save(record, path)
        current = pruned
    return first_saliency, record


def _check_pruned(run: Run, model, pruned, ss: StructureSet, remove: list[str], step: int) -> float:
    """The gate invariant for this step's removal on 8 training images (surgery.gate_error):
    the pruned model must be the masked model the saliencies were computed for."""
    x = take_batches(run.splits.train_eval, 8, 8, seed=run.cfg.seed)[0][0]
    return check_removal(model.cpu(), pruned, ss, remove, x, "8 training images", f"step {step}: ")


def _log_guards(sel, p, step: int, k: int) -> None:
    """What the layer guards changed in a step's selection: an info line when they kept
    structures, a warning when they kept so many that the budget was not reached."""
    guards = (f"the layer guards (min_channels={p.min_channels}, max_layer_ratio={p.max_layer_ratio}, "
              f"round_to={p.round_to}) kept {sel.guard_skipped} "
              f"{'structure' if sel.guard_skipped == 1 else 'structures'} that ranked for removal")
    if not sel.budget_met:
        if p.min_channels == 1 and p.max_layer_ratio >= 1 and p.round_to == 1:
            # the loosest guards: every removable structure went, so no selection removes more
            most = math.floor(1000 * sel.achieved_ratio) / 1000
            advice = (f"they are at their loosest (every group keeps one channel), so no selection "
                      f"removes more: ask for at most prune.ratio={most:g}")
        else:
            advice = f"relax them to reach prune.ratio={p.ratio}"
        log.warning(f"[prune] step {step}/{k}: {100 * sel.achieved_ratio:.1f} % of the "
                    f"{TARGET_NOUNS[sel.target]} removed, short of the {100 * sel.requested_ratio:.1f} % "
                    f"asked: {guards}; {advice}")
    elif sel.guard_skipped:
        log.info(f"[prune] step {step}/{k}: {guards}")


def cfg_steps(cfg: RunConfig) -> int:
    if cfg.prune.steps < 1:
        raise SospError(f"prune.steps={cfg.prune.steps} must be >= 1 (1 = single shot)")
    return cfg.prune.steps


# held in a run folder while a process runs (or resumes) it: two processes never run one folder
RUN_LOCK = ".sosp-run.lock"


def run(cfg: RunConfig, out_dir: str | Path, accepted=None) -> dict:
    """Run (or resume) one experiment; returns the result written to ``result.json``.

    A folder that another process is running — the same command started twice, a job requeued
    while its first attempt still runs — is refused in one line rather than run by both, and so
    is a folder holding an artefact of another config (:func:`check_folder`, after the checks of
    the inputs). ``accepted(out)`` is called (rank 0) once the folder is accepted, before any
    stage: ``sosp-run`` writes its record of the config there."""
    validate(cfg)
    out = Path(out_dir)
    make_folder(out, f"the run folder {out}")
    with distributed.file_lock(str(out / RUN_LOCK), busy=(
            f"the run folder {out} is in use by another sosp-run process (it holds {out / RUN_LOCK}); "
            "wait for it to end, or give another hydra.run.dir")):
        return _run(cfg, out, accepted)


def _run(cfg: RunConfig, out: Path, accepted=None) -> dict:
    result_path = out / "result.json"
    r = Run(cfg, out)   # reads the dataset: its own checks (present, larger than a batch) come first
    t_start = time.time()
    criterion = get_criterion(cfg.method)
    # the exact Hessian, for the method's saliency or for the diagnostics (diagnostics.py)
    hessian = cfg.method.curvature == "hessian" and ("hessian" in criterion.curvatures or cfg.prune.diagnostics)
    if criterion.structure_limited or hessian:   # refuse before pretraining, on the dense model
        fresh = create_model(cfg.model.name, r.spec["num_classes"], r.spec["in_channels"], cfg.model.width).eval()
        dense_ss = StructureSet(fresh, r.example)
        if criterion.structure_limited:
            criterion.check_structures(dense_ss.num_structures)
        if hessian:
            check_second_derivatives(fresh, dense_ss, r.example)
    check_folder(cfg, out)   # after every check of the inputs: a bad value is named first
    if accepted is not None and distributed.is_main():
        accepted(out)

    model = stage_pretrain(r)
    dense = r.evaluate(model)
    sal, pruned_rec = stage_prune(r, model)
    sel = pruned_rec["selection"]
    pruned = build_from_record(pruned_rec)
    after_prune = r.evaluate(pruned)

    fkey, fpath = finetune_key(cfg), out / "finetuned.pt"
    fine_rec = _load_stage(fpath, fkey)
    if fine_rec is None:
        seed_everything(cfg.seed + 1)
        r.fit(pruned, cfg.schedule.finetune, "finetune", out / "finetune_last.pt", fkey)
        fine_rec = model_record(pruned.cpu(), r.spec, pruned_rec["history"], key=fkey)
        r.save(fine_rec, fpath)
        r.remove(out / "finetune_last.pt")
    finetuned = build_from_record(fine_rec)
    after_finetune = r.evaluate(finetuned)

    result = None
    if distributed.is_main():   # latency is timed by one process, on a machine the others leave alone
        result = _result(r, model, finetuned, dense, after_prune, after_finetune, sal, sel, pruned_rec)
        if pruned_rec.get("diagnostics") is not None:
            result["diagnostics"] = pruned_rec["diagnostics"]
        result["wall_seconds"] = time.time() - t_start
        result["processes"] = distributed.world_size()
        save_json(result, result_path)
    return distributed.broadcast_object(result)


def _other_diagnostics(d: dict | None, cfg: RunConfig, originals: Originals) -> bool:
    """Whether a record's diagnostics are not those ``cfg`` asks for: none, or another number of
    single structures (``prune.diagnostics_samples`` is not part of the artefacts' keys)."""
    if d is None:
        return True
    k = min(cfg.prune.diagnostics_samples, originals.structures)
    return d.get("single_structures") != (k if k >= 3 else None)


def _diagnostics(r: Run, model, ss: StructureSet, remove: list[str]) -> dict:
    cfg = r.cfg
    batches = take_batches(r.splits.train_eval, cfg.saliency.num_samples, cfg.saliency.batch_size,
                           seed=cfg.seed)
    model = saliency_model(model.to(r.device), cfg.saliency.batchnorm, batches)
    with float32_products(cfg.saliency.tf32):   # the saliency's precision (Criterion.run)
        d = loss_prediction(model, ss, batches, ss.indices_of(remove), r.device,
                            cfg.method.curvature, cfg.prune.diagnostics_samples, cfg.seed)
    if distributed.is_main():
        log.info(f"[diagnostics] loss change of the removed set: predicted {d['predicted_second_order']:.4f} "
                 f"(first order {d['predicted_first_order']:.4f}), real {d['real']:.4f}; single-structure "
                 f"Spearman {d.get('single_spearman', float('nan')):.3f}")
    return d


def _result(r: Run, dense_model, pruned_model, dense, after_prune, after_finetune, sal, sel,
            pruned_rec) -> dict:
    cfg = r.cfg
    x = r.example
    p0, p1 = count_params(dense_model), count_params(pruned_model)
    f0, f1 = count_macs(dense_model.cpu(), x), count_macs(pruned_model.cpu(), x)
    latency = {}
    timed = [("cpu", bs) for bs in (1, 64)] + [("cuda", 64)] * (r.device.type == "cuda")
    for kind, bs in timed:   # dense and pruned in turn (measure.latencies_in_turn)
        d, p = latencies_in_turn([dense_model, pruned_model], x, bs, cfg.latency_repeats,
                                 r.device if kind == "cuda" else "cpu")
        latency[f"{kind}_bs{bs}"] = {"dense_ms": d["ms"], "pruned_ms": p["ms"], "speedup": p["speedup"]}
    dense_model.cpu(), pruned_model.cpu()
    return {
        "experiment": cfg.experiment_name, "dataset": cfg.dataset.name, "model": cfg.model.name,
        "width": cfg.model.width, "method": cfg.method.name, "combine": cfg.method.combine,
        "curvature": cfg.method.curvature, "stack_batch": cfg.method.stack_batch,
        "saliency_batchnorm": cfg.saliency.batchnorm,
        "scope": cfg.prune.scope, "seed": cfg.seed,
        "prune_ratio": cfg.prune.ratio, "target": cfg.prune.target, "steps": cfg.prune.steps,
        "normalize": cfg.prune.normalize, "round_to": cfg.prune.round_to,
        "achieved_ratio": sel["achieved_ratio"],
        "achieved_structures_ratio": sel["structures_ratio"], "achieved_params_ratio": sel["params_ratio"],
        "achieved_flops_ratio": sel["flops_ratio"],
        "removed_structures": pruned_rec["removed_structures"], "guard_skipped": sel["guard_skipped"],
        "budget_met": sel.get("budget_met"),   # None: pruned before the field existed
        "top1_before": dense["top1"], "top5_before": dense["top5"], "loss_before": dense["loss"],
        "top1_pruned": after_prune["top1"], "top5_pruned": after_prune["top5"],
        "loss_pruned": after_prune["loss"],
        "top1_finetuned": after_finetune["top1"], "top5_finetuned": after_finetune["top5"],
        "params_before": p0, "params_after": p1, "params_reduction": 1 - p1 / p0,
        "macs_before": f0, "macs_after": f1, "macs_reduction": 1 - f1 / f0,
        "latency": latency, "saliency_seconds": sal["seconds"],
        "saliency_seconds_steps": pruned_rec.get("saliency_seconds_steps"),
        # None: pruned before the check existed
        "gate_error": max(pruned_rec["gate_error_steps"]) if pruned_rec.get("gate_error_steps") else None,
        "saliency_peak_memory_mb": sal["peak_memory_mb"], "saliency_samples": sal["num_samples"],
        "device": str(r.device), "layer_ratios": sel["layer_ratios"],
    }


def load_result(path: str | Path) -> dict:
    with open(path) as fh:
        return json.load(fh)
