#!/usr/bin/env bash
# GPU check (<= 8 min): tests marked gpu/tensorrt, a torchrun (DDP, NCCL) fit of dpn92_se on CUDA, then
# latency and LIME on a dpn92_se bundle at 224. Installs nothing from the network: wheels missing on the
# machine (lime, pydicom) may be carried in gpu_wheels/. Where TensorRT is missing it measures ONNX Runtime
# and PyTorch (CUDA) and says what it skipped.  Usage: bash benchmarks/gpu_check.sh OUT_DIR [PYTHON]
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR [PYTHON]}
PY=${2:-python3}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if [ -d gpu_wheels ]; then "$PY" -m pip install -q --no-deps --no-index gpu_wheels/*.whl; fi
"$PY" -c "import cxr.train" 2>/dev/null || "$PY" -m pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/gpu.txt"
"$PY" -c "import tensorrt" 2>/dev/null && echo "TensorRT: present" || echo "TensorRT: missing -> engine build, engine latency and engine parity skipped"
timeout 180 "$PY" -m pytest -q -m "gpu or tensorrt" tests 2>&1 | tee "$OUT/gpu_tests.txt"
# DDP on CUDA through torchrun (NCCL; one process per visible GPU), AMP, dpn92_se at 224 on phantoms.
GPUS=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
"$PY" -m cxr.train.cli synth "$OUT/phantoms" --per-class 64 --size 256 > /dev/null
timeout 300 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$GPUS" -m cxr.train.cli fit "$OUT/phantoms" \
  --arch dpn92_se --image-size 224 --epochs 3 --batch-size 32 --device cuda --out "$OUT/run-ddp" 2>&1 \
  | grep -v "it/s\|batch/s" | tee "$OUT/fit_cuda.txt"
timeout 300 "$PY" - "$OUT" <<'PY'
import sys, time
from pathlib import Path
import numpy as np, torch
import cxr.train
from cxr.runtime.card import Card, InputSpec, Preprocessing, write_card
from cxr.train.run import build_net, net_mean_std
out = Path(sys.argv[1]); run = out / "run-dpn92se"; run.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
net = build_net("dpn92_se", 4)
torch.save(net.state_dict(), run / "model.pt")
mean, std = net_mean_std(net)
write_card(run, Card(arch="dpn92_se", input=InputSpec(size=224), preprocessing=Preprocessing(mean=mean, std=std),
                     training={"note": "random init for latency"}))
from cxr.export.onnx_export import export_onnx
from cxr.export.cli import fp16
bundle = out / "bundle-dpn92se"
export_onnx(run, bundle); fp16(bundle)
from cxr.runtime.backends.tensorrt import tensorrt_available
if tensorrt_available():
    from cxr.export.engine_build import build_engines
    build_engines(bundle, "fp16", timing_cache=out / "timing.cache")
from cxr.bench.latency import run_latency
from cxr.bench.lime_bench import run_lime_bench
run_latency(bundle, out, ["pytorch", "onnxruntime-fp32"], [1, 8, 32], 1.0, 3.0)  # ORT fp16 on CPU is emulated
run_lime_bench(bundle, out, None, 1000, 0, "slic", [250, 500, 1000])
PY
echo "results in $OUT"
