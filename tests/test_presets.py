"""Every experiment preset composes, every value of its sweep composes, and it runs end to end
through ``debug=smoke`` (one job of the sweep, or the whole bottleneck experiment)."""
import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from sosp_cli import bottleneck, pipeline
from sosp_cli.cli import CONFIG_DIR, to_run_config
from sosp_cli.errors import OtherConfig

PRESETS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
PAPER = [p for p in PRESETS if p.startswith("paper_")]


def compose_preset(name, extra=(), tmp_path=None, hydra_config=False):
    overrides = [f"experiment={name}"] + list(extra)
    if tmp_path is not None:
        overrides.append(f"pretrain.cache_dir={tmp_path / 'cache'}")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_config)


def test_every_paper_experiment_has_a_digits_twin():
    assert {"paper_cifar10", "paper_imagenet", "paper_scaling", "paper_bottleneck"} <= set(PAPER)
    for name in PAPER:
        if not name.endswith("_digits"):
            assert f"{name}_digits" in PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_preset_and_every_sweep_value_compose(name):
    cfg = compose_preset(name, hydra_config=True)
    run_cfg = to_run_config(compose_preset(name))
    assert run_cfg.experiment_name == name
    params = cfg.hydra.sweeper.params or {}
    if name.startswith("paper_") and run_cfg.task == "prune":
        assert cfg.hydra.mode.name == "MULTIRUN" and params
    for key, values in params.items():
        for value in str(values).split(","):
            to_run_config(compose_preset(name, [f"{key}={value}"]))


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_through_debug_smoke(name, tmp_path):
    run_cfg = to_run_config(compose_preset(name, ["debug=smoke"], tmp_path))
    assert run_cfg.dataset.name == "digits" and run_cfg.dataset.image_size == 16
    if run_cfg.task == "bottleneck":
        out = bottleneck.run(run_cfg, tmp_path / "run")
        assert (tmp_path / "run" / "bottlenecks.json").exists()
        assert (tmp_path / "run" / "bottleneck.png").exists()
        assert out["bottlenecks"]["override"].startswith("model.width=[")
        # the folders check_folder reads before anything runs are every sub-run the experiment
        # made; another widening is refused at its widened variant's first run
        folders = {f for _, _, f in bottleneck.sub_runs(run_cfg, out["bottlenecks"]["widths"])}
        assert folders == {p.parent.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("result.json")}
        bottleneck.check_folder(run_cfg, tmp_path / "run")
        b = run_cfg.bottleneck
        wider = dataclasses.replace(run_cfg, bottleneck=dataclasses.replace(b, widen_factor=2 * b.widen_factor))
        first = tmp_path / "run" / "bottleneck" / f"r{b.ratios[0]}_s{b.seeds[0]}"
        with pytest.raises(OtherConfig, match=f"^{first / 'pretrained.pt'} was made by a different config"):
            bottleneck.check_folder(wider, tmp_path / "run")
    else:
        result = pipeline.run(run_cfg, tmp_path / "run")
        assert result["experiment"] == name
