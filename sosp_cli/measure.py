"""Cost of a model: parameters, MACs and latency (DESIGN.md §4).

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one input and halved
(it counts a multiply-add as 2 FLOPs); like the pruning literature's "FLOPs", only conv, linear
and matmul operations are counted (BatchNorm, activations and pooling are not).
"""
from __future__ import annotations

import os
import random
import statistics
import threading
import time
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(example_input[:1])
    model.train(was_training)
    return counter.get_total_flops() // 2


# ATen ops that only allocate or describe memory: they launch no kernel on a GPU
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
              "lift_fresh", "alias", "set"}


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operations that compute (views and allocations excluded)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket.__name__.rstrip("_")
        if not func.is_view and packet not in _NO_KERNEL:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def count_work(fn) -> tuple[int, int]:
    """(FLOPs, computing ATen operations) of one call of ``fn``, forward and backward passes
    included: a host-independent account of an algorithm's cost. FLOPs as
    :func:`count_macs` counts them (convolutions, linear layers, matmuls; a multiply-add is 2);
    operations are the ATen calls other than views and allocations — each launches at least
    one kernel on a GPU, so their count is what a launch-bound pass's time follows."""
    with FlopCounterMode(display=False) as flops, _OpCounter() as ops:
        fn()
    return flops.get_total_flops(), ops.ops


def peak_tensor_mb(fn) -> float:
    """Peak bytes of CPU tensors alive during one call of ``fn``, above those alive before it,
    in MiB: the CPU counterpart of CUDA's ``max_memory_allocated`` (the bytes tensors hold, not
    what the allocator keeps: glibc's fragmentation and retained pages, oneDNN's caches and the
    interpreter are left out, which the resident set size of :class:`PeakMemory` includes). Read
    from the allocation and free events of ``torch.profiler`` (``profile_memory=True``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:   # (the profiler records no free of a tensor allocated before)
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def bootstrap_interval(values: Sequence[float], level: float = 0.95,
                       resamples: int = 2000) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``values`` (resampled with replacement;
    fixed seed: the same values give the same interval): the saliency benchmark's interval of a
    run's median per-repeat ratio."""
    rng = random.Random(0)
    values = list(values)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - level) / 2
    return medians[int(tail * resamples)], medians[min(resamples - 1, int((1 - tail) * resamples))]


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean of ``values``, independent estimates of one quantity
    (``scripts/pool_bench.py``: one per benchmark run): mean ± t(n − 1) · s / √n; None for fewer
    than two values."""
    from scipy.stats import t

    if len(values) < 2:
        return None
    n, mean = len(values), statistics.fmean(values)
    half = t.ppf((1 + level) / 2, n - 1) * statistics.stdev(values) / n ** 0.5
    return mean - half, mean + half


def in_turn(items: Sequence, repeats: int) -> list[list]:
    """The order of ``repeats`` rounds that each run every one of ``items`` once, reversed every
    other round (A B C, C B A, A B C, …): a host whose speed drifts during a round slows the
    ones timed last; reversed, each pair of adjacent items is timed once in each order, so that
    a steady drift cancels over two rounds instead of favouring whichever always runs first."""
    items = list(items)
    return [items if r % 2 == 0 else items[::-1] for r in range(repeats)]


def op_times_in_turn(fns: dict, device: torch.device | str = "cpu", rounds: int = 3) -> dict[str, dict]:
    """Where one call of each of ``fns`` ({name: function}) spends its time:
    ``{name: {operation: (milliseconds, calls)}}`` per call, averaged over ``rounds`` rounds that
    each profile one call of every function in turn (:func:`in_turn`: a host whose speed drifts
    slows all of them alike) — each ATen operation's and autograd node's *self* time (its
    children's excluded, so the values add up to the call's), host time on a CPU,
    kernel time on CUDA, from ``torch.profiler``. For when one method's time is not the multiple
    of another's that their FLOPs predict (``scripts/bench_saliency.py --profile``)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for fn in fns.values():
        fn()   # warm: the allocator holds each call's memory, as it does for a timed repeat
    sums = {name: {} for name in fns}
    for order in in_turn(fns, rounds):
        for name in order:
            fn = fns[name]
            with profile(activities=activities) as prof:
                fn()
                if cuda:
                    torch.cuda.synchronize()
            for e in prof.key_averages():
                us = e.self_device_time_total if cuda else e.self_cpu_time_total
                ms, calls = sums[name].get(e.key, (0.0, 0))
                sums[name][e.key] = (ms + us / 1000, calls + e.count)
    return {name: {op: (ms / rounds, calls / rounds) for op, (ms, calls) in ops.items() if ms > 0}
            for name, ops in sums.items()}


@torch.no_grad()
def latencies_in_turn(models: Sequence[nn.Module], example_input: torch.Tensor, batch_size: int,
                      repeats: int = 10, device: torch.device | str = "cpu") -> list[dict]:
    """Wall time of one forward pass of each model in eval mode, timed in turn: every repeat runs
    each model once (after two warm-up rounds), in the order of :func:`in_turn`, so that a host
    whose speed drifts slows every model alike. Per model: ``ms``, the median time, and
    ``speedup``, the median of the per-repeat ratios (first model's time) / (this model's time)
    — 1 for the first."""
    device = torch.device(device)
    modes = [m.training for m in models]
    for m in models:
        m.eval().to(device)
    x = example_input[:1].to(device).expand(batch_size, *example_input.shape[1:]).contiguous()
    times = [[] for _ in models]
    for i, order in enumerate(in_turn(range(len(models)), repeats + 2)):
        for m, t in ((models[k], times[k]) for k in order):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            m(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                t.append(1000 * (time.perf_counter() - t0))
    for m, mode in zip(models, modes):
        m.train(mode)
    return [{"ms": statistics.median(t), "speedup": statistics.median(a / b for a, b in zip(times[0], t))}
            for t in times]


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak memory above the level at entry, in MiB: CUDA peak allocated bytes, or on CPU the
    resident set size sampled every millisecond by a thread (a process's own peak, ru_maxrss,
    never drops, so it cannot measure one stage of a long process)::

        with PeakMemory(device) as peak:
            work()
        peak.mb
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.mb = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base, self._samples = _rss_mb(), []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.is_set():
            self._samples.append(_rss_mb())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self._done.set()
            self._thread.join()
            self.mb = max(self._samples + [_rss_mb(), self._base]) - self._base
        return False
