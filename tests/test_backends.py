"""Backend logic: fixed shapes, TensorRT limits and cleanup (against a fake engine), and ``auto``'s
fallback."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
from cxr.runtime.backends import tensorrt as trt_backend
from cxr.runtime.backends.base import BatchLimits, bucket, pad_rows, pad_z, z_columns
from cxr.runtime.errors import CxrError

from tests.conftest import AUTO_CPU_BACKEND
from tests.fake_tensorrt import FakeCudart, FakeEngine, explainer_profiles, fake_trt


def test_buckets_keep_a_handful_of_shapes():
    limits = BatchLimits(1, 64)
    assert [bucket(n, limits) for n in (1, 2, 3, 5, 16, 17, 63, 64, 100)] == [1, 2, 4, 8, 16, 32, 64, 64, 100]
    assert bucket(1, BatchLimits(4, 64)) == 4
    rows = np.arange(6, dtype=np.uint8).reshape(2, 3)
    padded = pad_rows(rows, 4)
    assert padded.shape == (4, 3) and (padded[2:] == rows[-1]).all() and (padded[:2] == rows).all()
    assert pad_rows(rows, 1) is rows


def test_z_is_padded_to_one_fixed_block():
    assert [z_columns(n) for n in (1, 50, 64, 65, 130)] == [64, 64, 64, 128, 192]
    z = np.ones((3, 50), dtype=np.uint8)
    block = pad_z(z, 8, 64)
    assert block.shape == (8, 64) and block[:3, :50].all() and not block[3:].any() and not block[:, 50:].any()
    with pytest.raises(ValueError):
        pad_z(np.ones((9, 50), dtype=np.uint8), 8, 64)


@pytest.fixture
def fake_engine(monkeypatch, tmp_path):
    """Installs a fake TensorRT + cudart; returns (plan path, cudart, install(engine))."""
    cudart = FakeCudart()
    plan = tmp_path / "explain.fp16.engine"
    plan.write_bytes(b"plan")
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: cudart)
    monkeypatch.setattr(trt_backend, "read_sidecar", lambda path: {"precision": "fp16"})
    monkeypatch.setattr(trt_backend, "check_sidecar", lambda *args: None)
    monkeypatch.setattr(trt_backend, "device_facts", lambda: {"compute_capability": "9.0"})

    def install(engine: FakeEngine) -> None:
        monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake_trt(engine))

    return plan, cudart, install


def test_trt_explainer_takes_its_batch_from_z_and_runs_one_shape(fake_engine):
    plan, cudart, install = fake_engine
    engine = FakeEngine(explainer_profiles(size=8, batch=64))
    install(engine)
    with trt_backend.TrtExplainer(plan, "fp16") as explainer:
        assert explainer.limits == BatchLimits(1, 64)  # not the image input's batch of 1
        image = np.full((8, 8), 100, dtype=np.uint8)
        segments = (np.arange(64).reshape(8, 8) // 2).astype(np.int32)  # 32 segments
        explainer.set_image(image, image, segments)
        rows = np.random.default_rng(0).integers(0, 2, (100, 32), dtype=np.uint8)
        probs = np.concatenate([explainer.run(rows[i : i + 64]) for i in range(0, 100, 64)])
        context = explainer.engine.context
        z_shapes = {shape for name, shape in context.shape_log[4:] if name == "z"}
    assert z_shapes == {(64, 64)}
    assert probs.shape == (100, 2)
    np.testing.assert_allclose(probs[:, 0], rows.sum(axis=1) / 1000.0, rtol=1e-6)
    assert not cudart.live, "every buffer is freed"
    assert cudart.calls.index("sync", cudart.calls.index("malloc")) < cudart.calls.index("free"), (
        "sync before free"
    )


def test_trt_refused_shape_is_an_error_not_a_silent_stale_run(fake_engine):
    plan, cudart, install = fake_engine
    install(FakeEngine({"image": ((1, 1, 8, 8), (8, 1, 8, 8), (8, 1, 8, 8))}, refuse_shapes=True))
    with pytest.raises(CxrError, match="refused input shape"):
        trt_backend.TrtBackend(plan, "fp16")
    assert not cudart.live


def test_trt_init_failing_halfway_frees_what_it_took(fake_engine, monkeypatch):
    plan, _, install = fake_engine
    cudart = FakeCudart(fail_malloc_after=2)
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: cudart)
    install(FakeEngine(explainer_profiles()))
    with pytest.raises(RuntimeError, match="cudaErrorMemoryAllocation"):
        trt_backend.TrtExplainer(plan, "fp16")
    assert cudart.calls.count("malloc") == 2 and not cudart.live and "stream_destroy" in cudart.calls


def test_trt_classifier_pads_short_batches_to_a_bucket(fake_engine):
    plan, _, install = fake_engine
    install(FakeEngine({"image": ((2, 1, 8, 8), (16, 1, 8, 8), (16, 1, 8, 8))}))
    with trt_backend.TrtBackend(plan, "fp16") as backend:
        assert backend.limits == BatchLimits(2, 16)
        batch = np.arange(3 * 64, dtype=np.uint8).reshape(3, 1, 8, 8)
        probs = backend.run(batch)
        assert backend.engine.context.shape_log[-1] == ("image", (4, 1, 8, 8))
    np.testing.assert_allclose(probs[:, 0], batch.reshape(3, -1).mean(axis=1) / 255.0, rtol=1e-6)


def _bundle_with_engine(bundle, tmp_path):
    import shutil

    from cxr.runtime.card import read_card, record_files

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "model.fp32.engine").write_bytes(b"not a plan")
    (copy / "model.fp32.engine.json").write_text(json.dumps({"precision": "fp32", "trt_version": "10.0.0"}))
    record_files(copy, read_card(copy), ["model.fp32.engine", "model.fp32.engine.json"])
    return copy


def test_auto_falls_back_when_the_engine_cannot_run_and_says_why_in_one_line(bundle, tmp_path, monkeypatch):
    from cxr.runtime.backends import select
    from cxr.runtime.bundle import Bundle

    copy = _bundle_with_engine(bundle, tmp_path)
    monkeypatch.setattr(trt_backend, "tensorrt_available", lambda: True)
    monkeypatch.setattr(
        trt_backend, "import_cudart", lambda: (_ for _ in ()).throw(CxrError("no CUDA driver"))
    )
    backend, reason = select.open_classifier(Bundle.open(copy), "auto", "fp32")
    with backend:
        assert backend.name == AUTO_CPU_BACKEND
    assert "\n" not in reason and "skipped tensorrt: no CUDA driver" in reason
    with pytest.raises(CxrError, match="no CUDA driver"):  # named explicitly: no fallback
        select.open_classifier(Bundle.open(copy), "tensorrt", "fp32")


def test_auto_refuses_a_backend_whose_probe_gives_nonsense(bundle, monkeypatch):
    from cxr.runtime.backends import select
    from cxr.runtime.backends.onnxruntime import OrtBackend
    from cxr.runtime.bundle import Bundle

    monkeypatch.setattr(
        OrtBackend, "run", lambda self, batch: np.full((len(batch), 4), np.nan, dtype=np.float32)
    )
    with pytest.raises(CxrError, match="finite"):
        select.open_classifier(Bundle.open(bundle), "onnxruntime", "fp32")


def test_tensorrt_ep_is_not_asked_for_where_libnvinfer_cannot_load(monkeypatch):
    import onnxruntime as ort
    from cxr.runtime.backends import onnxruntime as ort_backend

    providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: providers)
    monkeypatch.setattr(ort_backend, "tensorrt_ep_loads", lambda: False)
    assert ort_backend.available_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort_backend, "tensorrt_ep_loads", lambda: True)
    assert ort_backend.available_providers()[0] == "TensorrtExecutionProvider"


def test_cuda_ep_that_cannot_start_is_one_warning_line(bundle, monkeypatch, caplog):
    """onnxruntime-gpu without cuDNN: ORT drops the CUDA EP; we say so once, with the fix."""
    import onnxruntime as ort
    from cxr.runtime.backends.onnxruntime import open_session

    real = ort.InferenceSession

    class DroppingCuda(real):  # what ORT does when libcudnn cannot load: the session comes up on CPU only
        def __init__(self, path, options, providers, **kwargs):
            super().__init__(
                path, options, providers=[p for p in providers if p[0] == "CPUExecutionProvider"], **kwargs
            )

    monkeypatch.setattr(ort, "InferenceSession", DroppingCuda)
    with caplog.at_level(logging.WARNING):
        session, _ = open_session(bundle / "model.onnx", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "CUDA EP could not start" in line and "LD_LIBRARY_PATH" in line and "\n" not in line


def test_explainer_runs_one_fixed_shape_on_any_segment_count(bundle, phantoms):
    from cxr.runtime.backends.onnxruntime import OrtBackend, OrtExplainer
    from cxr.runtime.preprocess import load_and_preprocess
    from cxr.runtime.segment import segment, segment_means

    image = load_and_preprocess(sorted(phantoms.rglob("*.png"))[0], 64)
    with (
        OrtExplainer(bundle / "explain.onnx", "fp32", max_batch=8) as explainer,
        OrtBackend(bundle / "model.onnx", "fp32") as classifier,
    ):
        explainer.warm_up(64)
        for count in (10, 40):
            segments = segment(image, n_segments=count)
            fill = segment_means(image, segments)
            explainer.set_image(image, fill, segments)
            rows = np.random.default_rng(count).integers(0, 2, (5, segments.max() + 1), dtype=np.uint8)
            composed = np.where(rows[:, segments] == 1, image, fill)[:, None]
            assert np.abs(explainer.run(rows) - classifier.run(composed)).max() < 1e-5
            assert explainer._values["z"].shape() == [8, 64]


# the registry and the explainer contract ------------------------------------------------------------------


class _Explainer:
    """Builds an ExplainerBackend that keeps (or breaks) one duty of the contract."""

    @staticmethod
    def make(columns: bool = True, counts: bool = True, rows: int | None = None):
        from cxr.runtime.backends.base import ExplainerBackend

        class Made(ExplainerBackend):
            name, precision = "made", "fp32"

            def _set_image(self, image, fill, segments):
                if columns:
                    self.columns = z_columns(int(segments.max()) + 1)
                self.bytes_sent = self.bytes_sent + image.nbytes if counts else 0

            def _run(self, z):
                self.fixed_block(z)
                return np.zeros((len(z) if rows is None else rows, 2), dtype=np.float32)

        return Made()


def _image_and_segments():
    image = np.zeros((8, 8), dtype=np.uint8)
    return image, (np.arange(64).reshape(8, 8) // 8).astype(np.int32)  # 8 segments


def test_the_explainer_contract_is_enforced_with_the_duty_named():
    image, segments = _image_and_segments()
    kept = _Explainer.make()
    kept.set_image(image, image, segments)
    assert kept.columns == 64 and kept.segment_count == 8 and kept.bytes_sent == 64
    assert kept.run(np.ones((3, 8), dtype=np.uint8)).shape == (3, 2) and kept.bytes_sent == 64 + 64 * 64
    with pytest.raises(TypeError, match="_set_image must set columns"):
        _Explainer.make(columns=False).set_image(image, image, segments)
    counting = _Explainer.make(counts=False)
    counting.bytes_sent = 10
    with pytest.raises(TypeError, match="must add what it sends to bytes_sent"):
        counting.set_image(image, image, segments)
    short = _Explainer.make(rows=1)
    short.set_image(image, image, segments)
    with pytest.raises(TypeError, match="one row of probabilities per row of z"):
        short.run(np.ones((3, 8), dtype=np.uint8))
    with pytest.raises(RuntimeError, match="set_image"):
        _Explainer.make().run(np.ones((3, 8), dtype=np.uint8))


def test_backends_are_discovered_and_every_list_of_them_is_read_from_the_registry():
    from cxr.runtime.backends import registry
    from cxr.runtime.formats import FORMATS

    assert registry.names() == ("onnxruntime", "openvino", "tensorrt")
    order = [place.label for place in registry.auto_order()]
    assert order == ["tensorrt", "onnxruntime-cuda", "openvino", "onnxruntime"]
    assert registry.parity_choices() == ("onnx", "fp16", "int8", "openvino-bf16", "engine", "openvino")
    assert FORMATS["int8"].backends == ("tensorrt", "onnxruntime", "openvino")
    assert " -> ".join(order) in registry.backend_help()
    with pytest.raises(CxrError, match="one of auto, onnxruntime, openvino, tensorrt, got 'tensorrtt'"):
        registry.get("tensorrtt")
    with pytest.raises(ValueError, match="taken"):
        registry.register(registry.get("openvino"))


def test_a_new_backend_is_one_registration(monkeypatch):
    """What adding a backend takes: classes plus one register(); selection, parity, help and the formats
    table then know it."""
    from types import SimpleNamespace

    from cxr.runtime.backends import registry
    from cxr.runtime.backends.base import Backend
    from cxr.runtime.backends.select import _candidates, runnable_here
    from cxr.runtime.formats import FORMATS

    class Echo(Backend):
        name = "echo"

        def _run(self, batch):
            return np.zeros((len(batch), 2), dtype=np.float32)

    explainer = type(_Explainer.make())  # its name is 'made'
    spec = registry.BackendSpec(
        name="echo",
        title="Echo",
        runs=registry.ONNX,
        device="cpu",
        rank=35,
        classifier=Echo,
        explainer=explainer,
        precisions=("fp32",),
        parity_prefix="echo",
    )
    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))
    with pytest.raises(ValueError, match="name is 'made', but it registers as 'echo'"):
        registry.register(spec)
    monkeypatch.setattr(explainer, "name", "echo")
    with pytest.raises(ValueError, match=r"unknown precisions \['int8'\]"):  # auto's order: its own only
        registry.register(replace(spec, fastest_first=("int8", "fp32")))
    registry.register(spec)
    bundle = SimpleNamespace(has=lambda name: name in ("model.onnx", "model.fp16.onnx"))
    assert ("echo", "fp32") in runnable_here(bundle) and ("echo", "fp16") not in runnable_here(bundle)
    assert registry.parity_choices()[-1] == "echo" and "echo" in FORMATS["fp32"].backends
    assert "echo" not in FORMATS["fp16"].backends and "openvino -> echo ->" in registry.backend_help()
    bundle.onnx_path = lambda graph, precision: f"{graph}.onnx"
    bundle.folder = "b"
    candidates, _ = _candidates(bundle, "echo", "fp32", "model")
    assert [label for label, _ in candidates] == ["echo"]
