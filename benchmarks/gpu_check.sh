#!/usr/bin/env bash
# GPU check, end to end on one NVIDIA GPU (about 6 min on an H100): train dpn92_se on real chest X-rays with CUDA,
# export fp32/fp16, parity on the GPU, LIME (ours fp16/fp32 vs Captum and stock lime), predict --explain over 40
# real images, the fp16 graphs against the earlier export (fp16_variants), latency (ORT-CUDA vs PyTorch eager /
# torch.compile), the first map in a fresh process per explainer batch (cold_start), the GPU tests, then
# summary.json. (explain_variants, batch x layout, is run on its own.)
# Installs nothing from the network: onnxruntime-gpu and missing wheels come as in ../shared/gpu/README.md.
# Each step has its own time limit; a failed step is logged in steps.txt and the rest still run.
# Usage: bash benchmarks/gpu_check.sh OUT_DIR DATA_DIR [EPOCHS=6] [PYTHON=python3]
set -uo pipefail
OUT=$(realpath -m "${1:?usage: gpu_check.sh OUT_DIR DATA_DIR [EPOCHS] [PYTHON]}")
DATA=$(realpath "${2:?usage: gpu_check.sh OUT_DIR DATA_DIR [EPOCHS] [PYTHON]}")
EPOCHS=${3:-6}
PY=${4:-python3}
ARCH=${ARCH:-dpn92_se} SIZE=${SIZE:-224} DEVICE=${DEVICE:-cuda}  # ARCH=dpn_se_tiny SIZE=64 DEVICE=cpu: a dry run
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

source benchmarks/steps.sh

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$PY" -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers()); print('torch', torch.__version__, torch.cuda.get_device_name(0))"
  "$PY" -c "import tensorrt" 2>/dev/null && echo "TensorRT: present" || echo "TensorRT: missing (engine build, engine latency and engine parity skipped)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step fit 240 "$PY" -m cxr.train.cli fit "$DATA" --arch "$ARCH" --image-size "$SIZE" --epochs "$EPOCHS" --batch-size 32 \
  --device "$DEVICE" --out "$OUT/run"
step export 240 bash -c "'$PY' -m cxr.export.cli onnx '$OUT/run' --out '$OUT/bundle' && '$PY' -m cxr.export.cli fp16 '$OUT/bundle'"
# the run's patient-disjoint validation images, as a class-folder tree of links (parity, LIME and predict use them)
"$PY" - "$OUT/run" "$DATA" "$OUT/val" <<'PYCODE'
import json, os, sys
from pathlib import Path
run, data, val = map(Path, sys.argv[1:])
for rel in json.loads((run / "split.json").read_text())["val"]:
    (val / rel).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(data / rel, val / rel)
PYCODE
find -L "$OUT/val" -type f | sort | shuf -n 40 --random-source=<(yes) > "$OUT/explain40.txt"  # 40 real images, all classes

step parity 180 "$PY" -m cxr.export.cli parity "$OUT/bundle" "$OUT/val" --backends onnx,fp16 --report "$OUT/parity_gpu.json"
step lime 240 "$PY" -m cxr.bench.cli lime --model "$OUT/bundle" $(head -n 11 "$OUT/explain40.txt") --count 11 \
  --precision fp16,fp32 --peer captum,stock --out "$OUT"
step predict_explain 200 "$PY" -m research.gpu.predict_explain "$OUT/bundle" "$OUT" $(cat "$OUT/explain40.txt") \
  --precision fp16
step cold_start 150 "$PY" -m research.gpu.cold_start "$OUT/bundle" "$OUT" "$(head -n 1 "$OUT/explain40.txt")"
step fp16_variants 150 "$PY" -m research.gpu.fp16_variants "$OUT/bundle" "$OUT" $(head -n 6 "$OUT/explain40.txt")
step latency 200 "$PY" -m cxr.bench.cli latency --model "$OUT/bundle" --batch-sizes 64 --warmup-s 1 --duration-s 3 \
  --backends pytorch-fp32,pytorch-fp16,onnxruntime-fp32,onnxruntime-fp16,onnxruntime-exhaustive-fp32,onnxruntime-exhaustive-fp16 \
  --out "$OUT"
step latency_compile 200 "$PY" -m cxr.bench.cli latency --model "$OUT/bundle" --batch-sizes 64 --warmup-s 1 \
  --duration-s 3 --backends torch-compile-fp16 --out "$OUT/compile"
step info 120 "$PY" -m cxr.runtime.cli info --model "$OUT/bundle"
step gpu_tests 240 "$PY" -m pytest -q -m "gpu or tensorrt" -p no:cacheprovider tests
step summary 60 "$PY" -m research.gpu.gpu_summary "$OUT"
echo "results in $OUT"
