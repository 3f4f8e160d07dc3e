"""The ``*.engine.json`` sidecar: build facts of a TensorRT plan, checked before the plan is loaded.

An engine is executable code tied to a GPU architecture and a TensorRT version: a plan whose hash,
version or compute capability differs from this machine is refused with a rebuild hint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cxr.runtime.card import sha256_file
from cxr.runtime.errors import CxrError
from cxr.runtime.safe_io import atomic_write


def sidecar_path(plan: Path) -> Path:
    return Path(f"{plan}.json")


def write_sidecar(plan: Path, facts: dict[str, Any]) -> dict[str, Any]:
    facts = dict(facts, plan=plan.name, plan_sha256=sha256_file(plan))
    atomic_write(sidecar_path(plan), json.dumps(facts, indent=2) + "\n")
    return facts


def read_sidecar(plan: Path) -> dict[str, Any]:
    path = sidecar_path(plan)
    if not path.is_file():
        raise CxrError(f"{plan}: no sidecar {path.name}; rebuild with 'cxr-export build-engine'")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CxrError(f"{path}: unreadable sidecar ({exc})") from None


def check_sidecar(
    plan: Path, facts: dict[str, Any], trt_version: str, compute_capability: str, data: bytes | None = None
) -> None:
    """Refuse a plan that was changed, or built for another TensorRT or GPU architecture. ``data``: the plan's
    bytes as they will be deserialised (hashed here instead of the file, which could change in between)."""
    precision = facts.get("precision", "fp16")
    rebuild = (
        f"rebuild it on this machine with 'cxr-export build-engine {plan.parent} --precision {precision}'"
    )
    digest = sha256_file(plan) if data is None else hashlib.sha256(data).hexdigest()
    if digest != facts.get("plan_sha256"):
        raise CxrError(f"{plan}: sha256 does not match its sidecar (file changed or tampered); {rebuild}")
    if facts.get("trt_version") != trt_version:
        raise CxrError(
            f"{plan}: built with TensorRT {facts.get('trt_version')}, this machine has {trt_version}; "
            f"{rebuild}"
        )
    if facts.get("compute_capability") != compute_capability:
        raise CxrError(
            f"{plan}: built for compute capability {facts.get('compute_capability')} "
            f"({facts.get('gpu_name')}), "
            f"this GPU is {compute_capability}; {rebuild}"
        )
