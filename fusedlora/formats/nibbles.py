"""Two 4-bit codes per byte, first element in the HIGH nibble (the convention of both NF4 and INT4).

    element:   e0    e1    e2    e3   ...
    byte:     [ e0 | e1 ] [ e2 | e3 ] ...      byte j = (q[2j] << 4) | q[2j+1]
               7..4 3..0
An odd count pads the last low nibble with ``pad``.
"""

from __future__ import annotations

import torch


def pack_nibbles(q: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """uint8 codes 0..15 (any shape, flattened) -> uint8 [ceil(n/2)] bytes."""
    if q.dtype != torch.uint8:
        raise TypeError(f"q: expected dtype uint8 codes, got {q.dtype}")
    q = q.reshape(-1)
    if q.numel() % 2:
        q = torch.cat([q, q.new_full((1,), pad)])
    return (q[0::2] << 4) | q[1::2]


def unpack_nibbles(data: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 bytes (any shape, flattened) -> uint8 [n] codes; ``n`` may be one less than 2 * bytes."""
    if data.dtype != torch.uint8:
        raise TypeError(f"data: expected dtype uint8, got {data.dtype}")
    data = data.reshape(-1)
    if not 2 * data.numel() - 1 <= n <= 2 * data.numel():
        raise ValueError(f"data: expected {(n + 1) // 2} bytes for {n} codes, got {data.numel()}")
    q = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)
    return q[:n]
