"""Cost of a model: parameters, MACs and latency (DESIGN.md §4).

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one input and halved
(it counts a multiply-add as 2 FLOPs); like the pruning literature's "FLOPs", only conv, linear
and matmul operations are counted (BatchNorm, activations and pooling are not).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn
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


@torch.no_grad()
def latency_ms(model: nn.Module, example_input: torch.Tensor, batch_size: int, repeats: int = 10,
               device: torch.device | str = "cpu") -> float:
    """Median wall time of one forward pass (ms) on ``device`` after two warm-up passes."""
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    x = example_input[:1].to(device).expand(batch_size, *example_input.shape[1:]).contiguous()
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(1000 * (time.perf_counter() - t0))
    model.train(was_training)
    return statistics.median(times)
