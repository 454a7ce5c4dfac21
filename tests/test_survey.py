"""scripts/survey_models.py: which torchvision classifiers sosp prunes, and on which SOSP-H path."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "survey_models.py"


def _script():
    spec = importlib.util.spec_from_file_location("survey_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_survey_rows_say_what_prunes_exactly_and_why_the_rest_is_refused(tmp_path, capsys):
    survey = _script()
    out, table = tmp_path / "survey.json", tmp_path / "survey.md"
    rows = survey.main(["--models", "squeezenet1_1", "shufflenet_v2_x0_5", "alexnet", "--size", "32", "--max-params", "50",
                        "--json", str(out), "--markdown", str(table)])
    squeeze, shuffle, alexnet = rows
    assert alexnet["reason"] == "skipped: 57.04 M parameters > --max-params 50" and alexnet["S"] is None
    assert set(squeeze) == set(survey.FIELDS) and squeeze["S"] > 0
    assert squeeze["gate_error"] <= 1e-12 and squeeze["sosp_h_path"] == "pair" and squeeze["pair_error"] <= 1e-12
    assert survey.exact(squeeze) and not survey.exact(shuffle)
    assert shuffle["S"] is None and shuffle["reason"].startswith("Torch-Pruning could not build the dependency graph of ShuffleNetV2")
    assert json.loads(out.read_text())["rows"] == rows
    lines = table.read_text().splitlines()[4:]
    assert len(lines) == 5 and lines[2].startswith("| squeezenet1_1 | 0.73 | 32² | 2944 |") and "| pair |" in lines[2]
    assert "1 of 3 models prune exactly" in capsys.readouterr().out


def test_a_model_that_does_not_build_for_the_size_is_a_row_not_a_stop():
    row = _script().survey("vit_h_14", 64)   # patch size 14 does not divide 64
    assert row["params_M"] is None and row["reason"].startswith("does not build for 64 × 64 inputs (AssertionError")


def test_a_model_without_a_rule_is_surveyed_on_forward_mode(monkeypatch):
    """A model calling a function without a stacked rule: its row says forward mode and names it."""
    import torch
    survey = _script()
    original = survey.build

    def flipped(name, size):   # a left-right flip after a gate site (Fire's squeeze): no rule
        model = original(name, size)
        fire = model.features[3]
        flip = type("Flip", (torch.nn.Module,), {"forward": lambda self, t: torch.flip(t, [3])})()
        fire.squeeze_activation = torch.nn.Sequential(fire.squeeze_activation, flip)
        return model
    monkeypatch.setattr(survey, "build", flipped)
    row = survey.survey("squeezenet1_1", 32)
    assert row["gate_error"] <= 1e-12   # the flip acts on each channel alone
    assert row["sosp_h_path"] == "forward mode" and "flip" in row["reason"] and not survey.exact(row)


@pytest.mark.parametrize("args, message", [
    (["--models", "nosuch"], "--models nosuch: torchvision has no classifier 'nosuch'"),
    (["--size", "16"], "--size 16: must be >= 32"),
    (["--batch", "0"], "--batch 0: must be >= 1"),
    (["--max-params", "0"], "--max-params 0: must be > 0"),
    (["--json", "/dev/null/survey.json"], "--json /dev/null/survey.json: cannot be written (no folder /dev/null)"),
    (["--markdown", "/tmp"], "--markdown /tmp: cannot be written (it is a folder)"),
])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _script().parse(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
