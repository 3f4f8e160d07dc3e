"""One way to import an optional dependency: the module, or one line that names the extra that brings it."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from cxr.runtime.errors import CxrError


@dataclass(frozen=True)
class Extra:
    """Which extra of pyproject.toml installs a module: the distribution that provides it, and the extra that
    lists that distribution (tests/test_formats.py checks each against pyproject.toml)."""

    distribution: str
    extra: str
    where: str = ""  # when it is needed, e.g. "on a machine with an NVIDIA GPU"


GPU = "on a machine with an NVIDIA GPU"
# module (or its top package) -> how to get it; base dependencies (pydicom, onnxruntime ...) are not here
EXTRAS = {
    "tensorrt": Extra("tensorrt", "trt", GPU),
    "cuda": Extra("cuda-python", "trt", GPU),
    "openvino": Extra("openvino", "openvino"),
    "pytriton": Extra("nvidia-pytriton", "serve"),
    "tritonclient": Extra("tritonclient", "serve"),
    "cryptography": Extra("cryptography", "sign"),
    "pylibjpeg": Extra("pylibjpeg", "dicom"),  # pydicom's decoders for compressed transfer syntaxes
    "nncf": Extra("nncf", "export"),
}


def install_hint(module: str, extra: str | None = None) -> str:
    known = EXTRAS.get(module.split(".")[0], Extra("", ""))
    extra, where = extra or known.extra, known.where
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
