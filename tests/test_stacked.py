"""Stacked dual evaluation (pruning/stacked.py) against forward-mode AD, on every registered model,
and its fallback for functions without a stacked rule."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sosp_cli import api
from sosp_cli.errors import SospError
from sosp_cli.pruning import BATCHNORM, derivatives, paired, saliency_model, stacked
from sosp_cli.pruning.derivatives import curvature_product, joint_product, stackable
from sosp_cli.structures import StructureSet, classifier_name
from tiny import TinyFolds, TinyGLU, TinyHead, TinyInPlace, randomize_batchnorm

WIDTH = {"mobilenet_v2": 0.25, "resnet50": 0.125, "resnet18": 0.125}
LAYOUTS = ("whole", "pair")   # the two representations of a dual activation (stack_batch)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def float64_model(model, x):
    """Random BN statistics, and logits scaled to |z| ≤ 2 so that the softmax is not saturated
    (R, hence Q·d, would be ~0)."""
    model = randomize_batchnorm(model, torch.Generator().manual_seed(0)).double().eval()
    head = dict(model.named_modules())[classifier_name(model)]
    with torch.no_grad():
        scale = 2 / model(x).abs().max()
        head.weight.mul_(scale)
        if head.bias is not None:
            head.bias.mul_(scale)
    return model


def count_injections(monkeypatch, layout: str) -> list:
    """A list that grows by one whenever a layer adds the tangent injection to its output."""
    injections = []
    if layout == "pair":
        inject = paired._inject
        monkeypatch.setattr(paired, "_inject", lambda *a: injections.append(1) or inject(*a))
    else:
        add = stacked._add_primal_to_tangent
        monkeypatch.setattr(stacked, "_add_primal_to_tangent", lambda y: injections.append(1) or add(y))
    return injections


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batchnorm", BATCHNORM)
@pytest.mark.parametrize("direction", ["ones", "random"])
@pytest.mark.parametrize("name", api.list_models())
def test_stacked_equals_forward_mode_on_every_model(name, direction, batchnorm, layout, monkeypatch):
    """d = 1 (SOSP-H): convolutions and linear layers at gate sites add the tangent injection to
    their outputs; a random d: the gates inject it on their inputs. Both must equal forward mode,
    with BatchNorm on running statistics and on the batch's own (``saliency.batchnorm``), with
    the stacked rows (``whole``) and with primal and tangent as two tensors (``pair``)."""
    injections = count_injections(monkeypatch, layout)
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    model = float64_model(api.create_model(name, num_classes=5, width=WIDTH.get(name, 0.25)), x)
    y = torch.tensor([0, 3, 1])
    ss = StructureSet(model, x[:1])
    model = saliency_model(model, batchnorm, [(x, y)])
    d = torch.rand(ss.num_structures, dtype=torch.float64) if direction == "random" else \
        torch.ones(ss.num_structures, dtype=torch.float64)
    before = model(x)
    g1, q1 = curvature_product(model, ss, [(x, y)], d, "cpu", dual="forward_ad")
    g2, q2 = curvature_product(model, ss, [(x, y)], d, "cpu", dual="stacked", stack_batch=layout)
    assert stackable(model)
    assert q1.abs().max() > 0
    # batch statistics over as few as 3 values per channel (1×1 maps of the last stages) are
    # ill-conditioned: two float64 evaluation orders then differ by ~1e-9
    tol = 1e-10 if batchnorm == "running" else 1e-8
    assert rel_err(g2, g1) <= tol and rel_err(q2, q1) <= tol
    assert bool(injections) == (direction == "ones")
    assert torch.equal(model(x), before)                       # model left as it was
    assert all(p.requires_grad for p in model.parameters())


def tiny_errors(make_model, direction: str, layout: str, batchnorm: str | None = None):
    """Relative errors of (g, Q·d) from the ``layout`` pass (``dual="stacked"``: a function
    without a rule raises instead of falling back) against forward mode, on ``make_model()`` with
    random BatchNorm statistics in float64, six 2 × 5 × 5 inputs, d = 1 or random;
    ``batchnorm``: :func:`saliency_model`'s statistics. Checks that Q·d is not 0."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.tensor([0, 3, 1, 2, 2, 0])
    model = randomize_batchnorm(make_model(), torch.Generator().manual_seed(1)).double().eval()
    ss = StructureSet(model, x[:1])
    if batchnorm is not None:
        model = saliency_model(model, batchnorm, [(x, y)])
    d = torch.rand(ss.num_structures, dtype=torch.float64) if direction == "random" else \
        torch.ones(ss.num_structures, dtype=torch.float64)
    g1, q1 = curvature_product(model, ss, [(x, y)], d, "cpu", dual="forward_ad")
    g2, q2 = curvature_product(model, ss, [(x, y)], d, "cpu", dual="stacked", stack_batch=layout)
    assert q1.abs().max() > 0 and stackable(model)
    return rel_err(g2, g1), rel_err(q2, q1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batchnorm", BATCHNORM)
@pytest.mark.parametrize("direction", ["ones", "random"])
def test_batchnorm1d_has_a_stacked_rule(direction, batchnorm, layout):
    """BatchNorm1d — on [B, C] in an MLP head and on a flattened [B, C, H·W] map — runs the
    BatchNorm rule (running statistics: the per-channel affine map; batch statistics: ATen's
    fused kernels) on both layouts, equal to forward mode, instead of falling back to it."""
    errors = tiny_errors(TinyHead, direction, layout, batchnorm)
    assert max(errors) <= 1e-10


@pytest.mark.parametrize("direction", ["ones", "random"])
def test_paired_batchnorm_folds_its_scale_into_the_tangents_layer(direction, monkeypatch):
    """``pair``: the tangent of a bias-free convolution or linear layer is computed by its
    reader — by an eval-mode BatchNorm as the layer with the BatchNorm scale folded into the
    weight (plus the injection, d = 1), by any other reader as the layer itself — equal to
    forward mode. Each (layer, folded, injection) computed is recorded, in order of the pass."""
    computed = []
    tangent = paired._Pending.tangent

    def record(self, injection, scale=None):
        computed.append((self.layer.__name__[6:], scale is not None, self.inject))
        return tangent(self, injection, scale)
    monkeypatch.setattr(paired._Pending, "tangent", record)
    errors = tiny_errors(TinyFolds, direction, "pair")   # forward mode computes no _Pending
    assert max(errors) <= 1e-12
    inject = direction == "ones"
    # d = 1: conv2's input has no tangent yet (one evaluation, _FirstInjecting); fc has a bias
    conv2 = [] if inject else [("Conv", True, False)]
    assert computed == conv2 + [("Conv", True, inject), ("Conv", False, inject), ("Conv", False, inject),
                                ("Linear", True, inject), ("Linear", False, inject)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("direction", ["ones", "random"])
def test_an_in_place_addition_after_a_layer_read_its_input(direction, layout):
    """``h += ...`` after a depthwise convolution read h, before the convolution's BatchNorm:
    the convolution's tangent, which ``pair`` computes in the BatchNorm, is that of h as the
    convolution read it (``pair`` gave Q·d 8 % off when the addition changed h's tangent in place)."""
    assert max(tiny_errors(TinyInPlace, direction, layout)) <= 1e-12


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("direction", ["ones", "random"])
@pytest.mark.parametrize("residual", [False, True], ids=["glu", "glu_residual"])
def test_a_gated_linear_unit_has_stacked_rules(residual, direction, layout):
    """chunk, sigmoid and the product of the two halves (structures of two channels each) run
    on both layouts, equal to forward mode."""
    assert max(tiny_errors(lambda: TinyGLU(residual=residual), direction, layout)) <= 1e-12


# an activation called in place whose result the model drops: it goes on with its input
IN_PLACE_CALLS = {
    "x.relu_()": lambda h: h.relu_(), "torch.relu_": torch.relu_, "F.relu_": F.relu_,
    "nn.ReLU(inplace=True)": nn.ReLU(inplace=True), "F.relu(x, True)": lambda h: F.relu(h, True),
    "F.hardtanh_": lambda h: F.hardtanh_(h, -0.5, 0.5), "F.relu6(inplace=True)": lambda h: F.relu6(h, inplace=True),
    "F.silu(x, True)": lambda h: F.silu(h, True), "nn.Hardswish(inplace=True)": nn.Hardswish(inplace=True),
    "F.elu(x, 1.0, True)": lambda h: F.elu(h, 1.0, True),
}


class DroppedResult(nn.Module):
    """conv → BN → ``act(h)`` as a statement → conv → linear."""

    def __init__(self, act):
        super().__init__()
        self.act = act
        self.c0, self.b0 = nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.c1, self.b1 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.c2, self.fc = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.Linear(3, 4)

    def forward(self, x):
        h = F.relu(self.b0(self.c0(x)))
        h = self.b1(self.c1(h))
        self.act(h)
        return self.fc(self.c2(h).mean((2, 3)))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("call", IN_PLACE_CALLS)
def test_an_activation_called_in_place_changes_its_input(call, layout):
    """``x.relu_()``, ``self.relu(x)`` with ``inplace=True`` and the like, their results dropped:
    the model goes on with x, which both layouts change in place as the model does (before,
    they computed the activation as a new tensor, and Q·1 was off by 1.8–30×, silently)."""
    assert max(tiny_errors(lambda: DroppedResult(IN_PLACE_CALLS[call]), "ones", layout)) <= 1e-12


@pytest.mark.parametrize("batchnorm", BATCHNORM)
def test_stack_batch_changes_the_passes_not_the_result(batchnorm, monkeypatch):
    """``method.stack_batch``: ``half`` runs two stacked passes per batch, ``whole`` one of 2B
    rows, ``pair`` one paired pass, and so does ``auto`` on a CPU. All equal forward mode."""
    passes = []
    for name in ("_stacked_pass", "_paired_pass"):
        run_pass = getattr(derivatives, name)
        monkeypatch.setattr(derivatives, name, lambda f, x, *a, run=run_pass, kind=name[1]:
                            passes.append((kind, len(x))) or run(f, x, *a))
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 3, 1, 4, 2, 0])
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    model = float64_model(api.create_model("resnet20", num_classes=5, width=0.25), x)
    ss = StructureSet(model, x[:1])
    model = saliency_model(model, batchnorm, batches)
    ones = torch.ones(ss.num_structures, dtype=torch.float64)
    ref = curvature_product(model, ss, batches, ones, "cpu", dual="forward_ad")
    expected = {"whole": [("s", 4), ("s", 2)], "half": [("s", 2), ("s", 2), ("s", 1), ("s", 1)],
                "auto": [("p", 4), ("p", 2)], "pair": [("p", 4), ("p", 2)]}   # auto on a CPU: pair
    for mode in ("auto", "half", "whole", "pair") if batchnorm == "running" else ("auto", "whole", "pair"):
        passes.clear()
        got = curvature_product(model, ss, batches, ones, "cpu", stack_batch=mode)
        assert passes == expected[mode], mode
        tol = 1e-10 if batchnorm == "running" else 1e-8
        assert rel_err(got[0], ref[0]) <= tol and rel_err(got[1], ref[1]) <= tol
        joint = joint_product(model, ss, batches, ones, "cpu", stack_batch=mode)
        assert rel_err(joint, -ref[0] + 0.5 * ref[1]) <= tol
    if batchnorm == "batch":
        with pytest.raises(SospError, match=r"^method.stack_batch=half is not accepted with saliency.batchnorm=batch"):
            curvature_product(model, ss, batches, ones, "cpu", stack_batch="half")
    with pytest.raises(SospError, match=r"^unknown method.stack_batch 'halves'; accepted: auto, half, pair, whole$"):
        curvature_product(model, ss, batches, ones, "cpu", stack_batch="halves")
    scores = {mode: api.saliency(model, batches, "sosp_h", stack_batch=mode) for mode in ("auto", "whole", "pair")}
    for mode in ("auto", "pair"):
        assert scores[mode].keys() == scores["whole"].keys()
        assert max(abs(scores[mode][k] - scores["whole"][k]) for k in scores[mode]) <= \
            1e-8 * max(abs(v) for v in scores["whole"].values())


@pytest.mark.parametrize("batchnorm", BATCHNORM)
def test_auto_takes_halves_after_a_whole_pass_runs_out_of_memory(batchnorm, monkeypatch):
    """``stack_batch=auto`` on a GPU (whole passes; here on the CPU with a GPU's choice): a whole
    pass that raises ``torch.cuda.OutOfMemoryError`` is redone in halves, and so is the rest of
    the call, with one warning; the result is still exact. ``whole``, and ``auto`` with batch
    statistics (where halves would change them), raise the error."""
    monkeypatch.setattr(derivatives, "AUTO_LAYOUT", {})
    passes = []
    run_pass = derivatives._stacked_pass

    def tight(forward, x, *args):
        passes.append(len(x))
        if len(x) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return run_pass(forward, x, *args)
    monkeypatch.setattr(derivatives, "_stacked_pass", tight)
    torch.manual_seed(0)
    x, y = torch.randn(7, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 3, 1, 4, 2, 0, 1])
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    model = float64_model(api.create_model("resnet20", num_classes=5, width=0.25), x)
    ss = StructureSet(model, x[:1])
    model = saliency_model(model, batchnorm, batches)
    ones = torch.ones(ss.num_structures, dtype=torch.float64)
    if batchnorm == "batch":
        with pytest.raises(torch.cuda.OutOfMemoryError):
            curvature_product(model, ss, batches, ones, "cpu")
        return
    ref = curvature_product(model, ss, batches, ones, "cpu", dual="forward_ad")
    with pytest.warns(UserWarning, match="ran out of memory: this call takes its batches in halves") as caught:
        got = curvature_product(model, ss, batches, ones, "cpu")
    assert len([w for w in caught if "out of memory" in str(w.message)]) == 1
    assert passes == [4, 2, 2, 2, 1]       # batch 1 whole (fails), in halves; batch 2 in halves
    assert rel_err(got[0], ref[0]) <= 1e-10 and rel_err(got[1], ref[1]) <= 1e-10
    assert stackable(model)
    passes.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        curvature_product(model, ss, batches, ones, "cpu", stack_batch="whole")
    assert passes == [4]


class TwoLayer(nn.Module):
    """fc2(middle(fc1(x))): ``middle`` runs before the first gate sites (fc2's inputs)."""

    def __init__(self, middle):
        super().__init__()
        self.fc1, self.fc2, self.middle = nn.Linear(4, 5), nn.Linear(5, 3), middle

    def forward(self, x):
        return self.fc2(self.middle(self.fc1(x)))


class ThreeLayer(TwoLayer):
    """fc3(middle(fc2(relu(fc1(x))))): ``middle`` acts on the stacked rows (after the gate
    sites of fc2's inputs), where the stacked rules must refuse it."""

    def __init__(self, middle):
        super().__init__(middle)
        self.fc3 = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc3(self.middle(self.fc2(torch.relu(self.fc1(x)))))


UNSUPPORTED = {
    "cumsum": lambda h: torch.cumsum(h, 0),                        # mixes the rows
    "reciprocal": lambda h: 1.0 / (h * h + 1.0),                   # a quotient by an activation
    "centred": lambda h: torch.relu(h) - torch.relu(h).mean(0, keepdim=True),  # mixes the rows
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("middle", UNSUPPORTED)
def test_functions_without_a_rule_before_the_first_gate_keep_the_stacked_path(middle, layout):
    """Before the first gate site nothing carries a tangent: the stacked pass runs the B rows
    through any function as it is, and stays exact."""
    torch.manual_seed(0)
    model = TwoLayer(UNSUPPORTED[middle]).double().eval()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    ss = StructureSet(model, x[:1])
    ones = torch.ones(ss.num_structures, dtype=torch.float64)
    ref = curvature_product(model, ss, [(x, y)], ones, "cpu", dual="forward_ad")
    got = curvature_product(model, ss, [(x, y)], ones, "cpu", dual="stacked", stack_batch=layout)
    assert stackable(model)
    assert rel_err(got[0], ref[0]) <= 1e-12 and rel_err(got[1], ref[1]) <= 1e-12


@pytest.mark.parametrize("middle", UNSUPPORTED)
def test_unsupported_functions_fall_back_to_forward_mode(middle):
    torch.manual_seed(0)
    model = ThreeLayer(UNSUPPORTED[middle]).double().eval()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    ss = StructureSet(model, x[:1])
    ones = torch.ones(ss.num_structures)
    before = model(x)
    for layout in LAYOUTS:
        with pytest.raises(SospError, match="dual='stacked'"):
            curvature_product(model, ss, [(x, y)], ones, "cpu", dual="stacked", stack_batch=layout)
        assert torch.equal(model(x), before) and all(p.requires_grad for p in model.parameters())
    ref = curvature_product(model, ss, [(x, y)], ones, "cpu", dual="forward_ad")
    with pytest.warns(UserWarning, match="ThreeLayer calls .* no stacked-dual rule: .* forward-mode AD"):
        auto = curvature_product(model, ss, [(x, y)], ones, "cpu")   # falls back, stays exact
    assert not stackable(model)
    assert rel_err(auto[0], ref[0]) <= 1e-12 and rel_err(auto[1], ref[1]) <= 1e-12
    joint = joint_product(model, ss, [(x, y)], ones, "cpu")
    assert rel_err(joint, -ref[0] + 0.5 * ref[1]) <= 1e-12


class Hooked(nn.Module):
    """fc3(relu(hook(fc2(relu(fc1(x)))))): the hook normalises the gradient it is given, so it
    mixes that gradient's rows (applied to both stacked row blocks at once, it would differ)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(x)))
        if h.requires_grad:
            h.register_hook(lambda g: g / g.norm())
        return self.fc3(torch.relu(h))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradient_hooks_see_each_row_block_like_forward_mode(layout):
    torch.manual_seed(0)
    model = Hooked().double().eval()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    batches = [(x[i:i + 1], y[i:i + 1]) for i in range(3)]   # one sample: halves are the batch
    ss = StructureSet(model, x[:1])
    ones = torch.ones(ss.num_structures, dtype=torch.float64)
    ref = curvature_product(model, ss, batches, ones, "cpu", dual="forward_ad")
    got = curvature_product(model, ss, batches, ones, "cpu", dual="stacked", stack_batch=layout)
    assert stackable(model)
    assert rel_err(got[0], ref[0]) <= 1e-12 and rel_err(got[1], ref[1]) <= 1e-12


def test_instrumentation_keeps_the_stacked_path():
    """``FlopCounterMode``'s module tracker reads ``grad_fn`` and registers gradient hooks on
    every module's tensors: the stacked path must not fall back (for good) because of it."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 3])
    model = float64_model(api.create_model("resnet20", num_classes=5, width=0.25), x)
    ss = StructureSet(model, x[:1])
    ones = torch.ones(ss.num_structures, dtype=torch.float64)
    ref = curvature_product(model, ss, [(x, y)], ones, "cpu", dual="forward_ad")
    with FlopCounterMode(display=False) as counter:
        got = curvature_product(model, ss, [(x, y)], ones, "cpu")
    assert stackable(model) and counter.get_total_flops() > 0
    assert rel_err(got[0], ref[0]) <= 1e-10 and rel_err(got[1], ref[1]) <= 1e-10


def test_bad_dual_mode_is_one_line_error():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    ss = StructureSet(model, torch.randn(1, 4))
    with pytest.raises(SospError, match="dual='fast'.*auto, stacked, forward_ad"):
        curvature_product(model, ss, [(torch.randn(2, 4), torch.tensor([0, 1]))],
                          torch.ones(ss.num_structures), "cpu", dual="fast")
    assert derivatives.DUAL_MODES == ("auto", "stacked", "forward_ad")


# the stacked pass detects the read on a 3-d tensor (2 × rows), where torch warns that ``.T`` is deprecated
@pytest.mark.filterwarnings("ignore:The use of `x.T` on tensors:UserWarning")
def test_attribute_reads_that_move_values_are_unsupported():
    torch.manual_seed(0)
    # reads ``h.T`` (rows become columns): no stacked rule, even though it is an attribute
    model = ThreeLayer(lambda h: torch.relu(h).T.T).double().eval()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    ss = StructureSet(model, x[:1])
    for layout in LAYOUTS:
        with pytest.raises(SospError, match="dual='stacked'.*Tensor.T "):
            curvature_product(model, ss, [(x, y)], torch.ones(ss.num_structures), "cpu", dual="stacked",
                              stack_batch=layout)


def test_nested_layer_swaps_unwind_in_order():
    """A block that swaps layer forwards inside another restores the enclosing block's forwards
    on exit (not the classes'), and the outer exit leaves the model untouched."""
    from sosp_cli.pruning.lean import swapped_forwards
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    before = model(x)

    def tagged(tag):
        return {kind: (lambda module, kind=kind: (tag, kind)) for kind in ("conv", "bn", "linear")}
    with swapped_forwards(model, tagged("outer")):
        with swapped_forwards(model, tagged("inner")):
            assert model[0].forward == ("inner", "conv") and model[3].forward == ("inner", "linear")
        assert model[0].forward == ("outer", "conv") and model[1].forward == ("outer", "bn")
        assert not any(p.requires_grad for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in model)
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("stride,padding,dilation,groups,size", [
    ((1, 1), (1, 1), (1, 1), 1, (9, 8)), ((2, 2), (1, 1), (1, 1), 1, (9, 8)),
    ((2, 3), (0, 2), (1, 2), 1, (11, 10)), ((2, 2), (1, 1), (1, 1), 4, (7, 7)),
    ((3, 1), (2, 0), (2, 1), 2, (13, 6))])
def test_frozen_conv_gradients_equal_autograd(stride, padding, dilation, groups, size):
    """FrozenConv's input gradient (a transposed convolution with output_padding for the rows a
    strided convolution never reads) and its forward-mode rule equal autograd of F.conv2d."""
    from sosp_cli.pruning.lean import FrozenConv
    import torch.autograd.forward_ad as fwAD
    torch.manual_seed(0)
    x = torch.randn(2, 4, *size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 4 // groups, 3, 2, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    args = (w, b, stride, padding, dilation, groups)
    y = FrozenConv.apply(x, *args)
    ref = F.conv2d(x, *args)
    g = torch.randn_like(ref)
    assert torch.allclose(y, ref)
    assert torch.allclose(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0], atol=1e-12)
    t = torch.randn_like(x)
    with fwAD.dual_level():
        jvp = fwAD.unpack_dual(FrozenConv.apply(fwAD.make_dual(x.detach(), t), *args)).tangent
    assert torch.allclose(jvp, F.conv2d(t, w, None, *args[2:]), atol=1e-12)


def _each_saved(fn, visit) -> None:
    """Runs ``fn()``, calling ``visit(t)`` on every tensor autograd saves for a backward pass."""
    def pack(t):
        visit(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward passes of ``fn``."""
    storages = {}
    _each_saved(fn, lambda t: storages.__setitem__(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
    return sum(storages.values())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batchnorm", BATCHNORM)
def test_a_whole_stacked_pass_keeps_what_a_first_order_pass_keeps(batchnorm, layout):
    """ReLU and gate sites keep only the primal rows, in one copy they share (batch-statistics
    BatchNorm only the primal rows of its input): the stacked rows
    (2B) are freed during the forward pass, so ``stack_batch=whole`` saves for its backward
    the bytes Taylor's first-order pass saves, up to a few small tensors (logits, gates); so
    does ``pair``, whose primal tensors are those of a first-order pass."""
    torch.manual_seed(0)
    model = api.create_model("resnet20", num_classes=5, width=0.25).eval()
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    ss = StructureSet(model, x[:1])
    model = saliency_model(model, batchnorm, [(x, y)])
    ones = torch.ones(ss.num_structures)
    first_order = _saved_bytes(lambda: derivatives.gradient(model, ss, [(x, y)], "cpu"))
    dual = _saved_bytes(lambda: curvature_product(model, ss, [(x, y)], ones, "cpu", stack_batch=layout))
    assert dual == pytest.approx(first_order, rel=1e-3)


def _stacked_rows_saved(fn, rows: int, constants=()) -> list:
    """Shapes of the tensors saved for a backward pass during ``fn()`` whose storage holds
    ``rows`` rows of them (a view of fewer rows keeps its whole storage), but for the storages
    of ``constants`` (tensors of the model's that merely have as many rows)."""
    kept = []
    skip = {c.untyped_storage().data_ptr() for c in constants}

    def visit(t):
        row_bytes = t[0].numel() * t.element_size() if t.dim() >= 3 else 0
        if row_bytes and t.untyped_storage().nbytes() == rows * row_bytes and \
                t.untyped_storage().data_ptr() not in skip:
            kept.append(tuple(t.shape))
    _each_saved(fn, visit)
    return kept


def _sosp_h_pass(name: str, layout: str):
    """(a thunk running one SOSP-H pass with ``stack_batch=layout`` on the registered model
    ``name`` in float32, the batch's number of rows)."""
    torch.manual_seed(0)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 1])
    model = api.create_model(name, num_classes=5, width=WIDTH.get(name, 0.25)).eval()
    ss = StructureSet(model, x[:1])
    ones = torch.ones(ss.num_structures)
    return lambda: curvature_product(model, ss, [(x, y)], ones, "cpu", dual="stacked", stack_batch=layout), len(y)


@pytest.mark.parametrize("name", api.list_models())
def test_no_stacked_activation_is_kept_for_the_backward_pass(name):
    """On every registered model, nothing the stacked pass saves for its backward is (or views)
    an activation of 2B rows (ReLU / ReLU6 / smooth functions keep their primal rows or f'(x₀),
    max pooling its argmax, average pooling nothing; gate sites B-row copies): the stacked rows
    are freed as the forward pass moves on. Only the logits and the gates are 2-D."""
    one_pass, rows = _sosp_h_pass(name, "whole")
    assert _stacked_rows_saved(one_pass, 2 * rows) == []


def _tangents_saved(fn, monkeypatch) -> list:
    """Shapes of the tensors saved for a backward pass during ``fn()`` (a paired pass) that share
    storage with a tangent (every tangent attached is kept alive until the end, so that no
    other tensor can reuse its memory)."""
    tangents, kept = [], []
    dual = paired._dual
    monkeypatch.setattr(paired, "_dual", lambda y0, y1: tangents.append(y1) or dual(y0, y1))

    def visit(t):
        if any(t.untyped_storage().data_ptr() == u.untyped_storage().data_ptr() for u in tangents):
            kept.append(tuple(t.shape))
    _each_saved(fn, visit)
    assert tangents
    return kept


@pytest.mark.parametrize("name", api.list_models())
def test_no_tangent_is_kept_for_the_backward_pass(name, monkeypatch):
    """``stack_batch=pair``: on every registered model, nothing saved for the backward pass is
    (or views) a tangent; what is saved are primal tensors, as in a first-order pass."""
    one_pass, _ = _sosp_h_pass(name, "pair")
    assert _tangents_saved(one_pass, monkeypatch) == []


class Doubled(nn.Module):
    """fc2(r) with r = relu(fc1 x) doubled, in place or not (same function)."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.fc1, self.fc2, self.inplace = nn.Linear(4, 5), nn.Linear(5, 3), inplace

    def forward(self, x):
        h = self.fc1(x)
        r = torch.relu(h)
        if self.inplace:
            r += torch.relu(h)
            return self.fc2(r)
        return self.fc2(r + torch.relu(h))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_relu_output_changed_in_place_is_not_read_from_its_saved_copy(layout):
    """``r += relu(h)`` on a ReLU output read by a gate site: the site reads the changed output
    (no kept copy of the ReLU's). (A ReLU output changed in place cannot be differentiated
    through by autograd at all — its backward keeps the output — so the gates here are after it.)"""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    out = []
    for inplace in (False, True):
        torch.manual_seed(1)
        model = Doubled(inplace).double().eval()
        ss = StructureSet(model, x[:1])
        out.append(curvature_product(model, ss, [(x, y)], torch.ones(ss.num_structures), "cpu",
                                     dual="stacked", stack_batch=layout))
    assert rel_err(out[1][0], out[0][0]) <= 1e-12 and rel_err(out[1][1], out[0][1]) <= 1e-12


@pytest.mark.parametrize("name, untangled", [
    ("resnet20", ["conv1", "layer1.0.conv1"]),      # the stem; the first block's gated input
    ("vgg16", ["features.0", "features.3"]),        # the first convolution; the second's gated input
])
def test_stacked_pass_skips_the_work_without_a_tangent(name, untangled):
    """FLOPs of one SOSP-H pass = 2 × a first-order pass's, less one B-row forward of the
    layers that see no tangent: those before the first gate sites, and the first gated layers
    with d = 1, whose tangent L(d·x₀) is their primal output (pruning/stacked.py)."""
    from torch.utils.flop_counter import FlopCounterMode
    from sosp_cli.pruning.derivatives import gradient

    def flops(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    torch.manual_seed(0)
    model = api.create_model(name, num_classes=10, width=0.25).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    ss = StructureSet(model, x[:1])
    ones = torch.ones(ss.num_structures)
    inputs = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0]))
               for n in untangled]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    skipped = sum(flops(lambda n=n: modules[n](inputs[n])) for n in untangled)
    first_order = flops(lambda: gradient(model, ss, [(x, y)], "cpu"))
    stacked_pass = flops(lambda: curvature_product(model, ss, [(x, y)], ones, "cpu", dual="stacked"))
    paired_pass = flops(lambda: curvature_product(model, ss, [(x, y)], ones, "cpu", stack_batch="pair"))
    assert skipped > 0 and stacked_pass == paired_pass == 2 * first_order - skipped


def test_residual_gradients_accumulate_in_place():
    """At a residual branch point autograd adds the two 2B-row gradients in place (into the
    one it may reuse), as in a first-order pass — not into a third tensor: the stacked ReLU
    returns its input gradient as a tensor of its own, not as a view (:class:`stacked._Diagonal`)."""
    from torch.profiler import ProfilerActivity, profile

    def backward_adds(fn):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        return {k: sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                       if e.key == k and len(e.input_shapes[0]) == 4) for k in ("aten::add", "aten::add_")}

    torch.manual_seed(0)
    model = api.create_model("resnet20", num_classes=5, width=0.25).eval()
    x = torch.randn(4, 3, 32, 32)
    ss = StructureSet(model, x[:1])
    with stacked.stacked_dual(model, ss, torch.ones(ss.num_structures), torch.float32) as forward:
        z2, gates2 = forward(x)
        adds = backward_adds(lambda: torch.autograd.grad(z2, gates2, torch.randn_like(z2)))
    # ResNet-20: 9 residual blocks, the first one's input (the stem's) without a tangent yet
    assert adds["aten::add"] == 0 and adds["aten::add_"] >= 8
    with paired.paired_dual(model, ss, torch.ones(ss.num_structures), torch.float32) as forward:
        z, jd, gates2 = forward(x)
        adds = backward_adds(lambda: torch.autograd.grad((z, jd), gates2, (torch.randn_like(z), torch.randn_like(jd))))
    assert adds["aten::add"] == 0 and adds["aten::add_"] >= 16   # both tensors' gradients


# a per-channel constant (a layer scale) of the 6 channels of WithFunction's activations: as many
# as the stacked rows of the test's batch of 3, which the product rule must not read as stacked
LAYER_SCALE = torch.linspace(0.5, 1.5, 6, dtype=torch.float64).view(-1, 1, 1)
OFFSET = torch.tensor([0.25], dtype=torch.float64)
STACKED_FUNCTIONS = {
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu, "gelu": F.gelu,
    "softplus": F.softplus, "elu": F.elu, "leaky_relu": lambda t: F.leaky_relu(t, 0.1),
    "hardswish": F.hardswish, "mish": F.mish, "hardtanh": lambda t: F.hardtanh(t, -0.5, 0.5),
    "relu6": F.relu6, "relu": F.relu,
    # overlapping windows (their gradients add up), padding, a partial window
    "max_pool2d": lambda t: F.max_pool2d(t, 3, 2, 1, ceil_mode=True),
    "avg_pool2d": lambda t: F.avg_pool2d(t, 3, 2, 1, ceil_mode=True, count_include_pad=False),
    "adaptive_avg_pool2d": lambda t: F.adaptive_avg_pool2d(t, 3),
    # products: of two activations (broadcast, as in squeeze-and-excitation; a square), with constants
    "excitation": lambda t: t * torch.sigmoid(F.adaptive_avg_pool2d(t, 1)),
    "square": lambda t: torch.mul(t, t),
    "scaled": lambda t: 0.5 * t.mul(LAYER_SCALE),
    # shifts by constants (a hand-written hard swish; 1 − x; alpha; a 1-element tensor), quotients
    # by constants, differences and negations of activations
    "hard_swish_by_hand": lambda t: t * F.relu6(t + 3.0) / 6.0,
    "shifted": lambda t: (1.0 - torch.sigmoid(t)) + torch.add(t, LAYER_SCALE, alpha=0.5).sub(OFFSET),
    "difference": lambda t: torch.neg(t) - (-F.avg_pool2d(t, 3, 1, 1)) + torch.sub(3.0, t).div(LAYER_SCALE),
    # a rule's result changed in place (EfficientNetV2's ``result += input`` after a SiLU); not
    # a ReLU's (autograd cannot differentiate through a ReLU output changed in place) nor a
    # clamp's (test_a_clamped_output_changed_in_place_falls_back_on_pair)
    **{f"{name}_then_added_in_place": (lambda f: lambda t: added_in_place(f(t), t))(f) for name, f in (
        ("silu", F.silu), ("max_pool2d", lambda t: F.max_pool2d(t, 3, 1, 1)),
        ("avg_pool2d", lambda t: F.avg_pool2d(t, 3, 1, 1)),
        ("excitation", lambda t: t * torch.sigmoid(t.mean((2, 3), keepdim=True))))},
}


def added_in_place(out, t):
    out += t
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_clamped_output_changed_in_place_falls_back_on_pair(layout):
    """``relu6(t) += t`` on stacked rows: ``whole`` keeps a copy of the clamp's primal for its
    backward and runs it; the paired clamp keeps its output itself, so the addition into it is
    refused there (one line naming it) and the default ``dual='auto'`` falls back to forward
    mode — both exact."""
    torch.manual_seed(0)
    x, y = torch.randn(3, 3, 9, 9, dtype=torch.float64), torch.tensor([0, 3, 1])
    model = WithFunction(lambda t: added_in_place(F.relu6(t), t)).double().eval()
    ss = StructureSet(model, x[:1])
    d = torch.rand(ss.num_structures, dtype=torch.float64)
    g1, q1 = curvature_product(model, ss, [(x, y)], d, "cpu", dual="forward_ad")
    if layout == "pair":
        with pytest.raises(SospError, match="Tensor.add_ into an activation kept for the backward pass"):
            curvature_product(model, ss, [(x, y)], d, "cpu", dual="stacked", stack_batch=layout)
        with pytest.warns(UserWarning, match="forward-mode AD"):
            g2, q2 = curvature_product(model, ss, [(x, y)], d, "cpu", stack_batch=layout)
    else:
        g2, q2 = curvature_product(model, ss, [(x, y)], d, "cpu", dual="stacked", stack_batch=layout)
    assert q1.abs().max() > 0
    assert rel_err(g2, g1) <= 1e-10 and rel_err(q2, q1) <= 1e-10


class WithFunction(nn.Module):
    """conv → ReLU → conv → f → conv, with a residual addition around f when shapes allow: the
    second convolution's input is a gate site, so ``f`` runs on stacked rows."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.conv0, self.conv1 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.conv2, self.fc = nn.Conv2d(6, 5, 3, padding=1), nn.Linear(5, 4)

    def forward(self, x):
        h = F.relu(self.conv1(F.relu(self.conv0(x))))
        a = self.f(h)
        if a.shape == h.shape:
            a = a + h
        return self.fc(F.adaptive_avg_pool2d(self.conv2(a), 1).flatten(1))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(STACKED_FUNCTIONS))
def test_every_stacked_rule_equals_forward_mode_and_keeps_no_stacked_rows(name, layout, monkeypatch):
    """Each element-wise / pooling rule (pruning/stacked.py, pruning/paired.py) gives forward
    mode's g and Q·d in float64, and saves nothing of 2B rows (``whole``), no tangent (``pair``),
    for the backward pass."""
    torch.manual_seed(0)
    x, y = torch.randn(3, 3, 9, 9, dtype=torch.float64), torch.tensor([0, 3, 1])
    model = WithFunction(STACKED_FUNCTIONS[name]).double().eval()
    ss = StructureSet(model, x[:1])
    d = torch.rand(ss.num_structures, dtype=torch.float64)
    g1, q1 = curvature_product(model, ss, [(x, y)], d, "cpu", dual="forward_ad")
    out = []

    def run():
        out.extend(curvature_product(model, ss, [(x, y)], d, "cpu", dual="stacked", stack_batch=layout))
    kept = _tangents_saved(run, monkeypatch) if layout == "pair" else \
        _stacked_rows_saved(run, 2 * len(y), constants=[LAYER_SCALE])
    g2, q2 = out
    assert q1.abs().max() > 0
    assert rel_err(g2, g1) <= 1e-10 and rel_err(q2, q1) <= 1e-10
    assert kept == []
    assert stackable(model)


JVP_PROBE = """
import torch, torch.nn as nn
from sosp_cli.pruning.derivatives import curvature_product
from sosp_cli.structures import StructureSet
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Hardswish(), nn.Conv2d(6, 6, 3),
                      nn.Flatten(), nn.Linear(24, 4)).eval()
x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,))
ss = StructureSet(model, x[:1])
ones = torch.ones(ss.num_structures)
for dual, layout in (("stacked", "pair"), ("stacked", "whole"), ("forward_ad", "auto")):
    curvature_product(model, ss, [(x, y)], ones, torch.device("cpu"), dual=dual, stack_batch=layout)
print("ok")
"""


def test_forward_mode_ad_loads_without_pytorchs_own_deprecation_warning():
    """PyTorch scripts its forward-mode decompositions on first use and warns that
    ``torch.jit.script`` is deprecated — about its own code; every path that uses forward-mode AD
    (an element-wise rule's slope on both layouts, the forward-mode fallback) loads them without
    it. In a fresh process, since they load once per process; a FutureWarning fails it."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", JVP_PROBE],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["ok"], out.stderr[-2000:]
