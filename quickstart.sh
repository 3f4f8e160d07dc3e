#!/usr/bin/env bash
# Set up a virtual environment (CPU PyTorch is enough) and run the whole pipeline on generated phantoms.
set -euo pipefail
cd "$(dirname "$0")"
bash .ci/install
.venv/bin/cxr-quickstart --out quickstart
