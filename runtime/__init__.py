"""Bedside runtime: preprocessing, the model card, backends, predict and LIME. Imports no torch."""

from cxr.runtime.errors import CxrError
from cxr.runtime.labels import CLASSES

__all__ = ["CxrError", "CLASSES"]
