"""The gate invariant (DESIGN §2) for every registered model, and reloading pruned models."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from sosp_cli import api
from sosp_cli.checkpoint import load_model, save_model
from sosp_cli.errors import SospError
from sosp_cli.models import list_models
from sosp_cli import structures
from sosp_cli.structures import StructureSet
from sosp_cli.surgery import remove_structures
from tiny import TinyGLU, randomize_batchnorm

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


def pruned_as_masked(model, remove, x, tolerance=1e-5):
    """``api.prune(model, remove)``, checked to give the masked model's logits on ``x`` (within
    ``tolerance``) where the removal changed them (by more than 1e-3)."""
    with torch.no_grad():
        masked, pruned = api.mask(model, remove, x[:1])(x), api.prune(model, remove, x[:1])
        assert (masked - pruned(x)).abs().max().item() <= tolerance
        assert (masked - model(x)).abs().max().item() > 1e-3
    return pruned


@pytest.mark.parametrize("name", list_models())
def test_gates_at_zero_equal_physical_removal(name):
    model = calibrated(name)
    x = torch.randn(4, 3, 32, 32)
    names = api.structures(model, x[:1])
    assert len(names) == len(set(names)) > 0
    ss = StructureSet(model, x[:1])
    for trial in range(2):
        remove = ss.random_removal(torch.Generator().manual_seed(trial))
        pruned_model = pruned_as_masked(model, remove, x, tolerance=1e-4)
        p0 = sum(p.numel() for p in model.parameters())
        assert sum(p.numel() for p in pruned_model.parameters()) < p0


@pytest.mark.parametrize("name", list_models())
def test_the_channel_check_runs_on_every_registered_model(name, monkeypatch):
    """``_check_channels_stay_apart`` is not skipped (every function has a forward-mode rule),
    every gate site reads a tangent, and what it measures is rounding: it passes at 1e-5."""
    passes = []
    original = structures._site_tangents

    def spy(*args):
        passes.append(original(*args))
        return passes[-1]
    monkeypatch.setattr(structures, "_site_tangents", spy)
    monkeypatch.setattr(structures, "MIXING_TOLERANCE", 1e-5)
    ss = StructureSet(calibrated(name), torch.randn(1, 3, 32, 32))
    assert len(passes) == 2
    assert all(reads.get(site) is not None for reads in passes for site in ss.sites)


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


class _AddChannelMean(torch.autograd.Function):
    """x + its mean over the channels, as one autograd function: Torch-Pruning traces it as
    element-wise, and nothing in the graph says that it combines the channels."""

    @staticmethod
    def forward(ctx, x):
        return x + x.mean(1, keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        return grad + grad.mean(1, keepdim=True)


class _AddChannelMeanWithJvp(_AddChannelMean):
    @staticmethod
    def jvp(ctx, tangent):
        return tangent + tangent.mean(1, keepdim=True)


class _ChannelMixing(nn.Module):
    def __init__(self, jvp: bool = False):
        super().__init__()
        self.function = _AddChannelMeanWithJvp if jvp else _AddChannelMean

    def forward(self, x):
        return self.function.apply(x)


class _TokenMLP(nn.Module):
    """Linear layers on [batch, tokens, features]: the hidden units are read on the last dimension."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.fc = nn.Linear(6, 16), nn.Linear(16, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.down(torch.relu(self.up(x))).mean(1))


class _ChannelShuffle(nn.Module):
    """ShuffleNet's shuffle: a reshape by channel groups, which Torch-Pruning traces as leaving
    channel j at position j (and which a removed channel would break)."""

    def __init__(self, shuffle: bool = True):
        super().__init__()
        self.shuffle = shuffle
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.a(x))
        B, C, H, W = x.shape
        if self.shuffle:
            x = x.view(B, 2, C // 2, H, W).transpose(1, 2).reshape(B, C, H, W)
        else:    # a reshape to a fixed width: harmless here, impossible once a channel is removed
            x = x.reshape(B, 8, H, W)
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
    mixing, plain = _conv_net(_ChannelMixing()), _conv_net(nn.Identity())
    assert api.check_gates(plain, x) <= 1e-4   # relative to the removals' effect on the logits
    assert api.check_gates(mixing, x) > 1e-3
    remove = StructureSet(mixing, x[:1]).random_removal(torch.Generator().manual_seed(0))
    with pytest.raises(SospError, match=r"^the physically pruned Sequential differs from the masked one by "
                                        r"[\d.e-]+ in its logits, where the removal changed them by [\d.e-]+ "
                                        r"\(the example input\): the gates are not the removal"):
        api.prune(mixing, remove, x)
    assert api.prune(plain, remove, x)(x).shape == (4, 5)


@pytest.mark.parametrize("method", ["sosp_h", "taylor", "sosp_i"])
def test_linear_gate_site_on_tokens_is_refused(method):
    x, y = torch.randn(3, 5, 6), torch.tensor([0, 1, 2])
    with pytest.raises(SospError, match=r"^linear layer 'down' reads a 3-d input of shape \(3, 5, 16\)"):
        api.saliency(_TokenMLP(), [(x, y)], method)


def test_a_removal_torch_pruning_cannot_carry_through_is_a_one_line_error():
    model, x = _ChannelShuffle(shuffle=False).eval(), torch.randn(2, 3, 8, 8)
    assert len(api.structures(model, x[:1])) == 16
    with pytest.raises(SospError, match=r"^the physically pruned _ChannelShuffle does not run \(RuntimeError: "
                                        r"shape '\[1, 8, 8, 8\]' is invalid"):
        api.prune(model, ["a:0"], x[:1])


def test_channels_mixed_where_the_graph_does_not_show_it_are_refused_when_structures_are_built():
    """The forward-mode check of ``_check_channels_stay_apart``: a channel shuffle (before, its
    structures were scored silently, their gates on other channels than their own) and a custom
    autograd function with a forward-mode rule that adds the channel mean; one without such a
    rule is left to check_gates (test below)."""
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(SospError, match=r"^input channel \d of 'b', gated as structure 'a:\d', carries "
                                        r"other structures' channels too \(by 0\.\d+ of what it carries"):
        api.structures(_ChannelShuffle(), x)
    with pytest.raises(SospError, match=r"^input channel \d of '3', gated as structure '0:\d', carries"):
        api.structures(_conv_net(_ChannelMixing(jvp=True)), x)
    assert len(api.structures(_conv_net(_ChannelMixing()), x)) == 16


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
        pruned_model = pruned_as_masked(model, remove, x)
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


@pytest.mark.parametrize("residual", [False, True], ids=["glu", "glu_residual"])
def test_parts_of_a_split_that_meet_again_are_one_structure(residual):
    """TinyGLU: conv1's halves a, b meet in a · sigmoid(b), so channel j of a and channel j of b
    reach one channel of conv2's input together — one structure is conv1's channels j and j + 3.
    Rooted at conv1, Torch-Pruning's group keeps only one of the two root channels per channel it
    reaches, which left the other half with no gate (a saliency of 0, and a pruned model that
    differed from the masked one). With the residual addition, the group is rooted at conv2
    (whose channel j reaches both halves' channel j), as before."""
    torch.manual_seed(0)
    model = randomize_batchnorm(TinyGLU(residual=residual), torch.Generator().manual_seed(1)).eval()
    x = torch.randn(4, 2, 6, 6)
    ss = StructureSet(model, x[:1])
    glu = {g.root: g for g in ss.groups}["conv2" if residual else "conv1"]
    assert (glu.size, glu.channel_groups) == (3, 1 if residual else 2)
    assert glu.channels_of(1) == ([1] if residual else [1, 4])
    assert set(glu.producers) == ({"conv1", "conv2"} if residual else {"conv1"})
    assert ss.num_structures == 3 if residual else 6
    for j in ([0], [1, 2]):
        remove = [f"{glu.root}:{i}" for i in j]
        pruned_model = pruned_as_masked(model, remove, x)
        assert pruned_model.conv1.out_channels == 6 - 2 * len(j)
        assert pruned_model.conv2.in_channels == 3 - len(j)
    scores = api.saliency(model, [(x, torch.tensor([0, 1, 2, 3]))], "sosp_h", example_input=x[:1])
    assert min(scores.values()) > 0
    assert api.check_gates(model, x, trials=4) <= 1e-5


@pytest.mark.parametrize("residual", [False, True])
def test_the_parts_of_a_split_feeding_a_grouped_conv_keep_its_groups_equal(residual):
    """TinyGLU with conv2 a grouped conv (G = 2) over the GLU's 4 channels: a structure is
    channel position j of both of conv2's input groups with both halves behind each — conv1's
    channels j, j + 2, j + 4, j + 6 (P·G = 4 root channels, not lcm(P, G) = 2, which took one
    group's channel alone and was refused as unbalancing conv2). With the residual addition
    the group is rooted at conv2, whose channel j is one of two output groups' position j."""
    torch.manual_seed(0)
    model = randomize_batchnorm(TinyGLU(width=4, residual=residual, groups=2), torch.Generator().manual_seed(1)).eval()
    x = torch.randn(4, 2, 6, 6)
    ss = StructureSet(model, x[:1])
    glu = {g.root: g for g in ss.groups}["conv2" if residual else "conv1"]
    assert (glu.size, glu.channel_groups) == ((2, 2) if residual else (2, 4))
    assert glu.channels_of(1) == ([1, 3] if residual else [1, 3, 5, 7])
    for j in ([0], [1]):
        remove = [f"{glu.root}:{i}" for i in j]
        pruned_model = pruned_as_masked(model, remove, x)
        assert (pruned_model.conv1.out_channels, pruned_model.conv2.in_channels) == (4, 2)
        assert pruned_model.conv2.groups == 2
    scores = api.saliency(model, [(x, torch.tensor([0, 1, 2, 3]))], "sosp_h", example_input=x[:1])
    assert min(scores.values()) > 0
    assert api.check_gates(model, x, trials=4) <= 1e-5


# operations that combine a structure's channels with others and that Torch-Pruning traces as
# element-wise: the gate of a channel would not be its removal (check_gates error 0.05–0.6)
_ALONG_CHANNELS = {
    "softmax": lambda h: h.softmax(1), "log_softmax": lambda h: h.log_softmax(-3),
    "cumsum": lambda h: h.cumsum(1), "flip": lambda h: h.flip([1]), "roll": lambda h: h.roll(1, 1),
    "subtract_channel_mean": lambda h: h - h.mean((-3,), keepdim=True),
    "channel_max_attention": lambda h: h * h.amax(1, keepdim=True).sigmoid(),
    "global_scale": lambda h: h / h.abs().mean(),
    "index_select": lambda h: h.index_select(1, torch.tensor([3, 1, 2, 0, 4, 5, 6, 7]))}


def test_a_structure_that_no_layer_reads_is_refused(monkeypatch):
    """The last guard of the gate model: were the halves of a GLU not joined (as before
    ``_split_parts``), conv1's channels of one half would reach no gate site — refused, not
    scored 0."""
    monkeypatch.setattr(structures, "_split_parts", lambda root, channels, group: 1)
    with pytest.raises(SospError, match=r"^structure 'conv1:\d' reaches no Conv2d or Linear layer that "
                                        r"reads it .* so its gate would change nothing"):
        StructureSet(TinyGLU(residual=False), torch.zeros(1, 2, 6, 6))


def test_the_graph_is_traced_on_the_batch_not_on_its_first_example():
    """Torch-Pruning calls model(*example_inputs) first: on a tensor that is the first example
    unbatched, which an MLP or a conv net without a fixed-rank operation runs — there dimension
    0 is the channels, and the dimensions the autograd functions save are not the model's."""
    for model, x in ((nn.Sequential(_Shapes(), nn.Linear(4, 6), _BatchCentred(), nn.Linear(6, 3)),
                      torch.zeros(1, 4)),
                     (nn.Sequential(_Shapes(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                    nn.Flatten(0), nn.Linear(4, 2)), torch.zeros(1, 3, 8, 8))):
        model[0].seen.clear()
        structures.dependency_graph(model, x)
        assert model[0].seen == [tuple(x.shape)]
        assert len(api.structures(model, x)) == 4 if x.dim() == 4 else 6


class _Shapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return x


class _BatchCentred(nn.Module):
    def forward(self, h):
        return h - h.mean(0, keepdim=True)


class _Split(nn.Module):
    """conv 'a' (8 channels) → an operation on its channels → conv 'b' → classifier."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        halves = kind in ("nn_glu", "f_glu", "slice", "unbind", "split_sizes")
        self.b = nn.Conv2d(2 if kind == "pixel_shuffle" else 4 if halves else 8, 6, 1)
        self.glu, self.fc = nn.GLU(1), nn.Linear(6, 4)

    def forward(self, x):
        h = self.a(x)
        if self.kind == "nn_glu":
            h = self.glu(h)
        elif self.kind == "f_glu":
            h = F.glu(h, 1)
        elif self.kind == "slice":
            h = h[:, :4] * torch.sigmoid(h[:, 4:])
        elif self.kind == "split_sizes":
            a, b = h.split([4, 4], -3)
            h = a * b.sigmoid()
        elif self.kind == "unbind":
            a, b = h.unflatten(1, (2, 4)).unbind(1)
            h = a * b
        elif self.kind == "reordered_chunks":
            a, b = h.chunk(2, 1)
            h = torch.cat([b, a], 1)
        elif self.kind == "pixel_shuffle":
            h = F.pixel_shuffle(h, 2)
        elif self.kind == "lrn":
            h = F.local_response_norm(h, 3, alpha=1.0)
        elif self.kind == "spatial_pad":
            h = F.pad(h, (1, 1, 1, 1))[:, :, 1:-1, 1:-1] + F.pad(h, (0, 0, 2, 0))[:, :, :-2]
        elif self.kind == "sdpa":                                    # one head, positions as tokens
            tokens = h.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()   # [B, 1, HW, C]
            h = F.scaled_dot_product_attention(tokens, tokens, tokens).squeeze(1).transpose(1, 2).reshape(h.shape)
        elif self.kind in ("gram", "channel_attention", "input_attention"):
            shape, f = h.shape, h.flatten(2)                         # [B, C, HW]
            if self.kind == "gram":                                  # non-local block: sums over C
                h = f @ (f.transpose(1, 2) @ f) / 64
            elif self.kind == "channel_attention":                   # DANet: channel j ← all channels
                h = (f @ f.transpose(1, 2) / 64).softmax(-1) @ f
            else:                                                    # weights from the input image
                xf = x.flatten(2)
                h = f @ (xf.transpose(1, 2) @ xf).softmax(-1)
            h = h.view(shape)
        elif self.kind in _ALONG_CHANNELS:
            h = _ALONG_CHANNELS[self.kind](h)
        return self.fc(torch.relu(self.b(h)).mean((2, 3)))


@pytest.mark.parametrize("kind, message", [
    ("nn_glu", r"^a GLU \(F.glu / nn.GLU\) halves the channels of 'a', which Torch-Pruning does not map to the "
               r"layer reading them; write it as a, b = x.chunk\(2, 1\); a \* b.sigmoid\(\)"),
    ("f_glu", r"^a GLU \(F.glu / nn.GLU\) halves the channels of 'a'"),
    ("slice", r"^the channels of 'a' are sliced with fixed bounds \(x\[:, (4:|:4)\]\), which would select "
              r"other channels once some are removed"),
    ("split_sizes", r"^torch.split splits the channels of 'a' at the fixed sizes \[4, 4\], which cannot follow "
                    r"a removal \(the pruned model would not run\); supported: parts of equal size"),
    ("unbind", r"^channels \d, \d of 'a' reach one channel of a later layer together, not as channels j, "
               r"j \+ 4, ... of 2 equal parts would"),
    ("reordered_chunks", r"^Torch-Pruning maps 16 channels of 'a' onto the 8 output channels of 'a': an "
                         r"operation between them changes or reorders the channels in a way it does not trace"),
    ("pixel_shuffle", r"^Torch-Pruning maps 8 channels of 'a' onto the 2 input channels of 'b'")])
def test_channel_operations_torch_pruning_cannot_carry_are_refused_when_structures_are_built(kind, message):
    """Each of these gave structures that are not what removal removes — a saliency of 0, or a
    gate on other channels (the reordered chunks: check_gates error 0.36) — or an IndexError."""
    with pytest.raises(SospError, match=message):
        api.structures(_Split(kind), torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("kind", ["gram", "channel_attention", "sdpa"])
def test_matrix_products_over_the_channels_are_refused_when_structures_are_built(kind):
    """A product summing over the channels (Torch-Pruning traces it as element-wise) makes every
    channel depend on every other, so a gate at the next conv is not the removal of one; before,
    these built structures and scored them (check_gates 0.03 on the non-local block, 0.009 on
    the attention over positions, whose weights sum over the channels: on the CPU its flash
    kernel, ScaledDotProductFlashAttentionForCpuBackward0)."""
    with pytest.raises(SospError, match=r"^\w+Backward\d is a matrix product over a dimension of 8, "
                                        r"the number of channels of 'a' \(as in attention or a Gram "
                                        r"matrix over channels\)"):
        api.structures(_Split(kind), torch.zeros(1, 3, 8, 8))


def test_a_matrix_product_over_positions_keeps_the_channels():
    """Spatial attention whose weights do not depend on the structures (here: the input image)
    mixes positions, not channels: each channel of 'a' is still its own structure."""
    torch.manual_seed(0)
    model, x = _Split("input_attention").eval(), torch.randn(4, 3, 8, 8)
    assert api.structures(model, x[:1])[-8:] == [f"a:{i}" for i in range(8)]
    remove = ["a:1", "a:4", "a:6"]
    assert pruned_as_masked(model, remove, x).a.out_channels == 5


class _OptionA(nn.Module):
    """A residual block with an option-A shortcut (He et al. 2016; the CIFAR ResNets of
    akamaster/pytorch_resnet_cifar10): the input subsampled and zero-padded by 2 channels each side."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(h)))))
        out = F.relu(out + F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2)))
        return self.fc(out.mean((2, 3)))


@pytest.mark.parametrize("model", [_OptionA(), _Split("lrn")], ids=["option_a_shortcut", "local_response_norm"])
def test_padding_the_channels_is_refused_when_structures_are_built(model):
    """Torch-Pruning traces F.pad as element-wise, so it coupled the stem's channel j with
    conv2's channel j instead of j + 2 (check_gates 1.5), and a local response normalisation's
    sum over neighbouring channels went unseen (0.03 with alpha = 1)."""
    with pytest.raises(SospError, match=r"^ConstantPadNdBackward0 pads the channels of '(stem|a)' \(F.pad on "
                                        r"the dimension before H and W, .*option B"):
        api.structures(model, torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("kind", list(_ALONG_CHANNELS) + ["gram", "channel_attention", "lrn", "option_a"])
def test_the_channel_check_alone_finds_what_the_name_based_refusals_find(kind, monkeypatch):
    """With the refusals by autograd function name switched off, the forward-mode check of
    ``_check_channels_stay_apart`` refuses each of their cases on its own (mixing 0.003–0.4 of
    what a channel carries, the least over 25 seeds per case; a global scale h / mean |h| mixes
    least). Not attention on the CPU: its flash kernel has no forward-mode rule, so the check is
    skipped there and only the name-based refusal catches it."""
    torch.manual_seed(0)
    monkeypatch.setattr(structures, "_combines_channels", lambda *args: False)
    monkeypatch.setattr(structures, "_contracted_sizes", lambda *args: set())
    monkeypatch.setattr(structures, "_pads_channels", lambda *args: False)
    model = _OptionA() if kind == "option_a" else _Split(kind)
    with pytest.raises(SospError, match=r"^input channel \d of '(b|fc)', (gated as structure '(a|stem):\d', "
                                        r"carries other structures' channels too|of no structure, carries "
                                        r"structures' channels) \(by 0\.\d+ of what it carries"):
        api.structures(model.eval(), torch.randn(1, 3, 8, 8))


def test_padding_the_positions_keeps_the_channels():
    torch.manual_seed(0)
    model, x = _Split("spatial_pad").eval(), torch.randn(4, 3, 8, 8)
    assert len(api.structures(model, x[:1])) == 14
    assert api.check_gates(model, x, trials=4) <= 1e-5


@pytest.mark.parametrize("kind", _ALONG_CHANNELS)
def test_operations_along_the_channels_are_refused_when_structures_are_built(kind):
    """Found from the autograd function's saved dimension (negative ones too), which
    Torch-Pruning's graph keeps; before, these ran and gave saliencies of another model."""
    with pytest.raises(SospError, match=r"^\w+Backward\d combines the channels of 'a' \(a softmax, "
                                        r"cumulative sum, flip, roll, sort, gather or reduction along "
                                        r"dimension 1\), which Torch-Pruning traces as element-wise"):
        api.structures(_Split(kind), torch.zeros(1, 3, 8, 8))
    harmless = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Softmax(-1), nn.Flatten(2), nn.LogSoftmax(2),
                             nn.Unflatten(2, (6, 6)), nn.Conv2d(8, 4, 1))
    assert len(api.structures(harmless, torch.zeros(1, 3, 8, 8))) == 8   # softmax along H, W: fine
