"""The README's code is code that works: its Python API example runs as written, and its
"Extending" example, registered from the README's text, scores like a brute-force computation
and is refused without batches, as its class says."""
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


def test_the_readme_python_api_example_runs_and_does_what_its_comments_say():
    """Lines needing your own model or a GPU are left out."""
    text = README.read_text()
    block = re.search(r"```python\n(.*?)```", text[text.index("## Python API"):], re.S).group(1)
    code = "\n".join(ln for ln in block.splitlines() if "my_model" not in ln and ".cuda()" not in ln)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    model, x, names, sel = ns["model"], ns["x"], ns["names"], ns["sel"]
    assert len(names) == 1120 and names[-1] == "layer3.8.conv1:63" and f'"{names[0]}"' in block
    assert abs(sel.flops_ratio - 0.5) < 0.01 and ns["remove"] == sel.remove
    assert sum(p.numel() for p in ns["small"].parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert torch.allclose(ns["same"].eval()(x), ns["small"].eval()(x), atol=1e-4)
    assert list(ns["train_like"]) == names
