"""Sums of a reduction cut into slices, added by the kernel that made them instead of a launch after it.

A kernel whose reduction runs in ``num_programs(1)`` slices stores each slice's fp32 partial tile in a
workspace through ``store_slice``: every program takes a ticket (an int32 counter per output tile,
atomically incremented with release/acquire at GPU scope after a CTA barrier, so every thread's partial is
visible first), and the program that draws the last ticket adds the slices in slice order (the same sum
every run, whichever slice finishes last) and stores the result; it then puts the counter back to 0.
Counters live in one zeroed int32 buffer per device and stream (``tickets``), grown when a launch needs
more, so no launch zeroes them. The tail costs the last program a read of every slice of its tile from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def store_slice(part, ws_ptr, slice_stride, offs, mask, ticket_ptr, out_ptr):
    """Stores this slice's fp32 partial tile ``part`` at ws_ptr + program_id(1)·slice_stride + offs (int64
    ``slice_stride``; ``mask`` over the tile). With several slices the last one of this output tile to
    arrive then stores the sum of all of them at out_ptr + offs, in out_ptr's dtype; ``ticket_ptr`` is this
    tile's counter. With one slice the partial is the result (ws_ptr is then the output)."""
    tl.store(ws_ptr + tl.program_id(1).to(tl.int64) * slice_stride + offs, part, mask=mask)
    slices = tl.num_programs(1)
    if slices > 1:
        tl.debug_barrier()  # every thread's partial stored before the ticket is taken
        if tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu") == slices - 1:
            total = tl.zeros(offs.shape, dtype=tl.float32)
            for i in range(0, slices):  # L2 reads (.cg): other programs' stores are not in this SM's L1
                total += tl.load(ws_ptr + i * slice_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(ticket_ptr, 0, sem="relaxed", scope="gpu")  # 0 again for the next launch


_TICKETS: dict = {}


def tickets(device: torch.device, count: int) -> torch.Tensor:
    """At least ``count`` int32 counters for ``store_slice`` on ``device``'s current stream, all 0 between
    launches; per stream, so concurrent launches on two streams never share one."""
    device = torch.device(device)
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    have = _TICKETS.get(key)
    if have is None or have.numel() < count:
        have = _TICKETS[key] = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
    return have
