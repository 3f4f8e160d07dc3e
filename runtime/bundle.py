"""The model bundle's file names and loading: one place that maps (graph, precision) to files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cxr.runtime.card import Card, read_card, verify_file
from cxr.runtime.errors import CxrError, CxrUsageError

PRECISIONS = ("fp32", "fp16", "int8")
GRAPHS = ("model", "explain")  # classifier, LIME explainer


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise CxrUsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def onnx_name(graph: str, precision: str) -> str:
    check_precision(precision)
    return f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"


def engine_name(graph: str, precision: str) -> str:
    check_precision(precision)
    return f"{graph}.{precision}.engine"


@dataclass(frozen=True)
class Bundle:
    folder: Path
    card: Card

    @classmethod
    def open(cls, folder: str | Path) -> Bundle:
        folder = Path(folder)
        card = read_card(folder)
        if not any(name.endswith(".onnx") for name in card.files):
            raise CxrError(f"{folder}: no ONNX graph in this bundle (run 'cxr-export onnx RUN --out {folder}')")
        return cls(folder, card)

    def has(self, name: str) -> bool:
        return name in self.card.files and (self.folder / name).is_file()

    def verified(self, name: str) -> Path:
        """Path of a bundle file after its sha256 matched the card (tampered files refuse to load)."""
        return verify_file(self.folder, self.card, name)

    def onnx_path(self, graph: str, precision: str) -> Path:
        name = onnx_name(graph, precision)
        if not self.has(name):
            hint = {"fp16": "cxr-export fp16", "int8": "cxr-export int8"}.get(precision, "cxr-export onnx")
            raise CxrError(f"{self.folder}: no {name} (create it with '{hint} {self.folder}')")
        return self.verified(name)
