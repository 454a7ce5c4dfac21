"""Saliency cost side by side: taylor vs sosp_h vs sosp_i on CIFAR ResNet-56 at several widths.

``--classes`` sweeps the number of classes C as well (the model's output dimension; ResNet-56's
FLOPs barely change): SOSP-I's exact Gauss–Newton matrix takes C backward passes per batch and
SOSP-H a fixed two passes' work, so their ratio to Taylor shows which grows with C.

Every method runs in the same process on the same batches, alternating, ``--repeats`` times (in
the order given, then reversed, and so on: ``sosp_cli.measure.in_turn``); the
median time is reported with the ratio to ``taylor`` (one forward + one backward per batch), and
the ratio of the fastest runs (``_min``, less sensitive to a noisy host), and the median of the
per-repeat ratios (``_paired``) with a 95 % bootstrap interval (``_paired_ci95``). The work of one
call is counted too, independent of the host: FLOPs (``_gflops``, ``_flops`` ratio) and the ATen
operations that compute (``_ops``: views and allocations excluded; each launches a kernel on a
GPU, so a launch-bound pass's time follows their count). ``gradient`` does the
same work as ``taylor``: their ratio shows the host's noise. Peak memory is measured per method
on CPU in a fresh subprocess, because a process's RSS never drops: ``_peak_mb`` (CPU: peak RSS above
the process's baseline; CUDA: peak allocated bytes above those held before, in this process,
since ``reset_peak_memory_stats`` makes that count per method) and, on CPU, ``_tensor_mb``, the peak bytes held
by tensors (``sosp_cli.measure.peak_tensor_mb``: what CUDA's number counts, without the
allocator's fragmentation and retained pages).

The randomly initialised model's BatchNorm running statistics are first estimated on random
inputs (:func:`calibrate_batchnorm`), as a trained network has them; ``--uncalibrated`` keeps
the initial mean 0 / variance 1, whose saturated logits fill the gradients with denormal floats.

    python scripts/bench_saliency.py --widths 1 2 4 --batches 4 --batch-size 64
    python scripts/bench_saliency.py --widths 1 --classes 10 100 --methods taylor sosp_h sosp_i

``--model`` takes a registered model or ``torchvision.<name>`` (a torchvision classifier outside
the registry, at width 1, e.g. ``torchvision.efficientnet_b0``), ``--size`` the input's height
and width (default 32).
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

from sosp_cli.config import MethodConfig
from sosp_cli.errors import SospError, check_choice
from sosp_cli.measure import (PeakMemory, bootstrap_interval, count_macs, count_work, in_turn,
                              op_times_in_turn, peak_tensor_mb)
from sosp_cli.models import check_model, create_model
from sosp_cli.pruning import BATCHNORM, SaliencyInput, get_criterion, list_criteria, saliency_model
from sosp_cli.pruning.derivatives import AUTO_LAYOUT, curvature_product, gradient
from sosp_cli.structures import StructureSet
from sosp_cli.utils import float32_products, retain_freed_memory, unwritable

METHODS = ("taylor", "sosp_h", "sosp_i")
# timed variants of a registered criterion: name -> (criterion, MethodConfig options)
VARIANTS = {"sosp_h_joint": ("sosp_h", {"combine": "abs_joint"}),
            "sosp_h_half": ("sosp_h", {"stack_batch": "half"}),   # two stacked passes of B rows per batch
            "sosp_h_pair": ("sosp_h", {"stack_batch": "pair"}),   # one pass, primal and tangent as two tensors
            "sosp_h_whole": ("sosp_h", {"stack_batch": "whole"})}
EXTRA = ("gradient", "sosp_h_fwad", *VARIANTS)   # timed besides the criteria (see run_method)
DEFAULT_METHODS = ("gradient", *METHODS, "sosp_h_joint", "sosp_h_fwad", "sosp_h_half")


def refuse_repeats(parser: argparse.ArgumentParser, values: list[str], noun: str) -> None:
    """A one-line argparse error for the first of ``values`` given more than once (files to
    compare or pool: ``compare_latency.py``, ``pool_bench.py``)."""
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        parser.error(f"{twice[0]} is given twice; give each {noun} once")


def positive(kind):
    """argparse type: a number of ``kind`` that is > 0, else a one-line error naming it."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be > 0")
        return value
    return parse


def calibrate_batchnorm(model: nn.Module, batch_size: int, batches: int = 4, size: int = 32) -> nn.Module:
    """Every BatchNorm's running statistics as the average over ``batches`` random batches (the
    benchmark's input distribution), in eval mode after. With the initial mean 0 / variance 1 a
    deep residual network's activations grow block by block (ResNet-56 ×1: logits up to ±2400),
    the softmax saturates and 0.1–2 % of the gradients' entries are denormal floats, which
    Intel CPUs compute many times slower: Taylor's pass took 2.1× as long, SOSP-H's 2.6×
    (README, "Saliency benchmark") — a benchmark of denormal arithmetic, not of the methods."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None   # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch_size, 3, size, size))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


def setup(model_name: str, width: float, batches: int, batch_size: int, device: torch.device,
          batchnorm: str = "running", classes: int = 10, calibrate: bool = True, size: int = 32):
    torch.manual_seed(0)
    model = create_model(model_name, classes, 3, width).eval()
    if calibrate:
        calibrate_batchnorm(model, batch_size, size=size)
    x = torch.zeros(1, 3, size, size)
    ss = StructureSet(model, x)
    macs = count_macs(model, x)
    data = [(torch.randn(batch_size, 3, size, size), torch.randint(0, classes, (batch_size,)))
            for _ in range(batches)]
    data = [(a.to(device), b.to(device)) for a, b in data]
    return saliency_model(model, batchnorm, data).to(device), ss, data, macs


def method_config(method: str) -> MethodConfig | None:
    """The criterion configuration ``method`` runs (a registered criterion or one of
    :data:`VARIANTS`); None for ``gradient`` and ``sosp_h_fwad``, which call derivatives directly."""
    name, options = VARIANTS.get(method, (method, {}))
    return MethodConfig(name=name, **options) if name in list_criteria() else None


def check_batchnorm(method: str, batchnorm: str) -> None:
    """One-line error unless ``method`` is accepted with ``saliency.batchnorm=batchnorm``."""
    cfg = method_config(method)
    if cfg is not None:
        get_criterion(cfg).check_batchnorm(batchnorm)


def _accepts(method: str, batchnorm: str) -> bool:
    try:
        check_batchnorm(method, batchnorm)
    except SospError:
        return False
    return True


def run_method(method: str, model, ss, data, device, tf32: bool = False):
    """One saliency call of ``method``, with the float32 precision the pipeline uses
    (``saliency.tf32``; :meth:`Criterion.run`)."""
    cfg = method_config(method)
    if cfg is not None:
        return get_criterion(cfg).run(SaliencyInput(model, ss, data, device, tf32=tf32)).scores
    with float32_products(tf32):
        if method == "gradient":
            return gradient(model, ss, data, device)
        ones = torch.ones(ss.num_structures)   # sosp_h_fwad: z and J·1 with forward-mode AD, two backward passes
        return curvature_product(model, ss, data, ones, device, dual="forward_ad")


def timed(fn, device):
    gc.collect()   # every run starts without garbage left by the previous one
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def cpu_name() -> str:
    """The CPU model (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_child(args) -> None:
    """CPU peak memory of one method above the memory held before it started (model and data),
    in a fresh process (see :class:`sosp_cli.measure.PeakMemory`)."""
    device = torch.device("cpu")
    model, ss, data, _ = setup(args.model, args.child_width, args.batches, args.batch_size, device,
                               args.batchnorm, args.classes[0], not args.uncalibrated, args.size)
    with PeakMemory(device) as peak:
        run_method(args.child_method, model, ss, data, device)
    tensors = peak_tensor_mb(lambda: run_method(args.child_method, model, ss, data, device))
    print(json.dumps({"peak_mb": peak.mb, "tensor_mb": tensors}))


def cpu_peak(args, width: float, classes: int, method: str) -> dict:
    """Peak memory of ``method`` on CPU, from :func:`memory_child` in a fresh process (a
    process's resident set never drops)."""
    cmd = [sys.executable, __file__, "--child-method", method, "--child-width", str(width),
           "--model", args.model, "--batches", str(args.batches), "--batch-size", str(args.batch_size),
           "--batchnorm", args.batchnorm, "--classes", str(classes), "--size", str(args.size)] + (["--threads", str(args.threads)] if args.threads else []) + \
        (["--system-malloc"] if args.system_malloc else []) + (["--uncalibrated"] if args.uncalibrated else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cuda_peak(fn, device) -> dict:
    """Peak CUDA bytes allocated by ``fn`` above those held before it (in this process: CUDA's
    counter, unlike a process's RSS, can be reset per method)."""
    gc.collect()
    with PeakMemory(device) as peak:
        fn()
    return {"peak_mb": peak.mb, "tensor_mb": None}


def print_profile(profiles: dict, top: int, width: float, classes: int) -> dict:
    """Print, per method, the self time and calls of the ``top`` operations that take the most
    time in any method (:func:`sosp_cli.measure.op_times_in_turn`), with each method's time over
    Taylor's, and the total; return those times {method: {operation: ms}} (and "total")."""
    methods = list(profiles)
    ops = sorted({op for times in profiles.values() for op in times},
                 key=lambda op: -max(t.get(op, (0.0, 0))[0] for t in profiles.values()))[:top]
    # per row, each method's (ms, calls); the total has no count of calls
    table = {op: {m: profiles[m].get(op, (0.0, 0)) for m in methods} for op in ops}
    table["total"] = {m: (sum(ms for ms, _ in profiles[m].values()), None) for m in methods}
    print(f"\n# where the time goes (width {width:g}, {classes} classes): self ms per call (calls)"
          + (", and / taylor" if "taylor" in methods else ""))
    print("| operation | " + " | ".join(methods) + " |\n|" + "---|" * (len(methods) + 1))
    for op, row in table.items():
        ref = row["taylor"][0] if "taylor" in row else 0.0
        cells = [f"{ms:.1f}" + (f" ({n:g})" if n is not None else "")
                 + (f" ×{ms / ref:.2f}" if m != "taylor" and ref > 0 else "") for m, (ms, n) in row.items()]
        print(f"| {op} | " + " | ".join(cells) + " |")
    return {m: {op: row[m][0] for op, row in table.items()} for m in methods}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56",
                        help="a registered model, or torchvision.<name> (width 1)")
    parser.add_argument("--size", type=positive(int), default=32, help="input height and width")
    parser.add_argument("--widths", type=positive(float), nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--classes", type=positive(int), nargs="+", default=[10],
                        help="numbers of classes C (the model's outputs); every width is run with each")
    parser.add_argument("--batches", type=positive(int), default=4)
    parser.add_argument("--batch-size", type=positive(int), default=64)
    parser.add_argument("--repeats", type=positive(int), default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batchnorm", choices=BATCHNORM, default="running",
                        help="saliency.batchnorm: running statistics, or each batch's own")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"time only these (default: {' '.join(DEFAULT_METHODS)}); the ratio "
                             "columns need taylor")
    parser.add_argument("--threads", type=positive(int), default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc malloc as configured (default: as sosp-run, "
                             "sosp_cli.utils.retain_freed_memory)")
    parser.add_argument("--tf32", action="store_true",
                        help="CUDA: TensorFloat-32 products, as saliency.tf32=true (default: IEEE float32)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="CUDA: cuDNN autotuning (torch.backends.cudnn.benchmark), as sosp-run sets it; "
                             "the warm-up runs then pick the algorithms")
    parser.add_argument("--uncalibrated", action="store_true",
                        help="keep the initial BatchNorm statistics (mean 0, variance 1) instead of "
                             "estimating them on random inputs (calibrate_batchnorm)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--profile", type=positive(int), default=None, metavar="N",
                        help="also profile the methods (torch.profiler; --repeats rounds of one call of "
                             "each in turn, averaged) and print the N most time-consuming operations, "
                             "each method's beside Taylor's")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--child-method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-width", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        for m in args.methods or ():
            check_choice("method", m, EXTRA + tuple(list_criteria()))
            check_batchnorm(m, args.batchnorm)
    except SospError as exc:
        parser.error(f"--methods: {exc}")
    try:
        for width in [args.child_width] if args.child_method else args.widths:
            check_model(args.model, width)
    except SospError as exc:
        parser.error(f"--model {args.model}: {exc}")
    if args.json and (why := unwritable(args.json)):   # refused now, not after the whole benchmark has run
        parser.error(f"argument --json: {args.json} cannot be written ({why})")
    if min(args.classes) < 2:
        parser.error(f"argument --classes: {min(args.classes)} must be >= 2 (a 1-class loss has no gradient)")
    if args.threads:
        torch.set_num_threads(args.threads)
    retained = False if args.system_malloc else retain_freed_memory()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.child_method:
        return memory_child(args)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    print(f"# {args.model}, {args.batches} batches × {args.batch_size} at {args.size}×{args.size}, BatchNorm on {args.batchnorm} "
          f"statistics, device {device} ({name}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, BatchNorm statistics "
          f"{'initial' if args.uncalibrated else 'calibrated'}, "
          f"freed memory {'retained' if retained else 'returned to the OS (system malloc)'}"
          + (f", float32 products in {'TF32' if args.tf32 else 'IEEE float32'}, cuDNN autotuning "
             f"{'on' if args.cudnn_benchmark else 'off'}" if device.type == "cuda" else ""))
    rows = []
    for classes, width in ((c, w) for c in args.classes for w in args.widths):
        model, ss, data, macs = setup(args.model, width, args.batches, args.batch_size, device,
                                      args.batchnorm, classes, not args.uncalibrated, args.size)
        methods = tuple(args.methods or DEFAULT_METHODS)
        if not args.methods:   # the default list leaves out what this BatchNorm mode refuses
            methods = tuple(m for m in methods if _accepts(m, args.batchnorm))
        for m in methods:  # warm-up
            run_method(m, model, ss, data[:1], device, args.tf32)
        # host-independent cost of one call: FLOPs and computing ATen ops (kernel launches)
        work = {m: count_work(lambda: run_method(m, model, ss, data, device, args.tf32)) for m in methods}
        times = {m: [] for m in methods}
        for order in in_turn(methods, args.repeats):   # reversed every other repeat
            for m in order:
                times[m].append(timed(lambda: run_method(m, model, ss, data, device, args.tf32), device))
        med = {m: statistics.median(t) for m, t in times.items()}
        row = {"classes": classes, "width": width, "S": ss.num_structures, "MMACs": macs / 1e6,
               **{f"{m}_s": med[m] for m in methods},
               **{f"{m}_gflops": work[m][0] / 1e9 for m in methods},
               **{f"{m}_ops": work[m][1] for m in methods},
               "times": times}   # every repeat's seconds per method, in the JSON (scripts/pool_bench.py)
        for m in methods:   # median ratio, and the ratio of the fastest runs (less host noise)
            if m != "taylor" and "taylor" in methods:
                row[f"{m}/taylor"] = med[m] / med["taylor"]
                row[f"{m}/taylor_min"] = min(times[m]) / min(times["taylor"])
                paired = [a / b for a, b in zip(times[m], times["taylor"])]
                row[f"{m}/taylor_paired"] = statistics.median(paired)
                row[f"{m}/taylor_paired_ci95"] = "{:.2f}-{:.2f}".format(*bootstrap_interval(paired))
                row[f"{m}/taylor_flops"] = work[m][0] / work["taylor"][0]
                row[f"{m}/taylor_ops"] = work[m][1] / work["taylor"][1]
        if args.profile:
            profiles = op_times_in_turn({m: (lambda m=m: run_method(m, model, ss, data, device, args.tf32))
                                         for m in methods}, device, rounds=args.repeats)
            row["profile_ms"] = print_profile(profiles, args.profile, width, classes)
        if not args.no_memory:
            for m in (m for m in METHODS + ("sosp_h_half", "sosp_h_whole", "sosp_h_pair") if m in methods):
                peak = cpu_peak(args, width, classes, m) if device.type != "cuda" else \
                    cuda_peak(lambda: run_method(m, model, ss, data, device, args.tf32), device)
                row[f"{m}_peak_mb"] = peak["peak_mb"]
                if peak["tensor_mb"] is not None:   # CPU: the bytes tensors hold (CUDA's peak is that)
                    row[f"{m}_tensor_mb"] = peak["tensor_mb"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "times"}), flush=True)
    keys = [k for k in rows[0] if k not in ("profile_ms", "times")]
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(device), "device_name": name, "model": args.model, "size": args.size,
                       "batches": args.batches, "batch_size": args.batch_size, "repeats": args.repeats,
                       "batchnorm": args.batchnorm,
                       "batchnorm_calibrated": not args.uncalibrated, "threads": torch.get_num_threads(),
                       "retain_freed_memory": retained, "tf32": args.tf32, "cudnn_benchmark": args.cudnn_benchmark,
                       # what ``sosp_h`` (method.stack_batch=auto) runs on this device
                       "sosp_h_stack_batch": AUTO_LAYOUT.get(device.type, "whole"), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
