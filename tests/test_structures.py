"""The gate invariant (DESIGN §2) for every registered model, and reloading pruned models."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from sosp_cli import api
from sosp_cli.checkpoint import load_model, save_model
from sosp_cli.errors import SospError
from sosp_cli.models import list_models
from sosp_cli.structures import StructureSet
from sosp_cli.surgery import remove_structures

WIDTH = {"resnet18": 0.25, "resnet50": 0.125, "mobilenet_v2": 0.25, "vgg16": 0.25, "vgg19": 0.25,
         "resnext29_8x64d": 0.125}


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


@pytest.mark.parametrize("name", list_models())
def test_gates_at_zero_equal_physical_removal(name):
    model = calibrated(name)
    x = torch.randn(4, 3, 32, 32)
    names = api.structures(model, x[:1])
    assert len(names) == len(set(names)) > 0
    ss = StructureSet(model, x[:1])
    for trial in range(2):
        remove = ss.random_removal(torch.Generator().manual_seed(trial))
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
    pruned, history = remove_structures(model, ss, ss.random_removal(torch.Generator().manual_seed(3)), x[:1])
    spec = {"model": "resnet20", "num_classes": 10, "in_channels": 3, "width": 0.5,
            "input_shape": [3, 32, 32]}
    save_model(tmp_path / "pruned.pt", pruned, spec, history)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(pruned(x), tmp_path / "expected.pt")
    code = (
        "import sys, torch, sosp_cli.api; from sosp_cli.checkpoint import load_model\n"
        f"m, _ = load_model(r'{tmp_path / 'pruned.pt'}'); m.eval()\n"
        # a CIFAR model's process does not pay for torchvision (torch._dynamo) or scipy imports
        "assert not {'torchvision', 'scipy'} & set(sys.modules), sorted({'torchvision', 'scipy'} & set(sys.modules))\n"
        f"x = torch.load(r'{tmp_path / 'x.pt'}'); e = torch.load(r'{tmp_path / 'expected.pt'}')\n"
        "assert (m(x) - e).abs().max() < 1e-5\n"
        "print(sum(p.numel() for p in m.parameters()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) == sum(p.numel() for p in pruned.parameters())
    reloaded, _ = load_model(tmp_path / "pruned.pt")
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in model.parameters())


def test_a_scaled_torchvision_resnet_pickles_as_a_class_of_its_module():
    """``ScaledResNet`` is made on first use (torchvision is imported lazily) yet pickles by
    reference like a class defined in its module."""
    import pickle
    from sosp_cli.models import create_model, torchvision_models
    model = create_model("resnet18", num_classes=10, in_channels=1, width=0.25)
    copy = pickle.loads(pickle.dumps(model))
    assert type(copy) is type(model) is torchvision_models.ScaledResNet
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), copy.state_dict().values()))
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        torchvision_models.nosuch


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


def test_torchvision_googlenet_weights_load_without_their_auxiliary_classifiers(tmp_path):
    """torchvision's GoogLeNet weight files hold aux1/aux2; ``torchvision.googlenet`` is built
    without them: the rest loads, with the same eval logits; any other extra key still fails."""
    from torchvision.models import googlenet
    from sosp_cli.checkpoint import load_weights_into
    source = googlenet(num_classes=10, aux_logits=True, init_weights=True).eval()
    assert any(k.startswith("aux1.") for k in source.state_dict())
    torch.save(source.state_dict(), tmp_path / "tv.pth")
    ours = api.create_model("torchvision.googlenet", num_classes=10).eval()
    load_weights_into(ours, tmp_path / "tv.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), source(x))
    torch.save({**source.state_dict(), "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(SospError, match="unexpected 'extra.weight'"):
        load_weights_into(ours, tmp_path / "extra.pth")


def test_checkpoint_keys_that_do_not_all_share_a_wrapper_prefix_are_a_mismatch(tmp_path):
    from sosp_cli.checkpoint import load_weights_into
    from sosp_cli.errors import SospError
    from sosp_cli.models import create_model
    model = create_model("resnet20", num_classes=10, in_channels=3, width=0.5)
    state = {("module." if i else "") + k: v for i, (k, v) in enumerate(model.state_dict().items())}
    torch.save(state, tmp_path / "mixed.pt")
    with pytest.raises(SospError, match="does not match the model"):
        load_weights_into(model, tmp_path / "mixed.pt")


# --- models outside the registry (the API takes any nn.Module): refused in one line, or checked


def _conv_net(middle: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), middle, nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


class _ChannelSoftmax(nn.Module):
    """Mixes every channel with every other one — an operation Torch-Pruning traces as element-wise."""

    def forward(self, x):
        return torch.softmax(x, dim=1)


class _TokenMLP(nn.Module):
    """Linear layers on [batch, tokens, features]: the hidden units are read on the last dimension."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.fc = nn.Linear(6, 16), nn.Linear(16, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.down(torch.relu(self.up(x))).mean(1))


class _ChannelShuffle(nn.Module):
    """ShuffleNet's shuffle: a reshape by channel groups, which a removed channel breaks."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.a(x))
        B, C, H, W = x.shape
        x = x.view(B, 2, C // 2, H, W).transpose(1, 2).reshape(B, C, H, W)
        return self.fc(torch.relu(self.b(x)).mean((2, 3)))


@pytest.mark.parametrize("norm", [nn.GroupNorm(2, 8), nn.GroupNorm(8, 8, affine=False), nn.LayerNorm([8, 8, 8])],
                         ids=["groupnorm", "groupnorm_per_channel", "layernorm"])
def test_normalisation_across_a_structures_channels_is_refused(norm):
    """GroupNorm / LayerNorm statistics span the channels: a gate at 0 is not their removal."""
    with pytest.raises(SospError, match=rf"^{type(norm).__name__} '1' normalises the channels of '0'"):
        StructureSet(_conv_net(norm), torch.zeros(1, 3, 8, 8))


class _Reader(nn.Module):
    """conv 'a' → ReLU → ``reader`` (a weight layer other than Conv2d / Linear) → classifier."""

    def __init__(self, reader: nn.Module, flat: bool):
        super().__init__()
        self.a, self.reader, self.flat, self.fc = nn.Conv2d(3, 8, 3), reader, flat, nn.LazyLinear(4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(self.reader(h.flatten(2) if self.flat else h))
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("reader,flat", [(nn.ConvTranspose2d(8, 6, 2, stride=2), False), (nn.Conv1d(8, 6, 3), True)],
                         ids=["conv_transpose2d", "conv1d"])
def test_a_structure_read_by_a_weight_layer_it_cannot_gate_is_refused(reader, flat):
    """A ConvTranspose2d or Conv1d reading a structure's channels is not a gate site: the gates
    had no effect there (a zero saliency; pruned ≠ masked) — refused in one line instead."""
    model = _Reader(reader, flat).eval()
    model(torch.zeros(1, 3, 8, 8))   # (the lazy classifier)
    kind = type(reader).__name__
    with pytest.raises(SospError, match=rf"^{kind} 'reader' reads or writes the channels of the structures "
                       rf"of 'a', and sosp gates channels only where Conv2d and Linear layers read them .*"
                       rf"a model with a {kind} beside a pruned layer is not supported"):
        StructureSet(model, torch.zeros(1, 3, 8, 8))


class _TokenNorm(nn.Module):
    """conv → channels last → LayerNorm on the channels → back (ConvNeXt's, Swin's layout)."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.LayerNorm(8), nn.Conv2d(8, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        h = self.norm(self.a(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(torch.relu(self.b(torch.relu(h))).mean((2, 3)))


def test_normalisation_of_permuted_channels_is_refused_before_grouping(monkeypatch):
    """A LayerNorm on a structure's channels through a permute is refused from the graph, before
    Torch-Pruning's grouping (minutes and > 10 GiB on torchvision's Swin) runs; one that reads
    only the ignored classifier's outputs is not a structure's."""
    def grouping(*args, **kwargs):
        raise AssertionError("grouped before the normalisation was refused")
    monkeypatch.setattr(tp.DependencyGraph, "get_all_groups", grouping)
    with pytest.raises(SospError, match=r"^LayerNorm 'norm' normalises the channels of 'a'"):
        StructureSet(_TokenNorm(), torch.zeros(1, 3, 8, 8))
    monkeypatch.undo()
    head_norm = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4), nn.LayerNorm(4))
    assert StructureSet(head_norm, torch.zeros(1, 3, 8, 8), ignored=["3"]).num_structures == 8


@pytest.mark.parametrize("norm", [nn.InstanceNorm2d(8, affine=True), nn.BatchNorm2d(8, affine=False), nn.PReLU(8)],
                         ids=["instancenorm", "batchnorm_no_affine", "prelu"])
def test_per_channel_layers_keep_the_gate_invariant(norm):
    model = _conv_net(norm)
    with torch.no_grad():   # non-trivial running statistics
        model.train()(torch.randn(8, 3, 8, 8) * 2 + 1)
    assert api.check_gates(model.eval(), torch.randn(4, 3, 8, 8), trials=3) <= 1e-4


def test_check_gates_finds_channel_mixing_that_the_graph_does_not_show():
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(0)
    mixing, plain = _conv_net(_ChannelSoftmax()), _conv_net(nn.Identity())
    assert api.check_gates(plain, x) <= 1e-4   # relative to the removals' effect on the logits
    assert api.check_gates(mixing, x) > 1e-3


@pytest.mark.parametrize("method", ["sosp_h", "taylor", "sosp_i"])
def test_linear_gate_site_on_tokens_is_refused(method):
    x, y = torch.randn(3, 5, 6), torch.tensor([0, 1, 2])
    with pytest.raises(SospError, match=r"^linear layer 'down' reads a 3-d input of shape \(3, 5, 16\)"):
        api.saliency(_TokenMLP(), [(x, y)], method)


def test_a_removal_torch_pruning_cannot_carry_through_is_a_one_line_error():
    model, x = _ChannelShuffle().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(SospError, match=r"^the physically pruned _ChannelShuffle does not run \(RuntimeError"):
        api.prune(model, ["a:0"], x[:1])


def test_a_model_torch_pruning_cannot_trace_is_a_one_line_error():
    from torchvision.models import shufflenet_v2_x0_5
    with pytest.raises(SospError, match=r"^Torch-Pruning could not build the dependency graph of "
                                        r"ShuffleNetV2 on an input of shape \(1, 3, 32, 32\) \(ZeroDivisionError"):
        api.structures(shufflenet_v2_x0_5(num_classes=10), torch.zeros(1, 3, 32, 32))


def test_a_model_that_does_not_run_on_the_input_says_so_not_that_tracing_failed():
    from torchvision.models import alexnet
    with pytest.raises(SospError, match=r"^AlexNet does not run on an input of shape \(1, 3, 16, 16\) "
                                        r"\(RuntimeError: .*\); it may need larger images \(dataset.image_size\)$"):
        api.structures(alexnet(num_classes=10), torch.zeros(1, 3, 16, 16))
    assert len(api.structures(alexnet(num_classes=10), torch.zeros(1, 3, 64, 64))) > 0
    # an input of another dtype than the model's: the hint names the dtypes, not the image size
    with pytest.raises(SospError, match=r"^CifarResNet does not run on an input of shape \(1, 3, 32, 32\) "
                                        r"\(RuntimeError: .*\); the input is torch.uint8, the model's "
                                        r"parameters are torch.float32: convert the input$"):
        api.structures(api.create_model("resnet20", 10, 3, 0.25), torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


class _Grouped(nn.Module):
    """conv → grouped conv (groups=2) → grouped 1×1 conv (groups=3) added to a 1×1 conv → BN →
    linear: channel groups 2, 3 and lcm(2, 3) = 6 in one model, a residual addition of a grouped
    conv's outputs."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 12, 3, padding=1, groups=2), nn.BatchNorm2d(12)
        self.c = nn.Conv2d(12, 12, 1, groups=3)
        self.skip, self.bn_c = nn.Conv2d(12, 12, 1), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        h = torch.relu(self.bn_b(self.b(torch.relu(self.bn_a(self.a(x))))))
        return self.fc(torch.relu(self.bn_c(self.c(h) + self.skip(h))).mean((2, 3)))


def test_grouped_convolution_structures_take_one_position_of_every_group():
    torch.manual_seed(0)
    model = _Grouped()
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 8, 8))
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    ss = StructureSet(model, x[:1])
    groups = {g.root: g for g in ss.groups}
    assert (groups["a"].channel_groups, groups["a"].size) == (2, 4)            # read by b (groups=2)
    assert (groups["b"].channel_groups, groups["b"].size) == (6, 2)            # b: 2 groups, read by c: 3
    assert groups["b"].channels_of(1) == [1, 3, 5, 7, 9, 11]
    assert set(groups["c"].producers) == {"c", "skip"} and groups["c"].channel_groups == 3
    assert ss.num_structures == 4 + 2 + 4 == len(api.structures(model, x[:1]))
    for remove in (["a:1"], ["b:0"], ["a:0", "a:3", "b:1", "c:2"], ["c:0", "c:1", "c:3"]):
        with torch.no_grad():
            masked, pruned_model = api.mask(model, remove, x[:1])(x), api.prune(model, remove, x[:1])
            pruned = pruned_model(x)
            assert (masked - pruned).abs().max().item() <= 1e-5
            assert (masked - model(x)).abs().max().item() > 1e-3
        assert pruned_model.b.groups == 2 and pruned_model.c.groups == 3   # still equal groups
        removed = {r: sum(n.startswith(r + ":") for n in remove) for r in groups}
        assert pruned_model.b.in_channels == 8 - 2 * removed["a"]
        assert pruned_model.b.out_channels == 12 - 6 * removed["b"]
        assert pruned_model.c.out_channels == 12 - 3 * removed["c"]
    assert api.check_gates(model, x, trials=4) <= 1e-5


class _ShiftedGroups(nn.Module):
    """Two convs concatenated into a grouped conv (groups=2): with 4 + 4 channels each fills one
    group, so a structure of one of them would take channels from one group only; with 3 + 5
    channels, 3 cannot be split into 2 channel groups."""

    def __init__(self, na: int, nb: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, na, 3), nn.Conv2d(3, nb, 3)
        self.c = nn.Conv2d(na + nb, 8, 1, groups=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c(torch.cat([self.a(x), self.b(x)], 1))).mean((2, 3)))


@pytest.mark.parametrize("na, nb, message", [
    (4, 4, r"^the input channels of grouped convolution 'c' \(groups=2\) do not hold the same structures "
           r"at the same position of every group, so removing a structure would unbalance its groups"),
    (3, 5, r"^the 3 channels of 'a' cannot be split into 2 equal channel groups for grouped convolution "
           r"'c' \(groups=2\)")])
def test_grouped_convolution_that_structures_would_unbalance_is_refused(na, nb, message):
    with pytest.raises(SospError, match=message):
        api.structures(_ShiftedGroups(na, nb), torch.zeros(1, 3, 8, 8))
