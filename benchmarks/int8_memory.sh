#!/usr/bin/env bash
# Peak memory of 'cxr-export int8' for dpn92_se at 224 (the paper's model) with N calibration images, measured
# by /usr/bin/time -v around the real command. Weights are random: memory does not depend on them.
# Usage: bash benchmarks/int8_memory.sh OUT_DIR CALIB_DIR [SAMPLES=256] [PYTHON=python3]
set -euo pipefail
OUT=$(realpath -m "${1:?usage: int8_memory.sh OUT_DIR CALIB_DIR [SAMPLES] [PYTHON]}")
CALIB=$(realpath "${2:?usage: int8_memory.sh OUT_DIR CALIB_DIR [SAMPLES] [PYTHON]}")
SAMPLES=${3:-256}
PY=${4:-python3}
mkdir -p "$OUT"
"$PY" - "$OUT/run" <<'PYCODE'
import sys
from pathlib import Path
import torch
from cxr.runtime.card import Card, InputSpec, Preprocessing, write_card
from cxr.train.run import build_net, net_mean_std
run = Path(sys.argv[1]); run.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
net = build_net("dpn92_se", 4)
torch.save(net.state_dict(), run / "model.pt")
mean, std = net_mean_std(net)
write_card(run, Card(arch="dpn92_se", input=InputSpec(size=224), preprocessing=Preprocessing(mean=mean, std=std),
                     training={"note": "random init: for memory and latency only"}))
PYCODE
rm -rf "$OUT/bundle"
"$PY" -m cxr.export.cli onnx "$OUT/run" --out "$OUT/bundle" > /dev/null
/usr/bin/time -v "$PY" -m cxr.export.cli int8 "$OUT/bundle" --calib "$CALIB" --samples "$SAMPLES" \
  2> "$OUT/int8_time.txt" | tail -n 2
grep -E "Maximum resident set size|Elapsed \(wall clock\)" "$OUT/int8_time.txt"
"$PY" -c "import json,sys; c=json.load(open(sys.argv[1])); print({k: v.get('peak_rss_mb') for k, v in c['provenance']['int8'].items() if isinstance(v, dict)})" "$OUT/bundle/card.json"
