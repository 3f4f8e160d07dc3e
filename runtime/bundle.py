"""The model bundle: opening it (card, digest, signature) and its files by (graph, precision), named by the
formats table (``cxr.runtime.formats``)."""

from __future__ import annotations

import logging
import stat
from dataclasses import dataclass
from pathlib import Path

from cxr.runtime.card import Card, card_digest, read_card_bytes, verified_bytes, verify_file
from cxr.runtime.errors import CxrError
from cxr.runtime.formats import GRAPHS, PRECISIONS, get_format
from cxr.runtime.onnx_weights import check_weights_once

log = logging.getLogger(__name__)

__all__ = ["GRAPHS", "PRECISIONS", "Bundle", "check_precision", "engine_name", "onnx_name"]


def check_precision(precision: str) -> str:
    return get_format(precision).precision


def onnx_name(graph: str, precision: str) -> str:
    return get_format(precision).onnx_name(graph)


def engine_name(graph: str, precision: str) -> str:
    return get_format(precision).engine_name(graph)


@dataclass(frozen=True)
class Bundle:
    folder: Path
    card: Card
    digest: str = ""  # sha256 of card.json as read (see card_digest): what --expect-digest pins

    @classmethod
    def open(
        cls, folder: str | Path, expect_digest: str | None = None, trusted_key: Path | None = None
    ) -> Bundle:
        """Read the card; with ``expect_digest`` or ``trusted_key``, refuse unless the card's very bytes
        match."""
        folder = Path(folder)
        card, raw = read_card_bytes(folder)
        digest = card_digest(raw)
        if trusted_key is not None:
            from cxr.runtime.signing import verify_card

            verify_card(folder, raw, trusted_key)
        if expect_digest is not None and expect_digest.strip().lower() != digest:
            raise CxrError(
                f"{folder}: bundle digest is {digest}, not the expected {expect_digest.strip()[:80]}; "
                "refused (a changed card or a different bundle)"
            )
        _warn_if_others_can_write(folder, card)
        if not any(name.endswith(".onnx") for name in card.files):
            raise CxrError(
                f"{folder}: no ONNX graph in this bundle (run 'cxr-export onnx RUN --out {folder}')"
            )
        return cls(folder, card, digest)

    def has(self, name: str) -> bool:
        return name in self.card.files and (self.folder / name).is_file()

    def verified(self, name: str) -> Path:
        """Path of a bundle file after its sha256 matched the card (tampered files refuse to load)."""
        return verify_file(self.folder, self.card, name)

    def verified_bytes(self, name: str) -> bytes:
        """A bundle file's bytes, read once and checked against the card: load these, never the path again.
        An ONNX graph's float weights must also be finite (checked once per content per process: ~30 ms for
        a 150 MB graph), or the bundle is refused before any backend tries it."""
        data = verified_bytes(self.folder, self.card, name)
        if name.endswith(".onnx"):
            check_weights_once(data, self.folder / name, self.card.files[name])
        return data

    def onnx_path(self, graph: str, precision: str) -> Path:
        name = onnx_name(graph, precision)
        if not self.has(name):
            hint = get_format(precision).made_by
            raise CxrError(f"{self.folder}: no {name} (create it with '{hint} {self.folder}')")
        return self.verified(name)


_warned_writable: set[Path] = set()


def _warn_if_others_can_write(folder: Path, card: Card) -> None:
    """A bundle anyone else can write is a model anyone else can change: say so once per bundle (hashes still
    catch a change after export, but not a re-export or a card rewritten with its hashes)."""
    key = folder.absolute()
    if key in _warned_writable:
        return
    paths = [folder, folder / "card.json"] + [folder / name for name in card.files]
    writable = [p for p in paths if p.exists() and p.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)]
    parent = folder.absolute().parent.stat().st_mode
    if parent & (stat.S_IWGRP | stat.S_IWOTH) and not parent & stat.S_ISVTX:  # others could swap the folder
        writable.append(folder.absolute().parent)
    if writable:
        _warned_writable.add(key)
        names = ", ".join(p.name or str(p) for p in writable[:3]) + (", ..." if len(writable) > 3 else "")
        log.warning(
            f"warning: {folder}: writable by group or others ({names}): anyone there could change the model; "
            f"chmod -R go-w {folder}"
        )
