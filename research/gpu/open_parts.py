"""Where the explainer's open goes, in a fresh process (run on the H100 in session 8, once per variant):
``python -m research.gpu.open_parts default|heuristic|nograph BUNDLE BATCH IMAGE`` prints import, session and
warm-up seconds, then the first and steady explanation (1000 samples). The host was not warmed up in this
probe, so its first explanation carries the skimage/lime/sklearn imports."""

import json
import sys
import time
from pathlib import Path

started = time.perf_counter()
import onnxruntime  # noqa: E402, F401  (timed: the import is part of the open)

imported = time.perf_counter()
from cxr.runtime.backends.onnxruntime import CudaOptions, OrtExplainer  # noqa: E402
from cxr.runtime.bundle import Bundle  # noqa: E402
from cxr.runtime.explain import ExplainConfig  # noqa: E402
from cxr.runtime.preprocess import load_and_preprocess  # noqa: E402

from research.gpu.explain_variants import timed_explanations  # noqa: E402

variant, bundle_dir, batch, image_path = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
options = {
    "default": CudaOptions(cuda_graph=True),
    "heuristic": CudaOptions(cuda_graph=True, search="HEURISTIC"),
    "nograph": CudaOptions(cuda_graph=False),
}[variant]
t0 = time.perf_counter()
explainer = OrtExplainer(bundle_dir / "explain.fp16.onnx", "fp16", max_batch=batch, cuda=options)
t1 = time.perf_counter()
explainer.warm_up(224)
t2 = time.perf_counter()
explainer.warm_up(224)
t3 = time.perf_counter()
bundle = Bundle.open(bundle_dir)
image = load_and_preprocess(image_path, 224, pre=bundle.card.preprocessing)
first, _, steady = timed_explanations(explainer, [image, image, image], ExplainConfig(samples=1000))
result = {
    "variant": variant,
    "batch": batch,
    "import_s": round(imported - started, 2),
    "session_s": round(t1 - t0, 2),
    "warm_s": round(t2 - t1, 2),
    "second_warm_s": round(t3 - t2, 3),
    "first_explanation_s": round(first, 3),
    "steady_s": round(steady, 3),
}
print(json.dumps(result))
