#!/usr/bin/env bash
# Creates ./.venv if it is missing and installs fusedlora into it, editable, with the dev extras.
# torch goes in first, then the package is built with --no-build-isolation: an isolated build would fetch
# its own multi-GB torch instead of using this one. The CUDA extension is built when nvcc is found
# (CUDA_HOME, default /usr/local/cuda); FUSEDLORA_SKIP_CUDA_BUILD=1 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}

if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  echo "[install] installing $TORCH_SPEC"
  pip install -q "$TORCH_SPEC"
fi
pip install -q setuptools wheel ninja pybind11
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}
echo "[install] building fusedlora (CUDA extension: $([ -x "$CUDA_HOME/bin/nvcc" ] && echo "nvcc at $CUDA_HOME" || echo "no nvcc, skipped"))"
pip install -q --no-build-isolation -e ".[dev]"
python -c "import fusedlora; print('[install] fusedlora', fusedlora.__version__, '| CUDA extension loaded:', fusedlora.extension_loaded())"
