"""Baselines against Torch-Pruning's importances on the same groups, and FPGM / HRank by hand."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from scipy.stats import spearmanr

from sosp_cli.config import MethodConfig
from sosp_cli.api import structures
from sosp_cli.pruning import SaliencyInput, get_criterion, list_criteria
from sosp_cli.structures import StructureSet, dependency_graph
from test_structures import _Grouped, calibrated


def ours(method, model, batches, **kw):
    ss = StructureSet(model, batches[0][0][:1])
    crit = get_criterion(MethodConfig(name=method, **kw))
    return crit.compute(SaliencyInput(model, ss, batches, torch.device("cpu"), seed=kw.get("seed", 0))).scores, ss


def torch_pruning_scores(model, ss, x, importance, keep):
    """Score every structure with a Torch-Pruning importance, on each group restricted to the
    items ``keep(dep)`` selects (producers for l1, BatchNorms for bn_scale, consumers for taylor)."""
    dg = dependency_graph(model, x[:1])
    modules = dict(model.named_modules())
    scores = torch.zeros(ss.num_structures)
    for g in ss.groups:
        root = modules[g.root]
        group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, list(range(g.size)))
        sub = tp.dependency.Group()
        sub._group = [item for item in group.items if keep(item.dep, dg)]  # same items, fewer kinds
        scores[g.offset:g.offset + g.size] = importance(sub).float()
    return scores


def producer(dep, dg):
    return isinstance(dep.target.module, (nn.Conv2d, nn.Linear)) and dg.is_out_channel_pruning_fn(dep.handler) \
        and getattr(dep.target.module, "groups", 1) == 1


def norm_layer(dep, dg):
    return isinstance(dep.target.module, nn.BatchNorm2d)


def consumer(dep, dg):
    return isinstance(dep.target.module, (nn.Conv2d, nn.Linear)) and dg.is_in_channel_pruning_fn(dep.handler)


@pytest.mark.parametrize("name", ["vgg16", "resnet20"])
def test_l1_bn_scale_taylor_rank_like_torch_pruning(name):
    # float64: in float32 a different (equally valid) rounding of BatchNorm flips a few ReLU /
    # max-pool decisions near their kinks, which moves single gradients by ~0.5 %
    model = calibrated(name).double()
    x, y = torch.randn(16, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (16,))
    l1, ss = ours("l1", model, [(x, y)])
    tp_l1 = torch_pruning_scores(model, ss, x, tp.importance.MagnitudeImportance(
        p=1, group_reduction="sum", normalizer=None), producer)
    assert spearmanr(l1, tp_l1).statistic >= 0.99
    bn, _ = ours("bn_scale", model, [(x, y)])
    tp_bn = torch_pruning_scores(model, ss, x, tp.importance.BNScaleImportance(
        group_reduction="mean", normalizer=None), norm_layer)
    assert spearmanr(bn, tp_bn).statistic >= 0.99
    taylor, _ = ours("taylor", model, [(x, y)])
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    tp_taylor = torch_pruning_scores(model, ss, x, tp.importance.GroupTaylorImportance(
        group_reduction="sum", normalizer=None, multivariable=True), consumer)
    # TP takes |Σ w·∂L/∂w| per consumer layer and sums those; the gate derivative sums first,
    # so the two agree exactly on structures with one consumer (every VGG structure).
    single = torch.tensor([len(g.consumers) == 1 for g in ss.groups for _ in range(g.size)])
    assert spearmanr(taylor[single], tp_taylor[single]).statistic >= 0.99
    assert torch.allclose(taylor[single].sqrt(), tp_taylor[single].to(taylor.dtype), rtol=1e-5, atol=1e-9)


def test_random_is_seeded():
    model = calibrated("resnet20")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    a, ss = ours("random", model, [(x, y)])
    b, _ = ours("random", model, [(x, y)])
    crit = get_criterion(MethodConfig(name="random"))
    c = crit.compute(SaliencyInput(model, ss, [(x, y)], torch.device("cpu"), seed=1)).scores
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_fpgm_is_sum_of_filter_distances():
    model = calibrated("vgg16")
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    scores, ss = ours("fpgm", model, [(x, y)])
    g = ss.groups[0]
    w = dict(model.named_modules())[g.root].weight.detach().flatten(1).double()
    want = torch.stack([(w - w[i]).norm(dim=1).sum() for i in range(len(w))])
    assert torch.allclose(scores[g.offset:g.offset + g.size].double(), want, rtol=1e-5)


def test_hrank_is_mean_feature_map_rank():
    model = calibrated("vgg16")
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    scores, ss = ours("hrank", model, [(x, y)])
    # first conv's channels as the second conv reads them: relu(bn(conv(x)))
    feats = model.features[:3](x)
    g = next(g for g in ss.groups if g.root == "features.0")
    want = torch.linalg.matrix_rank(feats.double()).double().mean(0)
    assert torch.allclose(scores[g.offset:g.offset + g.size].double(), want)
    assert scores.max() <= 32 and scores.min() >= 0


def test_baselines_on_grouped_convolution_structures_use_all_their_channels():
    """A structure of a grouped conv's group is one channel per channel group (structures.py):
    l1 / l2 sum its filters' norms, fpgm concatenates its filters, bn_scale averages its BN
    scales, hrank sums its maps' ranks — each by hand here."""
    torch.manual_seed(0)
    model = _Grouped()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    model.eval()
    x, y = torch.randn(3, 3, 8, 8), torch.randint(0, 5, (3,))
    modules = dict(model.named_modules())
    results = {m: ours(m, model, [(x, y)])[0].double() for m in ("l1", "l2", "fpgm", "bn_scale", "hrank")}
    ss = StructureSet(model, x[:1])
    g = next(g for g in ss.groups if g.root == "b")           # 6 channel groups, 2 structures
    w = model.b.weight.detach().double().flatten(1)
    filters = torch.stack([w[g.channels_of(j)].flatten() for j in range(g.size)])
    block = slice(g.offset, g.offset + g.size)
    assert torch.allclose(results["l1"][block], filters.abs().sum(1), rtol=1e-6)
    assert torch.allclose(results["l2"][block], filters.norm(dim=1), rtol=1e-6)
    assert torch.allclose(results["fpgm"][block], torch.cdist(filters, filters).sum(1), rtol=1e-6)
    gamma = model.bn_b.weight.detach().double().abs()
    assert torch.allclose(results["bn_scale"][block],
                          torch.stack([gamma[g.channels_of(j)].mean() for j in range(g.size)]), rtol=1e-6)
    maps = torch.relu(model.bn_b(model.b(torch.relu(model.bn_a(model.a(x)))))).detach().double()
    ranks = torch.linalg.matrix_rank(maps).double().mean(0)           # [12]: per channel
    assert torch.allclose(results["hrank"][block], torch.stack([ranks[g.channels_of(j)].sum() for j in range(g.size)]))
    c = next(g for g in ss.groups if g.root == "c")            # a residual structure: two producers
    rows = [modules[p].weight.detach().double().flatten(1) for p in ("c", "skip")]
    want = torch.stack([sum(r[c.channels_of(j)].abs().sum() for r in rows) for j in range(c.size)])
    assert torch.allclose(results["l1"][c.offset:c.offset + c.size], want, rtol=1e-6)


@pytest.mark.parametrize("method", list_criteria())
def test_a_data_driven_method_refuses_an_empty_batch_list(method):
    """No saliency batches: the criteria that score from data refuse in one line (they would
    return all-zero scores and prune at random-by-index); the weight-only ones need none."""
    from sosp_cli.api import create_model, saliency
    from sosp_cli.errors import SospError
    model = create_model("resnet20", num_classes=10, width=0.25)
    x = torch.randn(1, 3, 16, 16)
    options = {"sparsity": 1e-4} if method == "slimming" else {}
    data_driven = get_criterion(MethodConfig(name=method, **options)).uses_data
    assert data_driven == (method in ("sosp_h", "sosp_i", "taylor", "obd", "hrank"))
    if data_driven:
        with pytest.raises(SospError, match=f"^method {method} scores structures on saliency batches, and none were given"):
            saliency(model, [], method, example_input=x, **options)
    else:
        assert len(saliency(model, [], method, example_input=x, **options)) == len(structures(model, x))
    with pytest.raises(SospError, match="no batches and no example_input"):
        saliency(model, [], method, **options)
