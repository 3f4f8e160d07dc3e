"""One way to import an optional dependency: the module, or one line that names the extra that brings it."""

from __future__ import annotations

import importlib
from types import ModuleType

from cxr.runtime.errors import CxrError

# module (or its top package) -> the extra of pyproject.toml that installs it, and when it is needed
EXTRAS = {
    "tensorrt": ("trt", "on a machine with an NVIDIA GPU"),
    "cuda": ("trt", "on a machine with an NVIDIA GPU"),
    "openvino": ("openvino", ""),
    "pytriton": ("serve", ""),
    "tritonclient": ("serve", ""),
    "cryptography": ("sign", ""),
    "pydicom": ("dicom", ""),
    "nncf": ("export", ""),
}


def install_hint(module: str, extra: str | None = None) -> str:
    known, where = EXTRAS.get(module.split(".")[0], ("", ""))
    extra = extra or known
    if not extra:
        return f"pip install {module.split('.')[0]}"
    return f"pip install 'cxr-edge[{extra}]'" + (f" {where}" if where else "")


def require(module: str, purpose: str, extra: str | None = None) -> ModuleType:
    """``importlib.import_module(module)``; if it is missing, ``CxrError('<purpose> needs <pkg>: pip install
    ...')``. ``extra`` names the extra where the package serves several (tritonclient: serve, export)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CxrError(f"{purpose} needs {module.split('.')[0]}: {install_hint(module, extra)}") from None
