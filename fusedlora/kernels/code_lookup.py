"""4-bit codes to 16-bit values by byte permutes: the in-loop decode of the fused GEMMs.

A weight byte holds two 4-bit codes (element 2j in the HIGH nibble, 2j+1 in the low one). The value of a
code is an entry of a 16-entry table: the NF4 code values, or the integers 0..15 for INT4 (whose zero and
scale the GEMM applies around the product). The table is held in the compute dtype (bf16 or fp16): 16
entries of 2 bytes, split into a low-byte table L and a high-byte table H of 16 bytes = 4 words each.

``PRMT`` (byte permute) picks 4 bytes out of two 32-bit words by 4 selector nibbles, so one PRMT looks up
4 codes in an 8-entry byte table. Four weight bytes in one 32-bit register r hold 8 codes whose nibbles,
from the least significant, are lo0 hi0 lo1 hi1 | lo2 hi2 lo3 hi3: r itself is the selector word of the
first four codes (PRMT reads the low 16 bits), r >> 16 that of the other four. Per selector word c:

    cm = c & 0x7777                     index within the half table (selector bit 3 is PRMT's sign mode)
    m  = PRMT(0, 0xffffffff, (c >> 1) & 0x4444)   0xff in the bytes whose code is >= 8, else 0x00
    L  = m ? PRMT(L2, L3, cm) : PRMT(L0, L1, cm)  (two PRMT and one LOP3; the same for H)
    out_hi = PRMT(L, H, 0x7351)         the values of hi0, hi1 as a 16-bit pair (a register of the MMA)
    out_lo = PRMT(L, H, 0x6240)         the values of lo0, lo1

25 instructions for 8 codes, no memory access; the select tree it replaces took ~24 per code. Words L0,
L2, H0 and H2 come in registers, L1, L3, H1, H3 as immediates (the PRMT form has one immediate slot; an
immediate in the register slot is copied into a register at every use). The register words are loaded once
per program by ``WORDS_PTX``, each lane from its own copy in ``table_tensor``. Words that every lane loads
from one address are provably uniform, and where registers are short (the 128-token tiles, 255 registers)
ptxas parks those in uniform registers and copies each back at every use: about one more instruction per
weight element.

Under TRITON_INTERPRET=1 (no PTX) ``code_pairs`` computes the same table values with selects.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ..formats.nf4 import NF4_CODE
from .weight_tile import INT4, NF4, nf4_value

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _bits16(value: float, dtype: torch.dtype) -> int:
    return torch.tensor([value], dtype=torch.float32).to(dtype).view(torch.int16).item() & 0xFFFF


def table_values(fmt: int, dtype: torch.dtype) -> list[int]:
    """The 16-bit patterns of the 16 table entries of weight format ``fmt`` (NF4: the code values; INT4:
    0..15) in ``dtype`` (bf16 or fp16)."""
    values = NF4_CODE if fmt == NF4 else [float(i) for i in range(16)]
    return [_bits16(v, dtype) for v in values]


def _words(byte_table: list[int]) -> list[int]:
    return [struct.unpack("<I", bytes(byte_table[4 * i:4 * i + 4]))[0] for i in range(4)]


def table_words(fmt: int, dtype: torch.dtype) -> tuple[list[int], list[int]]:
    """(L words, H words): the low and the high bytes of the 16 entries, 4 entries per word."""
    bits = table_values(fmt, dtype)
    return _words([b & 0xFF for b in bits]), _words([b >> 8 for b in bits])


def _selector_half(src: str, out_hi: str, out_lo: str, t: str, imm_l: tuple[int, int], imm_h: tuple[int, int]):
    """PTX for the 4 codes of selector word ``src``; registers $5, $9, $13, $17 hold L0, L2, H0, H2."""
    return f"""
    and.b32 cm{t}, {src}, 0x7777;
    shr.b32 s{t}, {src}, 1;
    and.b32 s{t}, s{t}, 0x4444;
    prmt.b32 m{t}, 0, 0xffffffff, s{t};
    prmt.b32 l0{t}, $5, {imm_l[0]:#x}, cm{t};
    prmt.b32 l1{t}, $9, {imm_l[1]:#x}, cm{t};
    prmt.b32 h0{t}, $13, {imm_h[0]:#x}, cm{t};
    prmt.b32 h1{t}, $17, {imm_h[1]:#x}, cm{t};
    lop3.b32 l{t}, l0{t}, l1{t}, m{t}, 0xd8;
    lop3.b32 h{t}, h0{t}, h1{t}, m{t}, 0xd8;
    prmt.b32 {out_hi}, l{t}, h{t}, 0x7351;
    prmt.b32 {out_lo}, l{t}, h{t}, 0x6240;"""


def lookup_asm(fmt: int, dtype: torch.dtype) -> str:
    """The inline PTX: $0, $1 the high-nibble values (pairs), $2, $3 the low-nibble ones, $4 four weight
    bytes, $5 / $9 / $13 / $17 the register table words L0, L2, H0, H2 (each argument fills 4 operands)."""
    lw, hw = table_words(fmt, dtype)
    regs = ", ".join(f"{r}{t}" for t in "ab" for r in ("cm", "s", "m", "l0", "l1", "h0", "h1", "l", "h"))
    return ("{ .reg .b32 c1, " + regs + ";"
            + _selector_half("$4", "$0", "$2", "a", (lw[1], lw[3]), (hw[1], hw[3]))
            + "\n    shr.b32 c1, $4, 16;"
            + _selector_half("c1", "$1", "$3", "b", (lw[1], lw[3]), (hw[1], hw[3])) + "\n}")


def register_words(fmt: int, dtype: torch.dtype) -> list[int]:
    """The words the asm takes in registers (L0, L2, H0, H2), as signed int32."""
    lw, hw = table_words(fmt, dtype)
    return [w - (1 << 32) if w >= 1 << 31 else w for w in (lw[0], lw[2], hw[0], hw[2])]


# The register words of one lane: 16 bytes at table + 16 · laneid ($4: the table's address).
WORDS_PTX = """{ .reg .u32 l; .reg .u64 a;
    mov.u32 l, %laneid;
    mul.wide.u32 a, l, 16;
    add.u64 a, a, $4;
    ld.global.nc.v4.b32 {$0, $1, $2, $3}, [a]; }"""
LANES = 32
_TABLES: dict = {}


def table_tensor(fmt: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """int32 [LANES, 4] on ``device``: ``register_words`` once per lane of a warp, for ``WORDS_PTX``."""
    key = (fmt, dtype, torch.device(device))
    if key not in _TABLES:
        words = register_words(fmt, dtype) if dtype in _DTYPES else [0, 0, 0, 0]
        _TABLES[key] = torch.tensor([words] * LANES, dtype=torch.int32, device=device)
    return _TABLES[key]


_ASM = {(fmt, name): lookup_asm(fmt, dt) for fmt in (NF4, INT4) for dt, name in _DTYPES.items()}
ASM_WORDS = tl.constexpr(WORDS_PTX)
ASM_NF4_BF16 = tl.constexpr(_ASM[(NF4, "bf16")])
ASM_NF4_FP16 = tl.constexpr(_ASM[(NF4, "fp16")])
ASM_INT4_BF16 = tl.constexpr(_ASM[(INT4, "bf16")])
ASM_INT4_FP16 = tl.constexpr(_ASM[(INT4, "fp16")])


@triton.jit
def _asm_pairs(byte, words, ASM: tl.constexpr, BF16: tl.constexpr):
    # one load per thread: the calls are pure and alike, so the compiler keeps one, out of the loop
    w0, w1, w2, w3 = tl.inline_asm_elementwise(ASM_WORDS, "=r,=r,=r,=r,l", [words + tl.zeros(byte.shape, tl.int32)],
                                               dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    if BF16:
        return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r" + ",r" * 16, [byte, w0, w1, w2, w3],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r" + ",r" * 16, [byte, w0, w1, w2, w3],
                                         dtype=(tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def code_pairs(byte, words, WFMT: tl.constexpr, DTYPE: tl.constexpr, USE_ASM: tl.constexpr):
    """(values of the high nibbles, of the low nibbles) of uint8 ``byte`` in DTYPE: the NF4 code values
    (WFMT 1) or 0..15 (WFMT 2). bf16/fp16 by the PRMT table when USE_ASM; otherwise (the interpreter, fp32)
    the same values computed with selects."""
    if USE_ASM and DTYPE == tl.bfloat16:
        if WFMT == 1:
            return _asm_pairs(byte, words, ASM_NF4_BF16, True)
        return _asm_pairs(byte, words, ASM_INT4_BF16, True)
    elif USE_ASM and DTYPE == tl.float16:
        if WFMT == 1:
            return _asm_pairs(byte, words, ASM_NF4_FP16, False)
        return _asm_pairs(byte, words, ASM_INT4_FP16, False)
    else:
        hi = (byte >> 4).to(tl.int32)
        lo = (byte & 15).to(tl.int32)
        if WFMT == 1:
            return nf4_value(hi).to(DTYPE), nf4_value(lo).to(DTYPE)
        return hi.to(DTYPE), lo.to(DTYPE)


@triton.jit
def rows_load(ptrs, row_mask, other, ROWS: tl.constexpr = 1):
    """``tl.load(ptrs)`` masked by ``row_mask`` (broadcast over a second axis when ROWS is 2), or unmasked
    when ``row_mask`` is None: every row in range, known when the kernel is compiled."""
    if row_mask is None:
        out = tl.load(ptrs)
    elif ROWS == 2:
        out = tl.load(ptrs, mask=row_mask[:, None], other=other)
    else:
        out = tl.load(ptrs, mask=row_mask, other=other)
    return out


@triton.jit
def load_w_codes(
    w_ptr, s_ptr, z_ptr, words, na_ptr, nc_ptr, noff,
    rn, k0, n_mask,
    K,
    WFMT: tl.constexpr, QBLOCK: tl.constexpr, DQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DTYPE: tl.constexpr, USE_ASM: tl.constexpr, SCALED: tl.constexpr = False,
):
    """(tile [BLOCK_N, BLOCK_K] in DTYPE, scale [BLOCK_N] fp32) of the 4-bit W[rn, k0:k0+BLOCK_K] with
    K % QBLOCK == 0 and QBLOCK % BLOCK_K == 0 (so the tile's columns are all in range: only rows are
    masked, by ``n_mask``, or not at all when it is None). NF4: the tile holds the code values and
    W = tile · absmax row by row (the GEMM applies the absmax to its product), or with SCALED the products
    themselves (``times_scale``); with DQ the absmax is decoded here from its uint8 code (s_ptr), the
    nested absmax (na_ptr), the nested code (nc_ptr) and the offset: two gathers per row per step, instead
    of a separate launch per GEMM. INT4: the tile is W itself."""
    n64 = rn.to(tl.int64)
    j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    byte = rows_load((w_ptr + n64 * (K // 2))[:, None] + j[None, :], n_mask, 0, 2)
    if WFMT == 1:
        hi, lo = code_pairs(byte, words, WFMT, DTYPE, USE_ASM)
        blk = (n64 * K + k0) // QBLOCK
        if DQ:
            qa = rows_load(s_ptr + blk, n_mask, 0).to(tl.int32)
            scale = tl.load(nc_ptr + qa) * rows_load(na_ptr + blk // 256, n_mask, 0.0) + noff
        else:
            scale = rows_load(s_ptr + blk, n_mask, 0.0)
        if SCALED:  # on the lookup's register pairs, before the join interleaves them
            hi = times_scale(hi, scale, USE_ASM)
            lo = times_scale(lo, scale, USE_ASM)
        codes = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))
    else:
        srow = n64 * (K // QBLOCK) + k0 // QBLOCK
        scale = rows_load(s_ptr + srow, n_mask, 0.0)
        zero = rows_load(z_ptr + srow, n_mask, 0).to(tl.float32)
        codes = int4_weights(byte, scale, zero, BLOCK_N, BLOCK_K, DTYPE)
    return codes, scale


@triton.jit
def int4_weights(byte, scale, zero, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr):
    """W = (q - zero) · scale [BLOCK_N, BLOCK_K] of an INT4 byte tile [BLOCK_N, BLOCK_K // 2] (per-row zero
    and scale), rounded once to DTYPE. q becomes a float without a conversion instruction: the bits
    0x4B000000 | q are the fp32 2^23 + q, and subtracting 2^23 + zero leaves q - zero exactly."""
    q = tl.reshape(tl.join(byte >> 4, byte & 15), (BLOCK_N, BLOCK_K)).to(tl.int32)
    qf = (q | 0x4B000000).to(tl.float32, bitcast=True)
    return ((qf - (8388608.0 + zero[:, None])) * scale[:, None]).to(DTYPE)


# c · (s_hi + s_lo) for bf16 pairs: t = c·s_lo (a fused multiply-add with -0, which sm_80 has and
# mul.bf16x2 needs sm_90 for), then c·s_hi + t rounded once
ASM_SCALE_BF16 = tl.constexpr("""{ .reg .b32 t, z;
    mov.b32 z, 0x80008000;
    fma.rn.bf16x2 t, $1, $3, z;
    fma.rn.bf16x2 $0, $1, $2, t; }""")


@triton.jit
def times_scale(values, scale, USE_ASM: tl.constexpr):
    """NF4 code values [BLOCK_N, C] (bf16 or fp16) times the rows' fp32 absmax [BLOCK_N], rounded once to
    their dtype.

    bf16 with USE_ASM: the scale is split into s_hi = bf16(s) and s_lo = bf16(s - s_hi) (s to 16 bits,
    2^-17 relative) and each register pair of values takes two packed bf16 FMAs, c·s_hi + c·s_lo: one
    instruction per element instead of 2.5 (widen to fp32, multiply, narrow in pairs). Before the one
    rounding to bf16 the result differs from the fp32 product by at most 2^-17 relative (the code's own
    rounding to bf16 comes first in both). fp16 keeps the fp32 product: its range cannot hold every fp32
    absmax."""
    if USE_ASM and values.dtype == tl.bfloat16:
        s_hi = scale.to(tl.bfloat16)
        s_lo = (scale - s_hi.to(tl.float32)).to(tl.bfloat16)
        out = tl.inline_asm_elementwise(ASM_SCALE_BF16, "=r,r,r,r", [values, s_hi[:, None], s_lo[:, None]],
                                        dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        out = (values.to(tl.float32) * scale[:, None]).to(values.dtype)
    return out
