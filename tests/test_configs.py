"""Every config option composes against the typed schema, and names match the registries."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from sosp_cli.cli import CONFIG_DIR
from sosp_cli.data import DATASETS
from sosp_cli.models import TORCHVISION, list_models
from sosp_cli.pruning import list_criteria
from helpers import compose_run


def options(group):
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def test_config_groups_match_registries():
    assert [o for o in options("model") if o != "torchvision"] == list_models()   # + torchvision.<name>
    assert options("method") == list_criteria()
    assert options("dataset") == sorted(DATASETS)


@pytest.mark.parametrize("group", ["dataset", "model", "method", "schedule", "experiment"])
def test_every_option_composes(group, tmp_path):
    for name in options(group):
        cfg = compose_run([f"{group}={name}"], tmp_path)
        if group in ("dataset", "model", "method"):
            assert getattr(cfg, group).name == (TORCHVISION + "efficientnet_b0" if name == "torchvision" else name)
        if group == "schedule":
            assert cfg.schedule.name == name and cfg.schedule.pretrain.epochs >= 1


def test_documented_schedule_numbers():
    cfg = compose_run(["schedule=cifar"], Path("/tmp"))
    p, f = cfg.schedule.pretrain, cfg.schedule.finetune
    assert (p.epochs, p.lr, p.batch_size, p.momentum, p.nesterov, p.weight_decay) == (200, 0.1, 128, 0.9, True, 5e-4)
    assert (f.epochs, f.lr) == (40, 0.01)


@pytest.mark.parametrize("overrides,label", [
    (["method=l1", "prune.ratio=0.3", "seed=2"], "l1_r0.3_s2"),
    (["experiment=paper_bottleneck_digits"], "sosp_h_bottleneck"),   # its ratios/seeds are bottleneck.*
    (["task=bottleneck", "method=taylor"], "taylor_bottleneck"),
])
def test_output_directories_name_what_the_run_varies(overrides, label):
    import re
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    assert re.fullmatch(rf"outputs/runs/[\d_-]+_digits_resnet20_{label}", cfg.hydra.run.dir)
    cfg.hydra.job.num = 7   # set by the launcher for each sweep point
    assert cfg.hydra.sweep.subdir == f"7_{label}"


def test_help_names_the_command_lists_every_option_and_its_examples_compose(tmp_path, monkeypatch, capsys):
    """``sosp-run --help`` (Hydra's help, with our header): the command's own name, every
    method / model / dataset, and example commands that compose (sweeps: their first values)."""
    import sys
    from sosp_cli import cli
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: None)
    monkeypatch.setattr(sys, "argv", ["sosp-run", "--help"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code in (0, None)
    text = capsys.readouterr().out
    assert text.startswith("sosp-run: ") and "cli is powered" not in text
    for group in ("method", "model", "dataset"):
        assert f"{group}: {', '.join(options(group))}\n" in text
    examples = [ln.split()[1:] for ln in text.splitlines() if ln.startswith("  sosp-run ")]
    assert len(examples) >= 3
    for args in examples:
        compose_run([a.split(",")[0] for a in args if a != "-m"], tmp_path)


def test_sweep_variants_put_every_value_to_the_test_once():
    """k compositions for k sweep values in all (not their product): each sweep at each value,
    the others at their first; a sweep it cannot expand (glob) is left to Hydra (None)."""
    from sosp_cli.cli import sweep_variants
    assert sweep_variants(["experiment=smoke", "method=l1,l2,taylor", "seed=range(0,2)", "+x=1"]) == [
        ["experiment=smoke", "method=l1", "seed=0", "+x=1"],
        ["experiment=smoke", "method=l2", "seed=0", "+x=1"],
        ["experiment=smoke", "method=taylor", "seed=0", "+x=1"],
        ["experiment=smoke", "method=l1", "seed=1", "+x=1"],
    ]
    assert sweep_variants(["model.width=[1,2,1],0.5"]) == [["model.width=[1,2,1]"], ["model.width=0.5"]]
    assert sweep_variants(["method=glob(sosp*)"]) is None


def test_a_presets_own_sweep_is_checked_before_its_first_point(monkeypatch, tmp_path):
    """A preset that sweeps by itself (``hydra.mode: MULTIRUN`` and its sweeper's params, no -m on
    the command line) has every value checked as a -m sweep's are — a missing dataset is one
    line, not one error per point of a 648-point sweep, each with its folder — and the command
    line's value of a key replaces the preset's sweep of it, as in Hydra's basic sweeper."""
    from sosp_cli import cli
    from sosp_cli.errors import SospError
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SospError, match=f"^cifar10 not found: looked for {tmp_path / 'none'}"):
        cli.precheck(["experiment=paper_cifar10", f"dataset.root={tmp_path / 'none'}"])
    cli.precheck(["experiment=paper_cifar10", f"dataset.root={tmp_path / 'none'}", "hydra/launcher=submitit_slurm"])
    with pytest.raises(SospError, match=r"prune.ratio=1.2 is outside \[0, 1\)"):
        cli.precheck(["experiment=paper_cifar10_digits", "prune.ratio=0.3,1.2"])
    assert not list(tmp_path.iterdir())   # no sweep folder, no point's folder
    seen = []
    monkeypatch.setattr(cli, "check_point", lambda cfg, here: seen.append(
        (cfg.model.name, cfg.method.name, cfg.prune.ratio, cfg.seed, here)))
    cli.precheck(["experiment=paper_cifar10_digits"])
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        params = compose("config", overrides=["experiment=paper_cifar10_digits"],
                         return_hydra_config=True).hydra.sweeper.params
    for i, key in enumerate(("model", "method", "prune.ratio", "seed")):
        assert {str(point[i]) for point in seen} == set(str(params[key]).split(",")), key
    assert all(point[4] for point in seen)
    seen.clear()
    cli.precheck(["-m", "experiment=paper_cifar10_digits", "method=l1,taylor", "seed=3"])
    assert {p[1] for p in seen} == {"l1", "taylor"} and {p[3] for p in seen} == {3}
    assert {p[0] for p in seen} == {"resnet20", "vgg16"}
    seen.clear()
    # a single run is checked here too, before Hydra makes its folder — on this machine, also
    # with a launcher that would send a sweep's points elsewhere (a single run runs here)
    cli.precheck(["experiment=smoke", "method=l1", "hydra/launcher=submitit_slurm"])
    assert seen == [("resnet20", "l1", 0.5, 0, True)]


def test_a_presets_sweep_merges_with_the_command_line_as_hydras_sweeper_does():
    from sosp_cli.cli import swept_overrides
    assert swept_overrides({"model": "a,b", "seed": "0,1"}, ["experiment=x", "seed=5", "+y=1"]) == [
        "model=a,b", "seed=5", "experiment=x", "+y=1"]


def test_sweep_points_are_checked_on_this_machine_unless_slurm_runs_them(monkeypatch, tmp_path):
    """A multirun's values are checked as its points would check them, before any runs — also
    what only the machine that runs a point can answer (a CUDA device, the dataset's and the
    weights' files), unless a launcher sends the points elsewhere (SLURM): then only that is
    left out."""
    from sosp_cli import cli, utils
    from sosp_cli.errors import SospError
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(utils.torch.cuda, "is_available", lambda: False)
    machine = ["device=cpu,cuda", "dataset=digits,cifar10", f"dataset.root={tmp_path / 'none'}",
               f"pretrain.checkpoint=null,{tmp_path / 'none.pt'}"]
    for launcher in ([], ["hydra/launcher=basic"], ["hydra/launcher=submitit_local"]):
        with pytest.raises(SospError, match="device=cuda but no CUDA device is available"):
            cli.precheck(["-m", "experiment=smoke"] + launcher + machine)
        with pytest.raises(SospError, match=f"cifar10 not found: looked for {tmp_path / 'none'}"):
            cli.precheck(["-m", "experiment=smoke"] + launcher + machine[1:])
        with pytest.raises(SospError, match=f"pretrain.checkpoint={tmp_path / 'none.pt'} does not exist"):
            cli.precheck(["-m", "experiment=smoke"] + launcher + machine[3:])
    cli.precheck(["-m", "experiment=smoke", "hydra/launcher=submitit_slurm"] + machine)
    for bad, needle in ((["device=cpu,gpu"], "unknown device 'gpu'"),
                        (["prune.ratio=0.3,1.2"], r"prune.ratio=1.2 is outside \[0, 1\)")):
        with pytest.raises(SospError, match=needle):
            cli.precheck(["-m", "experiment=smoke", "hydra/launcher=submitit_slurm"] + bad)
    # a single run runs here, whatever the launcher: checked here, before Hydra makes its folder
    with pytest.raises(SospError, match="device=cuda but no CUDA device is available"):
        cli.precheck(["experiment=smoke", "device=cuda", "hydra/launcher=submitit_slurm"])
    with pytest.raises(SospError, match=f"cifar10 not found: looked for {tmp_path / 'none'}"):
        cli.precheck(["experiment=smoke", "dataset=cifar10", f"dataset.root={tmp_path / 'none'}"])
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.pt"))
