"""NF4, byte for byte the bitsandbytes format, and its double quantization of the block scales.

Layout (W[N, K] flattened row-major, i = n*K + k; ``nibbles`` draws the byte):

    flat element  i:   0    1    2    3   ...  B-1 | B  ...             B = blocksize (64, 128, 256)
    byte          i>>1: [ q0 | q1 ] [ q2 | q3 ] ... | ...                 high nibble = even i
    absmax        i//B: absmax[0]                   | absmax[1] ...     last block may be partial

    W[i] = cast(float32(CODE[q_i]) * absmax[i // B])

Blocks run over the flat index, so a block may cross rows and a row may start in the middle of a byte
(when K is odd). How kernels read it:
- a K-tiled GEMM reading W[n, k0:k0+BK] computes i = n*K + k per element, loads byte i >> 1 and
  shifts by 4 * (1 - (i & 1)); the scale is absmax[i // B]. With K even (all real layers) a row starts
  on a byte boundary and BK/2 consecutive bytes hold the tile row.
- a 16-byte-load GEMV/dequant reads 32 consecutive codes per load. B is a multiple of 32, so an aligned
  16-byte load never straddles two blocks: one absmax per load.

Double quantization (bitsandbytes ``compress_statistics``): with offset = mean(absmax),
absmax - offset is quantized blockwise in blocks of 256 against the 256-entry signed dynamic map, so
    absmax[b] = float32(nested_code[qa[b]] * nested_absmax[b // 256]) + offset      (two fp32 roundings)

Quantization rules (those of bitsandbytes 0.50 on the CPU, checked against it in the tests):
- NF4: per block absmax = max|w| (in fp32); full blocks are scaled by w * (1 / absmax), the trailing
  partial block by w / absmax; the code is the nearest one, a tie going to the lower code.
- the 8-bit absmax codes: the scaled value v = (absmax - offset) * (1 / nested_absmax) is first snapped
  to a 65536-point grid on [-1, 1], j = trunc((v + 1) / 2 * 65535 + 0.5), and grid point j takes the
  nearest code of -1 + 2j/65535 (a tie going to the lower code). A block whose absmax is 0 gets code 0.
"""

from __future__ import annotations

import functools

import torch

from .nibbles import pack_nibbles, unpack_nibbles
from .packed import BLOCKSIZES, NESTED_BLOCKSIZE, Packed4bit, check_finite_weight

NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
ZERO_CODE = 7  # the code of 0.0: what pads the low nibble of the last byte when N*K is odd
_LUT_SIZE = 65536


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values as float32, index = 4-bit code."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=1)
def _dynamic_map_cpu() -> torch.Tensor:
    # Signed dynamic map, 8 bits: one sign bit, then for exponent e = 0..6 the 2**e midpoints of a
    # float32 linspace(0.1, 1, 2**e + 1), times +-10**(e - 6) in float32 arithmetic; plus 0 and 1.0.
    # 2 * (1 + 2 + ... + 64) + 2 = 256 values, sorted.
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (e - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted float32 values), the double-quant code book."""
    return _dynamic_map_cpu().to(device)


def _scale_blocks(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w scaled into [-1, 1] per block, fp32 absmax per block); the NF4 rule described above."""
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].view(-1, blocksize)
    absmax = head.abs().amax(dim=1)
    scaled = [(head * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)]
    if full < n:
        tail_max = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled.append((flat[full:] / tail_max).clamp(-1, 1))
    return torch.cat(scaled), absmax


def _nearest_code(v: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted ``code`` (fp32 midpoints; a tie goes to the lower)."""
    mids = (code[:-1] + code[1:]) / 2
    return torch.bucketize(v, mids).to(torch.uint8)


def quantize_nf4_codes(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes [numel], fp32 absmax [n_blocks]) of ``w`` flattened."""
    scaled, absmax = _scale_blocks(w, blocksize)
    return _nearest_code(scaled, nf4_code(w.device)), absmax


@functools.lru_cache(maxsize=4)
def _grid_codes_cpu() -> torch.Tensor:
    # The code of each of the 65536 grid points on [-1, 1] (float32 arithmetic, as in the rule above).
    j = torch.arange(_LUT_SIZE, dtype=torch.float32)
    points = -1.0 + (2.0 * j) / float(_LUT_SIZE - 1)
    code = _dynamic_map_cpu()
    mids = 0.5 * (code[:-1] + code[1:])
    # "nearest, tie to lower": the number of midpoints strictly below the point
    return torch.searchsorted(mids, points, right=False).to(torch.uint8)


def quantize_absmax_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """Blockwise 8-bit quantization of fp32 ``x`` [n] -> (uint8 codes [n], fp32 absmax [ceil(n/blocksize)])."""
    x = x.float().reshape(-1)
    n = x.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(x, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    v = (blocks * inv.unsqueeze(1)).clamp(-1.0, 1.0)
    # j = trunc((v + 1) * 0.5 * 65535 + 0.5): the product-add is done in float64 and rounded once to
    # fp32, which is what a fused multiply-add computes (and what bitsandbytes' CPU build does).
    half = ((v + 1.0) * 0.5).double()
    j = (half * float(_LUT_SIZE - 1) + 0.5).float().to(torch.int64)
    q = _grid_codes_cpu().to(x.device)[j]
    q = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(q), q)
    return q.reshape(-1)[:n], absmax


def double_quantize(absmax: torch.Tensor):
    """fp32 absmax [n_blocks] -> (uint8 qa, fp32 nested_absmax, fp32 nested_code [256], float offset)."""
    offset = absmax.mean()
    qa, nested_absmax = quantize_absmax_8bit(absmax - offset, NESTED_BLOCKSIZE)
    return qa, nested_absmax, dynamic_map(absmax.device), float(offset)


def decode_absmax(packed: Packed4bit) -> torch.Tensor:
    """The fp32 absmax per block of an NF4 weight, decoding the double quantization if present."""
    if not packed.double_quant:
        return packed.absmax.float()
    blk = torch.arange(packed.absmax.numel(), device=packed.absmax.device) // NESTED_BLOCKSIZE
    a = packed.nested_code.float()[packed.absmax.long()] * packed.nested_absmax.float()[blk]
    return a + packed.nested_offset


def check_nf4_args(shape, blocksize: int) -> None:
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape: expected a 2-D weight [N, K] with N, K >= 1, got {tuple(shape)}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize: expected one of {BLOCKSIZES}, got {blocksize}")


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> Packed4bit:
    """NF4-quantize a 2-D bf16/fp16/fp32 weight exactly as bitsandbytes does (see the module docstring)."""
    check_nf4_input(w, blocksize)
    data, absmax = quantize_nf4_bytes(w, blocksize)
    return assemble_nf4(data, absmax, tuple(w.shape), blocksize, double_quant)


def check_nf4_input(w, blocksize: int) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"w: expected dtype bfloat16, float16 or float32, got {w.dtype}")
    check_nf4_args(tuple(w.shape), blocksize)
    check_finite_weight(w)


def quantize_nf4_bytes(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 data [ceil(numel/2), 1], fp32 absmax [n_blocks]): the packed codes and plain block scales."""
    q, absmax = quantize_nf4_codes(w, blocksize)
    return pack_nibbles(q, pad=ZERO_CODE).unsqueeze(1), absmax


def assemble_nf4(data, absmax, shape, blocksize: int, double_quant: bool) -> Packed4bit:
    """A Packed4bit from packed bytes and fp32 absmax, double-quantizing the absmax if asked."""
    shape = (int(shape[0]), int(shape[1]))
    if not double_quant:
        return Packed4bit("nf4", data, shape, blocksize, absmax=absmax)
    qa, nested_absmax, nested_code, offset = double_quantize(absmax)
    return Packed4bit(
        "nf4", data, shape, blocksize, absmax=qa, nested_absmax=nested_absmax, nested_code=nested_code,
        nested_offset=offset,
    )


def dequantize_nf4(packed: Packed4bit, dtype: torch.dtype) -> torch.Tensor:
    """The plain-torch oracle: W[N, K] in ``dtype`` (fp32 products, one rounding into ``dtype``)."""
    n, k = packed.shape
    q = unpack_nibbles(packed.data, n * k)
    absmax = decode_absmax(packed)
    blk = torch.arange(n * k, device=q.device) // packed.block
    w = nf4_code(q.device)[q.long()] * absmax[blk]
    return w.to(dtype).view(n, k)
