"""Which implementation of an op runs: one table, filled by the op modules, read at call time.

An op name maps to implementations per backend family. The ``cuda`` family uses the extension's kernel
where one is registered and the Triton kernel otherwise (by design: hand-written CUDA exists only where
it beats Triton, see DESIGN.md); the other families use exactly their own implementation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .backend import backend

_IMPLS: dict[str, dict[str, Callable]] = {}
_SEARCH = {"cuda": ("cuda", "triton"), "triton": ("triton",), "reference": ("reference",)}


def register(op: str, family: str):
    """Decorator: ``fn`` implements ``op`` for ``family``."""

    def wrap(fn: Callable) -> Callable:
        table = _IMPLS.setdefault(op, {})
        if family in table:
            raise RuntimeError(f"op {op!r} already has a {family!r} implementation")
        table[family] = fn
        return fn

    return wrap


def select(op: str, device: torch.device, dtype: torch.dtype | None = None) -> tuple[str, Callable]:
    """(family, implementation) that runs ``op`` for tensors of ``dtype`` on ``device``."""
    family = "reference" if dtype == torch.float64 else backend(device)
    table = _IMPLS.get(op)
    if table is None:
        raise KeyError(f"unknown op {op!r}; known: {sorted(_IMPLS)}")
    for name in _SEARCH[family]:
        if name in table:
            return name, table[name]
    raise NotImplementedError(f"op {op!r} has no implementation in the {family!r} backend family")


def implementation(op: str, family: str) -> Callable:
    """The implementation ``family`` registered for ``op`` (no fallback)."""
    try:
        return _IMPLS[op][family]
    except KeyError:
        raise NotImplementedError(f"op {op!r} has no {family!r} implementation") from None


def implementations(op: str) -> tuple[str, ...]:
    return tuple(_IMPLS.get(op, {}))
