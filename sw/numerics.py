"""The numerics contract, written once for numpy (golden model) and torch (reference).

``requantize`` implements, per output channel ``c``::

    v = wrap32(acc + bias[c]);  p = v * M[c]   (exact in int64: |v|, |M| <= 2**31)
    r = p if shift == 0 else sign(p) * ((|p| + 2**(shift-1)) >> shift)   # half away from 0
    y = clamp(r, 0 if relu else -128, 127)
"""

from __future__ import annotations

import numpy as np

__all__ = ["INT32_MAX", "INT32_MIN", "requantize", "round_shift", "wrap32"]

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1


def wrap32(x: np.ndarray) -> np.ndarray:
    """Two's complement wrap of int64 values to int32 (kept as int64)."""
    x = np.asarray(x, dtype=np.int64)
    return ((x + (1 << 31)) & 0xFFFF_FFFF) - (1 << 31)


def round_shift(p: np.ndarray, shift: int) -> np.ndarray:
    """Divide by ``2**shift`` rounding half away from zero (int64 in, int64 out)."""
    if not 0 <= shift <= 62:
        raise ValueError(f"shift must be 0..62, not {shift!r}")
    p = np.asarray(p, dtype=np.int64)
    if shift == 0:
        return p
    half = np.int64(1 << (shift - 1))
    mag = (np.abs(p) + half) >> np.int64(shift)
    return np.where(p < 0, -mag, mag)


def requantize(acc: np.ndarray, bias: np.ndarray, mult: np.ndarray, shift: int,
               relu: bool) -> np.ndarray:
    """Requantise int32 accumulators (channels last) to int8 per the numerics contract."""
    v = wrap32(np.asarray(acc, dtype=np.int64) + np.asarray(bias, dtype=np.int64))
    p = v * np.asarray(mult, dtype=np.int64)
    r = round_shift(p, shift)
    return np.clip(r, 0 if relu else -128, 127).astype(np.int8)
