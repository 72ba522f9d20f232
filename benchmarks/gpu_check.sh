#!/usr/bin/env bash
# The GPU check of issue 24, one command, <= ~8 min on one GPU (read benchmarks/gpu_check.py).
# On the device machine, from the repository root:   bash benchmarks/gpu_check.sh
# It installs the project into .venv when missing, then writes records/gpu_check.json (and $OUT/ when set).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv && .venv/bin/pip install -q -e ".[onnx]"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi: running on CPU"
.venv/bin/python -m benchmarks.gpu_check "$@"
if [ -n "${OUT:-}" ]; then cp records/gpu_check.json "$OUT/"; fi
