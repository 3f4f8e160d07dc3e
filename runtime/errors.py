"""The one user-facing error type. CLIs print it as one line and exit non-zero, without a traceback."""


class CxrError(Exception):
    """A problem the user can fix: a bad file, a bad bundle, a missing backend, a bad option."""
