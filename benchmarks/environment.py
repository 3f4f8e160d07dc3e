"""Where a benchmark ran: CPU/GPU name and library versions, and a file-name slug built from them."""

from __future__ import annotations

import platform
import re
from typing import Any

from cxr.runtime.cpu_features import cpu_int8_features, cpu_vector_isa


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    import os

    import onnxruntime

    facts: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "cpu_vector": cpu_vector_isa(),
        "cpu_int8": cpu_int8_features(),
        "gpu": None,
    }
    try:
        import torch

        facts["torch"] = torch.__version__
        if torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        facts["torch"] = None
    return facts


def slug(facts: dict[str, Any]) -> str:
    device = facts.get("gpu") or facts.get("cpu") or "unknown"
    text = f"{device}_ort{facts.get('onnxruntime')}"
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:80]
