"""Model checkpoints that rebuild themselves: model spec + pruning history + state dict.

A pruned checkpoint reloads in a fresh process without the original model: the architecture
is rebuilt from the registry (``model``, ``num_classes``, ``in_channels``, ``width``) and the
saved Torch-Pruning history is replayed before the weights are loaded (:mod:`.surgery`).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from .errors import SospError, describe
from .models import AUXILIARY_PREFIXES, create_model
from .surgery import replay
from .utils import save_torch

FORMAT = "sosp-model/1"


# read_torch's hint for a run's own artefact: a file the run cannot read is never overwritten
KEPT = "; it is kept — delete it, or run in a new output directory"


def read_torch(path: str | Path, what: str = "", hint: str = "", mmap: bool = False):
    """``torch.load`` of ``path`` onto the CPU, or a one-line error naming the file (``what``:
    the option it came from, e.g. ``pretrain.checkpoint=``; ``hint``: what to do about it).
    ``mmap``: the tensors are mapped, not read (to read a record's other entries cheaply) — if
    the file is in the zip format torch.save writes, which mapping needs."""
    try:
        mmap = mmap and zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - an unreadable file is a bad input, whatever torch raises
        raise SospError(f"{what}{path} is not a readable torch file ({describe(exc)}){hint}") from None


def model_record(model: nn.Module, spec: dict, history: list | None = None, **extra) -> dict:
    return {"format": FORMAT, "spec": dict(spec), "history": list(history or []),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}


def save_model(path: Path, model: nn.Module, spec: dict, history: list | None = None, **extra) -> None:
    """``spec`` = {model, num_classes, in_channels, width, input_shape}."""
    save_torch(model_record(model, spec, history, **extra), path)


def build_from_record(record: dict) -> nn.Module:
    spec = record["spec"]
    model = create_model(spec["model"], spec["num_classes"], spec["in_channels"], spec["width"])
    if record["history"]:
        replay(model, record["history"], torch.zeros(1, *spec["input_shape"]))
    model.load_state_dict(record["state_dict"])
    return model


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by :func:`save_model`; returns (model, record)."""
    path = Path(path)
    if not path.is_file():
        raise SospError(f"checkpoint not found: {path}")
    record = read_torch(path)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise SospError(f"{path} is not a sosp model checkpoint (format {FORMAT})")
    return build_from_record(record), record


# key prefixes of wrapped models: DataParallel / DistributedDataParallel, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _without_wrapper_prefixes(state: dict) -> dict:
    """The state dict of the wrapped model: a prefix that every key carries is removed."""
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(str(k).startswith(p) for k in state)), None)
        if prefix is None:
            return state
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def check_checkpoint_path(path: str | Path) -> Path:
    """``pretrain.checkpoint`` as a Path, or a one-line error when no such file exists."""
    path = Path(path)
    if path.is_dir():
        raise SospError(f"pretrain.checkpoint={path} is a folder; pass the weights file in it "
                        "(a run folder's pretrained.pt, or a state dict such as torchvision's)")
    if not path.is_file():
        raise SospError(f"pretrain.checkpoint={path} does not exist")
    return path


def load_weights_into(model: nn.Module, path: str | Path) -> None:
    """Load a user-supplied checkpoint (a sosp checkpoint of an unpruned model, a dict with a
    ``state_dict``/``model`` entry, or a bare state dict such as torchvision's weight files)
    into ``model``, strictly; keys saved from a DDP / DataParallel or ``torch.compile`` wrapper
    (``module.`` / ``_orig_mod.`` on every key) are read without the prefix."""
    path = check_checkpoint_path(path)
    obj = read_torch(path, "pretrain.checkpoint=")
    if isinstance(obj, dict) and obj.get("format") == FORMAT and obj["history"]:
        raise SospError(f"pretrain.checkpoint={path} holds a pruned model; pass an unpruned one")
    state = obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if not isinstance(state, dict):
        raise SospError(f"pretrain.checkpoint={path} holds no state dict")
    state = _without_wrapper_prefixes(state)
    own = model.state_dict()
    # torchvision's GoogLeNet / Inception v3 weights hold auxiliary classifiers that the model,
    # built without them (models.TORCHVISION_KWARGS: the attribute is None), does not have:
    # those are not loaded
    removed = tuple(p for p in AUXILIARY_PREFIXES if hasattr(model, p[:-1]) and getattr(model, p[:-1]) is None)
    state = {k: v for k, v in state.items() if k in own or not (removed and k.startswith(removed))}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        what = (f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'" if unexpected
                else f"'{shape[0]}' has shape {tuple(state[shape[0]].shape)}, "
                     f"model expects {tuple(own[shape[0]].shape)}")
        raise SospError(f"pretrain.checkpoint={path} does not match the model ({what}; "
                        f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shape)} "
                        "shape mismatches)")
    spoiled = not_finite(state)
    if spoiled:
        raise SospError(f"pretrain.checkpoint={path} holds non-finite values ('{spoiled}'), as a "
                        "diverged training leaves; pass weights whose values are all finite")
    model.load_state_dict(state)


def not_finite(state: dict) -> str | None:
    """The first entry of a state dict holding a NaN or an infinity, or None."""
    return next((k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
                 and not bool(torch.isfinite(v).all())), None)
