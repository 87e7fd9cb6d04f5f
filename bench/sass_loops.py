"""Static report of the decode kernels' main loops, read from their SASS (no GPU needed).

Compiles csrc/decode_lora.cu and csrc/decode_lora_mma.cu for one architecture (nvcc -cubin), disassembles
them (cuobjdump -sass) and, for every kernel instantiation, finds the loop that streams the weight: the
innermost loop holding the L1-bypassing 16-byte loads of W (LDG...NA.128). Per instantiation it prints the
loop's instructions per 2 KB of weight per warp and the bandwidth a GPU would reach if issuing were the only
limit: SMs x 4 schedulers x clock x bytes per instruction. Each format (nf4, nf4-dq, int4) has its own
instantiation; both sides of any remaining if inside the loop are counted, so the count is an upper bound
on what one iteration issues.

--check fails when a main loop touches local memory (LDL/STL: spills), calls a subroutine (a CALL out of
the loop, e.g. a 64-bit division; sm_80 leaves loops with a CALL to the instruction after the backward
branch, which is not one), or, in the tensor-core kernel, has no HMMA.

    python bench/sass_loops.py [--arch 90] [--check]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("decode_lora.cu", "decode_lora_mma.cu")
# SMs, boost clock (GHz), HBM bandwidth (TB/s) of the cards each architecture is checked against.
GPUS = {"80": [("A100-SXM4-80GB", 108, 1.41, 2.04)],
        "90": [("H100-SXM", 132, 1.98, 3.35), ("H200", 132, 1.98, 4.8)]}
# the streaming loads of W (ld.global.nc.L1::no_allocate, 8 or 16 bytes per lane): LDG.E.NA.{64,128}...
WEIGHT_LOAD = re.compile(r"\bLDG\S*\.NA\.(64|128)\b")


def weight_load_bytes(text: str) -> int:
    """Bytes of W one warp-instruction loads (0 if it is not a streaming load of W)."""
    m = WEIGHT_LOAD.search(text)
    return 32 * int(m.group(1)) // 8 if m else 0


def tool(name: str) -> str:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates = [Path(cuda_home) / "bin" / name]
    try:
        import triton  # its wheel carries cuobjdump and nvdisasm

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    for c in candidates:
        if c.is_file():
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    raise SystemExit(f"{name}: not found under CUDA_HOME={cuda_home}, in the triton wheel, or on PATH")


def disassemble(source: Path, arch: str, workdir: Path) -> str:
    cubin = workdir / (source.stem + ".cubin")
    subprocess.run([tool("nvcc"), "-std=c++17", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin",
                    "-o", str(cubin), f"-I{source.parent}", str(source)], check=True)
    return subprocess.run([tool("cuobjdump"), "-sass", str(cubin)], check=True, capture_output=True,
                          text=True).stdout


def kernel_label(mangled: str) -> str | None:
    m = re.search(r"(gemv_lora_mma_kernel|gemv_lora_kernel)I(6__half|13__nv_bfloat16)LNS_6FormatE([012])ELi(\d+)E",
                  mangled)
    if not m:
        return None
    kind = "tensor-core" if "mma" in m.group(1) else "GEMV"
    dtype = "fp16" if "half" in m.group(2) else "bf16"
    scheme = ("nf4", "nf4-dq", "int4")[int(m.group(3))]
    tokens = f"M<={8 * int(m.group(4))}" if kind == "tensor-core" else f"M<={m.group(4)}"
    return f"{kind:<11} {dtype} {scheme:<6} {tokens}"


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def target(text: str, op: str) -> int | None:
    m = re.search(rf"\b{op}\S*\s+(?:\S+\s+)?0x([0-9a-f]+)", text)
    return int(m.group(1), 16) if m else None


def main_loop(function: str) -> tuple[list[str], int, int] | None:
    """The innermost loop streaming W: (its instructions, first address, address of the backward branch)."""
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", function)]
    index = {a: i for i, (a, _) in enumerate(ins)}
    best = None
    for i, (a, text) in enumerate(ins):
        to = target(text, "BRA")
        if to is None or to >= a or to not in index:
            continue
        body = [t for _, t in ins[index[to]:i + 1]]
        if any(weight_load_bytes(t) for t in body) and (best is None or len(body) < len(best[0])):
            best = (body, to, a)
    return best


def report(sass: str, arch: str) -> tuple[list[str], list[str]]:
    lines, problems = [], []
    for function in re.split(r"\n\s*Function : ", sass)[1:]:
        label = kernel_label(function.split("\n", 1)[0])
        if label is None:
            continue
        loop = main_loop(function)
        if loop is None:
            problems.append(f"{label}: no loop with L1-bypassing 8- or 16-byte loads of the weight")
            continue
        body, start, end = loop
        ops = collections.Counter(opcode(t) for t in body)
        weight_bytes = sum(weight_load_bytes(t) for t in body)
        per_2k = len(body) * 2048 / weight_bytes
        bounds = []
        for name, sms, ghz, hbm in GPUS.get(arch, []):
            tbps = sms * 4 * ghz * 1e9 * (2048 / per_2k) / 1e12
            bounds.append(f"{name} {tbps:4.2f} TB/s ({100 * tbps / hbm:3.0f}% of HBM)")
        top = ", ".join(f"{k}={v}" for k, v in ops.most_common(6))
        lines.append(f"{label:<28} {per_2k:6.0f} instr / 2 KB   issue bound: {'; '.join(bounds)}   [{top}]")
        for bad in ("LDL", "STL"):
            if any(opcode(t).startswith(bad) for t in body):
                problems.append(f"{label}: main loop has {bad} (local memory: spills)")
        for t in body:
            to = target(t, "CALL") if opcode(t).startswith("CALL") else None
            if opcode(t).startswith("CALL") and (to is None or not start <= to <= end + 0x10):
                problems.append(f"{label}: main loop calls a subroutine ({t})")
                break
        if label.startswith("tensor-core") and not any(opcode(t).startswith("HMMA") for t in body):
            problems.append(f"{label}: main loop has no HMMA")
    return lines, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="compute capability without the dot (80, 90)")
    parser.add_argument("--check", action="store_true", help="exit 1 on spills, calls or a missing HMMA")
    args = parser.parse_args()
    lines, problems = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for src in SOURCES:
            print(f"compiling csrc/{src} for sm_{args.arch} ...", file=sys.stderr, flush=True)
            got, bad = report(disassemble(ROOT / "csrc" / src, args.arch, Path(tmp)), args.arch)
            lines += got
            problems += bad
    print(f"decode main loops, sm_{args.arch} (weight streamed per warp; bound = issuing alone):")
    print("\n".join(sorted(lines)))
    if not lines:
        problems.append("no decode kernel found in the SASS")
    for p in problems:
        print("PROBLEM:", p)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
