"""ONNX Runtime on CUDA (onnxruntime-gpu): runs where a CUDA EP session comes up, skips cleanly elsewhere."""

import numpy as np
import pytest
from cxr.runtime.backends.onnxruntime import CUDA_EP, available_providers

pytestmark = pytest.mark.gpu
if CUDA_EP not in available_providers():
    pytest.skip("onnxruntime-gpu with a CUDA device is not present", allow_module_level=True)


def _rows_and_image():
    from cxr.runtime.segment import segment, segment_means

    image = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    segments = segment(image)
    return image, segment_means(image, segments), segments


def test_cuda_explainer_matches_the_cpu_at_one_fixed_shape(bundle):
    from cxr.runtime.backends.onnxruntime import CPU_EP, OrtExplainer

    image, fill, segments = _rows_and_image()
    rows = np.random.default_rng(1).integers(0, 2, (70, segments.max() + 1), dtype=np.uint8)
    with (
        OrtExplainer(bundle / "explain.onnx", "fp32") as gpu,
        OrtExplainer(bundle / "explain.onnx", "fp32", providers=[CPU_EP]) as cpu,
    ):
        assert gpu.device == "cuda" and gpu.limits.max_batch == 256
        assert gpu.session.get_provider_options()[CUDA_EP]["cudnn_conv_algo_search"] == "EXHAUSTIVE"
        gpu.warm_up(64)
        gpu.set_image(image, fill, segments)
        cpu.set_image(image, fill, segments)
        got = np.concatenate([gpu.run(rows[:50]), gpu.run(rows[50:])])
        want = np.concatenate([cpu.run(rows[i : i + 32]) for i in range(0, 70, 32)])
        assert gpu._values["z"].shape() == [256, 64]
    assert np.abs(got - want).max() < 2e-3  # TF32 is on for LIME; parity turns it off


def test_parity_precision_on_cuda_with_tf32_off(bundle):
    from cxr.runtime.backends.onnxruntime import CPU_EP, CudaOptions, OrtBackend

    pixels = np.random.default_rng(2).integers(0, 256, (5, 1, 64, 64), dtype=np.uint8)
    with (
        OrtBackend(bundle / "model.onnx", "fp32", cuda=CudaOptions(tf32=False)) as gpu,
        OrtBackend(bundle / "model.onnx", "fp32", providers=[CPU_EP]) as cpu,
    ):
        assert gpu.device == "cuda"
        assert np.abs(gpu.run(pixels) - cpu.run(pixels)).max() < 1e-4


def test_auto_names_the_provider_that_ran(bundle):
    from cxr.runtime.backends.select import open_classifier
    from cxr.runtime.bundle import Bundle

    backend, reason = open_classifier(Bundle.open(bundle), "auto", "fp16")
    with backend:
        assert backend.device == "cuda"
        options = backend.session.get_provider_options()[CUDA_EP]
        assert options["cudnn_conv_algo_search"] == "HEURISTIC"  # the classifier skips the per-shape search
    assert reason.startswith("onnxruntime fp16 on cuda (") and "\n" not in reason
