#!/usr/bin/env bash
# Downloads, here (with the package index), the wheels that benchmarks/gpu_check.sh installs on the
# lent H200 machine, which has no network: benchmarks/gpu_wheels.txt for CPython 3.12 manylinux
# x86_64, into .whl/ (git-ignored; the device call names it in `carry`). Then checks every wheel's
# Requires-Dist against the wheels and the device's packages (benchmarks/gpu_packages.py) and that
# the repository plus the wheels fit the 64 MiB the call may carry. docs/gpu.md has the recipe.
#
#   bash benchmarks/gpu_wheels.sh              # → .whl/
#   GPU_WHEELS_DIR=/tmp/w bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${GPU_WHEELS_DIR:-.whl}
PY=${PYTHON:-python3}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64; do
  platforms+=(--platform "$p")
done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl # one version of each: pip --no-index stops on two
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d "$DEST" -r benchmarks/gpu_wheels.txt \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$PY" benchmarks/gpu_packages.py check "$DEST"

wheels=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tracked=$(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
limit=$((64 * 1024 * 1024))
echo "wheels $((wheels / 1024)) KiB + tracked files $((tracked / 1024)) KiB" \
  "of the call's $((limit / 1024)) KiB (untracked, not ignored files travel too)"
if [ $((wheels + tracked)) -gt "$limit" ]; then
  echo "gpu_wheels: over the 64 MiB a device call carries" >&2
  exit 1
fi
ls -1 "$DEST"
