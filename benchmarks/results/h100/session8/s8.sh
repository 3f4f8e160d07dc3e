#!/usr/bin/env bash
# Session 8 on the GPU machine, after parts 0-2 were copied to /tmp/p: (1) the issue-15 ablation, 6 fits at once
# with a time budget, evaluated on the GPU; (2) the all_on run exported, then predict --explain over 40 real
# images (first result with the explainer opening beside the classifier) and cold_start per explainer batch.
# Dry run here: SETUP=0 DATA=... PY=... ARCH=dpn_se_tiny SIZE=64 DEVICE=cpu COMPARE=resnet18 bash .gpu/s8.sh /tmp/s8
set -uo pipefail
T0=$SECONDS
R=${1:-/tmp/res/h100s8}
if [ "${SETUP:-1}" = 1 ]; then
  mkdir -p /tmp/p /tmp/pl /tmp/ortgpu /tmp/site
  cp .gpu/payload/part.3 /tmp/p/
  (cd /tmp/p && sha256sum part.*) | sed 's#  #  .gpu/payload/#' | diff - .gpu/payload.sha256 || { echo "PAYLOAD PARTS MISSING"; ls -la /tmp/p; exit 3; }
  cat /tmp/p/part.0 /tmp/p/part.1 /tmp/p/part.2 /tmp/p/part.3 | tar -C /tmp/pl -xf - || exit 4
  xz -d -T0 < /tmp/pl/ort.tar.xz | tar -C /tmp/ortgpu -xf - || exit 5
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site /tmp/pl/wheels/* 2>&1 | tail -3
  export PYTHONPATH=/tmp/ortgpu:/tmp/site
  export LD_LIBRARY_PATH=$(python3 -c "import glob, site; print(':'.join(sorted(set(glob.glob(site.getsitepackages()[0] + '/nvidia/**/lib', recursive=True)))))")
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
fi
PY=${PY:-python3} DATA=${DATA:-/tmp/pl/data/cxr4-train}
export ARCH=${ARCH:-dpn92_se} SIZE=${SIZE:-224} DEVICE=${DEVICE:-cuda} COMPARE=${COMPARE:-resnet50}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT_FINAL=${OUT:-/tmp/s8_out}
mkdir -p "$R/first" "$OUT_FINAL"
echo "setup took $((SECONDS - T0))s"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1; nproc
  "$PY" -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers()); print('torch', torch.__version__)"
} > "$R/env.txt" 2>&1
cat "$R/env.txt"

# (1) ablation: its own process group, so a spent budget stops every fit it started
T1=$SECONDS
JOBS=${JOBS:-6} MAX_MINUTES=${MAX_MINUTES:-3} AUDIT=${AUDIT:-40} setsid bash benchmarks/gpu_ablation.sh "$R/ablation" "$DATA" "${EPOCHS:-30}" "$PY" > "$R/ablation.log" 2>&1 &
APID=$!
( sleep "${ABL_LIMIT:-330}"; kill -TERM -- -"$APID" 2>/dev/null ) & KILLER=$!
wait "$APID"; echo "ablation rc=$? $((SECONDS - T1))s" | tee -a "$R/steps.txt"
kill "$KILLER" 2>/dev/null
tail -n 30 "$R/ablation.log"
nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null

# (2) the first result and cold start, on the all_on run (the GPU is idle again)
OUT=$R/first
source benchmarks/steps.sh
step export 90 bash -c "'$PY' -m cxr.export.cli onnx '$R/ablation/all_on' --out '$R/first/bundle' && '$PY' -m cxr.export.cli fp16 '$R/first/bundle'"
"$PY" - "$R/ablation/all_on" "$DATA" "$R/first/val" <<'PYCODE'
import json, os, sys
from pathlib import Path
run, data, val = map(Path, sys.argv[1:])
for rel in json.loads((run / "split.json").read_text())["val"]:
    (val / rel).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(data / rel, val / rel)
PYCODE
find -L "$R/first/val" -type f | sort | shuf -n 40 --random-source=<(yes) > "$R/first/explain40.txt"
step predict_explain 90 "$PY" -m cxr.runtime.cli predict --model "$R/first/bundle" $(cat "$R/first/explain40.txt") \
  --precision fp16 --explain --allow-unvalidated --explain-dir "$R/first/overlays" --out "$R/first/predict_explain_fp16.jsonl"
step cold_start 110 "$PY" -m cxr.bench.cold_start "$R/first/bundle" "$R/first" "$(head -n 1 "$R/first/explain40.txt")" \
  "${VARIANTS:-fp16:64,fp16:128,fp16:256}"
step gpu_eval_test 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_train.py -k evaluate_on_the_gpu
"$PY" -m cxr.bench.gpu_summary "$R/first" > /dev/null
mkdir -p "$R/first/overlay_sample"
ls "$R/first/overlays" 2>/dev/null | head -n 8 | xargs -I{} cp "$R/first/overlays/{}" "$R/first/overlay_sample/"
(cd "$(dirname "$R")" && tar -czf "$OUT_FINAL/s8.tar.gz" --exclude='*.onnx' --exclude='*.pt' --exclude='first/val' \
  --exclude='first/overlays' --exclude='*.data' "$(basename "$R")")
ls -la "$OUT_FINAL"; echo "total $((SECONDS - T0))s"
