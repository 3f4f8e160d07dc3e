"""Writes that never follow a link, and folders that may not contain one.

A bundle is copied between machines and may come from anyone: a symlink planted in it (as ``card.json``'s
temporary file, or as a graph the next stage writes) would make an export write outside the bundle. So every
file is written to a fresh temporary file in the target folder (``mkstemp``: O_CREAT|O_EXCL, never an
existing path) and renamed over the target (``os.replace`` replaces a link, it does not write through it),
and a run or bundle folder that holds a symlink is refused by every command.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cxr.runtime.errors import CxrError


def read_capped(path: str | Path, limit: int, what: str) -> bytes:
    """The bytes of a small file the user names (a key, a signature, a card), refused in one line when it is
    not a regular file (a FIFO would hang, /dev/zero never ends) or larger than ``limit``."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CxrError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CxrError(f"{path}: the {what} must be a regular file")
        if info.st_size > limit:
            raise CxrError(f"{path}: {info.st_size:,} bytes, more than a {what} can be ({limit:,})")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise CxrError(f"{path}: more than a {what} can be ({limit:,} bytes)")
    return b"".join(chunks)


def refuse_links(folder: Path) -> None:
    """One-line error naming the symlinks directly inside ``folder`` (a bundle holds plain files only)."""
    links = sorted(p.name for p in Path(folder).iterdir() if p.is_symlink())
    if links:
        shown = ", ".join(repr(name) for name in links[:3]) + (", ..." if len(links) > 3 else "")
        raise CxrError(
            f"{folder}: refused, it contains symbolic link(s) {shown} (a bundle holds plain files only)"
        )


def current_umask() -> int:
    """This process's umask, read without changing it (``os.umask`` would, for a moment, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | Path, private: bool = False) -> Iterator[Path]:
    """A fresh, exclusive temporary path beside ``path`` for writers that take a file name; renamed over
    ``path`` when the block ends without error, removed otherwise. The file gets the mode any new file of
    the user's gets (0666 less the umask), or 0600 when ``private`` (a key)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if not private:
            os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str, private: bool = False) -> None:
    """Write ``data`` to ``path`` through a fresh temporary file and a rename (a link at ``path`` is
    replaced)."""
    with atomic_output(path, private) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
