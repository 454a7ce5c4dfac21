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
