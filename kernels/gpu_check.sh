#!/usr/bin/env bash
# GPU check for a fresh GPU machine with no internet (PyTorch + nvcc present, fedmri not
# installed): build the extension, run the `gpu` tests and `bench kernels`; JSON and logs go
# to OUTDIR. Usage: kernels/gpu_check.sh OUTDIR   (about 3-5 minutes on an H100/H200)
set -uo pipefail
OUT=${1:?usage: kernels/gpu_check.sh OUTDIR}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
source "$(dirname "$0")/package_links.sh"  # sets REPO, SITE; fedmri.kernels importable
export FEDMRI_KERNELS_CACHE="${FEDMRI_KERNELS_CACHE:-$SITE/cache}" PYTHONUNBUFFERED=1
status=0
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
timeout 240 "$PY" -m fedmri.kernels.cli build 2>&1 | tee "$OUT/build.log" || status=1
"$PY" -m fedmri.kernels.cli info --json >"$OUT/info.json" 2>>"$OUT/build.log" || status=1
cd "$REPO"
timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 \
  | tee "$OUT/tests.log" || status=1
timeout 240 "$PY" -m fedmri.kernels.bench --json >"$OUT/bench.json" 2>"$OUT/bench.log" || status=1
cat "$OUT/bench.log"
echo "gpu_check: exit $status; results in $OUT"
exit $status
