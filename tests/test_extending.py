"""The README's "Extending" example is code that works: registered from the README's text, the
method scores like a brute-force computation and is refused without batches, as its class says."""
import re
from pathlib import Path

import pytest
import torch

from sosp_cli import api
from sosp_cli.errors import SospError
from sosp_cli.pruning import base, list_criteria
from test_second_order import brute_force, setup

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    blocks = re.findall(r"```python\n(# sosp_cli/pruning/taylor_abs\.py\n.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1, "the README's Extending section holds one taylor_abs.py block"
    return blocks[0]


def test_the_readme_method_example_registers_and_scores_like_brute_force(monkeypatch):
    monkeypatch.setattr(base, "_CRITERIA", dict(base._CRITERIA))   # registered for this test only
    exec(compile(readme_example(), "README.md", "exec"),
         {"__name__": "sosp_cli.pruning.taylor_abs", "__package__": "sosp_cli.pruning"})
    assert "taylor_abs" in list_criteria()
    model, ss, x, y, batches = setup("resnet")
    want = torch.stack([brute_force(model, ss, xb, yb)[0].abs() for xb, yb in batches]).mean(0)
    got = api.saliency(model, batches, "taylor_abs")
    assert list(got) == ss.names()
    assert torch.allclose(torch.tensor(list(got.values()), dtype=torch.float64), want, rtol=1e-5, atol=1e-9)
    with pytest.raises(SospError, match="^method taylor_abs scores structures on saliency batches"):
        api.saliency(model, [], "taylor_abs", example_input=x[:1])
