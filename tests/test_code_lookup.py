"""The in-loop decode's byte-permute program (kernels/code_lookup.py), run by a small PTX interpreter.

The program only runs on a GPU (inline PTX), so here its text is executed instruction by instruction with
the PTX ISA's definitions of the instructions it uses (and, shr, prmt in its default mode, lop3), over
every value a weight byte can take in every position of the 32-bit word, and compared with the table
values computed independently: the NF4 code values and the integers 0..15, rounded to bf16 and fp16 by
torch. The interpreter refuses any instruction or operand form it does not know, so a change to the
program cannot pass by being skipped.
"""

from __future__ import annotations

import random
import re

import pytest
import torch

from fusedlora.formats.nf4 import NF4_CODE

M32 = 0xFFFFFFFF


def prmt(a: int, b: int, c: int) -> int:
    """PTX prmt.b32 (default mode): output byte i is byte (c >> 4i) & 7 of {b, a}, or its sign replicated
    when bit 3 of that selector nibble is set."""
    src = (b << 32) | a
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0x00
        out |= byte << (8 * i)
    return out


def lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def run_ptx(text: str, operands: dict[str, int]) -> dict[str, int]:
    """Executes the straight-line PTX ``text`` over 32-bit registers; ``operands`` maps "$i" to values."""
    regs = dict(operands)

    def val(tok: str) -> int:
        tok = tok.strip()
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", tok):
            return int(tok, 0) & M32
        if tok not in regs:
            raise KeyError(f"read of an unset register {tok!r}")
        return regs[tok]

    body = text.strip()
    assert body.startswith("{") and body.endswith("}")
    for stmt in body[1:-1].split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        dst, *srcs = [a.strip() for a in args.split(",")]
        if op == "and.b32":
            res = val(srcs[0]) & val(srcs[1])
        elif op == "shr.b32":
            res = val(srcs[0]) >> val(srcs[1])
        elif op == "prmt.b32":
            res = prmt(val(srcs[0]), val(srcs[1]), val(srcs[2]))
        elif op == "lop3.b32":
            res = lop3(val(srcs[0]), val(srcs[1]), val(srcs[2]), val(srcs[3]))
        else:
            raise NotImplementedError(f"instruction {op!r} is not modelled")
        regs[dst] = res & M32
    return regs


def _bits(values, dtype):
    return [v & 0xFFFF for v in torch.tensor(values, dtype=torch.float32).to(dtype).view(torch.int16).tolist()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["nf4", "int4"])
def test_byte_permute_program_gives_the_table(fmt, dtype):
    from fusedlora.kernels.code_lookup import lookup_asm, register_words
    from fusedlora.kernels.weight_tile import FORMATS

    fid = FORMATS[fmt]
    table = _bits(NF4_CODE if fmt == "nf4" else [float(i) for i in range(16)], dtype)
    asm = lookup_asm(fid, dtype)
    words = [w & M32 for w in register_words(fid, dtype)]
    rng = random.Random(7)
    # every byte value in every byte position, with random neighbours
    inputs = [(rng.getrandbits(32) & ~(0xFF << (8 * pos))) | (v << (8 * pos)) for pos in range(4) for v in range(256)]
    for word in inputs:
        ops = {"$4": word}
        for i, w in enumerate(words):  # each register argument fills 4 operands ($5-$8, $9-$12, ...)
            for j in range(4):
                ops[f"${5 + 4 * i + j}"] = w
        regs = run_ptx(asm, ops)
        codes = [(word >> (8 * i)) & 0xFF for i in range(4)]
        hi = [table[c >> 4] for c in codes]  # element 2j: the high nibble
        lo = [table[c & 0xF] for c in codes]
        assert regs["$0"] == hi[0] | (hi[1] << 16) and regs["$1"] == hi[2] | (hi[3] << 16), hex(word)
        assert regs["$2"] == lo[0] | (lo[1] << 16) and regs["$3"] == lo[2] | (lo[3] << 16), hex(word)


def test_interpreter_semantics():
    # the two byte-level primitives on hand-checked cases
    assert prmt(0x33221100, 0x77665544, 0x3210) == 0x33221100
    assert prmt(0x33221100, 0x77665544, 0x7654) == 0x77665544
    assert prmt(0x000000F0, 0, 0x4448) == 0x000000FF  # sign of byte 0 replicated; bytes 1-3 from b
    assert prmt(0x00000070, 0, 0x4448) == 0x00000000
    assert lop3(0xF0F0F0F0, 0xCCCCCCCC, 0xAAAAAAAA, 0xD8) == 0xD8D8D8D8  # c ? b : a
