"""The saliency benchmark script (README, "Saliency benchmark") runs and its statistics hold."""
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_saliency.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_saliency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_interval_brackets_the_median_and_is_reproducible():
    from sosp_cli.measure import bootstrap_interval
    ratios = [1.9, 2.0, 2.05, 2.1, 2.3, 1.95, 2.02]
    lo, hi = bootstrap_interval(ratios)
    assert min(ratios) <= lo <= sorted(ratios)[3] <= hi <= max(ratios)
    assert bootstrap_interval(ratios) == (lo, hi)
    assert bootstrap_interval([2.0] * 5) == (2.0, 2.0)


def test_mean_interval_is_students_t():
    from sosp_cli.measure import mean_interval
    # n = 4 runs, mean 2: t(3) at 97.5 % = 3.182446 (a table's value) → 2 ± 3.182446 · s / 2
    lo, hi = mean_interval([1.9, 1.95, 2.05, 2.1])
    s = statistics.stdev([1.9, 1.95, 2.05, 2.1])
    assert (lo, hi) == pytest.approx((2 - 3.182446 * s / 2, 2 + 3.182446 * s / 2), abs=1e-6)
    assert mean_interval([2.0]) is None and mean_interval([2.0, 2.0]) == (2.0, 2.0)


POOL = SCRIPT.parent / "pool_bench.py"


def _pool():
    spec = importlib.util.spec_from_file_location("pool_bench", POOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_file(path, paired: dict, device="Xeon", model=None, calibrated=True):
    """A bench_saliency.py --json file with sosp_h / taylor paired ratios {width: ratio}."""
    data = {"device_name": device, "batchnorm": "running", "batchnorm_calibrated": calibrated,
            "rows": [{"classes": 10, "width": w, "S": int(1120 * w), "sosp_h/taylor_paired": r,
                      "sosp_h/taylor_flops": 1.989, "gradient/taylor_paired": 1.0} for w, r in paired.items()]}
    if model:
        data["model"] = model
    path.write_text(json.dumps(data))
    return str(path)


def test_pooling_averages_each_widths_paired_ratio_over_runs(tmp_path, monkeypatch, capsys):
    """``scripts/pool_bench.py``: per device, model, width and method, the mean of the runs'
    paired ratios, an interval over runs inside their range, and the runs' extremes; files
    written before the model was recorded count as resnet56; another device, or BatchNorm
    statistics not calibrated, is a row of its own."""
    pool = _pool()
    runs = [_run_file(tmp_path / "a.json", {1: 1.90, 4: 1.95}),
            _run_file(tmp_path / "b.json", {1: 1.88, 4: 2.00}, model="resnet56"),
            _run_file(tmp_path / "c.json", {4: 1.99}),
            _run_file(tmp_path / "d.json", {4: 2.10}, device="EPYC"),
            _run_file(tmp_path / "e.json", {4: 2.30}, calibrated=False)]
    rows = pool.pool({p: pool.read_run(p) for p in runs}, ["sosp_h"])
    by = {(r["device_name"], r["width"]) if r["batchnorm"] == "running, calibrated" else r["batchnorm"]: r
          for r in rows}
    assert sorted(by, key=str) == [("EPYC", 4), ("Xeon", 1), ("Xeon", 4), "running"]
    assert {r["method"] for r in rows} == {"sosp_h"} and by["running"]["mean"] == 2.30
    x4 = by[("Xeon", 4)]
    assert x4["runs"] == 3 and x4["mean"] == pytest.approx((1.95 + 2.00 + 1.99) / 3)
    assert (x4["min"], x4["max"], x4["flops"], x4["model"]) == (1.95, 2.00, [1.989], "resnet56")
    assert x4["ci95"][0] < x4["mean"] < x4["ci95"][1]
    assert by[("Xeon", 1)]["mean"] == pytest.approx(1.89) and by[("EPYC", 4)]["ci95"] is None
    assert {r["method"] for r in pool.pool({p: pool.read_run(p) for p in runs})} == {"sosp_h", "gradient"}
    out = tmp_path / "pooled.json"
    monkeypatch.setattr(sys, "argv", ["pool_bench.py", *runs[:3], "--methods", "sosp_h", "--json", str(out)])
    pool.main()
    assert "| Xeon | resnet56 | running, calibrated | 10 | ×4 | 4480 | sosp_h | 3 | 1.980 |" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows"][1]["files"] == runs[:3]


@pytest.mark.parametrize("case, message", [
    ("missing", "{d}/nothing.json cannot be read (No such file or directory)"),
    ("not_json", "{d}/bad.json is not JSON (Expecting value, line 1)"),
    ("no_rows", "{d}/survey.json is not a bench_saliency.py --json file (no rows of widths)"),
    ("method", "method 'sosp_i' is in none of the runs; they have: gradient, sosp_h"),
    ("twice", "{d}/a.json is given twice; give each run once"),
    ("json_folder", "argument --json: {d} cannot be written (it is a folder)"),
])
def test_pooling_rejects_bad_input_in_one_line(case, message, tmp_path, monkeypatch, capsys):
    pool = _pool()
    good = _run_file(tmp_path / "a.json", {1: 1.9})
    (tmp_path / "bad.json").write_text("not json")
    (tmp_path / "survey.json").write_text(json.dumps({"rows": [{"model": "alexnet"}]}))
    args = {"missing": [good, f"{tmp_path}/nothing.json"], "not_json": [good, f"{tmp_path}/bad.json"],
            "no_rows": [f"{tmp_path}/survey.json"], "method": [good, "--methods", "sosp_i"],
            "twice": [good, good], "json_folder": [good, "--json", str(tmp_path)]}[case]
    monkeypatch.setattr(sys, "argv", ["pool_bench.py", *args])
    with pytest.raises(SystemExit) as exit_:
        pool.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "pool_bench.py: error: " + message.format(d=tmp_path)


@pytest.mark.parametrize("batchnorm", ["running", "batch"])
def test_benchmark_script_runs_and_writes_its_rows(tmp_path, batchnorm):
    out = tmp_path / "rows.json"
    halves = ["sosp_h_half"] if batchnorm == "running" else []   # refused with batch statistics
    memory = [] if batchnorm == "running" else ["--no-memory"]
    cuda_flags = [] if batchnorm == "running" else ["--tf32", "--cudnn-benchmark"]   # recorded; no effect on CPU
    subprocess.run([sys.executable, str(SCRIPT), "--widths", "0.25", "--batches", "1", "--batch-size", "8",
                    "--repeats", "2", "--methods", "taylor", "sosp_h", *halves, *memory, "--device", "cpu",
                    "--batchnorm", batchnorm, *cuda_flags, "--json", str(out)], check=True, capture_output=True, text=True)
    data = json.loads(out.read_text())
    assert data["batchnorm"] == batchnorm
    assert data["tf32"] == data["cudnn_benchmark"] == bool(cuda_flags)
    assert data["sosp_h_stack_batch"] == "pair"   # method.stack_batch=auto on a CPU
    (row,) = data["rows"]
    assert data["device_name"] and row["S"] > 0
    assert (data["model"], data["size"], data["batches"], data["batch_size"], data["repeats"]) == ("resnet56", 32, 1, 8, 2)
    assert row["sosp_h_s"] > 0 and row["taylor_s"] > 0
    # every repeat's time is kept (scripts/pool_bench.py), and the statistics are theirs
    times = row["times"]
    assert sorted(times) == sorted(["taylor", "sosp_h", *halves]) and all(len(t) == 2 for t in times.values())
    assert row["sosp_h/taylor_paired"] == pytest.approx((times["sosp_h"][0] / times["taylor"][0]
                                                          + times["sosp_h"][1] / times["taylor"][1]) / 2)
    # SOSP-H's exact Gauss-Newton product is at most two first-order passes' convolutions, less
    # the layers without a tangent (exact count: tests/test_stacked.py)
    assert 1.9 < row["sosp_h/taylor_flops"] < 2.0 and row["taylor_gflops"] > 0
    assert row["sosp_h_ops"] > row["taylor_ops"] > 0
    if halves:   # the same arithmetic in twice the passes: more operations, not more FLOPs
        assert row["sosp_h_half/taylor_flops"] == pytest.approx(row["sosp_h/taylor_flops"], rel=1e-12)
        assert row["sosp_h_half_ops"] > row["sosp_h_ops"]
        # ... and passes of half the rows: they hold fewer tensor bytes at a time
        assert 0 < row["sosp_h_half_tensor_mb"] < row["sosp_h_tensor_mb"]
        assert row["taylor_tensor_mb"] > 0 and all(row[f"{m}_peak_mb"] >= 0 for m in ("taylor", "sosp_h"))
    else:
        assert not any(k.endswith("_mb") for k in row)
    lo, hi = (float(v) for v in row["sosp_h/taylor_paired_ci95"].split("-"))
    assert lo <= round(row["sosp_h/taylor_paired"], 2) + 0.01 and round(row["sosp_h/taylor_paired"], 2) - 0.01 <= hi


def _subnormal_entries(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())


def test_benchmark_model_has_calibrated_batchnorm_and_no_denormal_gradients():
    """The timed model is like a trained one: logits of order 1, no denormal floats in the
    gradients (which the initial BatchNorm statistics produce, and which Intel CPUs compute many
    times slower: the benchmark would time them instead of the methods)."""
    bench = _bench()
    found = {}
    for calibrate in (True, False):
        model, ss, data, _ = bench.setup("resnet56", 1.0, 1, 64, torch.device("cpu"), calibrate=calibrate)
        subnormal = []   # in the gradient of every convolution's output
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_full_backward_hook(lambda m, gin, gout: subnormal.append(_subnormal_entries(gout[0])))
        x, y = data[0]
        z = model(x.requires_grad_(True))
        torch.autograd.grad(torch.nn.functional.cross_entropy(z, y), x)
        found[calibrate] = (z.detach().abs().max().item(), sum(subnormal))
    assert found[True][0] < 20 and found[True][1] == 0
    assert found[False][0] > 100 and found[False][1] > 0   # what the calibration prevents


def test_benchmark_classes_sweep_shows_sosp_i_growing_with_c(tmp_path):
    """SOSP-I's exact GN takes C backward passes per batch, SOSP-H a fixed two passes' work: with
    4× the classes SOSP-I's FLOPs ratio to Taylor grows > 2×, SOSP-H's stays (host-independent)."""
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, str(SCRIPT), "--widths", "0.25", "--classes", "3", "12", "--batches", "1",
                    "--batch-size", "8", "--repeats", "1", "--methods", "taylor", "sosp_h", "sosp_i",
                    "--no-memory", "--device", "cpu", "--json", str(out)], check=True, capture_output=True, text=True)
    few, many = json.loads(out.read_text())["rows"]
    assert (few["classes"], many["classes"]) == (3, 12) and few["S"] == many["S"]
    assert many["sosp_i/taylor_flops"] > 2 * few["sosp_i/taylor_flops"] > 2 * 2
    assert many["sosp_h/taylor_flops"] == pytest.approx(few["sosp_h/taylor_flops"], rel=0.01)


def test_benchmark_times_a_torchvision_model_on_the_stacked_path(tmp_path):
    """``--model torchvision.<name>``: MobileNetV3's squeeze-and-excitation products run on the
    stacked / paired rules (no fallback to forward mode, which would say so on stderr): at most
    two first-order passes of FLOPs, in fewer operations than forward mode's dual tensors."""
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--model", "torchvision.mobilenet_v3_small", "--widths", "1",
                          "--size", "32", "--batches", "1", "--batch-size", "4", "--repeats", "1", "--methods",
                          "taylor", "sosp_h", "sosp_h_whole", "sosp_h_fwad", "--no-memory", "--device", "cpu",
                          "--json", str(out)], check=True, capture_output=True, text=True)
    assert "no stacked-dual rule" not in run.stderr
    assert "mobilenet_v3_small, 1 batches × 4 at 32×32" in run.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["S"] > 1000
    for m in ("sosp_h", "sosp_h_whole"):
        assert 1.5 < row[f"{m}/taylor_flops"] <= 2.0
        assert row[f"{m}_ops"] < row["sosp_h_fwad_ops"]


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet"], "--model resnet: unknown model 'resnet'; accepted: densenet40, mobilenet_v2, "
     "resnet110, resnet18, resnet20, resnet32, resnet50, resnet56, resnext29_8x64d, vgg16, vgg19"),
    (["--model", "torchvision.nosuch"], "--model torchvision.nosuch: torchvision has no classifier 'nosuch'; "
     "e.g. torchvision.efficientnet_b0, torchvision.mobilenet_v3_small (torchvision.models.list_models())"),
    (["--model", "torchvision.resnet18", "--widths", "1", "2"], "--model torchvision.resnet18: "
     "torchvision.resnet18 has no width multiplier: width must be 1, got 2.0"),
    (["--size", "0"], "argument --size: 0 must be > 0"),
    (["--repeats", "0"], "argument --repeats: 0 must be > 0"),
    (["--classes", "10", "1"], "argument --classes: 1 must be >= 2 (a 1-class loss has no gradient)"),
    (["--widths", "1", "-2"], "argument --widths: -2 must be > 0"),
    (["--batch-size", "x"], "argument --batch-size: 'x' is not an integer"),
    (["--json", "/dev/null/rows.json"], "argument --json: /dev/null/rows.json cannot be written (no folder /dev/null)"),
    (["--json", "/tmp"], "argument --json: /tmp cannot be written (it is a folder)"),
    (["--methods", "taylor", "sosp"], None),
    (["--batchnorm", "batch", "--methods", "taylor", "sosp_i"],
     "--methods: saliency.batchnorm=batch is not accepted for sosp_i with method.curvature=gn: its "
     "per-sample gate Jacobians are undefined when batch statistics couple the samples of a batch; "
     "use saliency.batchnorm=running, or method.curvature=hessian"),
    (["--batchnorm", "batch", "--methods", "taylor", "sosp_h_half"],
     "--methods: method.stack_batch=half is not accepted with saliency.batchnorm=batch: a half batch "
     "has other BatchNorm statistics than the batch; use method.stack_batch=auto, pair or whole"),
])
def test_benchmark_script_rejects_bad_input_in_one_line(args, message, monkeypatch, capsys):
    bench = _bench()
    if message is None:   # every name the script times, sorted, as the project's other choices
        from sosp_cli.pruning import list_criteria
        accepted = ", ".join(sorted(bench.EXTRA + tuple(list_criteria())))
        message = f"--methods: unknown method 'sosp'; accepted: {accepted}"
    monkeypatch.setattr(sys, "argv", ["bench_saliency.py", "--no-memory", "--device", "cpu"] + args)
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"bench_saliency.py: error: {message}"


def test_work_counts_flops_and_computing_operations_forward_and_backward():
    from sosp_cli.measure import count_work
    x, w = torch.randn(8, 5, requires_grad=True), torch.randn(3, 5)

    def step():
        torch.autograd.grad(torch.nn.functional.linear(x, w).relu().sum(), x)
    # 2·8·5·3 FLOPs forward (mm) and as many for x's gradient (mm); operations: mm, relu, sum,
    # the seed gradient (ones_like), threshold_backward, mm — the transposes and expand are views
    assert count_work(step) == (480, 6)
    assert count_work(lambda: torch.ones(3).add_(1).view(3, 1).mul(2)) == (0, 3)


def test_peak_tensor_bytes_follow_allocations_and_frees():
    from sosp_cli.measure import peak_tensor_mb
    before = torch.ones(1 << 20)   # allocated before: not counted, nor is its free

    def work():
        nonlocal before
        a, b = torch.empty(1 << 20), torch.empty(2 << 20)      # 4 + 8 MiB alive: the peak
        del a
        before = None
        return torch.empty(1 << 20)                             # 8 + 4 MiB: not above it
    assert peak_tensor_mb(work) == 12.0
    assert peak_tensor_mb(lambda: None) == 0.0


def _script(name: str):
    path = SCRIPT.parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _saved_models(tmp_path):
    """A dense ResNet-20 (×0.25) and a copy with 6 structures removed, saved as sosp-run saves
    them; the pruned one in a run folder's ``pruned.pt``."""
    from sosp_cli import api
    from sosp_cli.checkpoint import save_model
    from sosp_cli.structures import StructureSet
    from sosp_cli.surgery import remove_structures
    torch.manual_seed(0)
    x = torch.zeros(1, 3, 16, 16)
    dense = api.create_model("resnet20", width=0.25).eval()
    spec = {"model": "resnet20", "num_classes": 10, "in_channels": 3, "width": 0.25, "input_shape": [3, 16, 16]}
    ss = StructureSet(dense, x)
    pruned, history = remove_structures(dense, ss, ss.names()[:6], x)
    save_model(tmp_path / "dense.pt", dense, spec)
    (tmp_path / "run").mkdir()
    save_model(tmp_path / "run" / "pruned.pt", pruned, spec, history)
    return dense, pruned


def test_latency_comparison_times_each_model_in_turn_against_the_first(tmp_path, monkeypatch, capsys):
    """``scripts/compare_latency.py``: a row per model and batch size, the reference's speed-up
    exactly 1, each model's own size; a run folder stands for its pruned.pt."""
    from sosp_cli.measure import count_params
    dense, pruned = _saved_models(tmp_path)
    out = tmp_path / "latency.json"
    monkeypatch.setattr(sys, "argv", ["compare_latency.py", str(tmp_path / "dense.pt"), str(tmp_path / "run"),
                                      "--batch-sizes", "4", "1", "--repeats", "3", "--json", str(out)])
    _script("compare_latency").main()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["batch_size"]) for r in rows] == [
        (str(tmp_path / "dense.pt"), 4), (str(tmp_path / "run"), 4), (str(tmp_path / "dense.pt"), 1), (str(tmp_path / "run"), 1)]
    assert [r["params"] for r in rows[:2]] == [count_params(dense), count_params(pruned)]
    assert rows[0]["speedup"] == rows[2]["speedup"] == 1.0 and all(r["ms"] > 0 and r["speedup"] > 0 for r in rows)
    assert f"| {tmp_path / 'run'} | {count_params(pruned):,} |" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["one model", "twice", "not a checkpoint", "missing", "another input"])
def test_latency_comparison_rejects_bad_input_in_one_line(case, tmp_path, monkeypatch, capsys):
    _saved_models(tmp_path)
    (tmp_path / "notes.pt").write_text("not a model")
    if case == "another input":
        from sosp_cli import api
        from sosp_cli.checkpoint import save_model
        save_model(tmp_path / "big.pt", api.create_model("resnet20", width=0.25), {
            "model": "resnet20", "num_classes": 10, "in_channels": 3, "width": 0.25, "input_shape": [3, 32, 32]})
    dense = str(tmp_path / "dense.pt")
    args, message = {
        "one model": ([dense], "give a reference and at least one model to compare with it"),
        "twice": ([dense, dense], f"{dense} is given twice; give each model once"),
        "not a checkpoint": ([dense, str(tmp_path / "notes.pt")], f"{tmp_path / 'notes.pt'}: "),
        "missing": ([dense, str(tmp_path / "nosuch")], f"{tmp_path / 'nosuch'}: checkpoint not found: {tmp_path / 'nosuch'}"),
        "another input": ([dense, str(tmp_path / "big.pt")], f"the models take different inputs: {dense} [3, 16, 16], "
                                                               f"{tmp_path / 'big.pt'} [3, 32, 32]"),
    }[case]
    monkeypatch.setattr(sys, "argv", ["compare_latency.py", *args])
    with pytest.raises(SystemExit) as exit_:
        _script("compare_latency").main()
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"compare_latency.py: error: {message}")


def test_latencies_are_timed_in_turn_and_the_speedup_is_the_median_ratio():
    """``measure.latencies_in_turn`` (``result.json``'s latency, ``compare_latency.py``): every
    repeat runs each model once; the first model's speed-up is 1, a model 4× slower ~0.25;
    each model's train / eval mode is restored."""
    import time
    from sosp_cli.measure import latencies_in_turn

    class Sleep(torch.nn.Module):
        def __init__(self, seconds):
            super().__init__()
            self.seconds, self.calls = seconds, 0

        def forward(self, x):
            self.calls += 1
            time.sleep(self.seconds)
            return x

    fast, slow = Sleep(0.002), Sleep(0.008)
    slow.train(), fast.eval()
    rows = latencies_in_turn([fast, slow], torch.zeros(1, 3), 4, repeats=5)
    assert fast.calls == slow.calls == 7 and slow.training and not fast.training
    assert rows[0]["speedup"] == 1.0 and 0.1 < rows[1]["speedup"] < 0.45
    assert rows[1]["ms"] > rows[0]["ms"] >= 2.0


def test_rounds_alternate_their_order_so_that_a_steady_drift_cancels(monkeypatch):
    """``measure.in_turn``: every round runs each item once, every other round in reverse. On a
    host that slows steadily (a fake clock: call k takes 1 + 0.1 k), two identical models timed
    in a fixed order would read a speed-up of ~0.95 for the second; in turn it reads 1."""
    from sosp_cli import measure

    assert measure.in_turn("abc", 3) == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
    assert measure.in_turn([], 2) == [[], []] and measure.in_turn("ab", 0) == []
    clock, calls = [0.0], [0]
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])

    class Drifting(torch.nn.Module):
        def forward(self, x):
            calls[0] += 1
            clock[0] += 1 + 0.1 * calls[0]
            return x

    rows = measure.latencies_in_turn([Drifting(), Drifting()], torch.zeros(1, 3), 2, repeats=6)
    assert calls[0] == 16 and rows[1]["speedup"] == pytest.approx(1.0, abs=0.005)
    assert rows[0]["ms"] == pytest.approx(rows[1]["ms"], rel=0.01)


def test_profile_shows_where_each_methods_time_goes(tmp_path):
    """``--profile N``: each method's N most time-consuming operations beside Taylor's, self times
    per call that add up to no more than the call's total (in the rows as ``profile_ms``)."""
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--widths", "0.25", "--batches", "1", "--batch-size", "8",
                           "--repeats", "1", "--methods", "taylor", "sosp_h", "--no-memory", "--device", "cpu",
                           "--profile", "5", "--json", str(out)], check=True, capture_output=True, text=True)
    assert "# where the time goes (width 0.25, 10 classes)" in proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    profile = row["profile_ms"]
    assert set(profile) == {"taylor", "sosp_h"} and all(len(p) == 6 for p in profile.values())
    for times in profile.values():
        assert 0 < sum(ms for op, ms in times.items() if op != "total") <= times["total"]
    assert profile["sosp_h"]["aten::mkldnn_convolution"] > profile["taylor"]["aten::mkldnn_convolution"] > 0
    assert "| aten::mkldnn_convolution | " in proc.stdout and "| total | " in proc.stdout


def test_op_times_are_self_times_per_call_of_each_function():
    from sosp_cli.measure import op_times_in_turn
    a = torch.randn(64, 64)
    times = op_times_in_turn({"mm": lambda: (a @ a).relu(), "twice": lambda: (a @ a @ a).relu()}, rounds=2)
    assert times["mm"]["aten::mm"][1] == 1 and times["twice"]["aten::mm"][1] == 2   # products per call
    assert times["mm"]["aten::relu"][1] == times["twice"]["aten::relu"][1] == 1
    assert all(ms > 0 for ops in times.values() for ms, _ in ops.values())
