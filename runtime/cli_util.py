"""Shared CLI plumbing: one line for every problem, no traceback for the user's.

A CxrError (bad file, bad bundle, missing backend) is ``error: ...`` and exit 1; a usage error (unknown
command or option, a bad or missing value, a CxrUsageError) is one ``error: ...`` line and exit 2, click's
convention; a bare command prints its help and exits 2. A command may return its exit code.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Any, TextIO

import click
import typer
from cxr.runtime.errors import CxrError, CxrUsageError, one_line


def _click_modules() -> list[Any]:
    """click itself, and the copy typer >= 0.29 carries (its exceptions are other classes)."""
    modules = [click]
    try:
        import typer._click as vendored  # noqa: PLC0415

        modules.append(vendored)
    except ImportError:
        pass
    return modules


def _classes(name: str, *extra: type) -> tuple[type, ...]:
    """Exception class ``name`` from every click copy that has it, plus typer's own where given."""
    found = [c for m in _click_modules() if (c := getattr(m.exceptions, name, None)) is not None]
    return tuple(dict.fromkeys([*found, *extra]))


USAGE_ERRORS = _classes("UsageError")
NO_ARGS = _classes("NoArgsIsHelpError")
CLICK_ERRORS = _classes("ClickException")
EXITS = _classes("Exit", typer.Exit)
ABORTS = _classes("Abort", typer.Abort)


OUR_LOGGERS = ("cxr", "__main__")


class _OneLineFilter(logging.Filter):
    """Third-party messages (pydicom, Pillow, ONNX Runtime, OpenVINO, Triton, warnings) are debug output:
    shown with --verbose only, and then as one line without their traceback; ours keep their traceback in
    --verbose only (a debug log of a fault)."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.split(".")[0] in OUR_LOGGERS
        if not ours and not self.verbose:
            return False
        if not ours:
            record.msg, record.args = one_line(record.getMessage()), None
        if not ours or not self.verbose:
            record.exc_info = record.exc_text = record.stack_info = None
        return True


def configure_logging(verbosity: int, stream: TextIO) -> None:
    """The library logs (``logging``); the CLI decides what is shown: -1 quiet (warnings and errors, no
    progress bars), 0 what a person follows (info), 1 verbose (debug, third-party messages included)."""
    level = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[max(-1, min(1, verbosity))]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        logging.Formatter("%(message)s" if level > logging.DEBUG else "%(name)s: %(message)s")
    )
    handler.addFilter(_OneLineFilter(verbose=level <= logging.DEBUG))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # Python warnings (pydicom's UserWarning ...) become third-party messages
    _quiet_opencv(verbose=level <= logging.DEBUG)
    for noisy in ("matplotlib", "PIL", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if verbosity < 0:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it when a bar is made


def _quiet_opencv(verbose: bool) -> None:
    """OpenCV's C++ log ("[ WARN:0] ... PNG input buffer is incomplete") writes to stderr itself: errors only,
    unless --verbose (the file's own record already says what was wrong with it)."""
    os.environ["OPENCV_LOG_LEVEL"] = "INFO" if verbose else "ERROR"  # read when cv2 is first imported
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        cv2.setLogLevel(3 if verbose else 2)  # cv::utils::logging: 2 error, 3 warning


def new_app(help_text: str, log_stream: str = "stdout") -> typer.Typer:
    """A Typer app with one-line errors and a --quiet/--verbose pair before the command. ``log_stream``: where
    messages go (stderr for a CLI whose stdout carries results, e.g. JSON lines)."""
    app = typer.Typer(
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _verbosity(
        quiet: bool = typer.Option(
            False, "--quiet", "-q", help="Only warnings and errors; no progress bars."
        ),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug messages too, with their source."),
    ) -> None:
        set_verbosity(quiet, verbose, sys.stderr if log_stream == "stderr" else sys.stdout)

    return app


def set_verbosity(quiet: bool, verbose: bool, stream: TextIO | None = None) -> None:
    """--quiet / --verbose as every CLI reads them (one of them at most); messages to ``stream`` (stdout)."""
    if quiet and verbose:
        raise CxrUsageError("--quiet and --verbose must not be given together")
    configure_logging(-1 if quiet else int(verbose), stream or sys.stdout)


def usage_line(exc: Exception) -> str:
    """``error: <click's message> (try 'cxr-train fit --help')`` on one line."""
    ctx = getattr(exc, "ctx", None)
    where = f" (try '{ctx.command_path} --help')" if ctx is not None else ""
    return f"error: {one_line(exc.format_message())}{where}"


# a full disk, a quota, or a file-size limit: the machine's fault, one line, whatever step wrote (each export
# stage builds in a work folder, so the bundle is left as it was)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def run_app(app: typer.Typer, args: list[str] | None = None) -> None:
    """Run a Typer app; user errors print one line (no traceback), internal errors keep theirs."""
    try:
        result: Any = app(args=args, standalone_mode=False)
    except CxrError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, CxrUsageError) else 1)
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(
            f"error: {where}no space left to write ({exc.strerror}); free some and run it again",
            file=sys.stderr,
        )
        sys.exit(1)
    except EXITS as exc:
        sys.exit(exc.exit_code)
    except NO_ARGS as exc:  # a bare command: its help, as click shows it
        print(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
        sys.exit(2)
    except USAGE_ERRORS as exc:
        print(usage_line(exc), file=sys.stderr)
        sys.exit(2)
    except CLICK_ERRORS as exc:
        print(f"error: {one_line(exc.format_message())}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (*ABORTS, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


def parse_int_list(text: str, what: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32] with a one-line error naming the option."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CxrUsageError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise CxrUsageError(f"{what}: expected positive integers, got {text!r}")
    return values
