"""Datasets: the bundled digits, and the real-dataset code paths on small local fixtures."""
import pytest
import torch

from helpers import write_cifar, write_imagefolder
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


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_reads_the_python_batches(tmp_path, name, classes):
    write_cifar(tmp_path, name)
    s = load_dataset(name, root=str(tmp_path), val_size=10)
    n_train = 100 if name == "cifar10" else 20
    assert len(s.train) + len(s.val) == n_train and len(s.val) == 10 and len(s.test) == 10
    assert s.num_classes == classes and s.train[0][0].shape == (3, 32, 32)
    batches = take_batches(s.train_eval, 8, 4)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 32, 32)] * 2


@pytest.mark.parametrize("size", [16, 48])
def test_cifar_is_resized_per_image_to_image_size(tmp_path, size):
    """dataset.image_size on CIFAR: every split comes at size × size, the stored tensor stays at
    32 × 32, and an image is the antialiased bilinear resize of the stored one."""
    import torch.nn.functional as F
    write_cifar(tmp_path, "cifar10")
    s = load_dataset("cifar10", root=str(tmp_path), val_size=10, image_size=size)
    assert s.image_size == size
    for split in (s.train, s.val, s.test, s.train_eval):
        assert split[0][0].shape == (3, size, size) and split.images.shape[-2:] == (32, 32)
    expected = F.interpolate(s.test.images[:1], size=(size, size), mode="bilinear", antialias=True)[0]
    assert torch.equal(s.test[0][0], expected) and not torch.equal(s.test[0][0], s.test[1][0])
    assert [tuple(x.shape) for x, _ in take_batches(s.train_eval, 8, 4)] == [(4, 3, size, size)] * 2


def test_missing_cifar_says_where_it_looked(tmp_path):
    with pytest.raises(SospError, match=str(tmp_path / "cifar-10-batches-py")):
        load_dataset("cifar10", root=str(tmp_path))


def test_imagenet_imagefolder_tree(tmp_path):
    write_imagefolder(tmp_path, ("n01", "n02", "n03"), n_train=6, n_val=2)
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


@pytest.mark.parametrize("layout, needle", [
    ("no class folders", "Couldn't find any class folder in .*train"),
    ("a class without images", "Found no valid file for the classes n01"),
    ("one class", r".*train has 1 class folder \(n01\); a classifier needs at least 2"),
    ("other classes in val", "class folders of .*val differ from .*train"),
])
def test_an_imagefolder_tree_sosp_cannot_train_on_is_one_line_naming_it(tmp_path, layout, needle):
    if layout == "no class folders":
        (tmp_path / "train").mkdir()
        (tmp_path / "val").mkdir()
    elif layout == "a class without images":
        write_imagefolder(tmp_path, ("n01",), n_train=0, n_val=0)
    elif layout == "one class":
        write_imagefolder(tmp_path, ("n01",), n_train=2, n_val=1)
    else:
        write_imagefolder(tmp_path, ("n01", "n02"), n_train=2, n_val=1)
        (tmp_path / "val" / "n02").rename(tmp_path / "val" / "n03")
    with pytest.raises(SospError, match=f"^imagenet: {needle}") as err:
        load_dataset("imagenet", root=str(tmp_path), image_size=24, val_size=0)
    assert "\n" not in str(err.value)


def test_an_unreadable_cifar_batch_is_one_line_naming_the_file(tmp_path):
    write_cifar(tmp_path, "cifar10")
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:100])   # a truncated download
    with pytest.raises(SospError, match=f"^{bad} is not a CIFAR python batch \\(UnpicklingError: .*\\); "
                                        "download it again") as err:
        load_dataset("cifar10", root=str(tmp_path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"not an image", "truncated"])
def test_an_image_that_cannot_be_read_is_one_line_naming_it_also_from_a_worker(tmp_path, content, monkeypatch):
    """A file that is not an image, or a PNG cut short (a broken download), read by the loader
    in this process or in a DataLoader worker — which re-raises with the worker's traceback in
    the message: ``errors.message`` gives the one line the CLI prints. (PyTorch's workers do
    not end on their own after one raised: the iterator, once collected, waits for each in turn
    ``MP_STATUS_CHECK_INTERVAL`` — 5 s — before it stops them; shortened here, and collected
    within the test.)"""
    import gc
    from torch.utils.data import DataLoader, _utils
    from sosp_cli.errors import message

    monkeypatch.setattr(_utils, "MP_STATUS_CHECK_INTERVAL", 0.2)

    write_imagefolder(tmp_path, ("n01", "n02"), n_train=3, n_val=1)
    bad = tmp_path / "train" / "n01" / "0.png"
    bad.write_bytes(content if isinstance(content, bytes) else bad.read_bytes()[:200])
    splits = load_dataset("imagenet", root=str(tmp_path), image_size=16, val_size=0)
    for workers in (0, 2):
        with pytest.raises(SospError) as err:
            list(DataLoader(splits.train, batch_size=6, num_workers=workers))
        line = message(err.value)
        assert line.startswith(f"cannot read image {bad} (") and line.endswith(
            "; replace or remove it, then resume the run") and "\n" not in line, line
        assert ("Original Traceback" in str(err.value)) == (workers > 0)
        del err
        gc.collect()   # the iterator of the workers, held by the traceback: its workers stopped now


def test_a_download_that_fails_is_one_line(tmp_path, monkeypatch):
    """``dataset.download=true`` where the internet cannot be reached (as here): torchvision's
    URLError becomes one line saying what to do instead."""
    import urllib.error
    from torchvision import datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(datasets, "CIFAR10", offline)
    with pytest.raises(SospError) as err:
        load_dataset("cifar10", root=str(tmp_path), download=True)
    assert str(err.value) == (
        f"dataset.download=true: cifar10 could not be downloaded into {tmp_path} (URLError: <urlopen "
        "error [Errno -2] Name or service not known>); without internet, put the python batches "
        "('cifar-10-batches-py') under dataset.root")
