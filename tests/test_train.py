"""Training: resume after an interruption gives exactly the uninterrupted run."""

import io
import json
import logging
import re

import pytest
import torch

from sosp_cli.config import TrainConfig
from sosp_cli.data import load_dataset, make_loader
from sosp_cli.models import create_model
from sosp_cli.train import evaluate, train

CFG = TrainConfig(epochs=3, batch_size=32, lr=0.05, scheduler="multistep", milestones=[0.5],
                  max_batches=3)


def _fit(cfg, ckpt, seed=0, metrics=None):
    torch.manual_seed(seed)
    splits = load_dataset("digits", image_size=16)
    model = create_model("resnet20", 10, 1, 0.25)
    loader = make_loader(splits.train, cfg.batch_size, True, seed=seed, drop_last=True)
    val = make_loader(splits.val, 128, False)
    history = train(model, loader, val, cfg, torch.device("cpu"), "t", metrics, ckpt, seed)
    return model, history, splits


def test_resume_equals_uninterrupted(tmp_path):
    full, hist_full, _ = _fit(CFG, tmp_path / "full.pt")
    interrupted = _interrupt_after(CFG, tmp_path / "killed.pt", epochs_done=1)
    kept = torch.load(interrupted, weights_only=False)["history"]
    resumed, hist_resumed, _ = _fit(CFG, interrupted, metrics=tmp_path / "m.jsonl")
    rows = [json.loads(l) for l in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[0] == kept[0]   # epoch 1 not redone
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert [h["train_loss"] for h in hist_full] == [h["train_loss"] for h in hist_resumed]
    assert len(hist_resumed) == CFG.epochs


def test_metrics_rows_are_the_epochs_a_resume_keeps(tmp_path, monkeypatch, caplog):
    """Killed after epoch 2's checkpoint but before its metrics row, with a row cut short at the
    file's end: the resumed run's file holds the other stages' rows as they were, then every
    epoch once, as the uninterrupted run's file does — no row lost, none repeated."""
    import sosp_cli.train as tr

    _fit(CFG, tmp_path / "full.pt", metrics=tmp_path / "full.jsonl")
    metrics, ckpt = tmp_path / "m.jsonl", tmp_path / "killed.pt"
    metrics.write_text(json.dumps({"stage": "earlier", "epoch": 1}) + "\n")
    original, calls = tr.append_jsonl, {"n": 0}

    def killing_append(record, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        original(record, path)

    monkeypatch.setattr(tr, "append_jsonl", killing_append)
    with pytest.raises(KeyboardInterrupt):
        _fit(CFG, ckpt, metrics=metrics)
    monkeypatch.setattr(tr, "append_jsonl", original)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1 and metrics.read_text().count("\n") == 2
    with open(metrics, "a") as fh:
        fh.write('{"stage": "t", "epo')
    with caplog.at_level(logging.WARNING, logger="sosp_cli"):
        _fit(CFG, ckpt, metrics=metrics)
    assert "dropped 1 unreadable line" in caplog.text
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    full = [json.loads(l) for l in (tmp_path / "full.jsonl").read_text().splitlines()]
    assert rows[0] == {"stage": "earlier", "epoch": 1}
    assert [r["epoch"] for r in rows[1:]] == [1, 2, 3]
    assert [r["train_loss"] for r in rows[1:]] == [r["train_loss"] for r in full]


def _interrupt_after(cfg, path, epochs_done):
    """Run ``cfg`` but stop (as if killed) after ``epochs_done`` epochs; return its checkpoint."""
    import sosp_cli.train as tr

    original = tr.evaluate
    calls = {"n": 0}

    def killing_evaluate(*a, **k):
        if calls["n"] == epochs_done:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(*a, **k)

    tr.evaluate = killing_evaluate
    try:
        _fit(cfg, path)
    except KeyboardInterrupt:
        pass
    finally:
        tr.evaluate = original
    assert torch.load(path, weights_only=False)["epoch"] == epochs_done - 1
    return path


def test_training_learns_digits():
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, scheduler="cosine")
    model, history, splits = _fit(cfg, None)
    acc = evaluate(model, make_loader(splits.test, 256, False), torch.device("cpu"))
    assert acc["top1"] > 50.0 and acc["top5"] >= acc["top1"]


def test_bn_momentum_is_the_stages_while_it_trains_and_the_models_after():
    """``bn_momentum`` (schedule.<stage>.bn_momentum): one step moves the running mean from 0 by
    momentum × the batch mean, with the stage's momentum (0.5) or the model's own (0.01, None);
    the model keeps its own momentum afterwards. Bad values are one-line errors."""
    import pytest
    import torch.nn as nn
    from torch.utils.data import DataLoader, TensorDataset
    from sosp_cli.errors import SospError
    torch.manual_seed(0)
    x, y = torch.randn(32, 2, 4, 4) * 3 + 1, torch.randint(0, 3, (32,))
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    for momentum, moved in ((0.5, 0.5), (None, 0.01)):
        model = nn.Sequential(nn.BatchNorm2d(2, momentum=0.01), nn.Flatten(), nn.Linear(32, 3))
        cfg = TrainConfig(epochs=1, batch_size=32, lr=0.0, scheduler="constant", bn_momentum=momentum)
        train(model, loader, loader, cfg, torch.device("cpu"), "t")
        assert torch.allclose(model[0].running_mean, moved * x.mean((0, 2, 3)), atol=1e-6)
        assert model[0].momentum == 0.01
    for bad in (0.0, 1.5, True):
        with pytest.raises(SospError, match=rf"^bn_momentum={bad}: expected a number in \(0, 1\] or null"):
            train(model, loader, loader, TrainConfig(epochs=1, bn_momentum=bad), torch.device("cpu"), "t")


@pytest.mark.parametrize("field,value,message", [
    ("epochs", -1, "epochs=-1 must be >= 0"), ("batch_size", 0, "batch_size=0 must be >= 1"),
    ("lr", -0.1, "lr=-0.1 must be a number >= 0"), ("lr", float("nan"), "lr=nan must be a number >= 0"),
    ("momentum", 1.0, "momentum=1.0 must be in [0, 1)"), ("weight_decay", -1e-4, "weight_decay=-0.0001 must be"),
    ("gamma", 0.0, "gamma=0.0 must be a number > 0"), ("warmup_epochs", -1, "warmup_epochs=-1 must be >= 0"),
    ("label_smoothing", 1.5, "label_smoothing=1.5 must be in [0, 1]"), ("max_batches", 0, "max_batches=0 must be >= 1"),
    ("milestones", [0.5, -2], "milestones=[0.5, -2] must be numbers >= 0"),
    ("optimizer", "adam", "unknown schedule.pretrain.optimizer 'adam'; accepted: adamw, sgd"),
    ("scheduler", "step", "unknown schedule.pretrain.scheduler 'step'; accepted: constant, cosine, multistep"),
])
def test_every_training_option_is_checked_with_its_full_name(field, value, message):
    """check_train_config names the key as the CLI spells it and what is accepted; train()
    calls it, so a library caller gets the same refusal before any step."""
    from dataclasses import replace
    from sosp_cli.errors import SospError
    from sosp_cli.train import check_train_config
    cfg = replace(TrainConfig(), **{field: value})
    prefixed = message if message.startswith("unknown") else f"schedule.pretrain.{message}"
    with pytest.raises(SospError, match="^" + re.escape(prefixed)):
        check_train_config(cfg, "schedule.pretrain")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(SospError):
        train(model, [], [], cfg, torch.device("cpu"), "t")
    check_train_config(TrainConfig(), "schedule.pretrain")   # the defaults pass


class _Terminal:
    def isatty(self):
        return True


def test_progress_bars_redraw_rarely_off_a_terminal_and_tqdm_env_wins():
    from sosp_cli.train import LOG_REFRESH_S, bar_refresh
    assert bar_refresh(_Terminal(), environ={}) == {}   # a terminal: tqdm's own 0.1 s
    assert bar_refresh(io.StringIO(), environ={}) == {"mininterval": LOG_REFRESH_S}
    assert bar_refresh(io.StringIO(), environ={"TQDM_MININTERVAL": "5"}) == {}


def test_a_training_log_file_gets_few_progress_redraws(capsys, caplog):
    """19 steps in an epoch: on a terminal up to one redraw each, into a log (pytest's
    captured stderr is not a terminal) the first draw and the bar's close; the epoch's line
    is a log record (``sosp_cli.train``), printed by the CLI's logging setup."""
    caplog.set_level(logging.INFO, logger="sosp_cli")
    _fit(TrainConfig(epochs=1, batch_size=64, lr=0.05), None)
    err = capsys.readouterr().err
    assert [r.getMessage()[:12] for r in caplog.records if r.name == "sosp_cli.train"] == ["[t] epoch 1/"]
    assert 1 <= err.count("\r") <= 3, err


class _SpoiledBatches:
    """The digits loader, but in epoch ``epoch`` (1-based) batch ``batch`` holds a NaN pixel."""

    def __init__(self, loader, epoch: int, batch: int):
        self.loader, self.epoch, self.batch, self.epochs = loader, epoch, batch, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.epochs += 1
        for i, (x, y) in enumerate(self.loader):
            if (self.epochs, i + 1) == (self.epoch, self.batch):
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
            yield x, y


def test_a_diverging_training_stops_in_one_line_and_writes_nothing_of_that_epoch(tmp_path, capsys):
    """A step whose loss is not finite (its gradients make every weight NaN) stops the training
    at that step, naming it and the stage's learning rate; a model whose validation loss is not
    finite (weights past float range, each step's loss still finite) stops after the epoch. The
    epochs before are kept as they were: the checkpoint, the metrics rows."""
    from sosp_cli.errors import SospError
    splits = load_dataset("digits", image_size=16)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, max_batches=3)
    metrics, ckpt = tmp_path / "m.jsonl", tmp_path / "ckpt.pt"

    def fit(loader, val, config=cfg, stage="pretrain"):
        torch.manual_seed(0)
        model = create_model("resnet20", 10, 1, 0.25)
        train(model, loader, val, config, torch.device("cpu"), stage, metrics, ckpt, setting=f"schedule.{stage}")

    clean = make_loader(splits.train, 32, True, seed=0, drop_last=True)
    val = make_loader(splits.val, 128, False)
    with pytest.raises(SospError, match=re.escape(
            "pretrain diverged: the training loss is nan at epoch 2, batch 2 (schedule.pretrain.lr=0.05); "
            "lower schedule.pretrain.lr or raise schedule.pretrain.warmup_epochs (now 0)") + "$"):
        fit(_SpoiledBatches(clean, epoch=2, batch=2), val)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 0   # epoch 1's, as it was
    assert [json.loads(l)["epoch"] for l in metrics.read_text().splitlines()] == [1]
    assert capsys.readouterr().err.endswith("\r")   # the bar is closed (cleared), not left mid-line

    ckpt.unlink()
    metrics.unlink()
    spoiled_val = [(x.clone().index_fill_(0, torch.tensor([0]), float("nan")), y) for x, y in val]
    with pytest.raises(SospError, match=r"^finetune diverged: the validation loss is nan after epoch 1 "
                                        r"\(schedule.finetune.lr=0.05\)"):
        fit(clean, spoiled_val, stage="finetune")
    assert not ckpt.exists() and not metrics.exists()
    # a step size far too large (here the validation loss is the first to go: weights past
    # float range while each step's loss is still finite; on another CPU it may be a step's)
    with pytest.raises(SospError, match=r"^pretrain diverged: the (validation|training) loss is nan"):
        fit(clean, val, TrainConfig(epochs=1, batch_size=32, lr=1e4, max_batches=3))


@pytest.mark.filterwarnings("error::UserWarning")
def test_under_amp_a_skipped_step_is_left_out_of_the_epoch_and_counted(tmp_path, monkeypatch, caplog):
    """AMP (CUDA in the runner; here CPU autocast and a CPU GradScaler, the same code): a step
    whose loss is not finite is the GradScaler's to skip. Training goes on; the epoch's loss and
    accuracy are those of the other steps (an inf no longer makes the epoch's loss inf),
    ``amp_skipped_steps`` counts it, and its forward pass leaves no NaN in the BatchNorm
    statistics. An epoch whose every step is skipped stops in one line, without PyTorch's
    warning about the scheduler stepping before the optimizer."""
    import logging
    import sosp_cli.train as T
    from sosp_cli.errors import SospError
    monkeypatch.setattr(T, "amp_enabled", lambda amp, device: amp)
    steps, step = [], T._train_step
    monkeypatch.setattr(T, "_train_step", lambda *a: steps.append(step(*a)) or steps[-1])
    caplog.set_level(logging.INFO, logger="sosp_cli")
    splits = load_dataset("digits", image_size=16)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, max_batches=3)
    clean = make_loader(splits.train, 32, True, seed=0, drop_last=True)
    val = make_loader(splits.val, 128, False)
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 1, 0.25)
    metrics = tmp_path / "m.jsonl"
    train(model, _SpoiledBatches(clean, epoch=2, batch=2), val, cfg, torch.device("cpu"), "pretrain",
          metrics, tmp_path / "c.pt", amp=True)
    assert [s[2] for s in steps] == [False] * 4 + [True, False]   # the NaN batch's update skipped
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [r["amp_skipped_steps"] for r in rows] == [0, 1]
    kept = [steps[3], steps[5]]
    assert rows[1]["train_loss"] == pytest.approx(sum(s[0] for s in kept) / 2, rel=1e-12)
    assert rows[1]["train_top1"] == pytest.approx(100 * sum(s[1] for s in kept) / 64)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())   # BatchNorm buffers too
    assert any(r.getMessage().endswith("(1 steps skipped by AMP)") for r in caplog.records)
    metrics.unlink()
    (tmp_path / "c.pt").unlink()
    ruined = [(x.clone().fill_(float("nan")), y) for x, y in list(clean)[:3]]
    with pytest.raises(SospError, match=re.escape(
            "pretrain diverged: the training loss is not finite at any step of epoch 1 (AMP's "
            "GradScaler skipped all 3) (lr=0.05)")):
        train(create_model("resnet20", 10, 1, 0.25), ruined, val, cfg, torch.device("cpu"), "pretrain",
              metrics, tmp_path / "c.pt", amp=True)
    assert not metrics.exists() and not (tmp_path / "c.pt").exists()


def test_a_loader_that_yields_no_batch_is_refused_before_any_epoch(tmp_path):
    """A batch larger than the training set, with the last partial batch dropped: zero steps per
    epoch would "train" silently; it is one line naming the batch size instead."""
    from sosp_cli.errors import SospError
    splits = load_dataset("digits", image_size=16)
    loader = make_loader(torch.utils.data.Subset(splits.train, range(20)), 32, True, drop_last=True)
    with pytest.raises(SospError, match=r"^schedule.finetune.batch_size=32: the finetune training loader "
                                        r"yields no batch"):
        train(create_model("resnet20", 10, 1, 0.25), loader, None, TrainConfig(epochs=1, batch_size=32),
              torch.device("cpu"), "finetune", tmp_path / "m.jsonl", tmp_path / "c.pt", setting="schedule.finetune")
    assert list(tmp_path.iterdir()) == []


def test_the_largest_accepted_seed_trains_and_the_next_is_refused():
    """Every epoch reseeds torch with seed·100003 + epoch: the largest seed the runner accepts
    (2³² − 1) must fit torch's 64-bit seeds there."""
    from sosp_cli.errors import SospError
    from sosp_cli.utils import SEED_LIMIT, check_seed
    check_seed(SEED_LIMIT - 1)
    _fit(TrainConfig(epochs=2, batch_size=32, lr=0.05, max_batches=1), None, seed=SEED_LIMIT - 1)
    with pytest.raises(SospError, match=r"^seed=4294967296 must be an integer in \[0, 4294967295\]$"):
        check_seed(SEED_LIMIT)
