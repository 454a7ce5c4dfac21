"""Datasets (DESIGN.md §6): train / validation / test splits for every dataset.

- ``digits``: scikit-learn's bundled 8×8 handwritten digits (1,797 real images, 10 classes),
  upsampled to ``image_size`` (32 by default) — the offline dataset for quick runs and tests.
- ``cifar10`` / ``cifar100``: the standard python-pickle batches (``cifar-10-batches-py`` /
  ``cifar-100-python``) under ``root``; downloaded there with torchvision when
  ``download=true`` and online. Validation = ``val_size`` images held out of the training set.
  Resized per image to ``image_size`` when it is not 32.
- ``imagenet``: an ImageFolder tree, ``root/train/<class>/*`` and ``root/val/<class>/*``; the
  validation split is held out of ``train/``, ``val/`` is the reported test split.

A missing dataset raises a one-line SospError naming where it looked and what to pass.
"""
from __future__ import annotations

import os
import pickle
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from . import distributed
from .errors import SospError, check_choice, describe

CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
# the python-pickle batches torchvision downloads: folder, train files, test files, label key, classes
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    train_eval: Dataset | None = None  # the training images without augmentation (saliency)


class TensorImages(Dataset):
    """Images held in memory as a float tensor [N, C, H, W], with optional train augmentation
    (random crop after zero padding, optional horizontal flip), then resized to ``size`` × ``size``
    (bilinear, antialiased) when ``size`` is given and differs from the stored images: the
    tensor stays at its own resolution, so CIFAR at 224 × 224 costs no more memory than at 32."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False,
                 pad: int = 4, flip: bool = True, size: int | None = None):
        self.images, self.labels = images, labels
        self.augment, self.pad, self.flip = augment, pad, flip
        self.size = None if size is None or tuple(images.shape[-2:]) == (size, size) else size

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        if self.augment:
            h, w = x.shape[-2:]
            x = F.pad(x, (self.pad,) * 4)
            top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[:, top:top + h, left:left + w]
            if self.flip and torch.rand(()) < 0.5:
                x = x.flip(-1)
        if self.size is not None:
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True)[0]
        return x, self.labels[i]


def _split_indices(n: int, held_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return perm[held_out:], perm[:held_out]


def load_digits(image_size: int = 32, split_seed: int = 0, augment: bool = True) -> Splits:
    """Digits: 70 % train / 10 % val / 20 % test, stratification-free fixed permutation."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.tensor(bunch.target, dtype=torch.long)
    perm = np.random.default_rng(split_seed).permutation(len(y))
    n_test, n_val = int(0.2 * len(y)), int(0.1 * len(y))
    test, val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    pad = max(1, image_size // 8)
    return Splits(TensorImages(x[train], y[train], augment, pad=pad, flip=False),
                  TensorImages(x[val], y[val]), TensorImages(x[test], y[test]),
                  num_classes=10, in_channels=1, image_size=image_size,
                  train_eval=TensorImages(x[train], y[train]))


def _read_cifar_batches(folder: Path, files: list[str], label_key: str):
    images, labels = [], []
    for f in files:
        try:   # a truncated download, or another file under the expected name
            with open(folder / f, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry[label_key])
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's bad input
            raise SospError(f"{folder / f} is not a CIFAR python batch ({describe(exc)}); "
                            "download it again (dataset.download=true when online)") from None
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long)


def load_cifar(name: str, root: str, download: bool = False, val_size: int = 5000,
               split_seed: int = 0, augment: bool = True, image_size: int = 32) -> Splits:
    """CIFAR-10/100 from the python-pickle batches (the format torchvision downloads); resized
    per image to ``image_size`` when it is not 32 (after augmentation, at 32 × 32)."""
    folder, train_files, test_files, key, classes = CIFAR_FILES[name]
    path = Path(root).expanduser() / folder
    if download and not path.exists():
        from torchvision import datasets
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        try:
            cls(root=str(Path(root).expanduser()), download=True)
        except (OSError, RuntimeError) as exc:   # offline (URLError), a corrupt archive (RuntimeError)
            raise SospError(f"dataset.download=true: {name} could not be downloaded into "
                            f"{Path(root).expanduser()} ({describe(exc)}); without internet, put the "
                            f"python batches ('{folder}') under dataset.root") from None
    check_dataset_present(name, root)
    x_train, y_train = _read_cifar_batches(path, train_files, key)
    x_test, y_test = _read_cifar_batches(path, test_files, key)
    mean = torch.tensor(CIFAR_MEAN[name]).view(3, 1, 1)
    std = torch.tensor(CIFAR_STD[name]).view(3, 1, 1)
    norm = lambda x: (x.float() / 255.0 - mean) / std  # noqa: E731
    if not 0 <= val_size < len(y_train):
        raise SospError(f"dataset.val_size={val_size} must be in [0, {len(y_train)})")
    train_idx, val_idx = _split_indices(len(y_train), val_size, split_seed)
    x_train = norm(x_train)
    return Splits(TensorImages(x_train[train_idx], y_train[train_idx], augment, size=image_size),
                  TensorImages(x_train[val_idx], y_train[val_idx], size=image_size),
                  TensorImages(norm(x_test), y_test, size=image_size),
                  num_classes=classes, in_channels=3, image_size=image_size,
                  train_eval=TensorImages(x_train[train_idx], y_train[train_idx], size=image_size))


def read_image(path: str):
    """torchvision's ImageFolder loader (PIL, RGB), with an image it cannot decode — a truncated
    download, a file that is not an image — named in one line instead of PIL's traceback from
    a DataLoader worker, hours into an epoch."""
    from PIL import Image
    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SospError(f"cannot read image {path} ({describe(exc)}); replace or remove it, "
                        "then resume the run") from None


def load_imagenet(root: str, image_size: int = 224, val_size: int = 10000,
                  split_seed: int = 0, augment: bool = True) -> Splits:
    """ImageNet-style ImageFolder tree: ``root/train`` (train + held-out val), ``root/val`` (test)."""
    from torchvision import datasets, transforms as T

    base = Path(root).expanduser()
    check_dataset_present("imagenet", root)
    resize = int(round(image_size / 0.875))
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    eval_tf = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), normalize])
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                          normalize]) if augment else eval_tf
    try:   # torchvision refuses a folder without class folders, or a class folder without images
        train_full = datasets.ImageFolder(str(base / "train"), transform=train_tf, loader=read_image)
        train_eval = datasets.ImageFolder(str(base / "train"), transform=eval_tf, loader=read_image)
        test = datasets.ImageFolder(str(base / "val"), transform=eval_tf, loader=read_image)
    except FileNotFoundError as exc:
        raise SospError(f"imagenet: {exc} (dataset.root={root} must hold train/<class>/<image> "
                        "and val/<class>/<image>)") from None
    if test.classes != train_full.classes:
        raise SospError(f"imagenet: class folders of {base / 'val'} differ from {base / 'train'}")
    if len(train_full.classes) < 2:
        raise SospError(f"imagenet: {base / 'train'} has {len(train_full.classes)} class folder "
                        f"({train_full.classes[0]}); a classifier needs at least 2")
    val_size = min(val_size, len(train_full) // 10) if val_size else 0
    train_idx, val_idx = _split_indices(len(train_full), val_size, split_seed)
    return Splits(Subset(train_full, train_idx.tolist()), Subset(train_eval, val_idx.tolist()), test,
                  num_classes=len(train_full.classes), in_channels=3, image_size=image_size,
                  train_eval=Subset(train_eval, train_idx.tolist()))


def check_dataset_options(name: str, image_size: int, val_size: int, num_workers: int = 0,
                          split_seed: int = 0) -> None:
    """A one-line SospError for a dataset option that loading would refuse or misread."""
    check_choice("dataset", name, DATASETS)
    if image_size < 1:
        raise SospError(f"dataset.image_size={image_size} must be >= 1")
    if val_size < 0:   # digits splits 70/10/20 and does not read it; a negative count is a mistake anywhere
        raise SospError(f"dataset.val_size={val_size} must be >= 0")
    if split_seed < 0:
        raise SospError(f"dataset.split_seed={split_seed} must be >= 0 (numpy's generator seeds the split)")
    if num_workers < 0:
        raise SospError(f"dataset.num_workers={num_workers} must be >= 0 (0: load in the main process)")


def check_dataset_present(name: str, root: str, download: bool = False) -> None:
    """A one-line SospError naming where ``name`` was looked for, if its files are not under
    ``root`` (DESIGN.md §6: a missing dataset is an error, never a silent substitute). Digits
    ships with scikit-learn; a CIFAR set with ``download`` is fetched by the run."""
    base = Path(root).expanduser()
    if name in CIFAR_FILES and not download:
        folder, train_files, test_files = CIFAR_FILES[name][:3]
        missing = [f for f in train_files + test_files if not (base / folder / f).exists()]
        if missing:
            raise SospError(f"{name} not found: looked for {base / folder}/{missing[0]}; pass "
                            f"dataset.root=DIR (the folder holding '{folder}') or "
                            "dataset.download=true when online")
    if name == "imagenet":
        for sub in ("train", "val"):
            if not (base / sub).is_dir():
                raise SospError(f"imagenet not found: looked for the folder {base / sub}; pass "
                                "dataset.root=DIR holding train/<class>/* and val/<class>/*")


def load_dataset(name: str, root: str = "data", download: bool = False, image_size: int = 32,
                 val_size: int = 5000, split_seed: int = 0, augment: bool = True) -> Splits:
    check_dataset_options(name, image_size, val_size, split_seed=split_seed)
    if name == "digits":
        return load_digits(image_size, split_seed, augment)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, root, download, val_size, split_seed, augment, image_size)
    return load_imagenet(root, image_size, val_size, split_seed, augment)


def _quiet_sigterm(worker_id: int) -> None:
    """In a loader's worker process: SIGTERM ends it with exit status 0. A scheduler (SLURM at a
    time limit) signals every process of the job at once, and a worker killed by the signal made
    the main process stop with "DataLoader worker ... is killed by signal: Terminated" before
    its own handler could stop the run with its resume line (``sosp_cli.cli.stop_on_sigterm``);
    a worker that exits 0 is not reported at once. (Not ignored: the main process, and Python's
    exit, stop their workers with SIGTERM and wait for them.)"""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0,
                num_workers: int = 0, pin_memory: bool = False, drop_last: bool = False,
                across_ranks: bool = False) -> DataLoader:
    """A DataLoader whose shuffling is driven by its own generator (``loader.generator``),
    reseeded per epoch by the trainer so that a resumed run sees the same batches.
    ``across_ranks`` (a training loader under several processes): this rank's share of each
    batch the single-process loader draws (:class:`.distributed.GlobalBatchShards`)."""
    generator = torch.Generator().manual_seed(seed)
    common = dict(generator=generator, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=num_workers > 0,
                  worker_init_fn=_quiet_sigterm if num_workers > 0 else None)
    if across_ranks and distributed.active():
        if not (shuffle and drop_last):
            raise ValueError("across_ranks: only a shuffled training loader with drop_last")
        return DataLoader(dataset, batch_sampler=distributed.GlobalBatchShards(
            len(dataset), batch_size, generator), **common)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, **common)


def take_batches(dataset: Dataset, num_samples: int, batch_size: int, seed: int = 0):
    """The first ``num_samples`` of a seeded permutation of ``dataset``, as a list of batches
    (the saliency samples: the same for every method of a sweep with the same seed)."""
    n = min(num_samples, len(dataset))
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False)
    return [(x, y) for x, y in loader]
