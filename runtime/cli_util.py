"""Shared CLI plumbing: a CxrError becomes one line on stderr and exit 1; a command may return its exit code."""

from __future__ import annotations

import sys
from typing import Any

import click
import typer
from cxr.runtime.errors import CxrError


def new_app(help_text: str) -> typer.Typer:
    return typer.Typer(
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


def run_app(app: typer.Typer, args: list[str] | None = None) -> None:
    """Run a Typer app; user errors print one line (no traceback), internal errors keep theirs."""
    try:
        result: Any = app(args=args, standalone_mode=False)
    except CxrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


def parse_int_list(text: str, what: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32] with a one-line error naming the option."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CxrError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise CxrError(f"{what}: expected positive integers, got {text!r}")
    return values
