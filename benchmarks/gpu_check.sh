#!/usr/bin/env bash
# The GPU check of issue #21, unattended, on a fresh CUDA machine holding only this repository:
# makes its own venv (torch's CUDA 12.8 wheels and the `gpu` extra, the pins of docs/gpu.md; no
# network beyond the package indexes), runs `ddserve doctor`, then benchmarks/bench_gpu.py, which
# prints one table (denoisers at batch 1/8/64 in fp32 / bf16 / bf16+compile / bf16+CUDA graphs, encoders in ONNX
# Runtime CUDA vs PyTorch, the batch the memory probe admits) within its time budget.
#
#   bash benchmarks/gpu_check.sh                      # venv in .venv-gpu, table in var/gpu_check/
#   GPU_CHECK_PYTHON=/usr/bin/python3 bash benchmarks/gpu_check.sh   # an interpreter that already
#                                                     # has torch with CUDA: no install at all
#   GPU_CHECK_BUDGET_S=300 bash benchmarks/gpu_check.sh              # the benchmark's time budget
#
# The whole run is meant to fit in 8 minutes: the install (~2-3 min with a warm pip cache) plus a
# benchmark budget of 300 s by default (cells past it are listed as skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_OUT:-var/gpu_check}
BUDGET=${GPU_CHECK_BUDGET_S:-300}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}
mkdir -p "$OUT"
started=$(date +%s)

if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  PY=$GPU_CHECK_PYTHON
  "$PY" -m pip install -q --no-deps -e . 2>/dev/null || true   # importable from the repo anyway
else
  VENV=${GPU_CHECK_VENV:-.venv-gpu}
  test -x "$VENV/bin/python" || python3 -m venv "$VENV"
  PY=$VENV/bin/python
  "$PY" -m pip install -q --upgrade pip
  # torch first, from its CUDA index (the same pin as the worker image: docs/gpu.md)
  "$PY" -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
  "$PY" -m pip install -q -e ".[gpu]" "diffusers>=0.30" "transformers>=4.40"
fi
echo "install: $(( $(date +%s) - started )) s" | tee "$OUT/timing.txt"

"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_check: torch sees no CUDA device (driver? CUDA wheel?)"
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))
PY
"$PY" -m ddserve.cli doctor | tee "$OUT/doctor.txt" || echo "doctor reported problems (above)"
"$PY" benchmarks/bench_gpu.py --device cuda --budget-s "$BUDGET" --json "$OUT/gpu_check.json" \
  | tee "$OUT/gpu_check.log"
echo "total: $(( $(date +%s) - started )) s" | tee -a "$OUT/timing.txt"
