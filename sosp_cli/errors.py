"""One exception type for every user-facing mistake.

The CLI prints ``str(error)`` as a single line and exits non-zero; library callers can catch it.
"""


class SospError(ValueError):
    """A bad input (name, value, file) with a message that says what is accepted."""


class OtherConfig(SospError):
    """An artefact in a run folder that another config made: the key it carries is not the one
    this config gives it (``sosp_cli.pipeline``). ``partial``: the stage of a partial training,
    resumed per epoch. ``changes``: the settings that differ, when the caller knows them (the
    folder's saved config: ``sosp-run``)."""

    def __init__(self, path, found, key, partial: str | None = None, changes: str = ""):
        self.path, self.found, self.key, self.partial, self.changes = str(path), found, key, partial, changes
        what = f"is a partial {partial} training of" if partial else "was made by"
        advice = "delete it to train afresh, or run in a new output directory" if partial else \
            "run in a new output directory"
        details = f" ({changes})" if changes else ""
        super().__init__(f"{path} {what} a different config (key {found} != {key}); it is kept — "
                         f"{advice}{details}")

    def __reduce__(self):   # pickled with its fields (sent between ranks), not its message
        return type(self), (self.path, self.found, self.key, self.partial, self.changes)


def check_choice(kind: str, value: str, accepted) -> None:
    """Raise a one-line SospError unless ``value`` is one of ``accepted``."""
    accepted = sorted(accepted)
    if value not in accepted:
        raise SospError(f"unknown {kind} '{value}'; accepted: {', '.join(accepted)}")


def describe(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception from a library, on one line (whitespace collapsed, the
    message cut at ``limit`` characters), to quote inside a SospError."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:limit]}"


def message(exc: SospError) -> str:
    """The error's one line — also for one raised in a DataLoader worker process, which PyTorch
    re-raises in the main process with the worker's traceback in its message."""
    text = str(exc)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split("SospError: ", 1)[-1]
    return text
