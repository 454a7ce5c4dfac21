"""Datasets: the bundled digits, and the real-dataset code paths on small local fixtures."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from sosp_cli.data import load_dataset, take_batches
from sosp_cli.errors import SospError


def test_digits_splits_are_real_disjoint_and_fixed_by_seed():
    a = load_dataset("digits", image_size=32, split_seed=0)
    b = load_dataset("digits", image_size=32, split_seed=0)
    c = load_dataset("digits", image_size=32, split_seed=1)
    assert (len(a.train), len(a.val), len(a.test)) == (1259, 179, 359)
    assert a.train_eval.images.shape == (1259, 1, 32, 32) and a.num_classes == 10
    assert torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.test.images, c.test.images)
    # real images: the ten classes are all present and the pixels are not noise (digits are smooth)
    assert set(a.test.labels.tolist()) == set(range(10))
    img = a.test.images[0, 0]
    assert (img[1:] - img[:-1]).abs().mean() < img.std()


def _write_cifar(root, name, n_train=20, n_test=10):
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


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_reads_the_python_batches(tmp_path, name, classes):
    _write_cifar(tmp_path, name)
    s = load_dataset(name, root=str(tmp_path), val_size=10)
    n_train = 100 if name == "cifar10" else 20
    assert len(s.train) + len(s.val) == n_train and len(s.val) == 10 and len(s.test) == 10
    assert s.num_classes == classes and s.train[0][0].shape == (3, 32, 32)
    batches = take_batches(s.train_eval, 8, 4)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 32, 32)] * 2


def test_missing_cifar_says_where_it_looked(tmp_path):
    with pytest.raises(SospError, match=str(tmp_path / "cifar-10-batches-py")):
        load_dataset("cifar10", root=str(tmp_path))


def test_imagenet_imagefolder_tree(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("n01", "n02", "n03"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    s = load_dataset("imagenet", root=str(tmp_path), image_size=24, val_size=3)
    assert s.num_classes == 3 and len(s.test) == 6
    assert len(s.train) + len(s.val) == 18
    x, y = s.train[0]
    assert x.shape == (3, 24, 24) and s.test[0][0].shape == (3, 24, 24)


def test_missing_imagenet_and_unknown_dataset(tmp_path):
    with pytest.raises(SospError, match="train"):
        load_dataset("imagenet", root=str(tmp_path))
    with pytest.raises(SospError, match="accepted: cifar10, cifar100, digits, imagenet"):
        load_dataset("mnist")
