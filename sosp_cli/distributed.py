"""Several processes, one run (DESIGN.md §7): ``torchrun --nproc_per_node=K --no-python sosp-run ...``.

torchrun starts K copies of ``sosp-run`` with ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set;
:func:`init_from_env` joins them into one process group (NCCL on CUDA, one GPU per process;
gloo on CPU). A job of several tasks started by Hydra's submitit launcher
(``hydra/launcher=submitit_slurm hydra.launcher.tasks_per_node=K``, or ``submitit_local``) gets
the same variables from submitit (:func:`export_submitit_environment`). Then:

- **training** (pretrain, fine-tune) is data-parallel (``DistributedDataParallel``) with the
  single-process recipe unchanged: every step draws the global batch a single process would
  draw (the same seeded permutation, ``schedule.*.batch_size`` images) and each rank takes its
  contiguous share of it (:class:`GlobalBatchShards`); DDP averages the ranks' gradients, so a
  step is the single-process step on the same images (up to BatchNorm, whose batch statistics
  are per process, as in torchvision's reference scripts without ``--sync-bn``);
- **saliencies**: the saliency batches are dealt out across ranks (:func:`shard`) and every
  sum over samples (g, Q·1, Q, Σ_b g_b², sample counts) is summed across ranks with
  ``all_reduce`` before any score is formed (:func:`summing`), so every rank holds the scores a
  single process computes on all batches;
- **evaluation** runs each rank on its share of the split (:func:`shard_dataset`) and sums the
  counts;
- only rank 0 writes files (:func:`is_main`); the others wait where they need them (:func:`barrier`);
- a process that runs no further job leaves the group (:func:`finish`).

With ``WORLD_SIZE`` unset or 1 nothing here does anything. The tests run every collective on
CPU with gloo (``tests/test_distributed.py``).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler, Subset

from .errors import SospError


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the process that writes files and prints the summary (always True alone)."""
    return rank() == 0


def export_submitit_environment() -> None:
    """Inside a submitit job of several tasks (SLURM or local) and not under torchrun: set
    torch's ``env://`` variables (rank, world size, local rank, master address and port) from
    submitit's job environment, all GPUs left visible (the local rank picks one)."""
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    try:
        import submitit
    except ImportError:
        return
    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun (or submitit) describes in the environment (once per
    process), and return the device this process uses: ``cuda:LOCAL_RANK`` on CUDA, else
    ``device``."""
    export_submitit_environment()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise SospError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} "
                            "CUDA devices: start at most that many processes per node")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def finish() -> None:
    """Leave the process group, once every rank has got here, after work that ended normally.
    A process that exits still in a gloo group can abort in gloo's teardown (SIGABRT,
    "terminate called without an active exception": pytorch/pytorch#190489); the barrier first,
    so that no rank closes its connections while another still uses them. Not after an error:
    a rank still inside a collective would never reach the barrier (pytorch/torchtitan#1342)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: DDP keeps the parameters
    equal, but each rank's last training forward pass updated its running statistics with its
    own share of the batch. After this every rank holds the model rank 0 saves."""
    if active():
        for b in model.buffers():
            dist.broadcast(b, src=0)


@contextlib.contextmanager
def file_lock(path: str, poll_seconds: float = 60.0, busy: str | None = None):
    """``filelock.FileLock(path)`` held by rank 0 for every rank (alone: by this process).

    While another run holds the lock (a sweep's first job pretraining the model the others
    need, for hours), rank 0 retries every ``poll_seconds`` and tells the other ranks after each
    try: they wait in a short collective each time rather than in one that outlasts the process
    group's timeout (torch's default: 10–30 minutes). With ``busy``, a lock held elsewhere is
    not waited for: every rank raises ``SospError(busy)``."""
    from filelock import FileLock, Timeout

    lock = FileLock(path) if is_main() else None
    while True:
        held = False
        if lock is not None:
            try:
                lock.acquire(timeout=0 if busy is not None else poll_seconds)
                held = True
            except Timeout:
                pass
        if broadcast_object(held):
            break
        if busy is not None:
            raise SospError(busy)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def shard(items: Sequence) -> list:
    """This rank's share of ``items`` (every ``world_size``-th, from ``rank``)."""
    return list(items)[rank()::world_size()]


def shard_dataset(dataset: Dataset) -> Dataset:
    """This rank's share of ``dataset`` (every ``world_size``-th sample; every sample once)."""
    if not active():
        return dataset
    return Subset(dataset, range(rank(), len(dataset), world_size()))


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in place (``t`` itself when alone)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_sum_numbers(*values: float) -> list[float]:
    """Python numbers summed over the ranks (one float64 all_reduce; exact for counts)."""
    if not active():
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return all_sum(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


_SUMMING = [False]


@contextlib.contextmanager
def summing(enabled: bool = True):
    """Within the block, :func:`summed` and :func:`summed_count` sum over the ranks: the
    saliency code calls them on its sums over samples, each rank having seen its
    :func:`shard` of the batches. Outside it (diagnostics, tests, the API) they return their
    argument, so no rank waits on a collective the others never reach."""
    previous = _SUMMING[0]
    _SUMMING[0] = enabled and active()
    try:
        yield
    finally:
        _SUMMING[0] = previous


def summed(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks inside :func:`summing`, else ``t``."""
    return all_sum(t) if _SUMMING[0] else t


def summed_count(n: int) -> int:
    """A count (samples, batches) summed over the ranks inside :func:`summing`, else ``n``."""
    return int(all_sum_numbers(n)[0]) if _SUMMING[0] else n


class GlobalBatchShards(Sampler[list[int]]):
    """Batch sampler of one rank: the batches a single-process ``DataLoader(shuffle=True,
    drop_last=True, generator=generator)`` of ``batch_size`` would draw — the same
    ``torch.randperm`` from the same generator — each cut into ``world_size`` contiguous
    shares, of which this rank takes share ``rank``."""

    def __init__(self, length: int, batch_size: int, generator: torch.Generator,
                 rank_: int | None = None, world: int | None = None):
        self.length, self.batch_size, self.generator = length, batch_size, generator
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world
        if batch_size % self.world:
            raise SospError(f"batch_size={batch_size} is not divisible by the {self.world} "
                            "processes: a step's global batch is split evenly across them; "
                            "choose a multiple of the process count")
        self.per_rank = batch_size // self.world

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.length, generator=self.generator).tolist()
        for k in range(len(self)):
            start = k * self.batch_size + self.rank * self.per_rank
            yield order[start:start + self.per_rank]

    def __len__(self) -> int:
        return self.length // self.batch_size
