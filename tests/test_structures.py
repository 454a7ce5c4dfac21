"""The gate invariant (DESIGN §2) for every registered model, and reloading pruned models."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from sosp_cli import api
from sosp_cli.checkpoint import load_model, save_model
from sosp_cli.models import list_models
from sosp_cli.structures import StructureSet
from sosp_cli.surgery import remove_structures

WIDTH = {"resnet18": 0.25, "resnet50": 0.125, "mobilenet_v2": 0.25, "vgg16": 0.25, "vgg19": 0.25}


def calibrated(name, in_channels=3, size=32):
    """A model with realistic BatchNorm statistics (a few train-mode passes), in eval mode."""
    model = api.create_model(name, num_classes=10, in_channels=in_channels, width=WIDTH.get(name, 0.5))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, in_channels, size, size))
    return model.eval()


def random_removal(ss, generator):
    """A random subset leaving every group at least one channel."""
    remove = []
    for g in ss.groups:
        k = int(torch.randint(0, g.size, (1,), generator=generator))
        remove += [f"{g.root}:{i}" for i in torch.randperm(g.size, generator=generator)[:k].tolist()]
    return remove


@pytest.mark.parametrize("name", list_models())
def test_gates_at_zero_equal_physical_removal(name):
    model = calibrated(name)
    x = torch.randn(4, 3, 32, 32)
    names = api.structures(model, x[:1])
    assert len(names) == len(set(names)) > 0
    ss = StructureSet(model, x[:1])
    for trial in range(2):
        remove = random_removal(ss, torch.Generator().manual_seed(trial))
        with torch.no_grad():
            masked = api.mask(model, remove, x[:1])(x)
            pruned_model = api.prune(model, remove, x[:1])
            pruned = pruned_model(x)
            dense = model(x)
        assert (masked - pruned).abs().max().item() <= 1e-4
        assert (masked - dense).abs().max().item() > 1e-3  # the removal did change something
        p0 = sum(p.numel() for p in model.parameters())
        assert sum(p.numel() for p in pruned_model.parameters()) < p0


def test_structure_names_are_stable_and_exclude_stem_and_classifier():
    model = api.create_model("resnet20", width=0.5)
    x = torch.zeros(1, 3, 32, 32)
    a, b = api.structures(model, x), api.structures(api.create_model("resnet20", width=0.5), x)
    assert a == b
    roots = {n.rsplit(":", 1)[0] for n in a}
    assert "fc" not in roots  # classifier outputs are never structures
    # residual channels of a stage form one structure spanning every block of the stage
    ss = StructureSet(model, x)
    stage1 = next(g for g in ss.groups if g.root == "conv1")
    assert {"layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"} <= set(stage1.producers)
    assert "layer2.0.shortcut.0" in stage1.consumers


def test_densenet_channel_has_many_consumers():
    model = api.create_model("densenet40", width=0.5)
    ss = StructureSet(model, torch.zeros(1, 3, 32, 32))
    first = next(g for g in ss.groups if g.root == "blocks.0.0.conv")
    assert len(first.consumers) == 12  # 11 later layers of the block + the transition


def test_pruned_model_reloads_in_fresh_process(tmp_path):
    model = calibrated("resnet20")
    x = torch.randn(2, 3, 32, 32)
    ss = StructureSet(model, x[:1])
    pruned, history = remove_structures(model, ss, random_removal(ss, torch.Generator().manual_seed(3)), x[:1])
    spec = {"model": "resnet20", "num_classes": 10, "in_channels": 3, "width": 0.5,
            "input_shape": [3, 32, 32]}
    save_model(tmp_path / "pruned.pt", pruned, spec, history)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(pruned(x), tmp_path / "expected.pt")
    code = (
        "import torch; from sosp_cli.checkpoint import load_model\n"
        f"m, _ = load_model(r'{tmp_path / 'pruned.pt'}'); m.eval()\n"
        f"x = torch.load(r'{tmp_path / 'x.pt'}'); e = torch.load(r'{tmp_path / 'expected.pt'}')\n"
        "assert (m(x) - e).abs().max() < 1e-5\n"
        "print(sum(p.numel() for p in m.parameters()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) == sum(p.numel() for p in pruned.parameters())
    reloaded, _ = load_model(tmp_path / "pruned.pt")
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("wrapper", ["", "module.", "module._orig_mod."])
def test_torchvision_weights_load_through_pretrain_checkpoint(tmp_path, wrapper):
    """A bare torchvision state dict (what its weight files hold), also as saved from a DDP /
    torch.compile wrapper, loads into the registry's ``resnet18`` with identical logits."""
    from torchvision.models import resnet18 as tv_resnet18
    from sosp_cli.checkpoint import load_weights_into
    from sosp_cli.models import create_model
    source = tv_resnet18(num_classes=10).eval()
    torch.save({wrapper + k: v for k, v in source.state_dict().items()}, tmp_path / "tv.pth")
    ours = create_model("resnet18", num_classes=10, in_channels=3, width=1.0).eval()
    load_weights_into(ours, tmp_path / "tv.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), source(x))


def test_checkpoint_keys_that_do_not_all_share_a_wrapper_prefix_are_a_mismatch(tmp_path):
    from sosp_cli.checkpoint import load_weights_into
    from sosp_cli.errors import SospError
    from sosp_cli.models import create_model
    model = create_model("resnet20", num_classes=10, in_channels=3, width=0.5)
    state = {("module." if i else "") + k: v for i, (k, v) in enumerate(model.state_dict().items())}
    torch.save(state, tmp_path / "mixed.pt")
    with pytest.raises(SospError, match="does not match the model"):
        load_weights_into(model, tmp_path / "mixed.pt")
