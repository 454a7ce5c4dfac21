"""Selection: budgets met exactly, local scope, guards, normalization (DESIGN §4)."""
import pytest
import torch

from sosp_cli import api
from sosp_cli.budget import CostModel
from sosp_cli.errors import SospError
from sosp_cli.measure import count_macs, count_params
from sosp_cli.selection import normalized, originals_of, removal_caps, select
from sosp_cli.structures import StructureSet
from sosp_cli.surgery import remove_structures

X = torch.zeros(1, 3, 32, 32)


def setup(name, width=None):
    width = width if width is not None else {"resnext29_8x64d": 0.125, "mobilenet_v2": 0.25}.get(name, 0.5)
    model = api.create_model(name, width=width).eval()
    ss = StructureSet(model, X)
    scores = torch.rand(ss.num_structures, generator=torch.Generator().manual_seed(0))
    return model, ss, scores


@pytest.mark.parametrize("name", ["resnet56", "densenet40", "resnext29_8x64d", "vgg16", "mobilenet_v2"])
@pytest.mark.parametrize("target", ["structures", "params", "flops"])
def test_budget_target_is_met_within_one_structure(name, target):
    model, ss, scores = setup(name)
    ratio = 0.4
    sel = select(scores, ss, CostModel(model, ss, X), ratio, target)
    pruned, _ = remove_structures(model, ss, sel.remove, X)
    p0, p1 = count_params(model), count_params(pruned)
    f0, f1 = count_macs(model, X), count_macs(pruned, X)
    measured = {"structures": len(sel.remove) / ss.num_structures, "params": 1 - p1 / p0, "flops": 1 - f1 / f0}
    assert sel.params_ratio == pytest.approx(measured["params"], abs=1e-12)
    assert sel.flops_ratio == pytest.approx(measured["flops"], abs=1e-12)
    # the structure crossing the target was taken iff that lands closer to the target
    cost = CostModel(model, ss, X)
    total = {"structures": ss.num_structures, "params": p0, "flops": f0}[target]
    done, crossing = 0, None
    for s in sorted(range(ss.num_structures), key=lambda s: (float(scores[s]), s)):
        params, macs = cost.removal_cost(s)
        step = {"structures": 1, "params": params, "flops": macs}[target]
        if done + step >= ratio * total:
            crossing = step
            break
        cost.remove(s)
        done += step
    assert abs(measured[target] - ratio) * total <= crossing / 2 + 1e-6
    assert abs(measured[target] - ratio) < 0.01


def test_local_scope_removes_the_same_fraction_per_group():
    model, ss, scores = setup("resnet56")
    sel = select(scores, ss, CostModel(model, ss, X), 0.5, scope="local")
    removed = {g.root: 0 for g in ss.groups}
    for n in sel.remove:
        removed[n.rsplit(":", 1)[0]] += 1
    for g in ss.groups:
        assert abs(removed[g.root] - 0.5 * g.size) <= 1, g.root


@pytest.mark.parametrize("name", ["resnet56", "densenet40", "vgg16"])
def test_guards_never_empty_a_layer(name):
    model, ss, scores = setup(name, 0.25)
    sel = select(scores, ss, CostModel(model, ss, X), 0.95, min_channels=2)
    assert sel.guard_skipped > 0
    assert all(r <= 1 - 2 / g.size + 1e-12 for r, g in zip(sel.layer_ratios.values(), ss.groups))
    pruned, _ = remove_structures(model, ss, sel.remove, X)
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    capped = select(scores, ss, CostModel(model, ss, X), 0.6, max_layer_ratio=0.7)
    assert max(capped.layer_ratios.values()) <= 0.7


def test_budget_met_says_whether_the_walk_reached_the_budget():
    """``budget_met`` is False exactly when the guards ran the walk out of structures before the
    budget: the achieved ratio is then short of the request by more than the rounding."""
    model, ss, scores = setup("resnet56", 0.25)        # groups of 4, 8 and 16 structures
    reached = [select(scores, ss, CostModel(model, ss, X), r, t) for r in (0.0, 0.4) for t in
               ("structures", "params", "flops")]
    assert all(sel.budget_met for sel in reached)
    short = [select(scores, ss, CostModel(model, ss, X), 0.95, min_channels=2),
             select(scores, ss, CostModel(model, ss, X), 0.5, "params", max_layer_ratio=0.1),
             select(scores, ss, CostModel(model, ss, X), 0.3, round_to=64)]   # every block would empty its group
    for sel in short:
        assert not sel.budget_met and sel.guard_skipped > 0
        assert sel.achieved_ratio < sel.requested_ratio - 0.05
    assert short[2].remove == [] and short[2].guard_skipped == ss.num_structures
    # the most the guards allow, asked for exactly, is met
    most = short[0].achieved_ratio
    assert select(scores, ss, CostModel(model, ss, X), most, min_channels=2).budget_met


def test_normalize_and_bad_values():
    model, ss, scores = setup("resnet20")
    scaled = normalized(scores * 7, ss, "layer_max")
    for g in ss.groups:
        assert scaled[g.offset:g.offset + g.size].max() == pytest.approx(1.0)
    cost = CostModel(model, ss, X)
    for kwargs, needle in [({"ratio": 1.0}, "prune.ratio=1.0"), ({"ratio": 0.5, "target": "watts"}, "watts"),
                           ({"ratio": 0.5, "scope": "layer"}, "layer"), ({"ratio": 0.5, "min_channels": 0}, "min_channels=0"),
                           ({"ratio": 0.5, "max_layer_ratio": 0.0}, "max_layer_ratio=0.0"),
                           ({"ratio": 0.5, "normalize": "zscore"}, "zscore")]:
        with pytest.raises(SospError, match=needle):
            select(scores, ss, cost, **kwargs)


@pytest.mark.parametrize("name", ["resnet56", "densenet40", "resnext29_8x64d"])
@pytest.mark.parametrize("target", ["structures", "flops"])
def test_round_to_leaves_multiples_of_the_lowest_ranked_in_blocks(name, target):
    """``round_to=k``: every group that loses structures keeps a multiple of k — per channel
    group of a grouped convolution, in the physically pruned model —, loses its lowest-ranked
    ones, and the budget is met within half a block's cost (a block costs at most what k
    structures of its group cost in the dense model)."""
    model, ss, scores = setup(name)
    k, ratio = 4, 0.4
    sel = select(scores, ss, CostModel(model, ss, X), ratio, target, round_to=k)
    lost = set(ss.indices_of(sel.remove).tolist())
    pruned, _ = remove_structures(model, ss, sel.remove, X)
    modules = dict(pruned.named_modules())
    cost = CostModel(model, ss, X)
    total = {"structures": ss.num_structures, "params": cost.params_total, "flops": cost.macs_total}[target]
    largest_block, touched = 0, 0
    for g in ss.groups:
        mine = [s for s in range(g.offset, g.offset + g.size) if s in lost]
        block = list(range(g.offset, g.offset + min(k, g.size)))
        largest_block = max(largest_block, len(block) if target == "structures" else cost.removal_cost_of(block)[1])
        if not mine:
            continue
        touched += 1
        assert (g.size - len(mine)) % k == 0, g.root
        ranked = sorted(range(g.offset, g.offset + g.size), key=lambda s: (float(scores[s]), s))
        assert sorted(mine) == sorted(ranked[:len(mine)]), g.root
        for producer in g.producers:
            assert modules[producer].weight.shape[0] // g.channel_groups % k == 0, producer
    assert touched > 1
    measured = len(sel.remove) / ss.num_structures if target == "structures" else \
        1 - count_macs(pruned, X) / count_macs(model, X)
    assert sel.achieved_ratio == pytest.approx(measured, abs=1e-12)
    assert abs(measured - ratio) * total <= largest_block / 2 + 1e-6
    plain = select(scores, ss, CostModel(model, ss, X), ratio, target)
    assert select(scores, ss, CostModel(model, ss, X), ratio, target, round_to=1).remove == plain.remove


def test_round_to_is_validated_and_only_a_set_value_changes_the_prune_key():
    """A bad ``prune.round_to`` is one line; the default leaves the artefact key of runs made
    before the option existed as it was."""
    from sosp_cli.config import RunConfig
    from sosp_cli.pipeline import prune_key
    model, ss, scores = setup("resnet20")
    for bad in (0, -8, 2.5, True):
        with pytest.raises(SospError, match=rf"^prune.round_to={bad!r} must be an integer >= 1"):
            select(scores, ss, CostModel(model, ss, X), 0.5, round_to=bad)
    cfg = RunConfig()
    default = prune_key(cfg)
    cfg.prune.round_to = 8
    assert prune_key(cfg) != default
    cfg.prune.round_to = 1
    assert prune_key(cfg) == default


def test_round_to_leaves_groups_of_at_most_round_to_structures_whole():
    """ResNet-56 ×0.5 (groups of 8, 16 and 32 structures) with ``round_to=16``: a block would
    empty the groups of 8 and 16, so the guards refuse it and count its structures; the groups
    of 32 lose 16 or nothing."""
    model, ss, scores = setup("resnet56")
    sel = select(scores, ss, CostModel(model, ss, X), 0.3, round_to=16)
    assert sorted({g.size for g in ss.groups}) == [8, 16, 32]
    lost = {g.root: round(r * g.size) for g, r in zip(ss.groups, sel.layer_ratios.values())}
    assert all(lost[g.root] == 0 for g in ss.groups if g.size <= 16)
    assert {lost[g.root] for g in ss.groups if g.size == 32} <= {0, 16} and len(sel.remove) > 0
    assert sel.guard_skipped > 0 and len(sel.remove) % 16 == 0


@pytest.mark.parametrize("guards", [dict(min_channels=2), dict(max_layer_ratio=0.6),
                                    dict(min_channels=3, max_layer_ratio=0.7, round_to=4)])
def test_removal_caps_are_what_the_walk_lets_each_group_lose(guards):
    """``removal_caps`` (what sosp_i's greedy growth stays within) equals what a selection that
    asks for nearly everything removes from each group — on the dense model and, counted against
    the dense model, after a first step."""
    model, ss, scores = setup("resnet56", 0.25)
    cost = CostModel(model, ss, X)
    originals = originals_of(cost, ss)
    first = select(scores, ss, cost, 0.3, **guards)
    for current, now, sel_ratio, orig in ((model, ss, 0.99, None), (None, None, 0.99, originals)):
        if current is None:
            current, _ = remove_structures(model, ss, first.remove, X)
            now = StructureSet(current.eval(), X)
        caps = removal_caps(now, orig, guards.get("min_channels", 1), guards.get("max_layer_ratio", 1.0),
                            guards.get("round_to", 1))
        s = torch.rand(now.num_structures, generator=torch.Generator().manual_seed(1))
        sel = select(s, now, CostModel(current, now, X), sel_ratio, originals=orig, **guards)
        lost = dict.fromkeys((g.root for g in now.groups), 0)
        for n in sel.remove:
            lost[n.rsplit(":", 1)[0]] += 1
        assert [lost[g.root] for g in now.groups] == caps
        assert any(c < g.size - 1 for c, g in zip(caps, now.groups))     # the guards bind


def test_api_select_is_the_runners_selection_on_named_scores():
    """``api.select`` takes a name → score dict and returns what :func:`select` returns for the
    same scores in structure order, with every option passed through; the budget is met on the
    physically pruned model; scores that do not name exactly the model's structures are one line."""
    model, ss, scores = setup("resnet20")
    named = dict(zip(ss.names(), scores.tolist()))
    options = dict(target="flops", min_channels=2, round_to=2)
    got = api.select(model, named, 0.4, X, **options)
    want = select(scores.double(), ss, CostModel(model, ss, X), 0.4, **options)
    assert got == want and got.remove
    pruned = api.prune(model, got.remove, X)
    assert got.flops_ratio == pytest.approx(1 - count_macs(pruned, X) / count_macs(model, X), abs=1e-12)
    first = ss.names()[0]
    with pytest.raises(SospError, match=rf"^select\(\) needs one score per structure of this model "
                                        rf"\({ss.num_structures}\); missing {first}"):
        api.select(model, {k: v for k, v in named.items() if k != first}, 0.4, X)
    with pytest.raises(SospError, match=r"; not structures of it: nosuch:0$"):
        api.select(model, {**named, "nosuch:0": 1.0}, 0.4, X)
    with pytest.raises(SospError, match=r"^prune.ratio=1.5 is outside \[0, 1\)"):
        api.select(model, named, 1.5, X)
