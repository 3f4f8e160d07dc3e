"""Record writers: JSON lines (stdout or file) and CSV, written atomically (temp file + rename)."""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from cxr.runtime.errors import CxrUsageError


class RecordWriter:
    """Streams records; a file target appears only complete (an interrupted run leaves nothing behind)."""

    def __init__(self, target: Path | None, classes: tuple[str, ...]) -> None:
        self.target = target
        self.classes = classes
        self.format = "jsonl"
        self._tmp: str | None = None
        self._csv: csv.DictWriter | None = None
        if target is None:
            self.handle: TextIO = sys.stdout
            return
        suffix = target.suffix.lower()
        if suffix not in (".jsonl", ".json", ".csv"):
            raise CxrUsageError(f"--out must end in .jsonl or .csv, got {target.name}")
        self.format = "csv" if suffix == ".csv" else "jsonl"
        if not target.parent.exists():
            raise CxrUsageError(f"--out: folder {target.parent} does not exist")
        fd, self._tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        self.handle = os.fdopen(fd, "w", newline="")
        if self.format == "csv":
            fields = ["path", "label", "backend", "precision", "error", "warnings"] + [
                f"prob_{c}" for c in classes
            ]
            fields += ["explained_label", "overlay"]
            self._csv = csv.DictWriter(self.handle, fieldnames=fields, extrasaction="ignore")
            self._csv.writeheader()

    def write(self, record: dict[str, Any]) -> None:
        if self._csv is not None:
            row = {k: record.get(k) for k in ("path", "label", "backend", "precision", "error")}
            row["warnings"] = "; ".join(record.get("warnings") or [])
            row.update(
                {
                    f"prob_{c}": (record["probs"] or {}).get(c) if record.get("probs") else None
                    for c in self.classes
                }
            )
            explanation = record.get("explanation") or {}
            row.update(explained_label=explanation.get("label"), overlay=explanation.get("overlay"))
            self._csv.writerow(row)
        else:
            self.handle.write(json.dumps(record) + "\n")
            if self.target is None:
                self.handle.flush()

    def close(self, success: bool = True) -> None:
        if self.target is None:
            return
        self.handle.close()
        if success:
            os.replace(self._tmp, self.target)
        else:
            Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(success=exc_type is None)
