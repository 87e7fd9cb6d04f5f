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


def test_main_loop_weighs_mma_by_shape():
    # dX's K loop (one wgmma of 64x128x16) against its dA epilogue loop (six mma.sync of 16x8x16, more
    # instructions but an eighth of the work): the K loop is the main loop
    body_k = [(0x100, "HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR12], R24"), (0x110, "@!P1 BRA 0x100")]
    body_e = [(0x120 + 0x10 * i, "HMMA.16816.F32.BF16 R4, R8, R12, R4") for i in range(6)]
    sass = "\n".join(f"        /*{a:04x}*/  {t} ;" for a, t in body_k + body_e + [(0x180, "@!P2 BRA 0x120"),
                                                                                 (0x190, "EXIT")])
    body, _ = tl_.find_loop(tl_.instructions(sass))
    assert len(body) == 2 and "HGMMA" in body[0]
    assert tl_.mma_work("HGMMA.64x128x16.F32.BF16") == 64 * 128 * 16
    assert tl_.mma_work("HMMA.16816.F32.BF16") == 16 * 8 * 16 and tl_.mma_work("HMMA.1688.F32.TF32") == 16 * 8 * 8


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


@pytest.mark.parametrize("name, role", [("dora_fwd_bf16", "dora_fwd"), ("dora_bwd_fp16", "dora_bwd")])
def test_dora_roles(name, role):
    d = tl_.describe(name, {"BLOCK_M": 32, "BLOCK_N": 128, "HAS_U": True}, {})
    assert (d["role"], d["fmt"], d["dtype"], d["elements"]) == (role, None, name[-4:], 32 * 128)


def test_dora_stream_work():
    c = {"BLOCK_M": 32, "BLOCK_N": 128}
    splits = tl_.dora_splits(4096, 4096, c, 132)
    assert splits == 17  # 32 column tiles, about 4 programs per SM
    fwd = tl_.work("dora_fwd", c, {"m": 4096, "n": 4096, "u": False}, 132)
    assert (fwd.programs, fwd.iters, fwd.fma_per_iter) == (32 * 17, 8, 0)  # 128 bands over 17 splits
    assert fwd.bytes == 2 * 2 * 4096 * 4096 + 4 * 4096  # z read, y written, g
    with_u = tl_.work("dora_fwd", c, {"m": 4096, "n": 4096, "u": True}, 132)
    assert with_u.bytes - fwd.bytes == 2 * 4096 * 4096
    bwd = tl_.work("dora_bwd", c, {"m": 4096, "n": 4096}, 132)
    assert bwd.bytes == 3 * 2 * 4096 * 4096 + 4 * 4096 + 4 * 17 * 4096  # dy, z, dz; g; partials


def test_mask_bytes_only_when_dropping():
    c = {"BLOCK_M": 64, "BLOCK_C": 64, "BLOCK_R": 16, "DROPOUT": True}
    drops = tl_.work("reduce_m", c, {"m": 4096, "c": 4096, "r": 16}, 132)
    plain = tl_.work("reduce_m", c, {"m": 4096, "c": 4096, "r": 16, "dropout": False}, 132)
    assert drops.bytes - plain.bytes == 4096 * 4096 / 8


def _roles(stages):
    return [role for stage in stages for role, _, _ in stage[0]]


def test_dora_layer_launches():
    lora = tl_.layer_kernels("inloop", 4096, 4096, 4096, 16, p_drop=False)
    # r <= 32: dA in dX's epilogue (no pass of its own); above, its own pass, where without dropout the
    # dropout build stands in, without a mask
    assert "reduce_m" not in _roles(lora) and [d for role, _, d in (s[0][0] for s in lora) if role == "dx"][0]["da"]
    # ... and dB's partial sums wait for dA's: one closing launch adds both
    assert _roles(lora)[-2:] == ["dx", "torch"] and lora[-1][0][0][2]["launches"] == 1
    assert [d for role, _, d in (s[0][0] for s in lora) if role == "g_db"][0]["db_deferred"]
    wide = tl_.layer_kernels("inloop", 4096, 4096, 4096, 64, p_drop=False)
    assert not [d for role, _, d in (s[0][0] for s in wide) if role == "dx"][0]["da"]
    assert len(wide[-1]) == 2 and wide[-1][0][0][0] == "reduce_m" and wide[-1][1][0][1] == {}
    p0 = tl_.dora_layer_kernels("inloop", "inloop", 4096, 4096, 4096, 16, False)
    roles = _roles(p0)
    # the norm: the forward GEMM with A as its 16 rows of input, making A·Aᵀ (its xa) in its own loop
    assert roles[:3] == ["fwd", "dora_norm", "dora_gain"]
    assert roles[3:3 + len(lora)] == _roles(lora) and roles[3 + len(lora):] == ["torch", "dora_colsum"]
    norm_gemm = p0[0][0][0][2]
    assert norm_gemm["m"] == 16 and norm_gemm["wfmt"] == "nf4-dq" and norm_gemm["fused_xa"]
    # the layer's GEMMs read the folded weight: NF4 codes with fp32 scales
    assert {d["wfmt"] for role, _, d in (s[0][0] for s in p0[3:3 + len(lora)]) if role in ("fwd", "dx")} == {"nf4"}
    p1 = tl_.dora_layer_kernels(("inloop", "dequant"), "inloop", 4096, 4096, 4096, 16, True)
    roles = _roles(p1)
    assert roles.count("fwd") == 3 and roles.count("dx") == 2 and roles.count("dequant") == 2
    assert roles.count("torch") == 2 and roles.count("dora_add") == 0 and roles.count("g_db") == 1  # sums, dB
    # the second base product: rank 0 (no low-rank launches), on the weight as it is, no dropout anywhere;
    # its forward adds v in the epilogue (y = v + u: no stream), reading [M, N] once more; its dX mixes in
    # drop(x)'s gradient by the bits (no stream for dx), reading [M, K] and the bits once more
    second = [d for role, _, d in (s[0][0] for s in p1[3 + len(lora) + 2:]) if role in ("fwd", "dx")]
    assert [(d["r"], d["wfmt"], d["residual"], d["blend"]) for d in second] == [
        (0, "nf4-dq", True, False), (0, "dense", False, True)]
    gemm = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_R": 16}
    plain, added = (tl_.work("fwd", gemm, {**second[0], "residual": res}, 132) for res in (False, True))
    assert added.bytes - plain.bytes == 2 * 4096 * 4096 and added.fma_per_iter == plain.fma_per_iter
    plain, mixed = (tl_.work("dx", gemm, {**second[1], "blend": b}, 132) for b in (False, True))
    assert mixed.bytes - plain.bytes == 2 * 4096 * 4096 + 4096 * 4096 / 8 and mixed.fma_per_iter == plain.fma_per_iter
    assert roles.count("lowrank") == 1  # the layer's (the norm's GEMM makes its xa itself)
    assert not any(d.get("dropout") for _, _, d in (s[0][0] for s in p1))
    assert roles.count("dora_drop_fwd") == 1 and roles.count("dora_drop_bwd") == 0
    drop = tl_.work("dora_drop_fwd", {"BLOCK_M": 16, "BLOCK_K": 128}, {"m": 4096, "k": 4096}, 132)
    mk = 4096 * 4096
    assert drop.bytes == 6 * mk + mk / 8 and drop.programs == 256 * 32  # bf16: x in, xd and c out, 1-bit mask
    colsum = tl_.work("dora_colsum", {"BLOCK_M": 32, "BLOCK_N": 128}, {"m": 4096, "n": 4096}, 132)
    assert colsum.bytes >= 4 * mk and colsum.bytes < 4.1 * mk  # dY and v read, no dz written


def _fake(name, role, constexprs, count=200, warps=4, mma=None, fmt=None):
    return tl_.Loop(name=name, cc=90, role=role, fmt=fmt, dtype="bf16", constexprs=constexprs, warps=warps,
                    large_m_gemm=False, is_loop=True, count=count, classes=dict.fromkeys(tl_.CLASS_NAMES, 0), top=[],
                    elements=None, wait=None,
                    mma=mma, tf32=False, regs=64, local=0, smem=0, ctas=4, loop_spills=False)


def test_dora_predictions_rows():
    gemm = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_R": 16, "DROPOUT": True}
    loops = [
        _fake("lowrank", "lowrank", {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_R": 16, "DROPOUT": False}),
        _fake("lowrank_dropout", "lowrank", {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_R": 16, "DROPOUT": True}),
        _fake("reduce_m_dropout", "reduce_m", {"BLOCK_M": 64, "BLOCK_C": 64, "BLOCK_R": 16, "DROPOUT": True}),
        _fake("g_db", "g_db", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_R": 16}, mma="HMMA"),
        *[_fake(f"dequant_{fmt}", "dequant", {"BYTES": 2048}, fmt=fmt) for fmt in ("nf4", "nf4-dq")],
        *[_fake(f"{role}_{fmt}", role, gemm, count=300, mma="HGMMA", fmt=fmt)
          for role in ("fwd", "dx") for fmt in ("dense", "nf4", "nf4-dq")],
        *[_fake(f"fwd_{fmt}_res", "fwd", {**gemm, "HAS_RES": True}, count=300, mma="HGMMA", fmt=fmt)
          for fmt in ("dense", "nf4-dq")],
        *[_fake(f"dx_{fmt}_blend", "dx", {**gemm, "BLEND": True}, count=300, mma="HGMMA", fmt=fmt)
          for fmt in ("dense", "nf4-dq")],
        *[_fake(f"dora_{s}_bf16", f"dora_{s}", {"BLOCK_M": 32, "BLOCK_N": 128}) for s in ("add", "colsum")],
        _fake("dora_norm_bf16", "dora_norm", {"BLOCK_N": 64, "BLOCK_R": 16}),
        _fake("dora_gain_bf16", "dora_gain", {"BLOCK_N": 32, "BLOCK_C": 64}),
        *[_fake(f"dora_drop_{d}_bf16", f"dora_drop_{d}", {"BLOCK_M": 16, "BLOCK_K": 128}) for d in ("fwd", "bwd")],
    ]
    rows = tl_.dora_predictions(loops)
    assert len(rows) == len(tl_.CHIPS) * len(tl_.PROJECTIONS) * len(tl_.DORA_TOKENS) * len(tl_.DORA_DROPOUT)
    for row in rows:
        assert {"dora", "lora", "peft_dora", "dense", "dense_lora", "dequant_lora", "p", "path"} <= set(row)
        assert row["dora"] > row["lora"]
    by_p = {r["p"]: r["dora"] / r["lora"] for r in rows if (r["chip"], r["k"], r["n"], r["m"]) ==
            ("H100-SXM", 4096, 4096, 4096)}
    assert by_p[0.1] > by_p[0.0] + 0.5  # the second base product and the dropout split
    table = tl_.dora_table(rows, "H200")
    assert len(table) == 2 + len(rows) // len(tl_.CHIPS)
    lines = tl_.dora_target_lines(rows)
    heads = [x for x in lines if x.startswith("- ")]
    assert len(heads) == len(tl_.CHIPS) and all("p = 0:" in x and "p = 0.1:" in x for x in heads)
    # per chip and dropout, the reachable DoRA / LoRA and PEFT ratios
    assert sum("best reachable" in x for x in lines) == 2 * len(tl_.CHIPS) * len(tl_.DORA_DROPOUT)
    misses = tl_.dora_target_misses(rows)
    assert len(misses) == sum(r["dora"] / r["lora"] > tl_.DORA_BARS[r["p"]] for r in rows) + sum(
        r["peft_dora"] / r["dora"] < tl_.DORA_PEFT_BAR for r in rows)
    block = tl_.readme_block(loops, [], "3.6.0", rows)
    assert any(x.startswith("Predicted DoRA layer") for x in block)


def test_peft_dora_baseline():
    """PEFT's DoRA over bitsandbytes costs at least the dequantize -> cuBLAS -> LoRA layer (it runs those
    launches and more), dropout adds a second GEMM each way, and [N, K] passes make it grow with N·K."""
    chip = tl_.CHIPS["H100-SXM"]
    for m, n, k in ((4096, 4096, 4096), (512, 14336, 4096)):
        base = tl_.baselines_us(m, n, k, chip)["dequant_lora"]
        p0, p1 = (tl_.peft_bnb_dora_us(m, n, k, chip, p) for p in (0.0, 0.1))
        assert base < p0 < p1
        assert p1 - p0 > 2 * tl_.cublas_us(m, n, k, chip) - 1e-9  # the second GEMM, forward and dX
    # M-independent [N, K] work (eye, B·A, the norm's passes, two more dequantizations) dominates at small M
    small = tl_.peft_bnb_dora_us(16, 4096, 4096, chip, 0.0) - tl_.baselines_us(16, 4096, 4096, chip)["dequant_lora"]
    assert small > 2 * tl_.dequant_baseline_us(4096, 4096, chip)


def test_dora_torch_launch_count():
    """DORA_LAUNCHES is the number of torch kernels the folded route runs besides its own kernels: the row
    gain (one kernel, replaced here) forward, then dB = g ⊙ (the gradient of g ⊙ B) backward."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from fusedlora.kernels import dora as kernels_dora
    from fusedlora.ops import dora as ops_dora

    views = {"aten.detach.default", "aten.t.default", "aten.empty.memory_format", "aten.unsqueeze.default",
             "aten.slice.Tensor", "aten.view.default"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    n, r = 64, 16
    b = torch.randn(n, r, dtype=torch.bfloat16, requires_grad=True)
    calls = []
    made = (torch.rand(n), torch.rand(n), torch.randn(n, r, dtype=torch.bfloat16), torch.empty(n, 2))
    m, norm, scales = torch.rand(n), torch.rand(n), torch.empty(2 * n)

    def gain(*args):
        calls.append("gain")
        return made

    forward, backward = Count(), Count()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels_dora, "dora_gain", gain)
        with forward:
            b_fold, *_ = ops_dora._RowGain.apply(b, m, norm, scales, None)
    grad = torch.randn_like(b_fold)
    with backward:
        torch.autograd.grad(b_fold, b, grad)
    torch_ops = lambda ops: [o for o in ops if o not in views and not o.startswith("fusedlora.")]  # noqa: E731
    assert calls == ["gain"] and forward.ops.count("fusedlora.dora_gain.default") == 1
    assert torch_ops(forward.ops) == []
    assert len(torch_ops(backward.ops)) == tl_.DORA_LAUNCHES, backward.ops


def test_reach_line_names_the_shapes_no_kernel_can_meet():
    """The best reachable ratio is the baseline over the bare dense products; a shape where even that misses
    the bar is counted and the worst one named, in either direction of bar."""
    rows = [{"k": 4096, "n": n, "m": m, "base": base, "dense": 100.0}
            for n, m, base in ((4096, 512, 180.0), (14336, 4096, 125.0), (14336, 8192, 118.0))]
    reach = lambda r: r["base"] / r["dense"]  # noqa: E731
    line = tl_.reach_line(rows, "x", reach, 1.3)
    assert "1.18–1.80" in line and "below 1.3 on 2 of 3 shapes" in line and "1.18 at 4096→14336 M = 8192" in line
    assert "every shape can meet 1.1" in tl_.reach_line(rows, "x", reach, 1.1)
    cost = tl_.reach_line(rows, "y", reach, 1.5, higher=False)
    assert "above 1.5 on 1 of 3 shapes" in cost and "1.80 at 4096→4096 M = 512" in cost
    assert tl_.dora_floor({"dense": 10.0, "p": 0.1}) == 20.0 and tl_.dora_floor({"dense": 10.0, "p": 0.0}) == 10.0
