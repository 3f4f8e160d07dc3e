"""The one user-facing error type. CLIs print it as one line and exit non-zero, without a traceback."""

import re

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # a name with ESC must not drive the terminal


def one_line(value: object, limit: int | None = None) -> str:
    """An exception's (or any) text on one line, whitespace collapsed, control characters shown as
    ``\\xNN``, cut to ``limit`` characters; an exception without text gives its class name."""
    text = CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", " ".join(str(value).split()))[:limit]
    return text or (type(value).__name__ if isinstance(value, BaseException) else "")


class CxrError(Exception):
    """A problem the user can fix: a bad file, a bad bundle, a missing backend, a bad option."""


class CxrUsageError(CxrError):
    """A bad option value found by our own checks: shown like click's usage errors (one line, exit 2)."""


class BundleRefused(CxrError):
    """The bundle itself is untrustworthy (a file changed, a card that contradicts its graph): no backend may
    try it."""
