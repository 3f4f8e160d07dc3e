"""Bundle stages as transactions: build beside the bundle, verify, swap in under a lock.

A bedside machine trusts a bundle because every file matches its card. A stage that wrote its graphs into the
bundle and was killed before its card left a bundle that ``info`` called tampered; two stages at once lost
each other's card entries; a folder re-exported into kept another model's graph and listed it, freshly
hashed. So every stage that changes a bundle runs inside ``bundle_stage``:

- a lock beside the bundle (``.NAME.lock``, ``flock``): a second stage is refused in one line, at once;
- a work folder beside the bundle (``.NAME.stage-*``, same file system) that starts as a verified copy of the
  bundle's listed files (hard links where possible) or empty for a fresh export; the stage writes there;
- on success the work folder is checked (the card is valid, every listed file matches its hash, nothing is
  there that the card does not list) and exchanged with the bundle in one ``renameat2(RENAME_EXCHANGE)``;
- on failure, or a kill at any point, the bundle is exactly as it was; a killed stage's work folder is
  removed by the next stage.
A folder holding symbolic links is refused before anything is written, and nothing is written through one.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cxr.runtime.card import CARD_NAME, read_card_bytes, verify_bundle, verify_file
from cxr.runtime.errors import CxrError, CxrUsageError
from cxr.runtime.safe_io import current_umask, refuse_links
from cxr.runtime.signing import SIGNATURE_NAME

log = logging.getLogger(__name__)

RENAME_EXCHANGE = 2  # linux/fs.h


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def bundle_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold the bundle's stage lock for the block; refused at once, in one line, while another stage holds
    it."""
    folder = Path(folder).absolute()
    if not folder.parent.is_dir():
        raise CxrUsageError(f"{folder.parent}: no such folder")
    flags = (
        os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    )
    try:
        fd = os.open(lock_path(folder), flags, 0o666)
    except OSError as exc:
        raise CxrError(f"{folder}: cannot take the stage lock ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # a planted FIFO, or a hard link to a victim
            raise CxrError(f"{lock_path(folder)}: not a plain lock file (a link or a device?); remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another stage"
            raise CxrError(
                f"{folder}: {holder} is changing this bundle; {what} refused (run it when that one ends)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"cxr-export {what} (pid {os.getpid()})".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def bundle_stage(folder: Path, what: str, fresh: bool = False) -> Iterator[Path]:
    """Yield a work folder for stage ``what``: a verified copy of the bundle ``folder`` (empty when ``fresh``,
    a new export). When the block ends without error, the work folder is checked and becomes the bundle in
    one atomic exchange; otherwise (or after a kill) the bundle stays as it was."""
    folder = Path(folder).absolute()
    with bundle_lock(folder, what):
        _remove_leftovers(folder)
        _check_target(folder, fresh)
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stage-", dir=folder.parent))
        try:
            os.chmod(work, os.stat(folder).st_mode & 0o7777 if folder.is_dir() else 0o777 & ~current_umask())
            if not fresh:
                _copy_verified(folder, work)
            try:
                yield work
                check_staged(work)
            except CxrError as exc:  # messages name the bundle, not the hidden work folder
                raise type(exc)(str(exc).replace(str(work), str(folder))) from None
            _swap_in(work, folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # after the swap it holds the old bundle


def _check_target(folder: Path, fresh: bool) -> None:
    if folder.is_symlink():
        raise CxrError(f"{folder}: refused, the bundle folder is a symbolic link (name the folder itself)")
    if folder.exists() and not folder.is_dir():
        raise CxrUsageError(f"{folder}: not a folder")
    if not fresh and not (folder / CARD_NAME).exists():
        raise CxrError(f"{folder}: no {CARD_NAME} (is this a model bundle folder?)")
    if not folder.is_dir():
        return
    refuse_links(folder)
    if fresh and any(folder.iterdir()) and not (folder / CARD_NAME).is_file():
        raise CxrUsageError(
            f"{folder}: holds files and is not a bundle; export into a new or empty folder (a bundle is "
            "replaced whole: nothing of what is there now would stay)"
        )
    if (folder / "model.pt").exists() or (folder / "split.json").exists():
        raise CxrUsageError(f"{folder}: a training run (model.pt), not a bundle; export to a new folder")
    foreign = foreign_files(folder) if (folder / CARD_NAME).exists() else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise CxrUsageError(
            f"{folder}: holds files its card does not list ({shown}); a stage replaces the bundle whole, so "
            "move them out first (a run folder is never a bundle: export into a new folder)"
        )


def foreign_files(folder: Path) -> list[str]:
    """Names in a bundle folder that are neither its card, its signature nor a file the card lists."""
    card, _ = read_card_bytes(folder)
    ours = {CARD_NAME, SIGNATURE_NAME, *card.files}
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name not in ours)


def _copy_verified(folder: Path, work: Path) -> None:
    """The bundle's card and every file it lists, each checked against its hash (hard links where possible:
    bundle files are only ever replaced, never changed in place)."""
    card, raw = read_card_bytes(folder)  # refuses links in the folder
    for name in card.files:
        source, target = folder / name, work / name
        try:
            os.link(source, target, follow_symlinks=False)
        except OSError:
            if not source.is_file():  # listed but gone since: one line, as every reader of bundles says
                raise CxrError(f"{source}: missing from the bundle") from None
            shutil.copyfile(source, target, follow_symlinks=False)
        verify_file(work, card, name)
    (work / CARD_NAME).write_bytes(raw)
    if (folder / SIGNATURE_NAME).exists():
        log.warning(f"{folder}: this stage changes the card, so its signature is dropped: sign it again")


def check_staged(work: Path) -> None:
    """What is swapped in must be a bundle every reader trusts: a valid card, every listed file matching its
    hash, and no file the card does not list."""
    card, _ = read_card_bytes(work)
    verify_bundle(work, card)
    foreign = sorted(p.name for p in work.iterdir() if p.name != CARD_NAME and p.name not in card.files)
    if foreign:
        raise CxrError(
            f"{work}: the stage left files its card does not list ({', '.join(foreign[:3])}); refused"
        )


def _swap_in(work: Path, folder: Path) -> None:
    """Make ``work`` the bundle in one step: a rename where there is none yet, else an atomic exchange."""
    if not folder.exists():
        os.rename(work, folder)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_cwd = -100
    if renameat2 is not None:
        if renameat2(at_cwd, os.fsencode(work), at_cwd, os.fsencode(folder), RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):
            raise CxrError(f"{folder}: could not swap the new bundle in ({os.strerror(code)})")
    _swap_in_two_steps(work, folder)


def _swap_in_two_steps(work: Path, folder: Path) -> None:
    """Where the file system has no atomic exchange: move the old bundle aside, the new one in. A kill between
    the two leaves ``.NAME.previous``, which the next stage puts back."""
    previous = folder.parent / f".{folder.name}.previous"
    os.rename(folder, previous)
    os.rename(work, folder)
    os.rename(previous, work)


def _remove_leftovers(folder: Path) -> None:
    """Work folders of stages that were killed (the lock is ours, so none is in use); a bundle moved aside by
    a two-step swap that did not finish is put back."""
    previous = folder.parent / f".{folder.name}.previous"
    if previous.is_dir() and not folder.exists():
        os.rename(previous, folder)
        log.warning(f"{folder}: put back the bundle an interrupted stage had moved aside")
    for stale in folder.parent.glob(f".{folder.name}.stage-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    if previous.is_dir():
        shutil.rmtree(previous, ignore_errors=True)
