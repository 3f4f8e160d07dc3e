"""Real TensorRT build + inference + parity; runs only where TensorRT and a GPU exist
(benchmarks/gpu_check.sh)."""

import json
import shutil

import numpy as np
import pytest

from tests.conftest import cli

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
pytestmark = [pytest.mark.gpu, pytest.mark.tensorrt]


def test_engine_build_inference_and_parity(bundle, phantoms, tmp_path):
    from cxr.runtime.backends.onnxruntime import OrtBackend
    from cxr.runtime.backends.tensorrt import TrtBackend

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    cli(
        "cxr-export",
        "build-engine",
        str(copy),
        "--precision",
        "fp16",
        "--opt-batch",
        "16",
        "--max-batch",
        "32",
    )
    sidecar = json.loads((copy / "model.fp16.engine.json").read_text())
    assert sidecar["trt_version"] == trt.__version__ and sidecar["precision"] == "fp16"
    pixels = np.random.default_rng(0).integers(0, 256, (5, 1, 64, 64), dtype=np.uint8)
    with (
        TrtBackend(copy / "model.fp16.engine", "fp16") as engine,
        OrtBackend(copy / "model.onnx", "fp32") as ref,
    ):
        assert np.abs(engine.run(pixels) - ref.run(pixels)).max() < 2e-2
    cli("cxr-export", "parity", str(copy), str(phantoms), "--backends", "engine")
