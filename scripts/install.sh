#!/usr/bin/env bash
# Creates ./.venv if it is missing and installs fusedlora into it, editable, with the dev extras.
# torch goes in first, then the package is built with --no-build-isolation: an isolated build would fetch
# its own multi-GB torch instead of using this one. The CUDA extension is built when nvcc is found
# (CUDA_HOME, default /usr/local/cuda); FUSEDLORA_SKIP_CUDA_BUILD=1 skips it. A rerun with nothing changed
# for the build returns in seconds (see build_inputs).
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
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}
has_nvcc() { [ -x "$CUDA_HOME/bin/nvcc" ] && [ "${FUSEDLORA_SKIP_CUDA_BUILD:-0}" != 1 ]; }

# What the build reads: when it is what the last install built from and the package still imports as it
# did then (with its extension where nvcc is here), pip is skipped: even with nothing to build it takes
# about a minute. Python sources need nothing: the install is editable.
STAMP=.venv/.fusedlora-install
build_inputs() {
  { echo "$CUDA_HOME $(has_nvcc && echo nvcc) ${TORCH_CUDA_ARCH_LIST:-} $(python --version 2>&1)"
    cat setup.py pyproject.toml
    find csrc -maxdepth 1 -type f | LC_ALL=C sort | xargs cat; } | sha256sum | cut -d' ' -f1
}
WANT=$(build_inputs)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && python -c "
import sys, fusedlora
ok = fusedlora.extension_loaded() or not $(has_nvcc && echo True || echo False)
if ok:
    print('[install] up to date: fusedlora', fusedlora.__version__, '| CUDA extension loaded:', fusedlora.extension_loaded())
sys.exit(0 if ok else 1)" 2>/dev/null; then
  exit 0
fi
rm -f "$STAMP"
pip install -q setuptools wheel ninja pybind11
echo "[install] building fusedlora (CUDA extension: $([ -x "$CUDA_HOME/bin/nvcc" ] && echo "nvcc at $CUDA_HOME" || echo "no nvcc, skipped"))"
pip install -q --no-build-isolation -e ".[dev]"
python -c "import fusedlora; print('[install] fusedlora', fusedlora.__version__, '| CUDA extension loaded:', fusedlora.extension_loaded())"
echo "$WANT" > "$STAMP"
