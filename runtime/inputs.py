"""Find the inputs a user names (files, folders searched recursively, globs), judging files by their bytes.

Nothing is dropped silently. A folder is walked with its symlinked files and folders followed (each folder
once, so a link loop ends); every regular file in it is sniffed: images are kept, other files are counted as
"not images" by name (unless named like an image: then it is a corrupt image). A named path that is missing, a
broken link or an unreadable folder becomes an input
whose one-line error is reported like any failed image.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from cxr.runtime.output import record_path
from cxr.runtime.preprocess import DICOM_SUFFIXES, IMAGE_SUFFIXES, SNIFF_BYTES, sniff_format


@dataclass
class Discovered:
    """What was found: inputs to run (images, and failures to report), and files that are not images."""

    inputs: list[Path] = field(default_factory=list)
    errors: dict[Path, str] = field(default_factory=dict)  # input -> why it cannot even be opened
    not_images: list[Path] = field(default_factory=list)

    def fail(self, path: Path, reason: str) -> None:
        self.inputs.append(path)
        self.errors[path] = f"{record_path(path)}: {reason}"


def file_kind(path: Path) -> str | None:
    """The image format of a file by its first bytes (a .dcm without the DICOM preamble counts), else None."""
    with open(path, "rb") as handle:
        kind = sniff_format(handle.read(SNIFF_BYTES))
    if kind is None and path.suffix.lower() in DICOM_SUFFIXES:
        return "dicom"
    return kind


def _walk(folder: Path, found: Discovered) -> None:
    """Every file under ``folder``, in sorted order, depth first, with symlinked folders followed once each.

    A loop over a stack, not recursion: a folder nested 1,500 deep is walked, not a RecursionError."""
    seen: set[tuple[int, int]] = set()
    stack = [folder]
    while stack:
        root = stack.pop()
        try:
            info = os.stat(root)
            if (info.st_dev, info.st_ino) in seen:  # a symlink back up the tree: walked already
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(root) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            found.fail(root, f"cannot read folder ({error.strerror or error})")
            continue
        folders = []
        for entry in entries:
            try:
                is_folder = entry.is_dir()  # follows links, as os.walk(followlinks=True) did
            except OSError:
                is_folder = False
            if is_folder:
                folders.append(Path(entry.path))
            else:
                _look_at(Path(entry.path), found, named=False)
        stack.extend(reversed(folders))


def _look_at(path: Path, found: Discovered, named: bool) -> None:
    """Sort one path into images, failures or not-images (a file named on the command line is never 'not an
    image')."""
    try:
        if path.is_symlink() and not path.exists():
            found.fail(path, f"broken symbolic link (points to {record_path(os.readlink(path))})")
            return
        if not path.is_file():
            found.fail(path, "not a regular file")
            return
        kind = file_kind(path)
    except OSError as exc:
        found.fail(path, f"cannot read ({exc.strerror or exc})")
        return
    if kind is not None or named or path.suffix.lower() in IMAGE_SUFFIXES:
        found.inputs.append(
            path
        )  # named, or named like an image: a non-image fails with the reader's message
    else:
        found.not_images.append(path)


def discover(items: list[str]) -> Discovered:
    """Sort what the user named into inputs (with the reason of each that cannot even be opened) and
    not-images; one odd name (too long, unreadable, a pattern over a maze) is that name's failure only."""
    found = Discovered()
    for item in items:
        try:
            _discover_one(item, found)
        except (OSError, RecursionError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            found.fail(Path(item), f"cannot search ({reason})")
    return found


def _discover_one(item: str, found: Discovered) -> None:
    path = Path(item)
    if path.is_dir():
        before = len(found.inputs) + len(found.not_images)
        _walk(path, found)
        if len(found.inputs) + len(found.not_images) == before:
            found.fail(path, "folder contains no files")
    elif not path.exists() and not path.is_symlink() and glob.has_magic(item):
        matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
        for match in matches:
            if match.is_dir():
                _walk(match, found)
            else:
                _look_at(match, found, named=True)
        if not matches:
            found.fail(path, "no such file (a pattern that matched nothing)")
    elif not path.exists() and not path.is_symlink():
        found.fail(path, "no such file")
    else:
        _look_at(path, found, named=True)


def expand_inputs(items: list[str]) -> list[Path]:
    """Every input to run, in order (failures included: each then reports its own error when read)."""
    return discover(items).inputs


def not_images_line(paths: list[Path], shown: int = 3) -> str:
    """'3 not images: README.txt, notes.md, scan.zip' (names only, the first few)."""
    names = ", ".join(record_path(p.name) for p in paths[:shown]) + (", ..." if len(paths) > shown else "")
    return f"{len(paths)} not image{'s' if len(paths) != 1 else ''}: {names}"
