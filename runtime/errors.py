"""The one user-facing error type. CLIs print it as one line and exit non-zero, without a traceback."""


def one_line(value: object, limit: int | None = None) -> str:
    """An exception's (or any) text on one line, whitespace collapsed, cut to ``limit`` characters; an
    exception without text gives its class name."""
    text = " ".join(str(value).split())[:limit]
    return text or (type(value).__name__ if isinstance(value, BaseException) else "")


class CxrError(Exception):
    """A problem the user can fix: a bad file, a bad bundle, a missing backend, a bad option."""


class CxrUsageError(CxrError):
    """A bad option value found by our own checks: shown like click's usage errors (one line, exit 2)."""


class BundleRefused(CxrError):
    """The bundle itself is untrustworthy (a file changed, a card that contradicts its graph): no backend may
    try it."""
