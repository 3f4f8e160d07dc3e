#!/usr/bin/env bash
# Shortcut-suppression ablation on one NVIDIA GPU (issue 15): dpn92_se on real chest X-rays with each suppression
# step on/off, and a ResNet-50 (timm, from scratch) as the paper's comparison; each run evaluated on its
# patient-disjoint validation split with bootstrap intervals, the shortcut baseline and a LIME audit; one table.
# Usage: bash benchmarks/gpu_ablation.sh OUT_DIR DATA_DIR [EPOCHS=30] [PYTHON=python3]
# JOBS=N runs N variants at once: each fit augments on one CPU core, and decoding and the shortcut baseline run
# on the CPU too, so parallel jobs overlap them. On an H100 with 16 cores, 6 jobs ran each dpn92_se fit at
# ~105 img/s (one alone: ~460) and the whole ablation (15 epochs each) in 263 s, about half the sequential
# estimate. MAX_MINUTES=M stops each fit after the epoch that spends M minutes (the run is still written).
# FIT_OPTIONS="--ema 2" adds options to every fit (a recipe change for all rows alike).
# ARCH=dpn_se_tiny SIZE=64 DEVICE=cpu EPOCHS=1 AUDIT=4: a dry run on a CPU.
set -uo pipefail
OUT=$(realpath -m "${1:?usage: gpu_ablation.sh OUT_DIR DATA_DIR [EPOCHS] [PYTHON]}")
DATA=$(realpath "${2:?usage: gpu_ablation.sh OUT_DIR DATA_DIR [EPOCHS] [PYTHON]}")
EPOCHS=${3:-30}
PY=${4:-python3}
ARCH=${ARCH:-dpn92_se} SIZE=${SIZE:-224} DEVICE=${DEVICE:-cuda} AUDIT=${AUDIT:-40} COMPARE=${COMPARE:-resnet50}
JOBS=${JOBS:-1} MAX_MINUTES=${MAX_MINUTES:-0} FIT_OPTIONS=${FIT_OPTIONS:-}
mkdir -p "$OUT"
# parallel jobs share the cores instead of each starting one thread per core
[ "$JOBS" -gt 1 ] && export OMP_NUM_THREADS=$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
source benchmarks/steps.sh

declare -A VARIANTS=(
  [all_on]=""
  [all_off]="--no-thorax-crop --no-clahe --erase-corners 0"
  [no_crop]="--no-thorax-crop"
  [no_clahe]="--no-clahe"
  [no_erase]="--erase-corners 0"
)
fit_and_evaluate() {  # NAME ARCH EXTRA_OPTIONS...
  local name=$1 arch=$2; shift 2
  # shellcheck disable=SC2086  # FIT_OPTIONS is a list of options
  step "fit_$name" 1800 "$PY" -m cxr.train.cli fit "$DATA" --arch "$arch" --image-size "$SIZE" --epochs "$EPOCHS" \
    --batch-size 32 --device "$DEVICE" --patience 8 --max-minutes "$MAX_MINUTES" --out "$OUT/$name" "$@" $FIT_OPTIONS
  step "evaluate_$name" 900 "$PY" -m cxr.train.cli evaluate "$OUT/$name" "$DATA" --lime-audit "$AUDIT" \
    --device "$DEVICE" --out "$OUT/$name/evaluation.json"
}
names=(all_on all_off no_crop no_clahe no_erase)
for name in "${names[@]}" "${COMPARE}_all_on"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  if [ "$name" = "${COMPARE}_all_on" ]; then
    fit_and_evaluate "$name" "$COMPARE" &
  else
    # shellcheck disable=SC2086
    fit_and_evaluate "$name" "$ARCH" ${VARIANTS[$name]} &
  fi
done
wait
reports=()
for name in "${names[@]}" "${COMPARE}_all_on"; do
  [ -f "$OUT/$name/evaluation.json" ] && reports+=("$OUT/$name/evaluation.json")
done
step table 60 "$PY" -m cxr.bench.cli ablation "${reports[@]}" --out "$OUT/clinical.md" \
  --title "Shortcut suppression, $ARCH @ $SIZE on $(basename "$DATA") ($EPOCHS epochs, $DEVICE)"
cat "$OUT/clinical.md"
echo "results in $OUT (each run's evaluation.png is the page a clinician reads)"
