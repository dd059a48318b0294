#!/usr/bin/env bash
# The GPU check of issue #21, unattended, on a CUDA machine holding only this repository: checks
# that torch sees the GPU, records the versions, runs `ddserve doctor`, then benchmarks/bench_gpu.py,
# which writes one table (denoisers at batch 1/8/64 in fp32 / bf16 / bf16+compile / bf16+CUDA
# graphs, encoders in ONNX Runtime vs PyTorch, the batch the memory probe admits) row by row, so a
# run stopped at its time limit still leaves the table so far. Three ways to get the packages:
#
#   GPU_CHECK_WHEELS=.whl GPU_CHECK_PYTHON=python3 bash benchmarks/gpu_check.sh
#       the lent H200 machine (no network; docs/gpu.md has the one-call recipe): its python3 has
#       torch, onnxruntime, transformers...; the rest travels as wheels made here by
#       `bash benchmarks/gpu_wheels.sh`, installed with --no-index into a folder on PYTHONPATH
#   GPU_CHECK_PYTHON=/usr/bin/python3 bash benchmarks/gpu_check.sh
#       an interpreter that already has every package: nothing is installed
#   bash benchmarks/gpu_check.sh
#       a machine with the package indexes: a venv in .venv-gpu with the pins of docs/gpu.md
#       (torch 2.13.0 cu128, the `gpu` extra, diffusers)
#
# GPU_CHECK_OUT: where everything goes (default var/gpu_check): timing.txt, versions.txt,
#   install.log, doctor.txt, gpu_check.log, gpu_check.json, gpu_check.md (7 files, one folder).
# GPU_CHECK_TOTAL_S: the whole run, install included (default 480: 8 minutes, inside the device
#   tool's 10-minute call); the benchmark is stopped at it whatever it is doing.
# GPU_CHECK_RESERVE_S: how long before that the benchmark starts no new cell (default 90: a compile
#   in flight may finish); cells past it are listed as skipped.
# GPU_CHECK_DEVICE (default cuda) and GPU_CHECK_BENCH_ARGS (more bench_gpu.py arguments): a dress
#   rehearsal on a CPU machine, e.g. GPU_CHECK_DEVICE=cpu GPU_CHECK_BENCH_ARGS="--quick --calls 1".
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${GPU_CHECK_OUT:-var/gpu_check}
TOTAL=${GPU_CHECK_TOTAL_S:-480}
RESERVE=${GPU_CHECK_RESERVE_S:-90}
WHEELS=${GPU_CHECK_WHEELS:-}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
read -r -a BENCH_ARGS <<<"${GPU_CHECK_BENCH_ARGS:-}"
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
started=$(date +%s)
elapsed() { echo $(($(date +%s) - started)); }
note() { echo "$*" | tee -a "$OUT/timing.txt"; }
: >"$OUT/timing.txt"

if [ -n "$WHEELS" ]; then
  # no network: the wheels of benchmarks/gpu_wheels.txt, no build, no index, nothing compiled
  PY=${GPU_CHECK_PYTHON:-python3}
  SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "gpu_check: no wheels in $WHEELS: run 'bash benchmarks/gpu_wheels.sh' where pip works" \
      "and carry the folder" | tee "$OUT/install.log" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl >"$OUT/install.log" 2>&1 || {
    cat "$OUT/install.log" >&2
    echo "gpu_check: installing the wheels failed" >&2
    exit 2
  }
  export PYTHONPATH=$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}
elif [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  PY=$GPU_CHECK_PYTHON # the repository is importable from its root: no `pip install -e`
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
  VENV=${GPU_CHECK_VENV:-.venv-gpu}
  test -x "$VENV/bin/python" || python3 -m venv "$VENV"
  PY=$VENV/bin/python
  {
    "$PY" -m pip install -q --upgrade pip
    # torch first, from its CUDA index (the same pin as the worker image: docs/gpu.md)
    "$PY" -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
    "$PY" -m pip install -q -e ".[gpu]" "diffusers>=0.30" "transformers>=4.40"
  } 2>&1 | tee "$OUT/install.log"
fi
note "install: $(elapsed) s"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  "$PY" - "$DEVICE" <<'PY'
import platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
if sys.argv[1].startswith("cuda"):
    assert torch.cuda.is_available(), "gpu_check: torch sees no CUDA device (driver? CUDA wheel?)"
    print("GPU", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
PY
} 2>&1 | tee "$OUT/versions.txt"
note "versions: $(elapsed) s"

timeout 120 "$PY" -m ddserve.cli doctor >"$OUT/doctor.txt" 2>&1 && doctor=0 || doctor=$?
cat "$OUT/doctor.txt"
note "doctor: exit $doctor (1: it found problems, listed above; an ONNX Runtime without CUDA is" \
  "one) at $(elapsed) s"

left=$((TOTAL - $(elapsed)))
budget=$((left - RESERVE))
if [ "$budget" -lt 30 ]; then
  note "gpu_check: ${left} s left of GPU_CHECK_TOTAL_S=$TOTAL: too little for the benchmark"
  exit 1
fi
note "benchmark: starts cells for $budget s, is stopped at $((left - 5)) s"
set +e
timeout -k 5 $((left - 5)) "$PY" benchmarks/bench_gpu.py --device "$DEVICE" --budget-s "$budget" \
  --json "$OUT/gpu_check.json" --table "$OUT/gpu_check.md" "${BENCH_ARGS[@]}" 2>&1 |
  tee "$OUT/gpu_check.log"
bench=${PIPESTATUS[0]}
set -e
case $bench in
  0) note "benchmark: done" ;;
  124 | 137) note "benchmark: stopped at the total budget; $OUT/gpu_check.md holds the rows so far" ;;
  *) note "benchmark: failed (exit $bench); $OUT/gpu_check.md holds the rows so far" ;;
esac
note "total: $(elapsed) s"
exit "$bench"
