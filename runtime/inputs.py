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

from cxr.runtime.preprocess import DICOM_SUFFIXES, IMAGE_SUFFIXES, sniff_format

SNIFF_BYTES = 132  # DICOM's "DICM" sits at offset 128


@dataclass
class Discovered:
    """What was found: inputs to run (images, and failures to report), and files that are not images."""

    inputs: list[Path] = field(default_factory=list)
    errors: dict[Path, str] = field(default_factory=dict)  # input -> why it cannot even be opened
    not_images: list[Path] = field(default_factory=list)

    def fail(self, path: Path, reason: str) -> None:
        self.inputs.append(path)
        self.errors[path] = f"{path}: {reason}"


def file_kind(path: Path) -> str | None:
    """The image format of a file by its first bytes (a .dcm without the DICOM preamble counts), else None."""
    with open(path, "rb") as handle:
        kind = sniff_format(handle.read(SNIFF_BYTES))
    if kind is None and path.suffix.lower() in DICOM_SUFFIXES:
        return "dicom"
    return kind


def _walk(folder: Path, found: Discovered) -> None:
    seen: set[tuple[int, int]] = set()

    def unreadable(error: OSError) -> None:
        where = Path(error.filename) if error.filename else folder
        found.fail(where, f"cannot read folder ({error.strerror or error})")

    for root, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable):
        stat = os.stat(root)
        if (stat.st_dev, stat.st_ino) in seen:  # a symlink back up the tree: this folder was walked already
            dirs[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs.sort()
        for name in sorted(files):  # os.walk lists broken links here too
            _look_at(Path(root) / name, found, named=False)


def _look_at(path: Path, found: Discovered, named: bool) -> None:
    """Sort one path into images, failures or not-images (a file named on the command line is never 'not an
    image')."""
    if path.is_symlink() and not path.exists():
        found.fail(path, f"broken symbolic link (points to {os.readlink(path)})")
        return
    if not path.is_file():
        found.fail(path, "not a regular file")
        return
    try:
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
    found = Discovered()
    for item in items:
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
    return found


def expand_inputs(items: list[str]) -> list[Path]:
    """Every input to run, in order (failures included: each then reports its own error when read)."""
    return discover(items).inputs


def not_images_line(paths: list[Path], shown: int = 3) -> str:
    """'3 not images: README.txt, notes.md, scan.zip' (names only, the first few)."""
    names = ", ".join(p.name for p in paths[:shown]) + (", ..." if len(paths) > shown else "")
    return f"{len(paths)} not image{'s' if len(paths) != 1 else ''}: {names}"
