"""Compose run configs exactly as the CLI does, for in-process pipeline tests; write small
real-dataset fixtures (CIFAR python batches, an ImageFolder tree) for the dataset code paths."""
import pickle
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from sosp_cli.cli import CONFIG_DIR, to_run_config


def compose_run(overrides, tmp_path: Path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides) + [f"pretrain.cache_dir={tmp_path / 'cache'}"])
    return to_run_config(cfg)


def write_cifar(root: Path, name: str, n_train: int = 20, n_test: int = 10) -> None:
    """``root/cifar-10-batches-py`` (``n_train`` images per data batch, five batches) or
    ``root/cifar-100-python``, in the python-pickle format torchvision downloads."""
    if name == "cifar10":
        folder, train, test, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"
        classes = 10
    else:
        folder, train, test, key = root / "cifar-100-python", ["train"], ["test"], "fine_labels"
        classes = 100
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for files, n in ((train, n_train), (test, n_test)):
        for f in files:
            entry = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                     key: rng.integers(0, classes, n).tolist()}
            with open(folder / f, "wb") as fh:
                pickle.dump(entry, fh)


def write_imagefolder(root: Path, classes, n_train: int, n_val: int, shape=(40, 48, 3)) -> None:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png``: an ImageNet-style tree."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(d / f"{i}.png")
