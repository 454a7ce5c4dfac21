"""saliency.tf32: the float32 precision of CUDA's products while a saliency is computed
(sosp_cli.utils.float32_products, Criterion.run). The flags are process-wide, so these checks run
on a CPU-only host too; what they change on a GPU is measured by scripts/gpu_exactness.py."""
import pytest
import torch

from sosp_cli import api
from sosp_cli.config import RunConfig
from sosp_cli.errors import SospError
from sosp_cli.pipeline import saliency_key
from sosp_cli.pruning import sosp_h
from sosp_cli.utils import _tf32_flags, float32_products
from tiny import TinyResNet


def flags():
    return [getattr(obj, name) for obj, name in _tf32_flags()]


def uses_tf32() -> list[bool]:
    return [v in (True, "tf32") for v in flags()]


@pytest.mark.parametrize("tf32", [False, True])
def test_float32_products_sets_every_flag_and_restores_them(tf32):
    before = flags()
    with float32_products(tf32):
        assert uses_tf32() == [tf32] * len(before)
    assert flags() == before
    with pytest.raises(RuntimeError), float32_products(tf32):
        raise RuntimeError("fails inside")
    assert flags() == before


@pytest.mark.parametrize("tf32", [False, True])
def test_saliency_runs_with_the_requested_precision(tf32, monkeypatch):
    """api.saliency → Criterion.run → compute sees the flags of ``tf32``, whatever they were
    before, and they are back afterwards."""
    seen = []
    compute = sosp_h.SospH.compute
    monkeypatch.setattr(sosp_h.SospH, "compute", lambda self, inp: seen.append(uses_tf32()) or compute(self, inp))
    torch.manual_seed(0)
    model = TinyResNet()
    batches = [(torch.randn(4, 2, 6, 6), torch.tensor([0, 1, 2, 3]))]
    before = flags()
    with float32_products(not tf32):   # the opposite setting outside
        scores = api.saliency(model, batches, "sosp_h", tf32=tf32)
        assert uses_tf32() == [not tf32] * len(before)
    assert seen == [[tf32] * len(before)]
    assert flags() == before
    assert len(scores) == len(api.structures(model, batches[0][0][:1]))


def test_tf32_is_in_the_saliency_key_only_when_set():
    """Scores computed in TF32 are not reused for IEEE float32."""
    cfg = RunConfig()
    default = saliency_key(cfg)
    cfg.saliency.tf32 = True
    assert saliency_key(cfg) != default
    cfg.saliency.tf32 = False
    assert saliency_key(cfg) == default


def test_tf32_that_is_not_a_bool_is_refused_in_one_line():
    """``tf32="no"`` is truthy: it must not switch TF32 on silently (the CLI's bool type refuses
    it already; this is the API's guard)."""
    model = TinyResNet()
    batches = [(torch.randn(4, 2, 6, 6), torch.tensor([0, 1, 2, 3]))]
    before = flags()
    with pytest.raises(SospError, match=r"^saliency.tf32='no': expected true or false$"):
        api.saliency(model, batches, "sosp_h", tf32="no")
    assert flags() == before
