#!/usr/bin/env bash
# Set up fedmri in ./.venv: the CPU build of torch, then fedmri with its dev tools, then its
# compiled kernels.
# A strict editable install gives mypy a real `fedmri/` file tree over server/, client/, ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]" --config-settings editable_mode=strict
.venv/bin/fedmri kernels build  # the compiled 3D convolution (C++; CUDA too with a CUDA torch)
echo "fedmri installed in $(pwd)/.venv"
