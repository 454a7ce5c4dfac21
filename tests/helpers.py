"""Compose run configs exactly as the CLI does, for in-process pipeline tests."""
from pathlib import Path

from hydra import compose, initialize_config_dir

from sosp_cli.cli import CONFIG_DIR, to_run_config


def compose_run(overrides, tmp_path: Path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides) + [f"pretrain.cache_dir={tmp_path / 'cache'}"])
    return to_run_config(cfg)
