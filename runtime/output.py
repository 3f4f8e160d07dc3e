"""Where a run's records go: JSON lines or CSV, appended one whole record at a time, never lost.

A bedside run over a ward's archive is long; whatever stops it (Ctrl+C, SIGTERM, SIGKILL, a full disk) must
leave every finished record on disk. So records are appended to ``--out`` itself, each in one ``write`` of
whole lines (the page cache keeps them through a SIGKILL), and nothing is ever written to a temporary file
that an interrupted run would leave behind. A rerun resumes (``--resume``: inputs already recorded by the same
bundle are skipped) or starts anew (``--overwrite``); otherwise an existing ``--out`` is refused, before any
work. A write that fails (disk full) is cut back to the last whole record.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cxr.runtime.errors import CxrError, CxrUsageError, one_line

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a cell starting with these


def record_path(path: str | Path) -> str:
    """A path as records show it: text that encodes in UTF-8 whatever bytes the file system holds (an
    undecodable byte shows as ``\\xff``), so every writer can write it and a resume can match it."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def csv_cell(value: Any) -> Any:
    """A value made safe for a spreadsheet: text that would run as a formula gets a leading quote (and so
    does text that starts with one, so ``_unquoted`` can always undo it)."""
    if isinstance(value, str) and value.startswith((*FORMULA_STARTS, "'")):
        return "'" + value
    return value


def csv_fields(classes: tuple[str, ...]) -> list[str]:
    return (
        ["path", "label", "backend", "precision", "error", "warnings"]
        + [f"prob_{c}" for c in classes]
        + ["ood_score", "in_distribution", "explained_label", "overlay", "bundle_digest"]
    )


def csv_row(record: dict[str, Any], classes: tuple[str, ...]) -> dict[str, Any]:
    keys = ("path", "label", "backend", "precision", "error", "ood_score", "in_distribution", "bundle_digest")
    row = {k: record.get(k) for k in keys}
    row["warnings"] = "; ".join(record.get("warnings") or [])
    probs = record.get("probs") or {}
    row.update({f"prob_{c}": probs.get(c) for c in classes})
    explanation = record.get("explanation") or {}
    row.update(explained_label=explanation.get("label"), overlay=explanation.get("overlay"))
    return {key: csv_cell(value) for key, value in row.items()}


@dataclass(kw_only=True)
class OutputPlan:
    """What ``--out`` will be, decided before any work: its format, and the inputs a resume skips."""

    target: Path | None
    format: str = "jsonl"
    resume: bool = False
    overwrite: bool = False
    recorded: set[str] = field(default_factory=set)  # record_path of inputs already in the file


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def plan_output(
    target: Path | None,
    inputs: list[Path],
    digest: str,
    resume: bool = False,
    overwrite: bool = False,
) -> OutputPlan:
    """Check ``--out`` before any work: a file name ending in .jsonl or .csv, in a writable folder, not a
    folder, not one of the inputs, and not an existing file unless resuming or overwriting it."""
    if resume and overwrite:
        raise CxrUsageError("--resume and --overwrite must not be given together")
    if target is None:
        if resume:
            raise CxrUsageError("--resume needs --out (the file whose records it continues)")
        return OutputPlan(target=None)
    plan = OutputPlan(target=target, format=_format_of(target), resume=resume, overwrite=overwrite)
    _check_folder(target)
    try:
        existing = os.stat(target)
    except FileNotFoundError:
        return plan  # a resume of a run that never wrote a record starts it
    _check_existing(target, existing, inputs)
    if resume:
        plan.recorded = recorded_inputs(target, plan.format, digest)
    elif not overwrite:
        raise CxrUsageError(
            f"--out {record_path(target)} exists: --resume continues it (skipping inputs it records), "
            "--overwrite replaces it"
        )
    return plan


def _format_of(target: Path) -> str:
    if target.is_dir():
        raise CxrUsageError(f"--out {record_path(target)} is a folder; name a file (e.g. results.jsonl)")
    suffix = target.suffix.lower()
    if suffix not in SUFFIXES:
        raise CxrUsageError(f"--out must end in .jsonl or .csv, got {record_path(target.name)!r}")
    return SUFFIXES[suffix]


def _check_folder(target: Path) -> None:
    """The folder must be there and writable; a link to nothing is no file to write."""
    parent = target.parent
    if not parent.is_dir():
        raise CxrUsageError(f"--out: folder {record_path(parent)} does not exist or cannot be reached")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CxrUsageError(f"--out: folder {record_path(parent)} is not writable")
    if target.is_symlink() and not target.exists():
        raise CxrUsageError(f"--out {record_path(target)} is a symbolic link to nothing; name a file")


def _check_existing(target: Path, existing: os.stat_result, inputs: list[Path]) -> None:
    """An existing ``--out``: a regular file we may write that is none of the inputs."""
    if stat.S_ISDIR(existing.st_mode):
        raise CxrUsageError(f"--out {record_path(target)} is a folder; name a file (e.g. results.jsonl)")
    if not stat.S_ISREG(existing.st_mode):
        raise CxrUsageError(f"--out {record_path(target)} is not a regular file")
    for path in inputs:
        try:
            same = _same_file(existing, os.stat(path))
        except OSError:
            continue
        if same:
            raise CxrUsageError(
                f"--out {record_path(target)} is one of the inputs: results would replace that film"
            )
    if not os.access(target, os.W_OK):
        raise CxrUsageError(f"--out {record_path(target)} is not writable")


def recorded_inputs(target: Path, kind: str, digest: str) -> set[str]:
    """The inputs ``target`` already records for the bundle of ``digest``; records of another bundle refuse
    the resume (one results file, one model). A last line cut short by a kill is not a record."""
    text = target.read_bytes().decode("utf-8", "replace")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows: list[dict[str, Any]] = []
    if kind == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise CxrError(f"--resume: {record_path(target)} line {number} is not a record") from None
    found = set()
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise CxrError(f"--resume: {record_path(target)} holds a record without a path")
        if row.get("bundle_digest") != digest:
            raise CxrError(
                f"--resume: {record_path(target)} holds records of another bundle "
                f"({str(row.get('bundle_digest'))[:23]}..., this one is {digest[:23]}...); use a new --out"
            )
        found.add(_unquoted(row["path"]) if kind == "csv" else row["path"])
    return found


def _cut_partial_line(fd: int) -> None:
    """A record a kill cut short ends the file without its newline: remove it before appending after it."""
    size = os.fstat(fd).st_size
    start = size
    while start > 0:
        step = min(start, 1 << 16)
        chunk = os.pread(fd, step, start - step)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            start = start - step + newline + 1
            break
        start -= step
    if start < size:
        os.ftruncate(fd, start)


def _unquoted(cell: str) -> str:
    """A CSV cell as it was before ``csv_cell`` quoted it."""
    return cell[1:] if cell.startswith("'") else cell


class RecordWriter:
    """Appends records to the planned target (or stdout), each one ``write`` of whole lines.

    Opened only once the run can start (the backend is open), so a run that fails to start leaves an
    existing file as it was. ``written`` counts records on disk; a failed write is cut back to the last
    whole record and raised as one line that says what was kept.
    """

    def __init__(self, plan: OutputPlan, classes: tuple[str, ...]) -> None:
        self.plan, self.classes, self.written = plan, classes, 0
        self._fd: int | None = None
        self._stdout: TextIO | None = None
        self._created: tuple[int, int] | None = None  # (device, inode) of a file this writer made
        if plan.target is None:
            if sys.stdout is None or sys.stdout.closed:
                raise CxrError("stdout is closed: name a file with --out")
            self._stdout = sys.stdout
            return
        try:
            self._open(plan)
            if plan.format == "csv" and os.fstat(self._fd).st_size == 0:
                self._append(self._csv_text(None))
        except BaseException:
            self.close()
            raise

    def _open(self, plan: OutputPlan) -> None:
        """A new file is made exclusively (a second run, or a link planted since the checks, is refused); an
        existing one is locked before it is cut or appended to, so two runs never share one ``--out``."""
        target, name = plan.target, record_path(plan.target)
        flags = os.O_RDWR | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        new = not (plan.resume or plan.overwrite) or not os.path.lexists(target)
        try:
            if new:
                self._fd = os.open(target, flags | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides
            else:
                self._fd = os.open(target, flags | getattr(os, "O_NONBLOCK", 0))
        except FileExistsError:
            raise CxrError(f"--out {name} appeared after the run started (another run writing it?)") from None
        except OSError as exc:
            raise CxrError(f"--out {name}: {exc.strerror or exc}") from None
        info = os.fstat(self._fd)
        if new:
            self._created = (info.st_dev, info.st_ino)
        if not stat.S_ISREG(info.st_mode):
            raise CxrError(f"--out {name} is not a regular file")
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CxrError(f"--out {name}: another run is writing it; refused") from None
        if plan.overwrite and not new:
            os.ftruncate(self._fd, 0)
        elif plan.resume:
            _cut_partial_line(self._fd)

    def _csv_text(self, record: dict[str, Any] | None) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=csv_fields(self.classes), extrasaction="ignore")
        if record is None:
            writer.writeheader()
        else:
            writer.writerow(csv_row(record, self.classes))
        return buffer.getvalue()

    def write(self, record: dict[str, Any]) -> None:
        if self._stdout is not None:
            try:
                self._stdout.write(json.dumps(record) + "\n")
                self._stdout.flush()
            except BrokenPipeError:
                raise
            except (OSError, ValueError) as exc:  # a full disk behind a redirect, a closed stream
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc, 80)
                raise CxrError(f"stdout: {reason}") from None
        elif self.plan.format == "csv":
            self._append(self._csv_text(record))
        else:
            self._append(json.dumps(record) + "\n")
        self.written += 1

    def _append(self, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError as exc:
            os.ftruncate(self._fd, start)  # no half record: the file ends at the last whole one
            reason = "no space left on the device" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else None
            target = record_path(self.plan.target)
            raise CxrError(f"--out {target}: {reason or exc.strerror or exc}") from None

    def close(self) -> None:
        """Flush to the disk; a file this writer made and never wrote a record to is removed (no litter)."""
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        if self._created and self.written == 0:  # ours and empty: removed, if the name still means that file
            try:
                info = os.lstat(self.plan.target)
                if (info.st_dev, info.st_ino) == self._created:
                    os.unlink(self.plan.target)
            except OSError:
                pass

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
