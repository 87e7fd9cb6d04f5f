"""Build script: the Python package, plus the CUDA extension ``fusedlora._C`` when it can be built.

The extension is built when torch is a CUDA build and nvcc is found (``CUDA_HOME``, else
``/usr/local/cuda``). ``FUSEDLORA_SKIP_CUDA_BUILD=1`` skips it. Target architectures come from
``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0+PTX``: binaries for sm_80 and sm_90, and PTX that newer GPUs
compile when they load the extension; ``fusedlora.backend`` checks that a device can run the build and
falls back to the triton family where it cannot); ``MAX_JOBS`` bounds the parallel compile.
Install with ``pip install --no-build-isolation -e .`` after torch, so the build sees the installed
torch instead of fetching another copy into an isolated environment.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def _extension_or_reason():
    """Returns (ext_modules, cmdclass) or a reason string saying why the extension is not built."""
    if os.environ.get("FUSEDLORA_SKIP_CUDA_BUILD", "0") == "1":
        return "FUSEDLORA_SKIP_CUDA_BUILD=1"
    try:
        import torch
    except ImportError:
        return "torch is not installed in the build environment (install it first, build with --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    home = _cuda_home()
    if home is None:
        return "nvcc not found (set CUDA_HOME)"
    # torch.utils.cpp_extension reads CUDA_HOME at import; its own search prefers /usr/local.
    os.environ["CUDA_HOME"] = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return "no sources under csrc/"
    ext = CUDAExtension(
        name="fusedlora._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],  # torch >= 2.10 headers need C++20; the .cu files include none
            # No --use_fast_math: the dequant kernels must round exactly like the reference.
            # Spills in a memory-bound decode kernel cost more than they save: make them visible.
            "nvcc": ["-O3", "-std=c++17", "-Xptxas=-warn-spills", "-lineinfo"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


result = _extension_or_reason()
if isinstance(result, str):
    print(f"fusedlora: building without the CUDA extension: {result}", file=sys.stderr)
    ext_modules, cmdclass = [], {}
else:
    ext_modules, cmdclass = result

setup(ext_modules=ext_modules, cmdclass=cmdclass)
