"""cxr-edge: chest X-ray classification from training to bedside hardware.

Subpackages: ``cxr.train`` (torch), ``cxr.export`` (torch + onnx), ``cxr.runtime`` (no torch),
``cxr.bench`` (benchmarks). Importing ``cxr`` itself imports none of them.
"""

__version__ = "0.1.0"
