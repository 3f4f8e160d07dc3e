"""Shared CLI plumbing: one line for every problem, no traceback for the user's.

A CxrError (bad file, bad bundle, missing backend) is ``error: ...`` and exit 1; a usage error (unknown
command or option, a bad or missing value, a CxrUsageError) is one ``error: ...`` line and exit 2, click's
convention;
a bare command prints its help and exits 2. A command may return its exit code.
"""

from __future__ import annotations

import sys
from typing import Any

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


def new_app(help_text: str) -> typer.Typer:
    return typer.Typer(
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


def usage_line(exc: Exception) -> str:
    """``error: <click's message> (try 'cxr-train fit --help')`` on one line."""
    ctx = getattr(exc, "ctx", None)
    where = f" (try '{ctx.command_path} --help')" if ctx is not None else ""
    return f"error: {one_line(exc.format_message())}{where}"


def run_app(app: typer.Typer, args: list[str] | None = None) -> None:
    """Run a Typer app; user errors print one line (no traceback), internal errors keep theirs."""
    try:
        result: Any = app(args=args, standalone_mode=False)
    except CxrError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, CxrUsageError) else 1)
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
