"""Several processes (DESIGN §7), on CPU with gloo: what a run split across ranks computes equals
what one process computes — saliencies (summed across ranks), training steps (DDP on shares of
the single-process global batch), evaluation (counts summed across ranks)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from sosp_cli import distributed
from sosp_cli.config import MethodConfig, TrainConfig
from sosp_cli.data import make_loader
from sosp_cli.errors import SospError
from sosp_cli.pruning import SaliencyInput, get_criterion, saliency_model
from sosp_cli.structures import StructureSet
from sosp_cli.train import evaluate, train
from tiny import TinyMLP, TinyResNet, randomize_batchnorm

WORLD = 2
# (criterion, options): every sum over samples a criterion makes must be summed across ranks
SALIENCIES = [("sosp_h", {}), ("sosp_h", {"combine": "abs_joint"}), ("sosp_h", {"curvature": "hessian"}),
              ("sosp_h", {"stack_batch": "half"}), ("taylor", {}), ("sosp_i", {}),
              ("sosp_i", {"selection": "greedy"}), ("sosp_i", {"curvature": "hessian"}), ("obd", {}),
              ("hrank", {}), ("l1", {})]
# with BatchNorm on each saliency batch's own statistics (saliency.batchnorm=batch): a batch is
# never split across ranks, so its statistics are those one process uses
BATCH_STATISTICS = [("sosp_h", {}), ("taylor", {}), ("sosp_i", {"curvature": "hessian"})]


def saliency_setup():
    torch.manual_seed(3)
    model = randomize_batchnorm(TinyResNet(), torch.Generator().manual_seed(1)).double().eval()
    x = torch.randn(11, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (11,))
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]   # 3 batches of unequal size on 2 ranks
    return model, StructureSet(model, x[:1]), batches


def scores(across_ranks: bool) -> list[torch.Tensor]:
    model, ss, batches = saliency_setup()
    batch_model = saliency_model(model, "batch", batches)
    return [get_criterion(MethodConfig(name=name, **options)).run(
        SaliencyInput(work, ss, batches, torch.device("cpu"), across_ranks=across_ranks)).scores
        for work, variants in ((model, SALIENCIES), (batch_model, BATCH_STATISTICS))
        for name, options in variants]


def train_setup(batchnorm: bool = False):
    torch.manual_seed(5)
    if batchnorm:
        model = TinyResNet().double()
        data = TensorDataset(torch.randn(40, 2, 5, 5, dtype=torch.float64), torch.randint(0, 4, (40,)))
    else:   # no BatchNorm: a DDP step is then exactly the single-process step
        model = TinyMLP().double()
        data = TensorDataset(torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,)))
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=5e-4,
                      scheduler="cosine", warmup_epochs=0)
    return model, data, cfg


def trained(tmp, batchnorm: bool = False) -> dict:
    model, data, cfg = train_setup(batchnorm)
    ranks = distributed.active()
    loader = make_loader(data, cfg.batch_size, True, seed=7, drop_last=True, across_ranks=ranks)
    held_out = make_loader(distributed.shard_dataset(data), 16, False)
    history = train(model, loader, held_out, cfg, torch.device("cpu"), "pretrain",
                    tmp / f"metrics{distributed.rank()}.jsonl", tmp / "ckpt.pt", seed=7, across_ranks=ranks)
    return {"state": model.state_dict(), "val": history[-1]["val_loss"],
            "test": evaluate(model, held_out, torch.device("cpu"), across_ranks=ranks)}


def diverged(tmp) -> str:
    """A NaN sample in one rank's share: that rank's step loss is NaN, the averaged gradients
    make every rank's weights NaN; each rank stops with the same one-line error."""
    model, data, cfg = train_setup()
    data.tensors[0][3, 0] = float("nan")
    ranks = distributed.active()
    loader = make_loader(data, cfg.batch_size, True, seed=7, drop_last=True, across_ranks=ranks)
    held_out = make_loader(distributed.shard_dataset(data), 16, False)
    try:
        train(model, loader, held_out, cfg, torch.device("cpu"), "pretrain", tmp / f"m{distributed.rank()}.jsonl",
              tmp / "ckpt.pt", seed=7, across_ranks=ranks, setting="schedule.pretrain")
    except SospError as exc:
        return str(exc)
    return "no error"


def waited_for_lock(tmp) -> dict:
    """Enter ``distributed.file_lock`` while another process holds the lock; count the tries."""
    import time
    tries, broadcast = [], distributed.broadcast_object
    distributed.broadcast_object = lambda obj: tries.append(obj) or broadcast(obj)
    (tmp / f"trying{distributed.rank()}").touch()   # the holder releases 1.5 s after this
    t0 = time.monotonic()
    try:
        with distributed.file_lock(str(tmp / "cache.lock"), poll_seconds=0.2):
            entered = time.monotonic() - t0
    finally:
        distributed.broadcast_object = broadcast
    return {"seconds": entered, "tries": len(tries)}


def _worker(rank: int, store: str, job: str, tmp):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        if job == "lock":
            out = waited_for_lock(tmp)
        elif job == "diverge":
            out = diverged(tmp)
        else:
            out = scores(True) if job == "saliency" else trained(tmp, batchnorm=job == "train_bn")
        torch.save(out, tmp / f"{job}{rank}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    distributed.finish()   # as sosp-run ends: every rank leaves the group after a barrier
    if not dist.is_initialized():
        (tmp / f"{job}{rank}.left").touch()


def run_ranks(job: str, tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / f"store_{job}"), job, tmp_path), nprocs=WORLD)
    assert all((tmp_path / f"{job}{r}.left").exists() for r in range(WORLD))
    return [torch.load(tmp_path / f"{job}{r}.pt", weights_only=False) for r in range(WORLD)]


def test_saliencies_across_ranks_equal_one_process(tmp_path):
    alone = scores(False)
    assert all(torch.equal(a, b) for a, b in zip(scores(True), alone))   # without a process group: a no-op
    for ranked in run_ranks("saliency", tmp_path):
        assert len(ranked) == len(alone) == len(SALIENCIES) + len(BATCH_STATISTICS)
        for (name, options), a, b in zip(SALIENCIES + BATCH_STATISTICS, ranked, alone):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (name, options, (a - b).abs().max())


def test_ddp_training_equals_one_process_on_the_same_global_batches(tmp_path):
    (tmp_path / "one").mkdir()
    alone = trained(tmp_path / "one")
    ranks = run_ranks("train", tmp_path)
    for r in ranks:
        for k, v in alone["state"].items():
            assert torch.allclose(r["state"][k], v, rtol=1e-9, atol=1e-12), k
        # evaluate() takes the cross-entropy of float32 logits: sums in another order differ there
        assert r["val"] == pytest.approx(alone["val"], rel=1e-6)
        assert r["test"] == pytest.approx(alone["test"], rel=1e-6)
    assert (tmp_path / "metrics0.jsonl").exists() and not (tmp_path / "metrics1.jsonl").exists()


def test_ddp_training_leaves_every_rank_with_rank_0s_model(tmp_path):
    """With BatchNorm each rank's last forward pass updates its running statistics with its own
    share of the batch; after training every rank holds rank 0's (the model rank 0 saves and
    all ranks evaluate)."""
    first, second = run_ranks("train_bn", tmp_path)
    assert first["state"].keys() == second["state"].keys()
    assert any("running_mean" in k for k in first["state"])
    assert all(torch.equal(first["state"][k], second["state"][k]) for k in first["state"])


def test_a_diverging_ddp_training_stops_every_rank_with_one_line_after_the_epoch(tmp_path):
    """Under several processes the per-step check would stop one rank while the others wait in
    the next step's gradient average; the epoch's sums are every rank's, so all stop there."""
    messages = run_ranks("diverge", tmp_path)
    assert messages[0] == messages[1]
    assert messages[0].startswith("pretrain diverged: the validation loss is nan after epoch 1 "
                                  "(schedule.pretrain.lr=0.1)")
    assert not (tmp_path / "ckpt.pt").exists()


def test_global_batch_shards_deal_out_the_single_process_batches():
    """Rank r's k-th batch is share r of the single-process loader's k-th batch, epoch after
    epoch (the trainer reseeds the loader's generator per epoch)."""
    from torch.utils.data import DataLoader
    data = TensorDataset(torch.arange(23))
    one = make_loader(data, 6, True, seed=4, drop_last=True)
    shards = []
    for r in range(3):
        gen = torch.Generator().manual_seed(4)
        shards.append(DataLoader(data, batch_sampler=distributed.GlobalBatchShards(23, 6, gen, r, 3), generator=gen))
    for epoch in range(2):
        for loader in [one] + shards:
            loader.generator.manual_seed(100 + epoch)
        batches = [b.tolist() for (b,) in one]
        assert len(batches) == 3 and all(len(b) == 6 for b in batches)
        shares = [[b.tolist() for (b,) in loader] for loader in shards]
        assert [sum((s[k] for s in shares), []) for k in range(len(batches))] == batches
    with pytest.raises(SospError, match="^batch_size=6 is not divisible by the 4 processes"):
        distributed.GlobalBatchShards(23, 6, torch.Generator(), 0, 4)


def sosp_run(tmp_path, name: str | None, processes: int, *overrides):
    """``sosp-run experiment=smoke`` in one process, or under torchrun with ``processes``, in
    ``tmp_path / name`` (None: the configured directory below ``tmp_path``, which must be the
    only one there). Returns the run directory and the standard output."""
    import subprocess
    import sys
    launch = [sys.executable, "-m", "sosp_cli.cli"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "-m", "sosp_cli.cli"]
    where = [] if name is None else [f"hydra.run.dir={tmp_path / name}"]
    done = subprocess.run(launch + ["experiment=smoke", f"pretrain.cache_dir={tmp_path / 'cache'}", *where,
                                    *overrides], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    if name is None:
        (out,) = (tmp_path / "outputs" / "runs").iterdir()   # every rank in one directory
        return out, done.stdout
    return tmp_path / name, done.stdout


def test_torchrun_runs_the_pipeline_with_the_single_process_saliency(tmp_path):
    """``torchrun --nproc_per_node=2 -m sosp_cli.cli``: one run directory (named by the torchrun
    run id, as no ``hydra.run.dir`` is given) written by rank 0,
    one summary, one metrics line per epoch, and saliencies equal to one process's on the same
    pretrained model (the cache: pretrained once, by the single-process run)."""
    import json
    one, _ = sosp_run(tmp_path, "one", 1, "method=sosp_i")
    two, stdout = sosp_run(tmp_path, None, 2, "method=sosp_i")
    assert two.name.startswith("torchrun-")
    assert stdout.count("top-1 after fine-tuning") == 1
    a = torch.load(one / "saliency.pt", weights_only=False)
    b = torch.load(two / "saliency.pt", weights_only=False)
    assert a["names"] == b["names"] and a["num_samples"] == b["num_samples"] == 64
    assert torch.allclose(a["scores"], b["scores"], rtol=1e-4, atol=1e-7)
    result = json.loads((two / "result.json").read_text())
    assert result["processes"] == 2 and json.loads((one / "result.json").read_text())["processes"] == 1
    lines = [json.loads(ln) for ln in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in lines] == ["finetune"]   # pretrained by the first run (the cache)
    assert sorted(p.name for p in two.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in one.iterdir() if not p.name.startswith("."))


@pytest.mark.slow   # ~30 s; `pytest -m slow`
def test_torchrun_pretrains_prunes_in_steps_and_resumes(tmp_path):
    """Data-parallel pretraining into the shared cache, two prune steps with fine-tuning between,
    diagnostics; the same command again finds every artefact and recomputes nothing."""
    import json
    args = ("seed=1", "prune.steps=2", "prune.step_epochs=1", "prune.diagnostics=true")
    out, _ = sosp_run(tmp_path, "two", 2, *args)
    stages = [json.loads(ln)["stage"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["pretrain", "step1-finetune", "finetune"]   # one line per epoch: rank 0 writes
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    result = json.loads((out / "result.json").read_text())
    assert result["processes"] == 2 and result["steps"] == 2 and "predicted_second_order" in result["diagnostics"]
    made = {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")}
    assert {"pretrained.pt", "saliency.pt", "saliency_step2.pt", "pruned_step1.pt", "pruned.pt",
            "finetuned.pt"} <= set(made)
    again, stdout = sosp_run(tmp_path, "two", 2, *args)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")} == made
    assert json.loads((out / "result.json").read_text())["top1_finetuned"] == result["top1_finetuned"]


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "multirun"])
def test_sosp_run_leaves_the_process_group_after_its_last_job(multirun, tmp_path, monkeypatch):
    """``sosp-run`` leaves the process group (:func:`distributed.finish`) once this process runs
    no further job: a single run at its end, a multirun after its last point, not before. In
    this process (``cli.main``, with Hydra), in a gloo group of one process."""
    import sys
    from sosp_cli import cli
    calls, finish = [], distributed.finish
    def recorded():
        calls.append((dist.is_initialized(), len(list(tmp_path.rglob("result.json")))))
        finish()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: None)
    monkeypatch.setattr(distributed, "finish", recorded)
    where = [f"hydra.sweep.dir={tmp_path / 'sweep'}", "prune.ratio=0.3,0.5", "-m"] if multirun else \
        [f"hydra.run.dir={tmp_path / 'run'}"]
    monkeypatch.setattr(sys, "argv", ["sosp-run", "experiment=smoke", "method=l1",
                                      f"pretrain.cache_dir={tmp_path / 'cache'}", *where])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cli.main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert calls == ([(True, 2)] if multirun else [(True, 1), (False, 1)])


def test_torchrun_output_directories_are_named_alike_on_every_rank():
    """``${run_stamp:...}`` (configs/config.yaml): the time alone, the torchrun run id under
    torchrun with several processes; the composed directories carry it."""
    import re
    from hydra import compose, initialize_config_dir
    from sosp_cli.cli import CONFIG_DIR, run_stamp
    env = {"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "abc"}
    assert run_stamp("%Y", env) == "torchrun-abc"
    for alone in ({}, {"WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "abc"}, {"WORLD_SIZE": "2"}):
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}-\d{6}", run_stamp("%Y-%m-%d_%H-%M-%S-%f", alone))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["method=l1"], return_hydra_config=True)
    stamp = r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}-\d{6}"
    assert re.fullmatch(rf"outputs/runs/{stamp}_digits_resnet20_l1_r0.5_s0", cfg.hydra.run.dir)
    assert re.fullmatch(rf"outputs/multirun/{stamp}", cfg.hydra.sweep.dir)


@pytest.mark.slow   # ~30 s; `pytest -m slow`
def test_submitit_launcher_runs_a_sweep_point_as_a_job_of_two_tasks(tmp_path):
    """Hydra's submitit launcher (``submitit_local``: what ``submitit_slurm`` does on a cluster,
    with local processes): a job of two tasks gets torch's environment from submitit
    (``distributed.export_submitit_environment``) and runs one data-parallel run; the sweep's
    report follows."""
    import json
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "sosp_cli.cli", "-m", "hydra/launcher=submitit_local",
                           "hydra.launcher.tasks_per_node=2", "experiment=smoke", "method=taylor",
                           f"pretrain.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = (tmp_path / "sweep").glob("*/result.json")
    assert json.loads(result.read_text())["processes"] == 2
    assert (tmp_path / "sweep" / "report.csv").exists()


def test_every_rank_waits_for_a_lock_another_run_holds_in_short_collectives(tmp_path):
    """The pretrain-cache lock, held by another run for a while: rank 0 retries and every rank
    learns the outcome of each try (so no collective lasts longer than one try), and all enter
    once the other run releases it."""
    import subprocess
    import sys
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, time; from filelock import FileLock\n"
        f"with FileLock({str(tmp_path / 'cache.lock')!r}):\n"
        "    print('held', flush=True)\n"
        f"    while not os.path.exists({str(tmp_path / 'trying0')!r}): time.sleep(0.05)\n"
        "    time.sleep(1.5)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    ranks = run_ranks("lock", tmp_path)
    assert holder.wait(timeout=30) == 0
    for r in ranks:
        assert r["tries"] >= 3 and r["seconds"] >= 1.0
    assert ranks[0]["tries"] == ranks[1]["tries"]
