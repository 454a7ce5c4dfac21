"""The scripts a lent GPU machine runs (scripts/gpu_session.sh) work on a CPU, so that a session
with a GPU does not spend its few minutes of device time on a script that fails to start."""
from __future__ import annotations

import importlib.util
import math
import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_exactness_script_passes_on_the_cpu(tmp_path):
    out = tmp_path / "exactness.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "gpu_exactness.py"), "--device", "cpu",
                           "--models", "resnet20", "--batch", "2", "--json", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "resnet20" and row["stackable"]
    for key in ("whole_g", "whole_q", "half_g", "half_q", "pair_g", "pair_q", "rowsum_q", "symmetric"):
        assert row[key] <= 1e-8, key   # float64: every layout and SOSP-I's row sums equal forward mode
    assert max(row["float32_g"], row["float32_q"], row["api"]) <= 1e-4


def test_exactness_script_refuses_an_output_it_cannot_write_before_checking():
    proc = subprocess.run([sys.executable, str(SCRIPTS / "gpu_exactness.py"), "--device", "cpu",
                           "--json", "/dev/null/exactness.json"], capture_output=True, text=True)
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "error: argument --json: /dev/null/exactness.json cannot be written (no folder /dev/null)")


def test_pipeline_check_runs_both_methods_on_the_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPTS / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    rows = gpu_check.main(str(tmp_path), device="cpu", smoke=True)
    assert [r["method"] for r in rows] == ["sosp_h", "sosp_i"]   # (the AMP check: CUDA only)
    for r in rows:
        assert set(r) == set(gpu_check.FIELDS) and r["device"] == "cpu"
        assert 0 < r["params_reduction"] < 1 and 0 < r["macs_reduction"] < 1 and r["saliency_seconds"] > 0
        assert (tmp_path / r["method"] / "result.json").exists()


def test_the_amp_check_sees_the_nan_step_skipped_under_amp(monkeypatch):
    """The GPU script's AMP check, with AMP let onto the CPU (autocast bfloat16, a CPU
    GradScaler: the code a CUDA run takes): the NaN step is skipped and the model stays finite."""
    import sosp_cli.train as T
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPTS / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(T, "amp_enabled", lambda amp, device: amp)
    row = gpu_check.amp_skip_check("cpu")
    assert row["amp_skipped_steps"] == [0, 1] and row["finite"] is True
    assert all(map(math.isfinite, row["train_loss"]))
