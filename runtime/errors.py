"""The one user-facing error type. CLIs print it as one line and exit non-zero, without a traceback."""


class CxrError(Exception):
    """A problem the user can fix: a bad file, a bad bundle, a missing backend, a bad option."""


class CxrUsageError(CxrError):
    """A bad option value found by our own checks: shown like click's usage errors (one line, exit 2)."""
