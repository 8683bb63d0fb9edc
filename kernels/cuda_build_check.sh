#!/usr/bin/env bash
# CI: compile the CUDA sources on a machine without a GPU, so a CUDA compile error fails CI.
# A second virtual environment (.venv-cuda) holds the CUDA build of torch (2.14.1, cu130,
# from the local package disk); nvcc comes from the CUDA toolkit (CUDA_HOME, default: the
# newest /usr/local/cuda-*). Compiles for sm_90a unless TORCH_CUDA_ARCH_LIST says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
[ -x .venv-cuda/bin/python ] || "$PY" -m venv .venv-cuda
.venv-cuda/bin/python -m pip install -q --upgrade pip
.venv-cuda/bin/python -m pip install -q "torch==2.14.1" ninja numpy
source kernels/package_links.sh
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-2}"
export FEDMRI_KERNELS_CACHE="$SITE/cache"
.venv-cuda/bin/python -m fedmri.kernels.cli build --require-cuda
.venv-cuda/bin/python -m fedmri.kernels.cli info
