#!/usr/bin/env bash
# Session 8, second check: first result of predict --explain with the quick explainer open (heuristic search
# for a short fp16 job, host warm-up beside the device), and cold_start heuristic vs exhaustive for fp16 and fp32.
set -uo pipefail
T0=$SECONDS
R=${1:-/tmp/res/s8b}
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
PY=${PY:-python3} DATA=${DATA:-/tmp/pl/data/cxr4-train} ARCH=${ARCH:-dpn92_se} SIZE=${SIZE:-224} DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT_FINAL=${OUT:-/tmp/s8b_out}
mkdir -p "$R" "$OUT_FINAL"; OUT=$R
source benchmarks/steps.sh
echo "setup took $((SECONDS - T0))s"
save() { (cd "$(dirname "$R")" && tar -czf "$OUT_FINAL/s8b.tar.gz" --exclude='*.onnx' --exclude='*.pt' --exclude='overlays' "$(basename "$R")"); }
step fit 45 "$PY" -m cxr.train.cli fit "$DATA" --arch "$ARCH" --image-size "$SIZE" --epochs 1 --batch-size 32 --device "$DEVICE" --out "$R/run"
step export 60 bash -c "'$PY' -m cxr.export.cli onnx '$R/run' --out '$R/bundle' && '$PY' -m cxr.export.cli fp16 '$R/bundle'"
ls "$DATA"/*/* | grep -v manifest | sort | shuf -n 12 --random-source=<(yes) > "$R/explain12.txt"
step predict_explain 40 "$PY" -m cxr.runtime.cli predict --model "$R/bundle" $(cat "$R/explain12.txt") \
  --precision fp16 --explain --allow-unvalidated --explain-dir "$R/overlays" --out "$R/predict_explain_fp16.jsonl"
save
step cold_start 60 "$PY" -m cxr.bench.cold_start "$R/bundle" "$R" "$(head -n 1 "$R/explain12.txt")" \
  "${VARIANTS:-fp16:256:heuristic,fp16:256,fp32:256:heuristic,fp32:256}" 1
save; ls -la "$OUT_FINAL"; echo "total $((SECONDS - T0))s"
