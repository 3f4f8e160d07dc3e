"""Expand the inputs a user names (files, folders searched recursively, globs) into a list of paths.

Nothing is dropped silently: a missing path, or a folder without images, stays in the list and
becomes that input's one-line error.
"""

from __future__ import annotations

import glob
from pathlib import Path

from cxr.runtime.preprocess import IMAGE_SUFFIXES, sniff_format


def _looks_like_image(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    if path.suffix == "":  # DICOM files from PACS exports often have no extension
        try:
            with open(path, "rb") as handle:
                return sniff_format(handle.read(132)) == "dicom"
        except OSError:
            return False
    return False


def expand_inputs(items: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _looks_like_image(p))
            paths.extend(found or [path])
        elif not path.exists() and glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            paths.extend(matches or [path])
        else:
            paths.append(path)
    return paths
