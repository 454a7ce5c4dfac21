"""Every second-order quantity against brute force on tiny networks, in float64 (DESIGN §3)."""
import functools
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from sosp_cli import api
from sosp_cli.config import MethodConfig
from sosp_cli.measure import count_work, peak_tensor_mb
from sosp_cli.pruning import SaliencyInput, get_criterion, saliency_model
from sosp_cli.pruning import derivatives
from sosp_cli.pruning.derivatives import (batch_gradients, curvature_matrix, curvature_product, gradient,
                                             joint_product)
from sosp_cli.pruning.sosp_i import greedy_order
from sosp_cli.structures import StructureSet
from tiny import TinyGLU, TinyHead, TinyMLP, TinyResNet, TinyResNeXt, randomize_batchnorm

CASES = {"mlp": (TinyMLP, (9, 6), 3), "resnet": (TinyResNet, (9, 2, 5, 5), 4),
         "resnext": (TinyResNeXt, (9, 2, 5, 5), 4), "batchnorm1d": (TinyHead, (9, 2, 5, 5), 4),
         "glu": (functools.partial(TinyGLU, residual=False), (9, 2, 5, 5), 4),
         "glu_grouped": (functools.partial(TinyGLU, width=4, residual=False, groups=2), (9, 2, 5, 5), 4)}


def setup(case):
    cls, shape, classes = CASES[case]
    model = randomize_batchnorm(cls(), torch.Generator().manual_seed(1)).double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, classes, (shape[0],))
    ss = StructureSet(model, x[:1])
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    return model, ss, x, y, batches


def brute_force(model, ss, x, y):
    """g, GN Q and Hessian H of the mean CE w.r.t. the gates, from explicit derivatives."""
    def logits(c):
        with ss.gated(model, c):
            return model(x)

    def loss(c):
        return F.cross_entropy(logits(c), y)

    c = torch.ones(ss.num_structures, dtype=torch.float64)
    g = torch.autograd.functional.jacobian(loss, c)
    H = torch.autograd.functional.hessian(loss, c)
    J = torch.autograd.functional.jacobian(logits, c)           # [N, C, S]
    p = torch.softmax(logits(c), 1).detach()
    R = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    Q = torch.einsum("ncs,ncd,ndt->st", J, R, J) / len(y)       # column by column: J_nᵀ R_n J_n
    return g, Q, H


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dual", ["stacked", "forward_ad"])
def test_curvature_vector_products_match_brute_force(case, dual):
    model, ss, x, y, batches = setup(case)
    g, Q, _ = brute_force(model, ss, x, y)
    d = torch.rand(ss.num_structures, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for direction in (torch.ones(ss.num_structures), d):
        g1, qd = curvature_product(model, ss, batches, direction, "cpu", "gn", dual=dual)
        assert rel_err(g1, g) <= 1e-4 and rel_err(qd, Q @ direction.double()) <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_gradient_and_curvature_products_match_brute_force(case):
    model, ss, x, y, batches = setup(case)
    g, Q, H = brute_force(model, ss, x, y)
    ones = torch.ones(ss.num_structures)
    g1, v = curvature_product(model, ss, batches, ones, "cpu", "gn")
    assert rel_err(g1, g) <= 1e-4 and rel_err(v, Q.sum(1)) <= 1e-4
    _, hv = curvature_product(model, ss, batches, ones, "cpu", "hessian")
    assert rel_err(hv, H.sum(1)) <= 1e-4
    g2, Qfull = curvature_matrix(model, ss, batches, "cpu", "gn", chunk_size=2)
    assert rel_err(g2, g) <= 1e-4 and rel_err(Qfull, Q) <= 1e-4
    _, Hfull = curvature_matrix(model, ss, batches, "cpu", "hessian", chunk_size=3)
    assert rel_err(Hfull, H) <= 1e-4
    _, diag = curvature_matrix(model, ss, batches, "cpu", "gn", diagonal_only=True)
    assert rel_err(diag, Q.diagonal()) <= 1e-4
    _, hdiag = curvature_matrix(model, ss, batches, "cpu", "hessian", chunk_size=3, diagonal_only=True)
    assert rel_err(hdiag, H.diagonal()) <= 1e-4


@pytest.mark.parametrize("diagonal_only", [False, True], ids=["sosp_i", "obd"])
def test_gauss_newton_memory_does_not_grow_with_the_number_of_classes(diagonal_only):
    """Q is summed one chunk of factor rows at a time (memory O(S² + chunk_size·B·S)): with 8×
    the classes, a batch's C·B factor rows grow by 16 MiB here, the peak by less than 1.6."""
    peaks, rows = [], []
    for classes in (16, 128):
        torch.manual_seed(0)
        model = TinyMLP(d_in=6, hidden=300, classes=classes).double().eval()
        x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, classes, (32,))
        ss = StructureSet(model, x[:1])
        rows.append(classes * len(y) * ss.num_structures * 8 / 2**20)
        peaks.append(peak_tensor_mb(lambda: curvature_matrix(
            model, ss, [(x, y)], "cpu", "gn", chunk_size=4, diagonal_only=diagonal_only)))
    assert rows[1] - rows[0] > 16
    assert 0 < peaks[1] - peaks[0] < 0.1 * (rows[1] - rows[0])


def test_gauss_newton_accumulation_is_counted_in_flops():
    """Q += FᵀF is a counted matrix product (the benchmark's FLOPs column): the full matrix costs
    exactly 2·S²·(C·B) FLOPs more than its diagonal, which uses the same backward passes."""
    model, ss, x, y, batches = setup("mlp")
    full, _ = count_work(lambda: curvature_matrix(model, ss, batches, "cpu", "gn", chunk_size=2))
    diag, _ = count_work(lambda: curvature_matrix(model, ss, batches, "cpu", "gn", chunk_size=2, diagonal_only=True))
    assert full - diag == 2 * ss.num_structures ** 2 * CASES["mlp"][2] * len(y)


def test_hessian_diagonal_holds_no_s_by_s_matrix():
    """obd with curvature=hessian keeps the diagonal of each chunk of Hessian rows only."""
    torch.manual_seed(0)
    model = TinyMLP(d_in=6, hidden=300, classes=8).double().eval()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 8, (32,))
    ss = StructureSet(model, x[:1])
    square = ss.num_structures ** 2 * 8 / 2**20
    assert peak_tensor_mb(lambda: curvature_matrix(model, ss, [(x, y)], "cpu", "hessian", chunk_size=4,
                                                   diagonal_only=True)) < square


def test_hessian_is_symmetrised_in_place_block_by_block():
    """The exact Hessian's (H + Hᵀ)/2, block pair by block pair (blocks that do not divide S,
    one that exceeds it): exactly the full-matrix formula, with no S×S temporary."""
    from sosp_cli.pruning.derivatives import _symmetrised_
    gen = torch.Generator().manual_seed(0)
    for S, block in ((9, 4), (7, 3), (5, 8)):
        h = torch.randn(S, S, generator=gen, dtype=torch.float64)
        want = (h + h.T) * 0.5
        assert torch.equal(_symmetrised_(h, block), want) and torch.equal(h, want)
    h = torch.randn(2048, 2048, generator=gen, dtype=torch.float64)    # 32 MiB
    assert peak_tensor_mb(lambda: _symmetrised_(h, 512)) < 8


@pytest.mark.parametrize("selection", ["score", "greedy"])
def test_sosp_i_scores_hold_no_second_s_by_s_matrix(selection, monkeypatch):
    """Beside Q itself, scoring (Σ_s'|Q_ss'|, a block of rows at a time) and the greedy growth
    (float64 column by column) hold less than an S×S float32 temporary — with S = 20000 (the
    default max_structures) Q alone is 1.5 GiB."""
    from sosp_cli.pruning import sosp_i
    S = 4096   # Q 64 MiB; a block of 1024 rows 16 MiB
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(S, 16, generator=gen)
    Q, g = A @ A.T, torch.randn(S, generator=gen)
    monkeypatch.setattr(sosp_i, "curvature_matrix", lambda *args, **kwargs: (g, Q))
    ss = type("Structures", (), {"num_structures": S, "group_of": lambda self: torch.arange(S) // 16})()
    crit = get_criterion(MethodConfig(name="sosp_i", selection=selection))
    inp = SaliencyInput(None, ss, [None], torch.device("cpu"), removable=[8] * (S // 16))
    out = {}
    peak = peak_tensor_mb(lambda: out.update(sal=crit.compute(inp)))
    assert peak < 0.5 * S * S * 4 / 2**20
    want = Q.abs().sum(1)
    assert torch.allclose(out["sal"].second_order, want, rtol=1e-6)
    if selection == "score":
        assert torch.allclose(out["sal"].scores, g.abs() + 0.5 * want, rtol=1e-6)
    else:
        assert torch.equal(out["sal"].scores.long(), greedy_order(g.double(), Q.double(), ss.group_of(), inp.removable))


@pytest.mark.parametrize("case", CASES)
def test_gauss_newton_is_symmetric_psd_and_rows_sum_to_sosp_h(case):
    model, ss, x, y, batches = setup(case)
    _, Q = curvature_matrix(model, ss, batches, "cpu", "gn")
    assert torch.allclose(Q, Q.T, atol=1e-12)
    assert torch.linalg.eigvalsh(Q).min() >= -1e-10
    _, v = curvature_product(model, ss, batches, torch.ones(ss.num_structures), "cpu", "gn")
    assert rel_err(v, Q.sum(1)) <= 1e-10


@pytest.mark.parametrize("case", CASES)
def test_fisher_mc_is_unbiased_for_gauss_newton(case):
    model, ss, x, y, batches = setup(case)
    _, Q = curvature_matrix(model, ss, batches, "cpu", "gn")
    gen = torch.Generator().manual_seed(0)
    draws = [curvature_matrix(model, ss, batches, "cpu", "fisher_mc", generator=gen)[1] for _ in range(400)]
    assert rel_err(torch.stack(draws).mean(0), Q) < 0.15


@pytest.mark.parametrize("case", CASES)
def test_quadratic_model_error_shrinks_cubically(case):
    model, ss, x, y, _ = setup(case)
    g, _, H = brute_force(model, ss, x, y)

    def loss(c):
        with torch.no_grad(), ss.gated(model, c):
            return F.cross_entropy(model(x), y)

    c = torch.ones(ss.num_structures, dtype=torch.float64)
    direction = torch.randn(ss.num_structures, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    errors = []
    for t in (1e-1, 5e-2, 2.5e-2):
        d = t * direction
        predicted = g @ d + 0.5 * d @ H @ d
        errors.append(abs((loss(c + d) - loss(c)) - predicted).item())
    # halving |δ| divides a third-order error by ~8
    assert 5.0 < errors[0] / errors[1] < 11.0 and 5.0 < errors[1] / errors[2] < 11.0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("combine", ["abs_sum", "abs_joint", "second_only"])
def test_method_scores_match_formulas(case, combine):
    model, ss, x, y, batches = setup(case)
    g, Q, H = brute_force(model, ss, x, y)
    expected = {
        "sosp_h": (Q.sum(1), "gn"), "sosp_i": (Q.abs().sum(1), "gn"), "obd": (Q.diagonal(), "gn"),
    }
    for method, (r, curvature) in expected.items():
        crit = get_criterion(MethodConfig(name=method, combine=combine, curvature=curvature))
        got = crit.compute(SaliencyInput(model, ss, batches, torch.device("cpu"))).scores
        want = {"abs_sum": g.abs() + 0.5 * r.abs(), "abs_joint": (-g + 0.5 * r).abs(),
                "second_only": 0.5 * r.abs()}[combine]
        assert rel_err(got, want) <= 1e-4, method
    crit = get_criterion(MethodConfig(name="sosp_h", combine=combine, curvature="hessian"))
    got = crit.compute(SaliencyInput(model, ss, batches, torch.device("cpu"))).scores
    r = H.sum(1)
    want = {"abs_sum": g.abs() + 0.5 * r.abs(), "abs_joint": (-g + 0.5 * r).abs(),
            "second_only": 0.5 * r.abs()}[combine]
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_taylor_is_mean_squared_batch_gradient(case):
    model, ss, x, y, batches = setup(case)
    want = torch.zeros(ss.num_structures, dtype=torch.float64)
    for xb, yb in batches:
        g, _, _ = brute_force(model, ss, xb, yb)
        want += g.pow(2) / len(batches)
    got = get_criterion(MethodConfig(name="taylor")).compute(
        SaliencyInput(model, ss, batches, torch.device("cpu"))).scores
    assert rel_err(got, want) <= 1e-4


def test_greedy_order_is_exhaustive_optimum_on_small_problem():
    """Each greedy step takes the structure with the smallest increase of the quadratic model."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    Q, g = A @ A.T, torch.randn(6, generator=gen, dtype=torch.float64)
    order = greedy_order(g, Q)
    model = lambda m: (-g[m]).sum() + 0.5 * Q[m][:, m].sum()  # noqa: E731
    chosen = []
    for step in range(6):
        s = int((order == step).nonzero())
        rest = [t for t in range(6) if t not in chosen]
        best = min(rest, key=lambda t: model(torch.tensor(chosen + [t])).item())
        assert s == best
        chosen.append(s)


def _constrained_greedy(g, Q, group, caps, steps):
    """Brute force: each step adds, among the structures whose group is under its cap, the one
    whose addition gives the smallest quadratic model Σ_M(−g) + ½ 1_Mᵀ Q 1_M."""
    model = lambda m: (-g[m]).sum() + 0.5 * Q[m][:, m].sum()  # noqa: E731
    chosen, lost = [], [0] * len(caps)
    for _ in range(steps):
        rest = [t for t in range(len(g)) if t not in chosen and lost[group[t]] < caps[group[t]]]
        best = min(rest, key=lambda t: model(torch.tensor(chosen + [t])).item())
        chosen.append(best)
        lost[group[best]] += 1
    return chosen


def test_greedy_growth_within_caps_is_the_constrained_optimum_step_by_step():
    """With per-group caps (the prune guards), every step takes the best structure among those
    whose group is under its cap; once no group is, the others follow."""
    gen = torch.Generator().manual_seed(4)
    A = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    Q, g = A @ A.T, torch.randn(8, generator=gen, dtype=torch.float64)
    group, caps = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2]), [1, 2, 0]
    order = greedy_order(g, Q, group, caps)
    steps = [int((order == k).nonzero()) for k in range(8)]
    assert steps[:3] == _constrained_greedy(g, Q, group.tolist(), caps, 3)
    assert sorted(order.tolist()) == list(range(8))
    assert {int(group[s]) for s in steps[:3]} == {0, 1}                  # within the caps first
    assert torch.equal(greedy_order(g, Q, group, [3, 3, 2]), greedy_order(g, Q))   # caps never hit


def test_greedy_selection_under_guards_removes_the_constrained_greedy_set():
    """``min_channels=2`` on the tiny ResNet (two groups of 3): each group may lose one structure.
    The unconstrained growth takes two of one group first, so the selection would skip the
    second and remove a set chosen on a curvature sum that included it; the growth within the
    caps removes exactly the brute-force constrained greedy set, and nothing is skipped."""
    from sosp_cli.budget import CostModel
    from sosp_cli.selection import removal_caps, select
    torch.manual_seed(2)   # data on which the unconstrained growth takes two of one group first
    model, ss, x, y, batches = setup("resnet")
    g, Q, _ = brute_force(model, ss, x, y)
    caps = removal_caps(ss, None, min_channels=2, max_layer_ratio=1.0)
    assert caps == [1, 1]
    crit = get_criterion(MethodConfig(name="sosp_i", selection="greedy"))
    sal = crit.compute(SaliencyInput(model, ss, batches, torch.device("cpu"), removable=caps))
    sel = select(sal.scores, ss, CostModel(model, ss, x[:1]), 2 / 6, min_channels=2)
    names = ss.names()
    want = _constrained_greedy(g, Q, ss.group_of().tolist(), caps, 2)
    assert sel.remove == [names[i] for i in sorted(want)] and sel.guard_skipped == 0
    free = crit.compute(SaliencyInput(model, ss, batches, torch.device("cpu")))
    old = select(free.scores, ss, CostModel(model, ss, x[:1]), 2 / 6, min_channels=2)
    assert old.guard_skipped == 2 and old.remove != sel.remove       # what the caps change


def test_api_greedy_growth_takes_the_guards_select_will_apply():
    """``api.saliency(..., selection="greedy", guards=...)`` grows within the caps of those
    guards, so ``api.select`` with the same guards removes the constrained greedy set; guards
    with score selection, unknown ones and bad values are one line each."""
    from sosp_cli.errors import SospError
    from sosp_cli.selection import removal_caps
    torch.manual_seed(2)   # the data of test_greedy_selection_under_guards_removes_the_constrained_greedy_set
    model, ss, x, y, batches = setup("resnet")
    g, Q, _ = brute_force(model, ss, x, y)
    scores = api.saliency(model, batches, "sosp_i", selection="greedy", guards={"min_channels": 2})
    caps = removal_caps(ss, None, 2, 1.0)
    assert torch.equal(torch.tensor(list(scores.values())).long(), greedy_order(g, Q, ss.group_of(), caps))
    sel = api.select(model, scores, 2 / 6, x[:1], min_channels=2)
    names = ss.names()
    assert sel.remove == [names[i] for i in sorted(_constrained_greedy(g, Q, ss.group_of().tolist(), caps, 2))]
    for kwargs, needle in [(dict(guards={"min_channels": 2}), r"^saliency\(\) got guards=\{'min_channels': 2\} "
                                                              r"with selection='score': only the greedy growth"),
                           (dict(selection="greedy", guards={"min_chanels": 2}),
                            r"^saliency\(\) got unknown guard min_chanels; accepted: max_layer_ratio, min_channels, round_to$"),
                           (dict(selection="greedy", guards={"round_to": 0}), r"^prune.round_to=0 must be an integer >= 1")]:
        with pytest.raises(SospError, match=needle):
            api.saliency(model, batches, "sosp_i", **kwargs)


def test_api_saliency_returns_one_score_per_structure():
    model = api.create_model("resnet20", width=0.25)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    names = api.structures(model, x[:1])
    for method in ("sosp_h", "sosp_i", "taylor", "obd", "l1", "bn_scale", "random"):
        scores = api.saliency(model, [(x, y)], method, example_input=x[:1])
        assert list(scores) == names
        assert all(s == s for s in scores.values())  # no NaN
    a = api.saliency(model, [(x, y)], "sosp_h", combine="abs_joint", curvature="hessian")
    assert len(a) == len(names)
    from sosp_cli.errors import SospError
    with pytest.raises(SospError, match=r"^saliency\(\) got unknown option combin; accepted: chunk_size, "
                                        r"combine, curvature, max_structures, selection, sparsity, stack_batch"):
        api.saliency(model, [(x, y)], "sosp_h", combin="abs_sum")


@pytest.mark.parametrize("bad, needle", [
    (lambda x, y: x, r"is a Tensor; each batch must be \(inputs, targets\), two tensors"),
    (lambda x, y: (x, y, y), r"is a tuple of 3; each batch must be"),
    (lambda x, y: (x, y[:4]), r"has targets of shape \(4,\) and dtype torch.int64 for 8 inputs; expected "
                              r"one integer class index per input"),
    (lambda x, y: (x, y.float()), r"has targets of shape \(8,\) and dtype torch.float32 for 8 inputs"),
    (lambda x, y: (x, y + 10), r"has class index 1\d; the model has 10 outputs \(indices 0 to 9\)"),
    (lambda x, y: (x, y - 20), r"has class index -\d+; the model has 10 outputs"),
], ids=["tensor", "triple", "short-targets", "float-targets", "index-too-high", "index-negative"])
def test_api_saliency_names_a_batch_it_cannot_use_in_one_line(bad, needle):
    """Batches that are not (inputs, class indices) for this model: one line naming the batch,
    before any pass (not PyTorch's error from inside the loss); (inputs, targets) as a list —
    a DataLoader's default collation — is a batch."""
    from sosp_cli.errors import SospError
    model = api.create_model("resnet20", width=0.25)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    with pytest.raises(SospError, match=r"^saliency\(\) batches\[1\] " + needle):
        api.saliency(model, [(x, y), bad(x, y)], "sosp_h")
    assert list(api.saliency(model, [[x, y]], "sosp_h")) == api.structures(model, x[:1])


def test_api_devices_and_seeds_it_cannot_use_are_one_line(monkeypatch):
    """``saliency(device=...)``: a string that is no device, a kind sosp does not compute on, CUDA
    where there is none or an index beyond the devices — one line each, before the model is
    copied (not PyTorch's driver error from the first transfer); seeds as ``seed=`` of sosp-run.
    ``check_gates`` needs at least one trial."""
    from sosp_cli.errors import SospError
    model = api.create_model("resnet20", width=0.25)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for device, needle in (("gpu", r"device='gpu' is not a device \(RuntimeError: Expected one of cpu, cuda"),
                           ("meta", r"device='meta': sosp computes on 'cpu' or 'cuda' devices"),
                           ("cuda", r"device='cuda' but no CUDA device is available; use 'cpu'")):
        with pytest.raises(SospError, match=r"^saliency\(\) " + needle):
            api.saliency(model, [(x, y)], "sosp_h", device=device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SospError, match=r"device='cuda:2' but this machine has 2 CUDA devices \(indices 0 to 1\)$"):
        api.saliency(model, [(x, y)], "sosp_h", device="cuda:2")
    with pytest.raises(SospError, match=r"^saliency\(\) seed=-1 must be an integer in \[0, "):
        api.saliency(model, [(x, y)], "random", seed=-1)
    with pytest.raises(SospError, match=r"^check_gates\(\) trials=0: expected an integer >= 1"):
        api.check_gates(model, x, trials=0)


def test_api_saliency_names_inputs_the_model_cannot_run_in_one_line():
    from sosp_cli.errors import SospError
    model = api.create_model("resnet20", width=0.25)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    with pytest.raises(SospError, match=r"^saliency\(\) batches\[0\]: the model does not run on inputs of "
                                        r"shape \(8, 1, 16, 16\) \(RuntimeError: .*3 channels"):
        api.saliency(model, [(x, y)], "sosp_h", example_input=torch.zeros(1, 3, 16, 16))


def test_api_saliency_refuses_a_model_that_does_not_return_logits_in_one_line():
    from sosp_cli.errors import SospError

    class Named(torch.nn.Module):   # returns {"logits": z}, as some training code's models do
        def __init__(self):
            super().__init__()
            self.net = api.create_model("resnet20", width=0.25)

        def forward(self, x):
            return {"logits": self.net(x)}

    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    with pytest.raises(SospError, match=r"^saliency\(\) needs a model that returns logits, a tensor \[batch, "
                                        r"classes\]; this one returns a dict: wrap it"):
        api.saliency(Named(), [(x, y)], "sosp_h", example_input=x[:1])


@pytest.mark.parametrize("curvature", ["gn", "hessian"])
def test_diagnostics_quadratic_prediction_matches_brute_force(curvature):
    from sosp_cli.diagnostics import loss_prediction
    model, ss, x, y, batches = setup("resnet")
    g, Q, H = brute_force(model, ss, x, y)
    curv = Q if curvature == "gn" else H
    remove = torch.tensor([0, 2])
    d = loss_prediction(model, ss, batches, remove, "cpu", curvature, samples=4)
    m = torch.zeros(ss.num_structures, dtype=torch.float64)
    m[remove] = 1
    assert d["predicted_first_order"] == pytest.approx(float(-g @ m), rel=1e-6)
    assert d["predicted_second_order"] == pytest.approx(float(-g @ m + 0.5 * m @ curv @ m), rel=1e-6)
    gates = torch.ones(ss.num_structures, dtype=torch.float64)
    gates[remove] = 0
    with torch.no_grad(), ss.gated(model, gates):
        real = F.cross_entropy(model(x), y)
    with torch.no_grad():
        base = F.cross_entropy(model(x), y)
    assert d["real"] == pytest.approx(float(real - base), rel=1e-6)
    assert -1.0 <= d["single_spearman"] <= 1.0 and len(d["single_real"]) == 4


def test_sosp_i_refuses_too_many_structures_and_names_sosp_h():
    from sosp_cli.errors import SospError
    model, ss, x, y, batches = setup("mlp")
    crit = get_criterion(MethodConfig(name="sosp_i", max_structures=5))
    with pytest.raises(SospError, match=r"S=10 structures \(> method.max_structures=5; Q alone: 400.0 B\); "
                       "use method=sosp_h"):
        crit.compute(SaliencyInput(model, ss, batches, torch.device("cpu")))
    # Q's float32 bytes in the unit that shows them: 30² → 3.5 KiB, 1000² → 3.8 MiB, 20000² → 1.5 GiB
    for S, size in ((30, "3.5 KiB"), (1000, "3.8 MiB"), (20000, "1.5 GiB")):
        with pytest.raises(SospError, match=f"Q alone: {size}"):
            crit.check_structures(S)


def test_greedy_selection_reproduces_the_greedy_set():
    model, ss, x, y, batches = setup("resnet")
    crit = get_criterion(MethodConfig(name="sosp_i", selection="greedy"))
    sal = crit.compute(SaliencyInput(model, ss, batches, torch.device("cpu")))
    g, Q, _ = brute_force(model, ss, x, y)
    assert torch.equal(sal.scores.long(), greedy_order(g, Q))


DERIVATIVE_PASSES = {
    "gradient": lambda m, ss, b: gradient(m, ss, b, "cpu"),
    "batch_gradients": lambda m, ss, b: list(batch_gradients(m, ss, b, "cpu")),
    "stacked": lambda m, ss, b: curvature_product(m, ss, b, torch.ones(ss.num_structures), "cpu", dual="stacked"),
    "forward_ad": lambda m, ss, b: curvature_product(m, ss, b, torch.ones(ss.num_structures), "cpu", dual="forward_ad"),
    "hessian_vector": lambda m, ss, b: curvature_product(m, ss, b, torch.ones(ss.num_structures), "cpu", "hessian"),
    "gn_matrix": lambda m, ss, b: curvature_matrix(m, ss, b, "cpu", "gn"),
    "hessian_matrix": lambda m, ss, b: curvature_matrix(m, ss, b, "cpu", "hessian"),
    "joint_forward_ad": lambda m, ss, b: _joint_fallback(m, ss, b),
}


def _joint_fallback(model, ss, batches):
    derivatives._NOT_STACKABLE[model] = "test: the forward-mode AD path of joint_product"
    return joint_product(model, ss, batches, torch.ones(ss.num_structures), "cpu")


@pytest.mark.parametrize("path", DERIVATIVE_PASSES)
def test_each_pass_releases_its_graph_before_the_next(path):
    """A finished pass's logits (and through them its autograd graph) must be gone when the next
    pass starts: kept alive, they raised the next forward pass's peak memory by ~40 %."""
    model, ss, x, y, batches = setup("resnet")
    outputs, alive_at_start = [], []
    pre = model.register_forward_pre_hook(
        lambda module, args: alive_at_start.append([ref() is not None for ref in outputs]))
    post = model.register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
    try:
        DERIVATIVE_PASSES[path](model, ss, batches)
    finally:
        pre.remove()
        post.remove()
    assert len(alive_at_start) >= 2
    assert not any(any(alive) for alive in alive_at_start)


def batch_statistics_brute_force(model, ss, batches):
    """g, GN Q and Hessian H with BatchNorm on each batch's statistics: L is the sample-weighted
    mean of the batch losses, each batch normalised on its own (so summed batch by batch)."""
    n = sum(len(y) for _, y in batches)
    parts = [brute_force(model, ss, xb, yb) for xb, yb in batches]
    return [sum(p[k] * len(yb) / n for p, (_, yb) in zip(parts, batches)) for k in range(3)]


def test_batch_statistics_saliencies_match_brute_force():
    """``saliency.batchnorm=batch``: every quantity sosp_h, taylor and the Hessian paths compute
    equals brute force on the model whose BatchNorm normalises each batch on its own — which
    differs from the running-statistics one (else the test would prove nothing)."""
    model, ss, x, y, batches = setup("resnet")
    work = saliency_model(model, "batch", batches)
    g, Q, H = batch_statistics_brute_force(work, ss, batches)
    g_running, _, _ = brute_force(model, ss, x, y)
    assert rel_err(g_running, g) > 1e-2
    ones = torch.ones(ss.num_structures)
    for dual in ("stacked", "forward_ad"):
        g1, v = curvature_product(work, ss, batches, ones, "cpu", "gn", dual=dual)
        assert rel_err(g1, g) <= 1e-4 and rel_err(v, Q.sum(1)) <= 1e-4, dual
    _, hv = curvature_product(work, ss, batches, ones, "cpu", "hessian")
    assert rel_err(hv, H.sum(1)) <= 1e-4
    _, Hfull = curvature_matrix(work, ss, batches, "cpu", "hessian", chunk_size=3)
    assert rel_err(Hfull, H) <= 1e-4
    taylor = sum(brute_force(work, ss, xb, yb)[0].pow(2) for xb, yb in batches) / len(batches)
    got = get_criterion(MethodConfig(name="taylor")).compute(
        SaliencyInput(work, ss, batches, torch.device("cpu"))).scores
    assert rel_err(got, taylor) <= 1e-4
    sosp_h = api.saliency(model, batches, "sosp_h", batchnorm="batch")
    assert rel_err(torch.tensor(list(sosp_h.values()), dtype=torch.float64),
                   g.abs() + 0.5 * Q.sum(1).abs()) <= 1e-4


def test_batch_statistics_leave_the_model_as_it_was():
    model, ss, x, y, batches = setup("resnet")
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scores = api.saliency(model, batches, "sosp_h", batchnorm="batch")
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert scores != api.saliency(model, batches, "sosp_h")


def test_batch_statistics_copy_the_model_once(monkeypatch):
    """``saliency_model`` converts a copy unless told it owns one; ``api.saliency``, which copies
    the caller's model anyway, converts that copy instead of copying it a second time."""
    import copy
    model, ss, x, y, batches = setup("resnet")
    has_running_stats = lambda m: all(b.running_mean is not None for b in m.modules()
                                      if isinstance(b, torch.nn.BatchNorm2d))
    work = saliency_model(model, "batch", batches)
    assert work is not model and has_running_stats(model) and not has_running_stats(work)
    mine = copy.deepcopy(model)
    assert saliency_model(mine, "batch", batches, inplace=True) is mine and not has_running_stats(mine)
    copied, deepcopy = [], copy.deepcopy

    def counting_deepcopy(obj, *args, **kwargs):
        if type(obj) is type(model):   # the whole network (not its submodules, copied recursively)
            copied.append(obj)
        return deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", counting_deepcopy)
    api.saliency(model, batches, "sosp_h", batchnorm="batch")
    assert len(copied) == 1 and copied[0] is model


@pytest.mark.parametrize("method,curvature", [("sosp_i", "gn"), ("sosp_i", "fisher_mc"), ("obd", "gn")])
def test_per_sample_curvatures_refuse_batch_statistics(method, curvature):
    from sosp_cli.errors import SospError
    model, ss, x, y, batches = setup("resnet")
    with pytest.raises(SospError) as err:
        api.saliency(model, batches, method, batchnorm="batch", curvature=curvature)
    assert str(err.value) == (
        f"saliency.batchnorm=batch is not accepted for {method} with method.curvature={curvature}: "
        "its per-sample gate Jacobians are undefined when batch statistics couple the samples of "
        "a batch; use saliency.batchnorm=running, or method.curvature=hessian")
    with pytest.raises(SospError, match="^per-sample gate Jacobians are undefined"):
        curvature_matrix(saliency_model(model, "batch", batches), ss, batches, "cpu", curvature)
    assert len(api.saliency(model, batches, method, batchnorm="batch", curvature="hessian")) == ss.num_structures


def test_bad_batchnorm_mode_and_single_sample_batches_are_one_line_errors():
    from sosp_cli.errors import SospError
    model, ss, x, y, batches = setup("resnet")
    with pytest.raises(SospError, match="^unknown saliency.batchnorm 'train'; accepted: batch, running$"):
        api.saliency(model, batches, "sosp_h", batchnorm="train")
    with pytest.raises(SospError, match="batch 2 has 1 sample: choose saliency.num_samples"):
        api.saliency(model, [(x[:4], y[:4]), (x[4:5], y[4:5])], "taylor", batchnorm="batch")


class _Excitation(torch.nn.Module):
    """A squeeze-and-excitation block gated by hardsigmoid (MobileNetV3's): PyTorch has no second
    derivative of hardsigmoid where its output multiplies an activation."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.bn = torch.nn.BatchNorm2d(6)
        self.fc = torch.nn.Conv2d(6, 6, 1)
        self.head = torch.nn.Conv2d(6, 5, 3)
        self.out = torch.nn.Linear(5, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = h * torch.nn.functional.hardsigmoid(self.fc(h.mean((2, 3), keepdim=True)))
        return self.out(self.head(h).mean((2, 3)))


@pytest.mark.parametrize("method", ["sosp_h", "sosp_i", "obd"])
def test_a_function_without_a_second_derivative_is_one_line_for_the_exact_hessian(method):
    from sosp_cli.api import saliency
    from sosp_cli.errors import SospError
    torch.manual_seed(0)
    model = _Excitation().eval()
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,))
    with pytest.raises(SospError, match=r"^method.curvature=hessian differentiates the model twice, and "
                       r"PyTorch has no derivative for aten::hardsigmoid_backward .*use method.curvature=gn"):
        saliency(model, [(x, y)], method, example_input=x[:1], curvature="hessian")
    scores = saliency(model, [(x, y)], method, example_input=x[:1])   # the Gauss–Newton matrix: fine
    assert all(math.isfinite(v) for v in scores.values())
