"""The pipeline end to end on the smoke preset: outputs, resume, cache, errors."""
import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sosp_cli.config import PretrainConfig
from sosp_cli.errors import SospError
from sosp_cli.pipeline import run
from helpers import compose_run, write_cifar, write_imagefolder

RESULT_KEYS = {"dataset", "model", "method", "prune_ratio", "seed", "top1_before", "top5_before",
               "top1_pruned", "top5_pruned", "top1_finetuned", "top5_finetuned", "params_before",
               "params_after", "params_reduction", "macs_before", "macs_after", "macs_reduction",
               "latency", "saliency_seconds", "saliency_peak_memory_mb", "layer_ratios", "gate_error"}


def test_smoke_run_writes_every_artefact_and_resumes(tmp_path):
    """... and every artefact has the mode any new file gets (0o666 less the umask), as
    ``metrics.jsonl`` (opened, not written atomically) has — not the private 0o600 of a temporary
    file renamed into place."""
    cfg = compose_run(["experiment=smoke", "method=l1", "prune.ratio=0.4"], tmp_path)
    out = tmp_path / "run"
    old_mask = os.umask(0o027)
    try:
        result = run(cfg, out)
    finally:
        os.umask(old_mask)
    for name in ("pretrained.pt", "saliency.pt", "pruned.pt", "finetuned.pt", "metrics.jsonl", "result.json"):
        assert (out / name).exists(), name
        assert (out / name).stat().st_mode & 0o777 == 0o640, name
    assert all(p.stat().st_mode & 0o777 == 0o640 for p in (tmp_path / "cache").glob("*.pt"))
    assert RESULT_KEYS <= set(result)
    assert result["params_after"] < result["params_before"]
    assert result["macs_after"] < result["macs_before"]
    assert abs(result["achieved_ratio"] - 0.4) < 0.02
    assert set(result["latency"]) == {"cpu_bs1", "cpu_bs64"}
    assert all(v < 1.0 for v in result["layer_ratios"].values())
    assert 0 <= result["gate_error"] <= 1e-4   # the pruned model is the masked one (surgery.gate_error)
    stamps = {p: os.stat(out / p).st_mtime_ns for p in ("pretrained.pt", "saliency.pt", "pruned.pt", "finetuned.pt")}
    lines = (out / "metrics.jsonl").read_text().count("\n")
    again = run(cfg, out)  # resume: every stage is skipped
    assert {p: os.stat(out / p).st_mtime_ns for p in stamps} == stamps
    assert (out / "metrics.jsonl").read_text().count("\n") == lines
    assert again["top1_finetuned"] == result["top1_finetuned"]
    # a folder pruned before the gate check existed is reused as it is: gate_error null
    record = torch.load(out / "pruned.pt", weights_only=False)
    del record["gate_error_steps"]
    torch.save(record, out / "pruned.pt")
    (out / "finetuned.pt").unlink()
    assert run(cfg, out)["gate_error"] is None
    assert "gate_error_steps" not in torch.load(out / "pruned.pt", weights_only=False)


def test_a_pruned_model_that_is_not_the_masked_one_stops_the_run(tmp_path, monkeypatch):
    """Every removal is checked against the masked model on 8 training images: a pruned model
    that differs (here: one of its weights changed after the surgery) is not the model the
    saliencies were about — a one-line error, with the saliencies already written kept."""
    from sosp_cli import pipeline
    surgery = pipeline.remove_structures

    def off(model, ss, remove, x):
        pruned, history = surgery(model, ss, remove, x)
        with torch.no_grad():
            pruned.fc.bias[0] += 1.0
        return pruned, history

    monkeypatch.setattr(pipeline, "remove_structures", off)
    cfg = compose_run(["experiment=smoke", "method=l1", "prune.ratio=0.2"], tmp_path)
    with pytest.raises(SospError, match=r"^step 1: the physically pruned CifarResNet differs from the masked one "
                                        r"by 1 in its logits, where the removal changed them by [\d.e-]+ \(8 training "
                                        r"images\): the gates are not the removal of these structures"):
        run(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "saliency.pt").exists() and not (tmp_path / "run" / "pruned.pt").exists()


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "imagenet"])
def test_real_dataset_paths_run_end_to_end_on_local_fixtures(tmp_path, dataset):
    """The CIFAR and ImageFolder code paths through the whole pipeline (written fixtures: no
    download): the model gets the dataset's classes and image size, and the run reloads."""
    root = tmp_path / "data"
    if dataset == "imagenet":
        write_imagefolder(root, [f"n{i:02d}" for i in range(4)], n_train=12, n_val=3)
        extra, classes, size = ["dataset.image_size=24", "dataset.val_size=4", "dataset.num_workers=2",
                                "schedule.pretrain.batch_size=16", "schedule.finetune.batch_size=16"], 4, 24
    else:
        write_cifar(root, dataset, n_train=40 if dataset == "cifar10" else 100)
        extra, classes, size = ["dataset.val_size=20"], 10 if dataset == "cifar10" else 100, 16
    cfg = compose_run(["experiment=smoke", "method=sosp_h", f"dataset={dataset}", f"dataset.root={root}",
                       "saliency.num_samples=16", "saliency.batch_size=8"] + extra, tmp_path)
    assert cfg.dataset.image_size == size
    result = run(cfg, tmp_path / "run")
    assert result["dataset"] == dataset and result["params_after"] < result["params_before"]
    finetuned = torch.load(tmp_path / "run" / "finetuned.pt", map_location="cpu", weights_only=False)
    from sosp_cli.checkpoint import build_from_record
    assert finetuned["spec"]["input_shape"] == [3, size, size]   # MACs and latency at this size
    model = build_from_record(finetuned).eval()
    assert model(torch.zeros(2, 3, size, size)).shape == (2, classes)
    assert run(cfg, tmp_path / "run")["top1_finetuned"] == result["top1_finetuned"]


@pytest.mark.parametrize("dataset", ["cifar10", "imagenet"])
def test_no_validation_split_trains_on_every_training_image_without_validation(tmp_path, dataset):
    """``dataset.val_size=0`` (the papers' CIFAR schedules train on all 50,000 images): every
    training image is trained on, no epoch is validated (its val_* are null), and the run ends
    as any other — not "evaluation split is empty" after the first epoch."""
    from sosp_cli.data import load_dataset
    root = tmp_path / "data"
    if dataset == "imagenet":
        write_imagefolder(root, [f"n{i:02d}" for i in range(4)], n_train=12, n_val=3)
        extra, n_train = ["dataset.image_size=24", "dataset.num_workers=0", "schedule.pretrain.batch_size=16",
                          "schedule.finetune.batch_size=16"], 48
    else:
        write_cifar(root, dataset, n_train=40)
        extra, n_train = [], 200
    splits = load_dataset(dataset, root=str(root), val_size=0, image_size=24 if dataset == "imagenet" else 32)
    assert len(splits.val) == 0 and len(splits.train) == n_train
    cfg = compose_run(["experiment=smoke", "method=l1", f"dataset={dataset}", f"dataset.root={root}",
                       "dataset.val_size=0"] + extra, tmp_path)
    result = run(cfg, tmp_path / "run")
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["pretrain", "finetune"]
    assert all(r["val_loss"] is None and r["val_top1"] is None and r["train_loss"] > 0 for r in rows)
    assert 0 <= result["top1_finetuned"] <= 100


def test_an_image_that_cannot_be_read_stops_the_run_with_one_line(tmp_path):
    """A broken image of the test split, met while a DataLoader worker evaluates the dense model:
    the shell sees one line naming it (not the worker's traceback), exit status 2, and the
    pretrained model written before is kept for the resume."""
    root = tmp_path / "data"
    write_imagefolder(root, ["n00", "n01"], n_train=12, n_val=3)
    bad = root / "val" / "n01" / "2.png"
    bad.write_bytes(b"not an image")
    proc = _cli(["experiment=smoke", "method=l1", "dataset=imagenet", f"dataset.root={root}",
                 "dataset.image_size=24", "dataset.val_size=4", "dataset.num_workers=2",
                 "schedule.pretrain.batch_size=8", "schedule.finetune.batch_size=8", f"hydra.run.dir={tmp_path / 'run'}",
                 f"pretrain.cache_dir={tmp_path / 'cache'}"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]   # progress bars aside
    assert len(errors) == 1 and errors[0].startswith(f"sosp-run: error: cannot read image {bad} (Unidentified")
    assert (tmp_path / "run" / "pretrained.pt").exists()


@pytest.mark.parametrize("name", ["squeezenet1_1", "regnet_x_400mf"])
def test_a_torchvision_classifier_outside_the_registry_runs_end_to_end(tmp_path, name):
    """``model=torchvision model.name=torchvision.<name>``: torchvision's SqueezeNet, and RegNet-X
    with its grouped convolutions, with the stem replaced for the digits' one channel, pruned by
    SOSP-H, saved and rebuilt as pruned."""
    from sosp_cli.checkpoint import load_model
    cfg = compose_run(["experiment=smoke", "model=torchvision", f"model.name=torchvision.{name}",
                       "dataset.image_size=32", "method=sosp_h"], tmp_path)
    result = run(cfg, tmp_path / "run")
    assert result["model"] == f"torchvision.{name}"
    assert result["params_after"] < result["params_before"] and result["macs_after"] < result["macs_before"]
    pruned, record = load_model(tmp_path / "run" / "pruned.pt")
    stem = next(m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d))
    assert record["spec"]["in_channels"] == 1 and stem.in_channels == 1
    assert sum(p.numel() for p in pruned.parameters()) == result["params_after"]
    assert pruned.eval()(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    grouped = [m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert all(m.in_channels % m.groups == 0 == m.out_channels % m.groups for m in grouped)
    if name.startswith("regnet"):   # structures of a grouped conv take a channel of every group
        assert any(m.in_channels < m.groups * 16 for m in grouped)   # group width 16, pruned


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_torchvision_classifiers_with_auxiliary_heads_train_on_their_logits(name):
    """Built without the auxiliary classifiers, whose train-mode output (a tuple) the loss cannot take."""
    from sosp_cli.models import create_model
    model = create_model(f"torchvision.{name}", 10, 1).train()
    assert not hasattr(model, "aux1") or model.aux1 is None
    assert isinstance(model(torch.randn(2, 1, 80, 80)), torch.Tensor)


def test_changed_config_never_overwrites_artefacts(tmp_path):
    out = tmp_path / "run"
    run(compose_run(["experiment=smoke", "method=random"], tmp_path), out)
    before = (out / "saliency.pt").read_bytes()
    with pytest.raises(SospError, match="different config"):
        run(compose_run(["experiment=smoke", "method=l2"], tmp_path), out)
    assert (out / "saliency.pt").read_bytes() == before


def test_the_files_check_folder_reads_are_those_the_stages_write_with_their_keys(tmp_path, monkeypatch):
    """:func:`pipeline.artefacts` lists what a run writes — every stage's file with its key, and
    every partial training's checkpoint with its key and stage — in a run with every kind of
    stage (its own pretraining, two rounds with fine-tuning between them)."""
    from sosp_cli import pipeline
    cfg = compose_run(["experiment=smoke", "method=l1", "prune.steps=2", "prune.step_epochs=1",
                       "pretrain.use_cache=false"], tmp_path)
    listed = pipeline.artefacts(cfg)
    trained, fit = [], pipeline.Run.fit

    def recording(self, model, tcfg, stage, checkpoint, key, *args, **kwargs):
        trained.append((checkpoint.name, key, stage))
        return fit(self, model, tcfg, stage, checkpoint, key, *args, **kwargs)

    monkeypatch.setattr(pipeline.Run, "fit", recording)
    run(cfg, tmp_path / "run")
    written = {p.name: torch.load(p, weights_only=False)["key"] for p in (tmp_path / "run").glob("*.pt")}
    assert written == {name: key for name, key, partial in listed if partial is None}
    assert trained == [entry for entry in listed if entry[2] is not None]


def test_a_folder_of_another_config_is_refused_before_any_stage_and_keeps_its_record(
        tmp_path, monkeypatch, capsys):
    """``sosp-run`` into a folder whose artefacts another config made: one line naming the first
    such file and the settings this run changes (from the folder's ``.hydra/config.yaml``),
    before any stage runs; the artefacts and the folder's record of the config that made them
    (``.hydra/``, which Hydra would have overwritten on starting the job) are as they were.
    The folder's own command then resumes it."""
    from sosp_cli import cli, pipeline
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: None)
    folder = tmp_path / "run"
    common = ["sosp-run", "experiment=smoke", f"pretrain.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={folder}"]
    monkeypatch.setattr(sys, "argv", common + ["method=l1"])
    cli.main()
    kept = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "run.log"}
    assert {Path(".hydra", n) for n in ("config.yaml", "hydra.yaml", "overrides.yaml")} <= set(kept)
    assert "- method=l1" in (folder / ".hydra" / "overrides.yaml").read_text()
    capsys.readouterr()

    def no_stage(*args):
        raise AssertionError("a stage ran")

    real_stage = pipeline.stage_pretrain
    monkeypatch.setattr(pipeline, "stage_pretrain", no_stage)
    monkeypatch.setattr(sys, "argv", common + ["method=l2", "prune.ratio=0.4"])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line == (f"sosp-run: error: {folder / 'saliency.pt'} was made by a different config (key "
                    f"{torch.load(folder / 'saliency.pt', weights_only=False)['key']} != "
                    f"{pipeline.saliency_key(compose_run(['experiment=smoke', 'method=l2'], tmp_path))}); "
                    "it is kept — run in a new output directory (this run changes method.name l1 → l2, "
                    "prune.ratio 0.5 → 0.4 from the folder's .hydra/config.yaml)")
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != "run.log"} == kept
    assert line.removeprefix("sosp-run: ") in (folder / "run.log").read_text()
    monkeypatch.setattr(pipeline, "stage_pretrain", real_stage)
    monkeypatch.setattr(sys, "argv", common + ["method=l1"])
    cli.main()   # resumed: nothing trained again
    assert (folder / "metrics.jsonl").read_bytes() == kept[Path("metrics.jsonl")]
    assert (folder / ".hydra" / "config.yaml").read_bytes() == kept[Path(".hydra", "config.yaml")]


def test_a_cache_dir_that_cannot_be_created_is_one_clear_error(tmp_path):
    cfg = dataclasses.replace(compose_run(["experiment=smoke"], tmp_path),
                              pretrain=PretrainConfig(cache_dir="/dev/null/cache"))
    with pytest.raises(SospError, match=r"^pretrain.cache_dir=/dev/null/cache cannot be created "
                                        r"\(NotADirectoryError: .*pretrain.use_cache=false$"):
        run(cfg, tmp_path / "run")
    assert not list((tmp_path / "run").glob("*.pt"))


def test_a_file_that_cannot_be_written_is_one_line_and_the_earlier_one_is_kept(tmp_path):
    """A full disk, here a file-size limit (Python ignores SIGXFSZ: the write fails with EFBIG):
    torch.save's zip writer fails with "unexpected pos", which becomes one line naming the file,
    the free space and the limit; the file written before is intact, no temporary file is left.
    A metrics row that cannot be appended is one line too."""
    import resource
    from sosp_cli.utils import append_jsonl, save_torch

    path = tmp_path / "pruned.pt"
    save_torch({"w": torch.zeros(4)}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(SospError) as err:
            save_torch({"w": torch.zeros(1 << 16)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(err.value)
    assert message.startswith(f"cannot write {path} (") and "\n" not in message
    assert "MiB free there, file size limit 65,536 bytes (ulimit -f)" in message
    assert torch.equal(torch.load(path)["w"], torch.zeros(4)) and sorted(tmp_path.iterdir()) == [path]
    (tmp_path / "file").write_text("")
    with pytest.raises(SospError, match=r"^cannot write .*file/metrics.jsonl \((FileExistsError|NotADirectoryError)"):
        append_jsonl({"epoch": 1}, tmp_path / "file" / "metrics.jsonl")


@pytest.mark.parametrize("steps", [1, 2])
def test_diagnostics_asked_for_on_a_finished_run_are_computed_as_a_fresh_run_computes_them(tmp_path, steps):
    """``prune.diagnostics=true`` rerun in a folder pruned without it: the diagnostics appear in
    result.json (and every step's record), equal to those of a run that asked from the start,
    and nothing else is recomputed — they do not change what is pruned."""
    base = ["experiment=smoke", "method=sosp_h", f"prune.steps={steps}", "prune.step_epochs=0"]
    run(compose_run(base, tmp_path), tmp_path / "later")
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "later").glob("*.pt") if p.name != "pruned.pt"
              and not p.name.startswith("pruned_step")}
    later = run(compose_run(base + ["prune.diagnostics=true"], tmp_path), tmp_path / "later")
    fresh = run(compose_run(base + ["prune.diagnostics=true"], tmp_path), tmp_path / "fresh")
    assert later["diagnostics"] == fresh["diagnostics"] and later["diagnostics"]["removed"] > 0
    assert {p: (tmp_path / "later" / p).stat().st_mtime_ns for p in stamps} == stamps
    for name in ["pruned.pt"] + [f"pruned_step{k}.pt" for k in range(1, steps)]:
        record = torch.load(tmp_path / "later" / name, weights_only=False)
        assert record["diagnostics"] == fresh["diagnostics"], name
    assert later["top1_finetuned"] == fresh["top1_finetuned"]
    more = run(compose_run(base + ["prune.diagnostics=true", "prune.diagnostics_samples=5"], tmp_path),
               tmp_path / "later")   # another number of single structures: computed again
    assert more["diagnostics"]["single_structures"] == 5 and len(more["diagnostics"]["single_real"]) == 5


def test_a_partial_training_of_another_config_is_refused_and_kept(tmp_path, monkeypatch):
    """Killed during fine-tuning, then rerun in the same folder with another fine-tuning setting:
    the partial fine-tuning (``finetune_last.pt``) is not resumed under the new setting — one
    line, the file kept. The same config resumes it."""
    import sosp_cli.train as tr
    base = ["experiment=smoke", "method=l1", "schedule.finetune.epochs=3"]
    out = tmp_path / "run"
    real, calls = tr.evaluate, {"n": 0}

    def killing(*args, **kwargs):   # the 1 pretraining epoch, 1 fine-tuning epoch, then Ctrl-C
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, "evaluate", killing)
    with pytest.raises(KeyboardInterrupt):
        run(compose_run(base, tmp_path), out)
    monkeypatch.setattr(tr, "evaluate", real)
    partial = out / "finetune_last.pt"
    kept = partial.read_bytes()
    with pytest.raises(SospError, match=f"^{partial} is a partial finetune training of a different config "
                                        r"\(key \w+ != \w+\); it is kept — delete it to train afresh"):
        run(compose_run(base + ["schedule.finetune.lr=0.5"], tmp_path), out)
    assert partial.read_bytes() == kept
    run(compose_run(base, tmp_path), out)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["stage"] == "finetune"] == [1, 2, 3] and not partial.exists()


def test_the_error_for_an_artefact_of_another_config_crosses_ranks_whole():
    """Rank 0 reads the folder and sends every rank its answer (pickled): the same error."""
    import pickle
    from sosp_cli.errors import OtherConfig
    sent = OtherConfig("/run/finetune_last.pt", "abc", "def", partial="finetune", changes="this run changes x 1 → 2")
    got = pickle.loads(pickle.dumps(sent))
    assert type(got) is OtherConfig and str(got) == str(sent) and (got.path, got.partial) == (sent.path, "finetune")


def test_rounds_after_fine_tuning_between_them_are_keyed_by_its_settings(tmp_path):
    """``prune.steps=2`` with ``prune.step_epochs``: the second round prunes a model that
    ``schedule.finetune`` trained, so a round made with another fine-tuning setting is refused
    (here the run was stopped before its final fine-tuning), not reused under the new one."""
    base = ["experiment=smoke", "method=l1", "prune.steps=2", "prune.step_epochs=1"]
    out = tmp_path / "run"
    run(compose_run(base, tmp_path), out)
    (out / "finetuned.pt").unlink()
    with pytest.raises(SospError, match=f"^{out / 'pruned_step1.pt'} was made by a different config"):
        run(compose_run(base + ["schedule.finetune.lr=0.5"], tmp_path), out)
    run(compose_run(base + ["schedule.finetune.epochs=2"], tmp_path), out)   # epochs: not the rounds'


def test_a_run_folder_another_process_runs_is_refused_in_one_line(tmp_path):
    """The same folder run twice at once (a command started twice, a requeued job): the second
    stops at once, before any stage, naming the folder; once it is free the run goes on."""
    from filelock import FileLock
    from sosp_cli.pipeline import RUN_LOCK

    cfg = compose_run(["experiment=smoke", "method=l1"], tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    with FileLock(str(out / RUN_LOCK)):   # held as another process would hold it
        with pytest.raises(SospError, match=f"^the run folder {out} is in use by another sosp-run process"):
            run(cfg, out)
        assert sorted(p.name for p in out.iterdir()) == [RUN_LOCK]
    assert run(cfg, out)["method"] == "l1"


def test_a_run_folder_that_cannot_be_created_is_one_clear_error(tmp_path):
    with pytest.raises(SospError, match=r"^the run folder /dev/null/run cannot be created \(NotADirectoryError"):
        run(compose_run(["experiment=smoke"], tmp_path), "/dev/null/run")


def test_pretrained_model_is_shared_through_the_cache(tmp_path):
    a = run(compose_run(["experiment=smoke", "method=l1"], tmp_path), tmp_path / "a")
    b = run(compose_run(["experiment=smoke", "method=random", "prune.ratio=0.3"], tmp_path), tmp_path / "b")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    assert a["top1_before"] == b["top1_before"]
    sa = torch.load(tmp_path / "a" / "pretrained.pt", weights_only=False)["state_dict"]
    sb = torch.load(tmp_path / "b" / "pretrained.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("spoil", ["garbage", "cut short", "another key"])
def test_a_spoiled_cached_model_is_one_line_naming_it_and_is_not_copied(tmp_path, spoil):
    """A file in the pretrain cache that is not the model its name says — garbage, a copy cut
    short, a model of another config under this name — is named in one line (delete it to
    pretrain again) and never copied into the run folder."""
    run(compose_run(["experiment=smoke", "method=l1"], tmp_path), tmp_path / "a")
    (cached,) = (tmp_path / "cache").glob("*.pt")
    if spoil == "garbage":
        cached.write_bytes(b"garbage")
    elif spoil == "cut short":
        cached.write_bytes(cached.read_bytes()[:1000])
    else:
        record = torch.load(cached, weights_only=False)
        torch.save({**record, "key": "another"}, cached)
    spoiled = cached.read_bytes()
    with pytest.raises(SospError, match=f"^{cached} is (not a readable torch file \\(.*\\)|not the pretrained model "
                                        "its name says \\(key another != \\w+\\)); delete it to pretrain again "
                                        f"\\(it is in pretrain.cache_dir={tmp_path / 'cache'}\\)$"):
        run(compose_run(["experiment=smoke", "method=l2"], tmp_path), tmp_path / "b")
    assert not (tmp_path / "b" / "pretrained.pt").exists() and cached.read_bytes() == spoiled


def test_pretrain_checkpoint_is_used_and_mismatch_is_one_clear_error(tmp_path):
    run(compose_run(["experiment=smoke", "method=l1"], tmp_path), tmp_path / "a")
    ckpt = tmp_path / "a" / "pretrained.pt"
    r = run(compose_run(["experiment=smoke", "method=l1", f"pretrain.checkpoint={ckpt}"], tmp_path), tmp_path / "b")
    assert r["top1_before"] == json.loads((tmp_path / "a" / "result.json").read_text())["top1_before"]
    with pytest.raises(SospError, match="does not match the model"):
        run(compose_run(["experiment=smoke", "model=resnet32", f"pretrain.checkpoint={ckpt}"], tmp_path),
            tmp_path / "c")
    folder = tmp_path / "a"   # the run folder instead of its file: said so, not "does not exist"
    with pytest.raises(SospError, match=f"^pretrain.checkpoint={folder} is a folder; pass the weights file in it"):
        run(compose_run(["experiment=smoke", "method=l1", f"pretrain.checkpoint={folder}"], tmp_path),
            tmp_path / "d")


def test_a_diverging_stage_or_a_non_finite_model_is_one_line_and_nothing_after_it_is_written(tmp_path):
    """A fine-tuning whose learning rate makes it diverge stops with the stage's option named,
    the pruned model kept; non-finite weights — as pretrain.checkpoint, or a pretrained model
    (a cached one, say) whose saliency cannot be ranked — are named before anything is written."""
    import shutil
    base = ["experiment=smoke", "method=sosp_h"]
    with pytest.raises(SospError, match=r"^finetune diverged: the (training|validation) loss is nan .*"
                                        r"\(schedule.finetune.lr=10000.0\); lower schedule.finetune.lr"):
        run(compose_run(base + ["schedule.finetune.lr=1e4"], tmp_path), tmp_path / "a")
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"pretrained.pt", "saliency.pt", "pruned.pt"}
    assert not list((tmp_path / "a").glob("finetune*.pt")) and not (tmp_path / "a" / "result.json").exists()

    record = torch.load(tmp_path / "a" / "pretrained.pt", weights_only=False)
    name = next(k for k in record["state_dict"] if k.endswith("bn1.weight"))
    record["state_dict"][name][0] = float("nan")
    spoiled = tmp_path / "spoiled.pt"
    torch.save(record, spoiled)
    with pytest.raises(SospError, match=f"^pretrain.checkpoint={spoiled} holds non-finite values \\('{name}'\\)"):
        run(compose_run(base + [f"pretrain.checkpoint={spoiled}"], tmp_path), tmp_path / "b")
    for folder, (key, scale), cause in (
            ("c", (name, None), f"its '{name}' is not finite \\(a training that diverged\\)"),
            ("d", ("fc.weight", 1e37), "its weights are finite, its loss or derivatives on the saliency batches are not")):
        (tmp_path / folder).mkdir()
        shutil.copyfile(tmp_path / "a" / "pretrained.pt", tmp_path / folder / "pretrained.pt")
        changed = torch.load(tmp_path / folder / "pretrained.pt", weights_only=False)
        if scale is None:
            changed["state_dict"][key][0] = float("nan")
        else:
            changed["state_dict"][key] *= scale
        torch.save(changed, tmp_path / folder / "pretrained.pt")   # the same key: this config's
        with pytest.raises(SospError, match=f"^sosp_h scores of the dense model are NaN for \\d+ of \\d+ "
                                            f"structures: {cause}; nothing was written$"):
            run(compose_run(base, tmp_path), tmp_path / folder)
        assert not (tmp_path / folder / "saliency.pt").exists()


def test_an_unreadable_torch_file_is_one_line_naming_it_and_is_kept(tmp_path):
    """A garbage artefact in the run folder, as ``pretrain.checkpoint``, or given to load_model."""
    from sosp_cli.checkpoint import load_model
    garbage = b"not a torch file"
    artefact = tmp_path / "run" / "pretrained.pt"
    artefact.parent.mkdir()
    artefact.write_bytes(garbage)
    with pytest.raises(SospError, match=f"^{artefact} is not a readable torch file \\(UnpicklingError: .*\\); "
                                        "it is kept — delete it, or run in a new output directory$"):
        run(compose_run(["experiment=smoke", "method=l1"], tmp_path), artefact.parent)
    assert artefact.read_bytes() == garbage
    with pytest.raises(SospError, match=f"^pretrain.checkpoint={artefact} is not a readable torch file"):
        run(compose_run(["experiment=smoke", "method=l1", f"pretrain.checkpoint={artefact}"], tmp_path),
            tmp_path / "other")
    with pytest.raises(SospError, match=f"^{artefact} is not a readable torch file"):
        load_model(artefact)


def test_sosp_i_beyond_max_structures_is_refused_before_pretraining(tmp_path):
    cfg = compose_run(["experiment=smoke", "method=sosp_i", "method.max_structures=100"], tmp_path)
    with pytest.raises(SospError, match=r"S=\d+ structures \(> method.max_structures=100.*use method=sosp_h"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "pretrained.pt").exists()
    assert not list((tmp_path / "cache").glob("*.pt"))


def test_the_exact_hessian_of_a_model_pytorch_cannot_differentiate_twice_is_refused_before_pretraining(
        tmp_path, monkeypatch):
    """MobileNetV3's squeeze-and-excitation blocks gate with hardsigmoid, which PyTorch cannot
    differentiate twice: ``method.curvature=hessian`` — for the method, or for the diagnostics —
    is one line before pretraining, not a traceback at the saliency. A method that does not use
    the curvature is not held to it."""
    from sosp_cli import pipeline
    mobilenet = ["experiment=smoke", "model=torchvision", "model.name=torchvision.mobilenet_v3_small",
                 "dataset.image_size=32", "method.curvature=hessian"]
    for extra in (["method=sosp_h"], ["method=taylor", "prune.diagnostics=true"]):
        with pytest.raises(SospError, match=r"^method.curvature=hessian differentiates the model twice, and "
                           r"PyTorch has no derivative for aten::hardsigmoid_backward"):
            run(compose_run(mobilenet + extra, tmp_path), tmp_path / "run")
        assert not (tmp_path / "run" / "pretrained.pt").exists() and not list((tmp_path / "cache").glob("*.pt"))
    checked = []
    monkeypatch.setattr(pipeline, "check_second_derivatives", lambda *args: checked.append(args))
    run(compose_run(["experiment=smoke", "method=taylor", "method.curvature=hessian"], tmp_path), tmp_path / "taylor")
    assert checked == []


def test_sosp_methods_run_end_to_end(tmp_path, caplog):
    for method in ("sosp_h", "sosp_i", "taylor", "obd", "bn_scale", "slimming", "fpgm", "none"):
        extra = ["prune.diagnostics=true", "prune.diagnostics_samples=4"] if method == "sosp_h" else []
        if method == "taylor":   # more saliency samples than training images: all of them, said once
            extra = ["saliency.num_samples=100000"]
        caplog.clear()
        r = run(compose_run(["experiment=smoke", f"method={method}"] + extra, tmp_path), tmp_path / method)
        assert r["method"] == method
        said = [rec.getMessage() for rec in caplog.records if "saliency.num_samples" in rec.getMessage()]
        if method == "taylor":
            n = r["saliency_samples"]
            assert said == [f"[saliency] saliency.num_samples=100000 is more than the {n} training images: "
                            f"the saliency uses all {n}"] and n > 32
        else:
            assert said == []
        if method == "sosp_h":
            d = r["diagnostics"]
            assert {"predicted_first_order", "predicted_second_order", "real", "single_spearman"} <= set(d)
            assert d["removed"] == r["removed_structures"]
        if method == "none":
            assert r["params_after"] == r["params_before"]
        else:
            assert r["params_after"] < r["params_before"]


def test_amp_on_a_cpu_says_that_it_trains_in_float32(tmp_path, caplog):
    """``amp=true`` is CUDA's: on a CPU the run trains in float32, and says so once."""
    from sosp_cli.pipeline import Run
    for amp in ("true", "false"):
        caplog.clear()
        Run(compose_run(["experiment=smoke", f"amp={amp}", "device=cpu"], tmp_path), tmp_path / amp)
        said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert said == (["[run] amp=true: mixed precision trains on CUDA only; this run trains on cpu "
                         "in float32"] if amp == "true" else [])


def test_a_budget_the_guards_cannot_reach_is_a_warning_a_summary_row_and_a_field(tmp_path, caplog):
    """A layer guard that keeps the selection short of ``prune.ratio`` does not pass silently:
    each step's warning names the guards and the shortfall, result.json has ``budget_met``
    false, the summary says NOT MET and the report lists the point."""
    from sosp_cli.cli import summary
    from sosp_cli.report import write_report
    base = ["experiment=smoke", "prune.target=params", "prune.ratio=0.5", "prune.steps=2"]
    short = run(compose_run(base + ["prune.max_layer_ratio=0.1"], tmp_path), tmp_path / "sweep" / "short")
    said = [rec for rec in caplog.records if "short of the" in rec.getMessage()]
    assert [rec.levelname for rec in said] == ["WARNING", "WARNING"]
    assert said[1].getMessage().startswith(
        f"[prune] step 2/2: {100 * short['achieved_ratio']:.1f} % of the parameters removed, short of "
        "the 50.0 % asked: the layer guards (min_channels=1, max_layer_ratio=0.1, round_to=1) kept ")
    assert said[1].getMessage().endswith("relax them to reach prune.ratio=0.5")
    assert short["budget_met"] is False and short["achieved_ratio"] < 0.4
    assert f"NOT MET: {100 * short['achieved_ratio']:.1f} % of the parameters removed, 50.0 % asked" in summary(short)
    caplog.clear()
    met = run(compose_run(base, tmp_path), tmp_path / "sweep" / "met")
    assert met["budget_met"] is True and abs(met["achieved_ratio"] - 0.5) < 0.02
    assert "budget" not in summary(met) and not [r for r in caplog.records if r.levelname == "WARNING"]
    report = write_report(tmp_path / "sweep")
    assert "Budget not met" in report and "short: " in report and "met: " not in report
    caplog.clear()   # guards at their loosest: no selection removes more, so none is to be relaxed
    most = run(compose_run(["experiment=smoke", "prune.ratio=0.99", "prune.max_layer_ratio=1.0"], tmp_path),
               tmp_path / "loosest")
    said = [rec.getMessage() for rec in caplog.records if "short of the" in rec.getMessage()]
    assert most["budget_met"] is False and len(said) == 1 and "relax" not in said[0]
    assert said[0].endswith("they are at their loosest (every group keeps one channel), so no selection "
                            f"removes more: ask for at most prune.ratio={math.floor(1000 * most['achieved_ratio']) / 1000:g}")


@pytest.mark.parametrize("kept,said", [(1, "kept 1 structure that ranked"), (3, "kept 3 structures that ranked")])
def test_the_guards_line_counts_what_they_kept_in_words(caplog, kept, said):
    from types import SimpleNamespace
    from sosp_cli.pipeline import _log_guards
    sel = SimpleNamespace(budget_met=True, guard_skipped=kept)
    p = SimpleNamespace(min_channels=1, max_layer_ratio=1.0, round_to=1)
    with caplog.at_level("INFO", logger="sosp_cli.pipeline"):
        _log_guards(sel, p, 1, 1)
    assert [r.getMessage() for r in caplog.records] == [
        f"[prune] step 1/1: the layer guards (min_channels=1, max_layer_ratio=1.0, round_to=1) {said} for removal"]


def test_greedy_growth_gets_each_steps_guard_caps_and_they_key_its_saliency(tmp_path, monkeypatch):
    """``method.selection=greedy`` grows the removed set within what the prune guards let each
    group lose (selection.removal_caps): every step's criterion call gets the caps of the model
    it scores, counted against the dense model, and the guards are part of the saliency's key
    (other guards, other scores) — for greedy only."""
    from sosp_cli.budget import CostModel
    from sosp_cli.checkpoint import load_model
    from sosp_cli.pipeline import saliency_key
    from sosp_cli.pruning.sosp_i import SospI
    from sosp_cli.selection import originals_of, removal_caps
    from sosp_cli.structures import StructureSet
    seen, compute = [], SospI.compute
    monkeypatch.setattr(SospI, "compute", lambda self, inp: seen.append(inp.removable) or compute(self, inp))
    guards = ["prune.min_channels=2", "prune.max_layer_ratio=0.6"]
    cfg = compose_run(["experiment=smoke", "method=sosp_i", "method.selection=greedy", "prune.steps=2",
                       "prune.ratio=0.5"] + guards, tmp_path)
    out = tmp_path / "run"
    r = run(cfg, out)
    x = torch.zeros(1, 1, 16, 16)
    dense, _ = load_model(out / "pretrained.pt")
    step1, _ = load_model(out / "pruned_step1.pt")
    ss0, ss1 = StructureSet(dense.eval(), x), StructureSet(step1.eval(), x)
    originals = originals_of(CostModel(dense, ss0, x), ss0)
    assert seen == [removal_caps(ss0, None, 2, 0.6), removal_caps(ss1, originals, 2, 0.6)]
    assert seen[1] != removal_caps(ss1, None, 2, 0.6)          # counted against the dense model
    assert max(r["layer_ratios"].values()) <= 0.6
    key = saliency_key(cfg)
    cfg.prune.min_channels = 3
    assert saliency_key(cfg) != key
    cfg.method.selection = "score"
    plain = saliency_key(cfg)
    cfg.prune.min_channels = 2
    assert saliency_key(cfg) == plain


def test_batch_statistics_saliency_runs_end_to_end_and_diagnostics_use_the_same_model(tmp_path):
    """``saliency.batchnorm=batch``: the saliency record, result.json and the diagnostics all
    come from the model whose BatchNorm uses the batch statistics: the diagnostics' first-order
    prediction is −Σ_{s∈M} g_s with g from saliency.pt (eval-mode g would differ)."""
    base = ["experiment=smoke", "method=sosp_h", "prune.diagnostics=true", "prune.diagnostics_samples=4"]
    runs = {}
    for mode, stack in (("batch", "auto"), ("running", "whole")):
        out = tmp_path / mode
        r = run(compose_run(base + [f"saliency.batchnorm={mode}", f"method.stack_batch={stack}"], tmp_path), out)
        rec = torch.load(out / "saliency.pt", weights_only=False)
        assert r["saliency_batchnorm"] == mode and r["params_after"] < r["params_before"]
        assert r["stack_batch"] == stack
        runs[mode] = (r, rec)
    for mode, (r, rec) in runs.items():
        pruned = torch.load(tmp_path / mode / "pruned.pt", weights_only=False)
        idx = [rec["names"].index(n) for n in pruned["selection"]["remove"]]
        assert r["diagnostics"]["predicted_first_order"] == pytest.approx(-float(rec["grad"][idx].sum()), rel=1e-4)
    assert not torch.allclose(runs["batch"][1]["grad"], runs["running"][1]["grad"])


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "sosp_cli.cli"] + args, cwd=cwd,
                          capture_output=True, text=True)


BAD_INPUTS = [
    (["method=nosuch"], "nosuch"),
    (["model=nosuch"], "nosuch"),
    (["dataset=nosuch"], "nosuch"),
    (["prune.ratio=1.5"], "prune.ratio=1.5"),
    (["prune.ratio=-0.1"], "prune.ratio=-0.1"),
    (["method.num_batchs=4"], "num_batchs"),
    (["prune.ratio=abc"], "abc"),
    (["prune.round_to=0"], "prune.round_to=0 must be an integer >= 1"),
    (["dataset=cifar10", "dataset.root=/nonexistent/cifar"], "/nonexistent/cifar"),
    (["dataset=imagenet", "dataset.root=/nonexistent/inet"], "/nonexistent/inet"),
    (["pretrain.checkpoint=/nonexistent/model.pt"], "/nonexistent/model.pt"),
    (["method.combine=bogus"], "bogus"),
    (["experiment=nosuch"], "nosuch"),
    (["task=nosuch"], "unknown task 'nosuch'; accepted: bottleneck, prune"),
    # a multirun: every sweep value composed before any point runs
    (["-m", "method=l1,nosuch", "seed=0,1"], "unknown method 'nosuch'; accepted: bn_scale, fpgm"),
    (["-m", "method=l1,l2", "prune.ratio=0.3,abc"], "prune.ratio=abc Value 'abc' of type 'str' could not be converted to Float"),
    # ... and checked as its point would check it, before any point runs (not hours into the sweep)
    (["-m", "prune.ratio=0.3,1.2"], "prune.ratio=1.2 is outside [0, 1)"),
    (["-m", "task=prune,bottleneck", "bottleneck.ratios=[0.3,1.2]"], "bottleneck.ratios=[0.3, 1.2] must hold fractions"),
    (["-m", "task=bottleneck", "prune.round_to=1,0"], "prune.round_to=0 must be an integer >= 1"),
    (["-m", "dataset=digits,cifar10", "dataset.root=/nonexistent/cifar"], "cifar10 not found: looked for /nonexistent/cifar"),
    (["seed=x"], "'x'"),
    # Hydra's grammar: was Hydra's several lines (the lexer's exception, a caret, a link)
    (["hydra.run.dir=/tmp/a b/é"], "cannot read the override 'hydra.run.dir=/tmp/a b/é' (LexerNoViableAltException"),
    (["seed=-3"], "seed=-3 must be an integer in [0, 4294967295]"),
    (["seed=999999999999999"], "seed=999999999999999 must be an integer in [0, 4294967295]"),   # was torch's overflow, midway
    (["task=bottleneck", "bottleneck.seeds=[0,-1]"], "bottleneck.seeds=[0, -1] must hold integers in [0, 4294967295]"),
    (["device=tpu"], "tpu"),
    (["model.width=[1,2]"], "width=[1.0, 2.0]"),
    (["schedule.finetune.bn_momentum=2"], "schedule.finetune.bn_momentum=2.0: expected a number in (0, 1] or null"),
    (["model.name=torchvision.nosuch"], "torchvision has no classifier 'nosuch'"),
    (["model=torchvision", "model.width=0.5"], "torchvision.efficientnet_b0 has no width multiplier: width must be 1, got 0.5"),
    (["model.name=torchvision.shufflenet_v2_x0_5", "model.width=1.0"], "Torch-Pruning could not build the dependency graph of ShuffleNetV2"),
    (["saliency.batchnorm=train"], "unknown saliency.batchnorm 'train'; accepted: batch, running"),
    (["method=sosp_i", "saliency.batchnorm=batch"], "saliency.batchnorm=batch is not accepted for sosp_i"),
    (["saliency.batchnorm=batch", "saliency.num_samples=65"],
     "saliency.num_samples=65 in batches of saliency.batch_size=32 leaves a batch of 1 sample"),
    (["method.stack_batch=halves"], "unknown method.stack_batch 'halves'; accepted: auto, half, pair, whole"),
    (["method=sosp_i", "method.chunk_size=0"], "method.chunk_size=0: expected an integer >= 1"),
    # every method.* value is checked whichever method reads it
    (["method=sosp_h", "method.selection=greedy"], "method.selection=greedy is not accepted for sosp_h"),
    (["method=sosp_i", "method.selection=greedy", "prune.normalize=layer_mean"],
     "; prune.normalize=layer_mean would reorder it by layer"),
    (["method=sosp_i", "method.selection=greedy", "prune.scope=local"],
     "; prune.scope=local would reorder it by layer"),
    (["method.selection=gredy"], "unknown method.selection 'gredy'; accepted: greedy, score"),
    (["method=taylor", "method.curvature=hesian"],
     "unknown method.curvature for taylor 'hesian'; accepted: fisher_mc, gn, hessian"),
    (["method=sosp_i", "method.max_structures=0"], "method.max_structures=0: expected an integer >= 1"),
    (["method=sosp_h", "method.sparsity=-1"], "method.sparsity=-1.0: expected a number >= 0"),
    (["dataset.split_seed=-1"], "dataset.split_seed=-1 must be >= 0"),
    (["dataset.val_size=-5"], "dataset.val_size=-5 must be >= 0"),
    (["hydra.run.dir=/dev/null/run"], "hydra.run.dir=/dev/null/run cannot be created (NotADirectoryError"),
    (["model.width=-1"], "width=-1: every multiplier must be > 0, got -1.0"),
    (["model.width=[1,0,1]"], "width=[1.0, 0.0, 1.0]: every multiplier must be > 0, got 0.0"),
    (["method=sosp_h", "method.stack_batch=half", "saliency.batchnorm=batch"],
     "method.stack_batch=half is not accepted with saliency.batchnorm=batch: a half batch has other "
     "BatchNorm statistics than the batch; use method.stack_batch=auto, pair or whole"),
    # refused before pretraining, not by the optimizer, the DataLoader or the loss midway
    (["schedule.pretrain.lr=-0.1"], "schedule.pretrain.lr=-0.1 must be a number >= 0"),
    (["schedule.finetune.epochs=-1"], "schedule.finetune.epochs=-1 must be >= 0"),
    (["schedule.pretrain.batch_size=0"], "schedule.pretrain.batch_size=0 must be >= 1"),
    (["schedule.pretrain.label_smoothing=2"], "schedule.pretrain.label_smoothing=2.0 must be in [0, 1]"),
    (["schedule.finetune.milestones=[-1]"], "schedule.finetune.milestones=[-1.0] must be numbers >= 0"),
    (["schedule.finetune.optimizer=adam"], "unknown schedule.finetune.optimizer 'adam'; accepted: adamw, sgd"),
    (["dataset.image_size=0"], "dataset.image_size=0 must be >= 1"),
    # a batch larger than the training split: no step per epoch (its partial batch dropped)
    (["schedule.finetune.batch_size=5000"], "schedule.finetune.batch_size=5000 is more than the 1259 training "
                                            "images of digits: an epoch would take no step"),
    (["dataset.num_workers=-1"], "dataset.num_workers=-1 must be >= 0"),
    (["latency_repeats=0"], "latency_repeats=0 must be >= 1"),
    (["prune.diagnostics_samples=2"], "prune.diagnostics_samples=2 must be 0 (no single-structure check) or >= 3"),
    (["task=bottleneck", "bottleneck.detect_ratio=2"], "bottleneck.detect_ratio=2.0 is outside [0, 1)"),
    (["task=bottleneck", "bottleneck.ratios=[0.3,1.2]"], "bottleneck.ratios=[0.3, 1.2] must hold fractions"),
]


def _one_error_line(stderr: str, needle: str) -> None:
    """``stderr`` is one line, ``sosp-run: error: ...``, naming ``needle`` (warnings aside)."""
    assert needle in stderr
    lines = [ln for ln in stderr.strip().splitlines() if "Warning" not in ln and "warnings.warn" not in ln]
    assert len(lines) == 1 and lines[0].startswith("sosp-run: error:"), stderr


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)), ids=lambda i: " ".join(BAD_INPUTS[i][0]))
def test_bad_input_is_one_clear_line_and_nonzero_exit(case, tmp_path, monkeypatch, capsys):
    """Every case through the entry point ``sosp-run`` calls (:func:`sosp_cli.cli.main`, with
    Hydra), in this process: a subprocess per case would be mostly torch's import. The process
    itself — exit status, nothing else on stderr — is checked on two cases below. The run
    folder already holds a pretrained model of another config (a rerun after a change in a
    fixed ``hydra.run.dir``): the bad value is named first, and that model is left as it was,
    with no record of the refused config beside it."""
    from sosp_cli import cli
    args, needle = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: None)   # leaves this process's malloc as it is
    monkeypatch.setattr(sys, "argv", ["sosp-run", "experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}"] + args)
    earlier = tmp_path / "run" / "pretrained.pt"
    earlier.parent.mkdir()
    torch.save({"key": "another config"}, earlier)
    kept = earlier.read_bytes()
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code not in (0, None)
    _one_error_line(capsys.readouterr().err, needle)
    written = [p for p in tmp_path.rglob("*") if p.suffix in (".pt", ".json", ".jsonl")]
    assert written == [earlier] and earlier.read_bytes() == kept   # nothing ran
    assert not (tmp_path / "run" / ".hydra").exists()   # nor is the refused config recorded there
    # refused before Hydra starts the job: not even its run.log is written into the folder —
    # unless the refusal needs the data (a batch larger than the training split, once it is read)
    if not any(a.startswith("schedule.finetune.batch_size=") for a in args):
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["pretrained.pt"]


@pytest.mark.parametrize("case", [i for i, (args, _) in enumerate(BAD_INPUTS)
                                  if args[0] in ("method=nosuch", "dataset=cifar10")], ids=lambda i: " ".join(BAD_INPUTS[i][0]))
def test_bad_input_exits_the_process_with_one_line(case, tmp_path):
    """A composition error and a missing dataset, as a user's shell sees them: both are
    refused before Hydra starts the job, so no run folder is made under ``outputs/`` (a mistyped
    command leaves nothing to clean up)."""
    args, needle = BAD_INPUTS[case]
    proc = _cli(["experiment=smoke"] + args, tmp_path)
    assert proc.returncode == 2
    _one_error_line(proc.stderr, needle)
    assert not (tmp_path / "outputs").exists()


def _until_interrupted(args, cwd, after_epochs, sig=signal.SIGINT):
    """Run ``sosp-run ARGS``, send ``sig`` once ``after_epochs`` pretraining epochs have printed;
    return (exit status, every pretraining epoch it finished, stderr, its "[run]" line)."""
    # SIGINT's default disposition in the child, where Python turns it into KeyboardInterrupt: a
    # shell without job control starts background commands (a CI script's) with SIGINT ignored
    proc = subprocess.Popen([sys.executable, "-m", "sosp_cli.cli"] + args, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    epochs, first = [], None
    for line in proc.stdout:
        if first is None and line.startswith("[run] "):
            first = line.strip()
        if line.startswith("[pretrain] epoch "):
            epochs.append(int(line.split()[2].split("/")[0]))
            if len(epochs) == after_epochs:
                proc.send_signal(sig)
                break
    rest, err = proc.communicate(timeout=120)
    epochs += [int(l.split()[2].split("/")[0]) for l in rest.splitlines() if l.startswith("[pretrain] epoch ")]
    return proc.returncode, epochs, err, first


@pytest.mark.parametrize("mode", ["run", "multirun"])
def test_ctrl_c_is_one_line_whose_override_resumes_the_run(tmp_path, mode):
    """Ctrl-C mid-training: exit status 130 and one line, no traceback, naming the override that
    resumes — the default folder is stamped with the time, so "the same command" alone would
    start afresh. With it, training goes on after the last finished epoch."""
    args = (["-m"] if mode == "multirun" else []) + [
        "experiment=smoke", "schedule.pretrain.epochs=400", f"pretrain.cache_dir={tmp_path / 'cache'}"]
    status, epochs, err, first = _until_interrupted(args, tmp_path, 2)
    assert status == 130 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("sosp-run: interrupted; what finished is kept"), last
    override = shlex.split(last.split(" with ")[-1])
    key = "hydra.sweep.dir" if mode == "multirun" else "hydra.run.dir"
    assert len(override) == 1 and override[0].startswith(f"{key}={tmp_path / 'outputs'}/")
    # the job's first line (after Hydra's in a sweep) names its folder and the same override,
    # for a job killed outright
    folder = first.split()[2]
    assert first.startswith("[run] folder ") and f"with {override[0]} resumes" in first
    assert (Path(folder) / "run.log").exists() and (override[0].endswith(folder) or mode == "multirun")
    # ... and the run's log says why it stopped, for whoever reads it later (a SLURM job's)
    assert (Path(folder) / "run.log").read_text().rstrip().endswith(last)
    status, resumed, err, _ = _until_interrupted(args + override, tmp_path, 1)
    assert status == 130 and resumed[0] == epochs[-1] + 1, (epochs, resumed)


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path):
    """SIGTERM — a scheduler's time limit, ``scancel``, ``kill`` — mid-training: exit status 143
    and one line, no traceback, in the console and in ``run.log`` (a SLURM job's log says why it
    stopped), no temporary file left; its override resumes after the last finished epoch."""
    args = ["experiment=smoke", "schedule.pretrain.epochs=400", f"pretrain.cache_dir={tmp_path / 'cache'}"]
    status, epochs, err, first = _until_interrupted(args, tmp_path, 2, signal.SIGTERM)
    assert status == 143 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("sosp-run: stopped by SIGTERM; what finished is kept"), last
    folder = Path(first.split()[2])
    assert (folder / "run.log").read_text().rstrip().endswith(last)
    assert not [p.name for p in folder.rglob("*.tmp")]
    override = shlex.split(last.split(" with ")[-1])
    status, resumed, err, _ = _until_interrupted(args + override, tmp_path, 1, signal.SIGTERM)
    assert status == 143 and resumed[0] == epochs[-1] + 1, (epochs, resumed)


def test_sigterm_to_every_process_of_a_run_with_loader_workers_is_the_same_one_line(tmp_path):
    """SLURM signals every process of a job at once, the loader's worker processes too: the run
    still stops with its one line and 143 — not "DataLoader worker ... is killed by signal"."""
    write_cifar(tmp_path / "data", "cifar10", n_train=200, n_test=50)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sosp_cli.cli", "experiment=smoke", "dataset=cifar10",
         f"dataset.root={tmp_path / 'data'}", "dataset.num_workers=2", "dataset.val_size=100",
         "schedule.pretrain.epochs=400", "schedule.pretrain.batch_size=32",
         f"hydra.run.dir={tmp_path / 'run'}", f"pretrain.cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("[pretrain] epoch 2/"):
            os.killpg(proc.pid, signal.SIGTERM)   # the main process and its two workers
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("sosp-run: stopped by SIGTERM; what finished is kept")


def test_the_sigterm_handler_is_sosp_runs_alone_and_not_under_torchrun_or_submitit(monkeypatch):
    """``stop_on_sigterm`` puts the handler before it back on the way out (``cli.main`` called
    in a process of one's own leaves it as it was), and sets none under torchrun or submitit,
    whose agents stop their processes with SIGTERM themselves."""
    from sosp_cli.cli import stop_on_sigterm
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_sigterm():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    for k in ("SUBMITIT_EXECUTOR", "TORCHELASTIC_RUN_ID", "LOCAL_RANK"):
        monkeypatch.setenv(k, "0")
        with stop_on_sigterm():
            assert signal.getsignal(signal.SIGTERM) is before
        monkeypatch.delenv(k)


@pytest.mark.parametrize("folder", ["a b/é", "résumé(2)", "a,b", "it's", 'q"x', "x\\\"y", "[x]", "a=b", "{a}", "a:b@c",
                                    "a#b;c&d", "plain-1_2.3", "my runs"])
def test_a_folder_override_reads_back_as_the_folder(folder):
    """The resume line's override, as the shell splits it and Hydra reads it, is the folder itself
    — not a parse error (a space), a sweep (a comma) or another string (quotes)."""
    from sosp_cli.cli import _parsed, hydra_override
    path = f"/tmp/runs/{folder}"
    (arg,) = shlex.split(shlex.quote(hydra_override("hydra.run.dir", path)))
    read = _parsed(arg)
    assert read.key_or_group == "hydra.run.dir" and not read.is_sweep_override() and read.value() == path


def test_a_run_folder_with_a_space_and_a_comma_is_made_as_named_and_resumed_by_its_line(
        tmp_path, monkeypatch, capsys):
    """A quoted ``hydra.run.dir`` (a space and a comma in it): the folder is the value Hydra reads
    (not one named with the quotes), and the override its first line names resumes it."""
    from sosp_cli import cli
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: None)
    folder = tmp_path / "my runs" / "a,b"
    common = ["sosp-run", "experiment=smoke", "method=l1", f"pretrain.cache_dir={tmp_path / 'cache'}"]
    monkeypatch.setattr(sys, "argv", common + [f'hydra.run.dir="{folder}"'])
    cli.main()
    assert (folder / "result.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "my runs"]   # nothing named with a quote
    first = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[run] folder"))
    override = shlex.split(first.split(" with ", 1)[1].rsplit(" resumes", 1)[0])
    assert override == [f'hydra.run.dir="{folder}"']
    monkeypatch.setattr(sys, "argv", common + override)
    cli.main()
    # resumed in that folder (no other made), no epoch trained again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "my runs"]
    assert list((tmp_path / "my runs").iterdir()) == [folder]
    assert (folder / "metrics.jsonl").read_text().count("\n") == 2


def test_hydras_own_flags_misused_are_one_line(tmp_path):
    proc = _cli(["-m", "--cfg", "hydra"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "sosp-run: error: Only one of --run, --multirun, --cfg, --info and --shell_completion can be specified")
    shown = _cli(["--cfg", "job", "-p", "method", "method=sosp_i"], tmp_path)   # the flags themselves work
    assert shown.returncode == 0 and "name: sosp_i" in shown.stdout


def test_installed_command_runs_from_any_directory_and_multirun_reports(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        ["sosp-run", "-m", "experiment=smoke", "method=l1,bn_scale,random", "prune.ratio=0.3,0.6",
         f"hydra.sweep.dir={sweep}", f"pretrain.cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list(sweep.rglob("result.json"))) == 6
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # pretrained once
    # every point's messages: on stdout, and kept in its folder's run.log with time and source
    logs = sorted(sweep.glob("*/run.log"))
    assert len(logs) == 6 and proc.stdout.count("top-1 after fine-tuning") == 6
    first = logs[0].read_text()
    assert "[sosp_cli.train][INFO] [pretrain] epoch 1/" in first
    assert "[sosp_cli.cli][INFO] digits / resnet20 / l1 / ratio 0.3" in first
    assert "top-1 after fine-tuning" in first and "[finetune] epoch 1/" in proc.stdout
    assert f"  run folder               {logs[0].parent}\n" in proc.stdout   # the summary names each point's folder
    report = subprocess.run(["sosp-report", str(sweep)], capture_output=True, text=True)
    assert report.returncode == 0
    rows = [l for l in report.stdout.splitlines() if l.startswith("| digits")]
    assert len(rows) == 6
    assert (sweep / "report.csv").exists() and (sweep / "report.md").exists()
    # the shipped citations hold no digits rows: the report says so rather than show an empty table
    from sosp_cli.report import main as report_main   # (in this process: the command ran above)
    assert report_main([str(sweep), "--reference", str(REFERENCE)]) == 0
    assert f"Published results (cited, not measured here):\n\nnone in {REFERENCE} for these datasets" in capsys.readouterr().out
    assert (sweep / "report_cited.csv").exists()


def test_a_failed_sweep_point_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    """A multirun point that fails with a one-line error — here a weights file that exists (the
    check before the sweep passes) but is not a checkpoint — writes it into its own directory
    (error.txt); the other points run and are reported; the sweep ends listing the failure, with
    exit status 2. Rerunning the sweep once the file is fixed removes its error.txt. (In this
    process: the installed command's own exit status is checked by the test above.)"""
    from sosp_cli import cli
    from sosp_cli.report import main as report
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: None)
    sweep = tmp_path / "sweep"
    weights = tmp_path / "weights.pt"
    weights.write_text("not a checkpoint")
    monkeypatch.setattr(sys, "argv", [
        "sosp-run", "-m", "experiment=smoke", "method=random", f"hydra.sweep.dir={sweep}",
        f"pretrain.cache_dir={tmp_path / 'cache'}", f"pretrain.checkpoint={weights},null", "prune.ratio=0.3,0.4"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-2000:]
    assert sorted(p.parent.name for p in sweep.rglob("result.json")) == ["2_random_r0.3_s0", "3_random_r0.4_s0"]
    failed = sorted(sweep.rglob("error.txt"))
    assert [f.parent.name for f in failed] == ["0_random_r0.3_s0", "1_random_r0.4_s0"]
    assert all(f.read_text().startswith(f"pretrain.checkpoint={weights} is not a readable") for f in failed)
    # the point's run.log ends with the line, stamped (the console had it on stderr)
    assert all((f.parent / "run.log").read_text().splitlines()[-1].endswith(
        f"[sosp_cli.stop][ERROR] sosp-run: error: {f.read_text().strip()}") for f in failed)
    assert f"sosp-run: error: 2 of 4 sweep points failed (the others are in the report):\n  0_random_r0.3_s0: " \
        f"pretrain.checkpoint={weights} is not a readable" in err
    assert len([l for l in (sweep / "report.md").read_text().splitlines() if l.startswith("| digits")]) == 2
    assert report([str(sweep)]) == 0 and "not in the report, 2 failed sweep point(s):\n  0_random_r0.3_s0: " \
        f"pretrain.checkpoint={weights}" in capsys.readouterr().out
    shutil.copyfile(sweep / "2_random_r0.3_s0" / "pretrained.pt", weights)   # the file fixed
    cli.main()   # succeeds: returns, no SystemExit
    assert not list(sweep.rglob("error.txt")) and len(list(sweep.rglob("result.json"))) == 4


def test_a_sweep_point_that_faults_is_recorded_with_its_traceback_and_the_sweep_goes_on(
        tmp_path, monkeypatch, capsys):
    """Not a one-line error but a fault (a bug, a RuntimeError from deep inside PyTorch) in one
    point of a sweep: its traceback goes to the console and the point's run.log, error.txt names
    it, the other points run and are reported, and the sweep ends listing it with exit status 2
    — an overnight sweep is not lost to one point. (A single run shows the traceback as before.)"""
    from sosp_cli import cli, pipeline
    real = pipeline.stage_saliency

    def faulty(run, *args, **kwargs):
        if run.cfg.method.name == "random":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real(run, *args, **kwargs)

    monkeypatch.setattr(pipeline, "stage_saliency", faulty)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: None)
    sweep = tmp_path / "sweep"
    monkeypatch.setattr(sys, "argv", ["sosp-run", "-m", "experiment=smoke", "method=random,l1",
                                      f"hydra.sweep.dir={sweep}", f"pretrain.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "sosp-run: error: 1 of 2 sweep points failed (the others are in the report):\n  0_random_r0.5_s0: " \
        "RuntimeError: DefaultCPUAllocator: can't allocate memory (its traceback: run.log)" in err
    assert (sweep / "1_l1_r0.5_s0" / "result.json").exists()
    log = (sweep / "0_random_r0.5_s0" / "run.log").read_text()
    assert "this sweep point failed" in log and "Traceback (most recent call last)" in log and "in faulty" in log
    monkeypatch.setattr(sys, "argv", ["sosp-run", "experiment=smoke", "method=random",
                                      f"hydra.run.dir={tmp_path / 'single'}", f"pretrain.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(SystemExit) as single:   # one run: Hydra's own report of the fault
        cli.main()
    assert single.value.code == 1 and "can't allocate memory" in capsys.readouterr().err
    log = (tmp_path / "single" / "run.log").read_text()   # and its run.log has the traceback too
    assert "[sosp_cli.stop][ERROR] [run] failed (RuntimeError: DefaultCPUAllocator" in log and "in faulty" in log


def test_report_on_empty_dir_is_an_error(tmp_path):
    proc = subprocess.run(["sosp-report", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "no result.json" in proc.stderr


@pytest.mark.parametrize("content,needle", [
    ("{bad json", "is not a readable result (JSONDecodeError"),
    ('{"dataset": "digits"}', "is not a sosp-run result: it lacks model, method"),
    ("[1, 2]", "is not a sosp-run result: it lacks (not a JSON object)"),
])
def test_report_names_a_result_json_it_cannot_read_and_writes_nothing(tmp_path, capsys, content, needle):
    from sosp_cli.report import main
    (tmp_path / "r0_s0").mkdir()
    (tmp_path / "r0_s0" / "result.json").write_text(content)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sosp-report: error: ") and "\n" not in err
    assert f"{tmp_path / 'r0_s0' / 'result.json'} {needle}" in err
    assert not (tmp_path / "report.csv").exists() and not (tmp_path / "report.md").exists()


def test_iterative_pruning_in_three_steps(tmp_path):
    cfg = compose_run(["experiment=smoke", "method=sosp_h", "prune.steps=3", "prune.step_epochs=1",
                       "prune.target=flops", "prune.ratio=0.45", "prune.diagnostics=true",
                       "prune.diagnostics_samples=4"], tmp_path)
    out = tmp_path / "run"
    r = run(cfg, out)
    for step in (1, 2):
        assert (out / f"pruned_step{step}.pt").exists()
    assert (out / "saliency_step2.pt").exists() and (out / "saliency_step3.pt").exists()
    assert r["steps"] == 3
    assert r["achieved_flops_ratio"] == pytest.approx(r["macs_reduction"], abs=1e-9)
    # the last step's cut lands within half a structure's MACs of the target, on either side
    # (selection.py: it stops short when that is closer), counted against the dense model
    from sosp_cli.budget import CostModel
    from sosp_cli.checkpoint import load_model
    from sosp_cli.structures import StructureSet
    before_last, _ = load_model(out / "pruned_step2.pt")
    x = torch.zeros(1, 1, 16, 16)
    ss = StructureSet(before_last.eval(), x)
    cost = CostModel(before_last, ss, x)
    largest = max(cost.removal_cost(s)[1] for s in range(ss.num_structures))
    assert 0 < largest < 0.05 * r["macs_before"]
    assert abs(r["macs_reduction"] - 0.45) <= 0.5 * largest / r["macs_before"]
    assert (out / "metrics.jsonl").read_text().count("step1-finetune") == 1
    # every round's saliency time, also after a resume that reads the first rounds' records
    names = ["saliency.pt", "saliency_step2.pt", "saliency_step3.pt"]
    seconds = [torch.load(out / n, weights_only=False)["seconds"] for n in names]
    assert r["saliency_seconds_steps"] == seconds and r["saliency_seconds"] == seconds[0]
    gate_errors = torch.load(out / "pruned.pt", weights_only=False)["gate_error_steps"]
    assert len(gate_errors) == 3 and r["gate_error"] == max(gate_errors) <= 1e-4
    (out / "pruned.pt").unlink()
    (out / "finetuned.pt").unlink()
    again = run(cfg, out)
    assert again["saliency_seconds_steps"] == seconds and again["gate_error"] == r["gate_error"]
    # the diagnostics of the first step's removed set reach result.json
    step1 = torch.load(out / "pruned_step1.pt", weights_only=False)
    assert r["diagnostics"] == step1["diagnostics"] and r["diagnostics"]["removed"] == len(step1["selection"]["remove"])
    model, record = load_model(out / "finetuned.pt")  # three rounds of history replay
    assert sum(p.numel() for p in model.parameters()) == r["params_after"]
    # the printed summary names the target and the share of structures, not of the target
    from sosp_cli.cli import summary
    lines = summary(r).splitlines()
    assert lines[0].endswith("/ sosp_h / ratio 0.45 of flops")
    share = f"{100 * r['achieved_structures_ratio']:.1f} %"
    assert share != f"{100 * r['achieved_ratio']:.1f} %"
    assert any(ln.split() == ["structures", "removed", str(r["removed_structures"]), f"({share.split()[0]}", "%)"]
               for ln in lines)


def test_layer_local_method_needs_local_scope(tmp_path):
    with pytest.raises(SospError, match="layer-local"):
        run(compose_run(["experiment=smoke", "method=fpgm", "prune.scope=global"], tmp_path), tmp_path / "r")
    r = run(compose_run(["experiment=smoke", "method=hrank"], tmp_path), tmp_path / "h")
    assert r["scope"] == "local"


RETAIN_PROBE = """
import resource, sys, torch
from sosp_cli.utils import retain_freed_memory
print(retain_freed_memory())
def cycle():   # a pass: ten 4 MiB activations and one of 40 MiB (above any mmap threshold), freed
    acts = [torch.ones(1 << 20) for _ in range(10)] + [torch.ones(10 << 20)]
    del acts
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux" or __import__("platform").libc_ver()[0] != "glibc",
                    reason="glibc malloc only")
def test_retain_freed_memory_keeps_pages_and_respects_opt_outs():
    def probe(**env):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "SOSP_SYSTEM_MALLOC"} | env
        out = subprocess.run([sys.executable, "-c", RETAIN_PROBE], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0] == "True", int(out[1])
    applied, faults = probe()
    assert applied
    assert faults < 0.25 * 20 * 20 * 1024      # freed pages are reused, not faulted in again
    assert probe(SOSP_SYSTEM_MALLOC="1")[0] is False
    assert probe(MALLOC_TRIM_THRESHOLD_="1000000")[0] is False
    env = dict(os.environ, SOSP_SYSTEM_MALLOC="yes")
    bad = subprocess.run([sys.executable, "-m", "sosp_cli.cli", "experiment=quickstart"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "sosp-run: error: SOSP_SYSTEM_MALLOC='yes': expected 1 (leave glibc malloc as it is) or 0"]


def test_report_keeps_runs_that_differ_in_a_setting_apart(tmp_path):
    """Two curvatures of one sweep are two rows (not averaged as if seeds); settings all runs
    share add no column; results from before ``saliency.batchnorm`` / ``method.stack_batch`` /
    ``prune.round_to`` count as ``running`` / ``auto`` / 1."""
    import pandas as pd
    from sosp_cli.report import collect, key_columns, summarize, to_markdown

    def row(curvature, seed, top1, batchnorm=None):
        r = {"dataset": "digits", "model": "resnet20", "width": "1.0", "method": "sosp_h",
             "target": "structures", "scope": "global", "prune_ratio": 0.5, "combine": "abs_sum",
             "curvature": curvature, "seed": seed, "normalize": "none", "steps": 1,
             **{m: 0.5 for m in ("top1_before", "top1_pruned", "achieved_ratio", "params_reduction",
                                 "macs_reduction", "speedup_cpu_bs64", "speedup_cuda_bs64",
                                 "saliency_seconds")}, "top1_finetuned": top1}
        if batchnorm is not None:
            r["saliency_batchnorm"] = batchnorm
        return r

    df = pd.DataFrame([row("gn", 0, 90.0), row("gn", 1, 92.0), row("hessian", 0, 80.0)])
    table = summarize(df)
    assert key_columns(df)[-1] == "curvature" and len(table) == 2
    assert sorted(table["top1_finetuned_mean"]) == [80.0, 91.0]
    md = to_markdown(table).splitlines()
    assert "curvature" in md[0]
    # two seeds: mean ± sample std; one seed: the value alone (no spread to show)
    col = [c.strip() for c in md[0].split("|")].index("top1_finetuned")
    assert [l.split("|")[col].strip() for l in md[2:]] == ["91.0 ± 1.4", "80.0"]
    same = pd.DataFrame([row("gn", 0, 90.0), row("gn", 1, 92.0)])
    assert key_columns(same) == key_columns(same.drop(columns=["curvature"])) and len(summarize(same)) == 1
    for k, r in enumerate([row("gn", 0, 90.0, "batch"), row("gn", 0, 92.0)]):
        (tmp_path / str(k)).mkdir()
        (tmp_path / str(k) / "result.json").write_text(json.dumps({**r, "latency": {}}))
    mixed = collect(tmp_path)
    assert sorted(mixed["saliency_batchnorm"]) == ["batch", "running"] and len(summarize(mixed)) == 2
    assert list(mixed["stack_batch"]) == ["auto", "auto"] and list(mixed["round_to"]) == [1, 1]
    rounded = pd.DataFrame([row("gn", 0, 90.0), {**row("gn", 0, 92.0), "round_to": 8}])
    assert "round_to" in key_columns(rounded.fillna({"round_to": 1})) and len(summarize(rounded.fillna({"round_to": 1}))) == 2
    passes = pd.DataFrame([{**row("gn", 0, 90.0), "stack_batch": "half"}, {**row("gn", 0, 90.0), "stack_batch": "whole"}])
    assert "stack_batch" in key_columns(passes) and len(summarize(passes)) == 2


def test_report_rows_split_by_every_setting_the_saved_configs_differ_in(tmp_path):
    """A sweep over a setting result.json does not carry (``method.selection``,
    ``saliency.num_samples``) gives a row per value, read from each run's ``.hydra/config.yaml``;
    settings that change nothing computed (``pretrain.cache_dir``) add no row; a run without a
    saved config is its own row ("?"), not dropped; a nested run (a bottleneck job's) reads its
    job's config."""
    from omegaconf import OmegaConf
    from sosp_cli.report import collect, key_columns, summarize, to_markdown

    def write(folder, seed, top1, selection="score", samples=512, cache="a", config_at=None):
        folder = tmp_path / folder
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps({
            "dataset": "digits", "model": "resnet20", "width": 1.0, "method": "sosp_i", "target": "structures",
            "scope": "global", "prune_ratio": 0.5, "seed": seed, "latency": {},
            **{m: 0.5 for m in ("top1_before", "top1_pruned", "achieved_ratio", "params_reduction",
                                "macs_reduction", "saliency_seconds")}, "top1_finetuned": top1}))
        if config_at is not False:
            at = tmp_path / config_at if config_at else folder
            (at / ".hydra").mkdir(parents=True, exist_ok=True)
            OmegaConf.save(OmegaConf.create({
                "seed": seed, "method": {"name": "sosp_i", "selection": selection, "chunk_size": 16},
                "saliency": {"num_samples": samples}, "pretrain": {"cache_dir": cache},
                "schedule": {"finetune": {"milestones": [0.5, 0.75]}}}), at / ".hydra" / "config.yaml")

    write("score0", 0, 80.0, cache="a")
    write("score1", 1, 82.0, cache="b")
    write("greedy0", 0, 90.0, selection="greedy")
    write("job/runs/n64", 0, 70.0, samples=64, config_at="job")
    write("api", 0, 60.0, config_at=False)
    df = collect(tmp_path)
    assert key_columns(df)[-2:] == ["method.selection", "saliency.num_samples"]
    table = summarize(df)
    rows = {(r["method.selection"], r["saliency.num_samples"]): (r["top1_finetuned_mean"], r["n"])
            for _, r in table.iterrows()}
    assert rows == {("score", "512"): (81.0, 2), ("greedy", "512"): (90.0, 1), ("score", "64"): (70.0, 1),
                    ("?", "?"): (60.0, 1)}
    assert "method.selection" in to_markdown(table).splitlines()[0]
    assert "pretrain.cache_dir" not in df.columns and "method.chunk_size" not in df.columns
    from sosp_cli.plots import series_labels   # the figures' lines split alike
    assert set(series_labels(df)) == {f"sosp_i method.selection={a} saliency.num_samples={b}" for a, b in rows}


def test_report_figures_draw_a_line_per_configuration_not_an_average_of_settings():
    """A sweep over ``method.curvature`` (and a baseline that does not read it): the accuracy
    figure has one line per curvature, each point the mean over that curvature's seeds only; the
    baseline keeps its plain name; settings a figure splits by are not in the labels."""
    import matplotlib.pyplot as plt
    import pandas as pd
    from sosp_cli.plots import _lines, series_labels

    def row(method, curvature, ratio, seed, top1):
        return {"dataset": "digits", "model": "resnet20", "width": "1.0", "method": method, "target": "structures",
                "scope": "global", "prune_ratio": ratio, "curvature": curvature, "seed": seed,
                "macs_reduction": ratio, "top1_finetuned": top1}

    df = pd.DataFrame([row("sosp_h", c, r, seed, {"gn": 90.0, "hessian": 70.0}[c] - 10 * r + seed)
                       for c in ("gn", "hessian") for r in (0.3, 0.6) for seed in (0, 1)]
                      + [row("l1", "gn", r, 0, 50.0) for r in (0.3, 0.6)])
    labels = series_labels(df, {"dataset", "model", "prune_ratio"})
    assert sorted(set(labels)) == ["l1", "sosp_h curvature=gn", "sosp_h curvature=hessian"]
    fig, ax = plt.subplots()
    _lines(ax, df.assign(series=labels), "macs_reduction", "top1_finetuned", "series")
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}
    plt.close(fig)
    assert lines == {"l1": [50.0, 50.0], "sosp_h curvature=gn": [87.5, 84.5], "sosp_h curvature=hessian": [67.5, 64.5]}
    assert set(series_labels(df[df["curvature"] == "gn"], {"prune_ratio"})) == {"l1", "sosp_h"}


REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference_results.csv"


def test_reference_rows_are_those_of_the_measured_datasets_and_models():
    """``sosp-report --reference``: the shipped citations of the measured (dataset, model) — a
    cited "resnet56 (option B)" is ResNet-56 —, marked as cited; other models' rows are left out."""
    import pandas as pd
    from sosp_cli.report import reference_table
    shipped = pd.read_csv(REFERENCE)
    cited = reference_table(REFERENCE, pd.DataFrame({"dataset": ["cifar10"], "model": ["resnet56"]}))
    assert list(cited.columns[:2]) == ["cited", "method"] and set(cited["cited"]) == {"yes"}
    assert len(cited) == shipped["model"].str.startswith("resnet56 ").sum() > 0
    assert set(cited["model"].str.split().str[0]) == {"resnet56"}
    assert reference_table(REFERENCE, pd.DataFrame({"dataset": ["digits"], "model": ["resnet56"]})).empty


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"),
    ("folder", "is a folder; pass a CSV file"),
    ("method,dataset,model\nl1,cifar10,vgg16\n", "lacks column 'baseline_top1'; expected at least method, "
     "dataset, model, baseline_top1, pruned_top1, source"),
    ("", "is not a readable CSV (EmptyDataError"),
    (b"\xb5\x00\xff\xfe", "is not a readable CSV (UnicodeDecodeError"),
])
def test_a_reference_file_it_cannot_use_is_one_line(tmp_path, content, needle):
    import pandas as pd
    from sosp_cli.report import reference_table
    path = tmp_path / "ref.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(SospError, match=f"^--reference {path} ") as err:
        reference_table(path, pd.DataFrame({"dataset": ["cifar10"], "model": ["vgg16"]}))
    assert needle in str(err.value) and "\n" not in str(err.value)
    # through sosp-report: one line, and no report file of the measured runs either
    from sosp_cli.report import main
    (tmp_path / "runs" / "0").mkdir(parents=True)
    (tmp_path / "runs" / "0" / "result.json").write_text(json.dumps(_result_row()))
    assert main([str(tmp_path / "runs"), "--reference", str(path)]) == 2
    assert not list((tmp_path / "runs").glob("report*"))


def _result_row(**changes) -> dict:
    """A result.json with the fields the report reads."""
    return {"dataset": "digits", "model": "resnet20", "width": "1.0", "method": "sosp_h",
            "target": "structures", "scope": "global", "prune_ratio": 0.5, "combine": "abs_sum",
            "curvature": "gn", "seed": 0, "normalize": "none", "steps": 1, "latency": {},
            **{m: 0.5 for m in ("top1_before", "top1_pruned", "top1_finetuned", "achieved_ratio",
                                "params_reduction", "macs_reduction", "saliency_seconds")}, **changes}
