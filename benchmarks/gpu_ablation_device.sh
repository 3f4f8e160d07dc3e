#!/usr/bin/env bash
# Issue 15's ablation in one call of the device tool, whose whole budget (15 minutes, the machine's start
# included) leaves room for one try: the six fits at once under a per-fit training budget, their evaluations,
# the table, then one tarball of everything but the weights under $OUT.
# Here:   mkdir -p gpu_data && cp -r ../shared/data/cxr4-train gpu_data/      (git-ignored, 30 MB)
# Device: bash benchmarks/gpu_ablation_device.sh gpu_data/cxr4-train          (carry gpu_data, timeout_s 600)
# MAX_MINUTES=6 (per fit) keeps the call near 8 minutes on an H100: six dpn92_se-sized fits share it at about
# 105 img/s each, so 30 epochs of 1,199 images take about 5.7 minutes; loading and evaluation add about 1.5.
# Should the GPU be slower, each fit's learning rate follows the clock and still anneals within the 6 minutes
# (the table then says "time budget, annealed"; session 8's runs were cut at their peak).
# A dry run on a CPU: ARCH=dpn_se_tiny SIZE=64 DEVICE=cpu EPOCHS=1 AUDIT=4 PYTHON=.venv/bin/python
set -uo pipefail
DATA=$(realpath "${1:?usage: gpu_ablation_device.sh DATA_DIR}")
RESULTS=$(mktemp -d)/ablation
SAVE=${OUT:-/tmp}
mkdir -p "$SAVE"
cd "$(dirname "$0")/.."
GPU=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1)
JOBS=${JOBS:-6} MAX_MINUTES=${MAX_MINUTES:-6} AUDIT=${AUDIT:-40} FIT_OPTIONS=${FIT_OPTIONS:-} \
  bash benchmarks/gpu_ablation.sh "$RESULTS" "$DATA" "${EPOCHS:-30}" "${PYTHON:-python3}"
echo "$GPU" > "$RESULTS/gpu.txt"
tar -C "$(dirname "$RESULTS")" -czf "$SAVE/ablation.tar.gz" --exclude=model.pt "$(basename "$RESULTS")" &&
  echo "wrote $SAVE/ablation.tar.gz"
