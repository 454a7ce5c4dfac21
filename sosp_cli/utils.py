"""Small shared helpers: atomic writes, config fingerprints, seeding, devices."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .errors import SospError, check_choice, describe


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a killed run never leaves half a file.

    The file gets the permissions any new file gets (0o666 less the umask), as ``open`` would
    give it: ``mkstemp`` makes its file private (0o600), which would hide a run's artefacts — and
    a ``pretrain.cache_dir`` shared by a group — from everyone but their owner."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # torch.save reports a failed write as a RuntimeError of its zip writer ("[enforce fail at
        # inline_container.cc] ... unexpected pos ...", "PytorchStreamWriter failed writing ...",
        # "basic_ios::clear: iostream error"): a full disk in other words
        if isinstance(exc, RuntimeError) and not any(
                m in str(exc) for m in ("inline_container", "PytorchStreamWriter", "iostream error")):
            raise
        raise unwritten(path, exc) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def unwritten(path: Path, exc: BaseException) -> SospError:
    """The one-line error for a file that could not be written (a full disk, a file-size limit,
    a read-only folder)."""
    path = Path(path)
    return SospError(f"cannot write {path} ({describe(exc)}; {_room(path.parent)}); "
                     "the files written before it are kept: make room and resume")


def _room(folder: Path) -> str:
    """Free space on ``folder``'s disk, and the process's file-size limit when it has one."""
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    try:
        import resource   # POSIX only
    except ImportError:
        return free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return free if limit == resource.RLIM_INFINITY else f"{free}, file size limit {limit:,} bytes (ulimit -f)"


def make_folder(path: str | Path, name: str) -> None:
    """``mkdir -p path``, or a one-line error: ``<name> cannot be created (<OSError>)``."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SospError(f"{name} cannot be created ({describe(exc)})") from None


def unwritable(path: str | Path) -> str | None:
    """Why a file cannot be written at ``path`` (a folder is there, or its folder is missing),
    or None: for a script to refuse an output path before its work, not after it."""
    path = Path(path).expanduser()
    if path.is_dir():
        return "it is a folder"
    folder = path.resolve().parent
    return None if folder.is_dir() else f"no folder {folder}"


def save_torch(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_text(text: str, path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def jsonl_row(record: dict) -> str:
    """One line of a ``.jsonl`` file (``metrics.jsonl``): keys sorted, anything else as str."""
    return json.dumps(record, sort_keys=True, default=str) + "\n"


def save_json(obj, path: Path) -> None:
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
    atomic_write(path, write)


def append_jsonl(record: dict, path: Path) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(jsonl_row(record))
    except OSError as exc:
        raise unwritten(path, exc) from None


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-serialisable config parts (the cache/resume key)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


SEED_LIMIT = 2**32   # numpy's seeds; torch's (seed·100003 + epoch in train.py) fit below 2⁶³


def check_seed(seed, key: str = "seed") -> None:
    """A one-line SospError unless ``seed`` is an integer in [0, 2³²) — a larger one overflows
    torch's 64-bit seeds midway through training; ``key`` with a list checks each of its seeds."""
    seeds = seed if isinstance(seed, (list, tuple)) else [seed]
    if not all(not isinstance(s, bool) and isinstance(s, int) and 0 <= s < SEED_LIMIT for s in seeds):
        raise SospError(f"{key}={seed} must {'hold integers' if seeds is seed else 'be an integer'} "
                        f"in [0, {SEED_LIMIT - 1}]")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    check_choice("device", name, DEVICES)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SospError("device=cuda but no CUDA device is available; use device=cpu or auto")
    return torch.device(name)


def check_torch_device(device, key: str = "device") -> torch.device:
    """``device`` (a ``torch.device`` or its string: ``"cpu"``, ``"cuda"``, ``"cuda:1"``) as a
    ``torch.device`` that sosp computes on and this machine has; one line otherwise (the Python
    API's twin of :func:`resolve_device`)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SospError(f"{key}={device!r} is not a device ({describe(exc)}); pass 'cpu', 'cuda' "
                        "or 'cuda:<index>'") from None
    if dev.type not in ("cpu", "cuda"):
        raise SospError(f"{key}={device!r}: sosp computes on 'cpu' or 'cuda' devices")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SospError(f"{key}={device!r} but no CUDA device is available; use 'cpu'")
        if dev.index is not None and dev.index >= count:
            raise SospError(f"{key}={device!r} but this machine has {count} CUDA device"
                            f"{'s' * (count > 1)} (indices 0 to {count - 1})")
    return dev


def _tf32_flags() -> list[tuple[object, str]]:
    """(object, attribute) of every switch between IEEE float32 and TensorFloat-32 for CUDA's
    convolutions (cuDNN) and matrix products: torch ≥ 2.9's ``fp32_precision`` ('ieee' | 'tf32'),
    else the older ``allow_tf32`` (the two APIs must not be mixed: torch raises on reading
    ``allow_tf32`` when the new flags of cuDNN's convolutions and RNNs differ)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(getattr(cudnn, "conv", None), "fp32_precision") and hasattr(matmul, "fp32_precision"):
        return [(cudnn.conv, "fp32_precision"), (cudnn.rnn, "fp32_precision"), (matmul, "fp32_precision")]
    return [(cudnn, "allow_tf32"), (matmul, "allow_tf32")]


@contextmanager
def float32_products(tf32: bool = False):
    """Inside: CUDA convolutions and matrix products of float32 tensors in IEEE float32
    (``tf32=False``), or in TensorFloat-32 (``tf32=True``, 10-bit mantissa); the previous
    settings are restored on exit. PyTorch runs cuDNN convolutions in TF32 by default on Ampere
    and later GPUs; that is fine for training but not for a saliency, whose gate gradients sum
    many terms of both signs: on an H100 the TF32 errors of g and Q·1 reached 20 % of their
    largest entry (ResNet-110, ``scripts/gpu_exactness.py``; README "GPU"). No effect on CPU."""
    if not isinstance(tf32, bool):
        raise SospError(f"saliency.tf32={tf32!r}: expected true or false")
    flags = _tf32_flags()
    saved = [getattr(obj, name) for obj, name in flags]
    new = "tf32" if tf32 else "ieee"
    try:
        for obj, name in flags:
            setattr(obj, name, new if name == "fp32_precision" else tf32)
        yield
    finally:
        for (obj, name), value in zip(flags, saved):
            setattr(obj, name, value)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def retain_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory in the process instead of returning it to the OS.

    Every forward/backward pass frees and re-allocates activation-sized blocks. By default glibc
    hands blocks above its mmap threshold, and free heap tops above its trim threshold, back to
    the OS at once, so the next pass page-faults the same memory in again; on the 2-core VM we
    develop on that cost SOSP-H about a fifth of its saliency time (README, "Saliency
    benchmark"). This is ``MALLOC_MMAP_MAX_=0`` (no block is served by ``mmap``: glibc's mmap
    threshold cannot be raised above 32 MiB, and a 2B-row stacked activation of ResNet-56 ×4 at
    batch 64 is 32 MiB, so those were still mapped and unmapped on every pass), with
    ``MALLOC_MMAP_THRESHOLD_=32 MiB`` and ``MALLOC_TRIM_THRESHOLD_=2 GiB``, set at run time: the
    process keeps its peak heap, as PyTorch's CUDA caching allocator does on the GPU.
    ``sosp-run`` calls it at start-up.

    Returns False, changing nothing, when the C library is not glibc, when the user set any
    ``MALLOC_*_`` tuning variable, or when ``SOSP_SYSTEM_MALLOC=1``; any value of
    ``SOSP_SYSTEM_MALLOC`` other than 0 or 1 is an error."""
    import ctypes
    import platform

    opt_out = os.environ.get("SOSP_SYSTEM_MALLOC", "0")
    if opt_out not in ("0", "1"):
        raise SospError(f"SOSP_SYSTEM_MALLOC={opt_out!r}: expected 1 (leave glibc malloc as it is) or 0")
    user_tuned = any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ)
    if opt_out == "1" or user_tuned:
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(param, value) for param, value in
               ((_M_MMAP_THRESHOLD, 32 << 20), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


@functools.cache
def load_jvp_decompositions() -> None:
    """PyTorch's forward-mode AD loads its decompositions on first use, scripting them with
    ``torch.jit.script``, which warns that it is deprecated — PyTorch's warning about PyTorch's
    own code, which a user of sosp can do nothing about. Load them once with that warning off."""
    loader = getattr(torch.autograd.forward_ad, "_maybe_load_decompositions", None)
    if loader is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            loader()


def channel_shaped(values: torch.Tensor, ndim: int, channel_dim: int = 1) -> torch.Tensor:
    """Per-channel ``values`` viewed to broadcast along ``channel_dim`` of an ``ndim``-d tensor."""
    shape = [1] * ndim
    shape[channel_dim % ndim] = -1
    return values.detach().view(shape)
