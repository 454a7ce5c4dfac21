"""One exception type for every user-facing mistake.

The CLI prints ``str(error)`` as a single line and exits non-zero; library callers can catch it.
"""


class SospError(ValueError):
    """A bad input (name, value, file) with a message that says what is accepted."""


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
