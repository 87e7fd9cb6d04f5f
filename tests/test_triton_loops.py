"""bench/triton_loops.py on a canned SASS listing: loop finding, classes, wgmma wait depth, occupancy, the
resource listing, role parsing and the prediction model's arithmetic (no compile, no GPU)."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import triton_build  # noqa: E402
import triton_loops as tl_  # noqa: E402

# an outer loop (0x0110..0x01c0) around the MMA loop (0x0120..0x01a0), a load-only loop after it
SASS = """
        Function : _lora_fwd_kernel
        /*0100*/                   MOV R1, c[0x0][0x28] ;                      /* 0x00000a0000017a02 */
        /*0110*/                   IADD3 R0, R0, 0x1, RZ ;                     /* 0x0000000100007810 */
        /*0120*/                   LDG.E.128 R4, desc[UR4][R2.64] ;            /* 0x0000000402047981 */
        /*0130*/                   LOP3.LUT R8, R4, 0xf, RZ, 0xc0, !PT ;       /* 0x0000000f04087812 */
        /*0140*/                   PRMT R9, R8, 0x7610, R9 ;                   /* 0x0000761008097816 */
        /*0150*/                   F2FP.BF16.F32.PACK_AB R10, R9, R8 ;         /* 0x000000080a0a723e */
        /*0160*/                   STS.128 [R6], R8 ;                          /* 0x0000000806007388 */
        /*0170*/                   WARPGROUP.ARRIVE ;                          /* 0x00000000000079c5 */
        /*0180*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;  /* 0x01e0000008 */
        /*0190*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;             /* 0x00008000000079c5 */
        /*01a0*/              @!P5 BRA 0x120 ;                                 /* 0xfffffff80068d947 */
        /*01b0*/                   FFMA R7, R7, R8, R9 ;                       /* 0x0000000807077223 */
        /*01c0*/               @P0 BRA 0x110 ;                                 /* 0xfffffff80068d947 */
        /*01d0*/                   LDG.E R4, desc[UR4][R2.64] ;                /* 0x0000000402047981 */
        /*01e0*/               @P1 BRA 0x1d0 ;                                 /* 0xfffffff80068d947 */
        /*01f0*/                   EXIT ;                                      /* 0x000000000000794d */
        /*0200*/                   BRA 0x200;                                  /* 0xfffffffc00fc7947 */
"""

USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _lora_fwd_kernel:
  REG:113 STACK:0 SHARED:1024 LOCAL:8 CONSTANT[0]:640 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_innermost_mma_loop_and_classes():
    body, is_loop = tl_.find_loop(tl_.instructions(SASS))
    assert is_loop and len(body) == 9  # 0x120..0x1a0
    assert body[0].startswith("LDG") and "BRA" in body[-1]
    build = triton_build.Build(name="lora_fwd_bf16_nf4_128x128x64", cc=90, num_warps=8, shared=73728,
                               constexprs={"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64})
    lp = tl_.analyse(build, SASS, USAGE)
    assert lp.classes == {"MMA": 1, "decode": 2, "FMA": 0, "cvt": 1, "mem": 2, "sync": 2, "other": 1}
    assert (lp.role, lp.fmt, lp.dtype, lp.elements) == ("fwd", "nf4", "bf16", 128 * 64)
    assert lp.per_element == pytest.approx(9 * 8 * 32 / (128 * 64))
    assert lp.wait == 1 and lp.mma == "HGMMA" and not lp.tf32
    assert (lp.regs, lp.local, lp.smem) == (113, 8, 73728 + 1024)
    assert not lp.loop_spills


def test_loop_without_mma_and_wait_depths():
    no_mma = SASS.replace("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0", "NOP")
    body, is_loop = tl_.find_loop(tl_.instructions(no_mma))
    assert is_loop and len(body) == 9 and body[0].startswith("LDG.E.128")  # first innermost loop with a load
    assert tl_.wait_depth(body) is None
    waits0 = tl_.find_loop(tl_.instructions(SASS.replace("gsb0, 0x1", "gsb0, 0x0")))[0]
    assert tl_.wait_depth(waits0) == 0
    never = [t for t in tl_.find_loop(tl_.instructions(SASS))[0] if "DEPBAR" not in t]
    assert tl_.wait_depth(never) == math.inf
    straight = "\n".join(line for line in SASS.splitlines() if "BRA" not in line)
    assert tl_.find_loop(tl_.instructions(straight))[1] is False


def test_main_loop_is_the_one_with_most_mma():
    # a K loop with two HGMMAs, then an epilogue loop over rank slices with one (and fewer instructions)
    sass = "\n".join(f"        /*{a:04x}*/  {t} ;" for a, t in [
        (0x100, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24"), (0x110, "IADD3 R0, R0, 0x1, RZ"),
        (0x120, "LOP3.LUT R8, R4, 0xf, RZ, 0xc0, !PT"), (0x130, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24"),
        (0x140, "@!P1 BRA 0x100"), (0x150, "HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR12], R24"),
        (0x160, "@!P5 BRA 0x150"), (0x170, "EXIT")])
    body, _ = tl_.find_loop(tl_.instructions(sass))
    assert len(body) == 5 and sum("HGMMA" in t for t in body) == 2


def test_resources_and_occupancy():
    assert tl_.resource_usage(USAGE) == {"REG": 113, "STACK": 0, "SHARED": 1024, "LOCAL": 8}
    # 113 regs -> 15 x 256 per warp -> 4 warps per scheduler -> 16 warps: two 8-warp CTAs; smem allows two
    assert tl_.ctas_per_sm(113, 97 * 1024, 8, 90) == 2
    assert tl_.ctas_per_sm(113, 97 * 1024, 8, 80) == 1  # 164 KB per SM
    assert tl_.ctas_per_sm(255, 1024, 4, 90) == 2  # registers bind
    assert tl_.ctas_per_sm(32, 0, 4, 90) == 16  # warps bind (64 per SM)
    assert tl_.ctas_per_sm(64, 230 * 1024, 4, 90) == 0  # more than a CTA may have


@pytest.mark.parametrize("name, role, fmt", [
    ("lora_dx_fp16_nf4-unaligned_128x128x64", "dx", "nf4-unaligned"),
    ("lowrank_bf16_small_m_dropout", "lowrank", None),
    ("reduce_m_bf16_dropout", "reduce_m", None),
    ("decode_absmax", "decode_absmax", None),
    ("dequant_nf4_b64_dq_bf16", "dequant", "nf4-dq"),
    ("dequant_int4_g128_fp16", "dequant", "int4"),
    ("dropout_mask", "other", None),
])
def test_roles_from_names(name, role, fmt):
    d = tl_.describe(name, {"BLOCK_M": 16, "BLOCK_K": 128, "BLOCK_C": 64, "BLOCK": 1024, "BYTES": 2048,
                            "BLOCK_N": 64}, {})
    assert (d["role"], d["fmt"]) == (role, fmt)


def test_report_hints_override_the_name():
    d = tl_.describe("lora_fwd_bf16_nf4_128x128x64", {"BLOCK_N": 128, "BLOCK_K": 64},
                     {"role": "dx", "fmt": "int4", "elements": 4096})
    assert (d["role"], d["fmt"], d["elements"]) == ("dx", "int4", 4096)


def _loop(count, warps, wait, ctas, mma="HGMMA"):
    return tl_.Loop(name="x", cc=90, role="fwd", fmt="nf4", dtype="bf16", constexprs={}, warps=warps,
                    large_m_gemm=True, is_loop=True, count=count, classes={}, top=[], elements=8192, wait=wait,
                    mma=mma, tf32=False, regs=128, local=0, smem=0, ctas=ctas, loop_spills=False)


def test_kernel_time_model():
    chip = tl_.CHIPS["H100-SXM"]
    clk = chip["ghz"] * 1e9
    launch = tl_.MODEL["launch_us"]
    tensor = 128 * 128 * 64 / (chip["fma_per_clk"] * tl_.MODEL["tensor_efficiency"])
    w = tl_.Work(programs=264, iters=64, fma_per_iter=128 * 128 * 64, bytes=0)  # two tiles per SM
    # issue-light loop: tensor bound; issue-heavy: issue bound; waiting with one CTA per SM: the sum
    assert tl_.kernel_us(_loop(100, 8, 1, 2), w, chip) == pytest.approx(2 * 64 * tensor / clk * 1e6 + launch)
    issue = 900 * 8 / 4
    assert tl_.kernel_us(_loop(900, 8, 1, 2), w, chip) == pytest.approx(2 * 64 * issue / clk * 1e6 + launch)
    assert tl_.kernel_us(_loop(900, 8, 0, 1), w, chip) == pytest.approx(
        2 * 64 * (issue + tensor) / clk * 1e6 + launch)
    # 265 programs need a third round on some SM (wave quantization); memory bound when bytes dominate
    w265 = tl_.Work(programs=265, iters=64, fma_per_iter=128 * 128 * 64, bytes=0)
    assert tl_.kernel_us(_loop(100, 8, 1, 2), w265, chip) == pytest.approx(3 * 64 * tensor / clk * 1e6 + launch)
    big = tl_.Work(programs=1, iters=1, fma_per_iter=0, bytes=3e9)
    assert tl_.kernel_us(_loop(100, 8, 1, 2), big, chip) == pytest.approx(1e3 + launch)


def test_cublas_and_launch_shapes():
    chip = tl_.CHIPS["H100-SXM"]
    # M = 1: reading W (2 bytes per element) at the copy rate
    assert tl_.cublas_us(1, 4096, 4096, chip) == pytest.approx(
        2 * (4096 + 4096 * 4096 + 4096) / 3.0e12 * 1e6 + tl_.MODEL["launch_us"])
    w = tl_.work("fwd", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, {"m": 4096, "n": 14336, "k": 4096,
                                                                          "r": 16, "wfmt": "nf4"}, 132)
    assert (w.programs, w.iters) == (32 * 112, 64)
    w = tl_.work("dx", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, {"m": 4096, "n": 14336, "k": 4096,
                                                                         "r": 16, "wfmt": "nf4"}, 132)
    assert (w.programs, w.iters) == (32 * 64, 112)
    w = tl_.work("reduce_m", {"BLOCK_M": 64, "BLOCK_C": 64, "BLOCK_R": 16}, {"m": 4096, "c": 4096, "r": 16}, 132)
    assert w.programs == 64 * 4 and w.iters == 16  # 264 // 64 = 4 splits of 16 row tiles
    # the in-loop GEMMs decode the double-quantized absmax themselves: no separate launch on that path
    roles = [role for stage in tl_.layer_kernels("inloop", 64, 4096, 4096, 16) for role, _, _ in stage[0]]
    assert "decode_absmax" not in roles and "dequant" not in roles
    mixed = [role for stage in tl_.layer_kernels(("inloop", "dequant"), 4096, 4096, 4096, 16)
             for role, _, _ in stage[0]]
    assert mixed.count("dequant") == 1 and mixed.index("dequant") > mixed.index("fwd")
    # few tokens: the 4-bit GEMM slices its reduction (fp32 partials) and the launch carries the slices
    w = tl_.work("fwd", {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, {"m": 16, "n": 4096, "k": 4096, "r": 16,
                                                                        "wfmt": "nf4-dq"}, 132)
    splits = tl_.reduction_splits(16, 4096, 4096, 132)
    assert splits == 5 and (w.programs, w.iters, w.splits) == (64 * splits, 13, splits)  # 264 / 64 tiles
