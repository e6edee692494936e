"""The PyTorch integer reference: the oracle every other model is compared with.

Activations are int8 tensors in ``(C, H, W)`` layout (no batch dimension); weights are int8
``(Cout, Cin, KH, KW)``; biases and multipliers are int32 per output channel. Every function
computes exactly what the tile computes (``docs/architecture.md``, *Numerics*):

    acc = sum of int8 products (exact, int64)
    v = wrap32(acc + bias[c]);  p = v * M[c]
    r = p if shift == 0 else sign(p) * ((|p| + 2**(shift-1)) >> shift)
    y = clamp(r, 0 if relu else -128, 127)

Convolutions are evaluated with :func:`torch.nn.functional.conv2d` on float64, which is exact
here: every partial sum is an integer far below ``2**53`` (``|x * w| <= 2**14`` and at most
``2**38`` terms would be needed to leave the exact range).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tilewright.sw.numerics import INT32_MAX, INT32_MIN

__all__ = [
    "add_int",
    "avgpool_int",
    "conv2d_int",
    "linear_int",
    "maxpool_int",
    "requantize_t",
]


IntPair = int | Sequence[int]


# Argument checking --------------------------------------------------------------------------

def _as_tensor(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, not {type(x).__name__}")


def _int8(x: torch.Tensor | np.ndarray, name: str, ndim: int) -> torch.Tensor:
    t = _as_tensor(x, name)
    if t.dtype != torch.int8:
        raise TypeError(f"{name} must be an int8 tensor, not {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, not shape {tuple(t.shape)}")
    return t


def _per_channel(v: torch.Tensor | np.ndarray | int | Sequence[int], name: str, channels: int,
                 lo: int = INT32_MIN, hi: int = INT32_MAX) -> torch.Tensor:
    """``v`` as an int64 vector of ``channels`` values (a scalar is broadcast)."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        t = torch.full((channels,), int(v), dtype=torch.int64)
    else:
        if isinstance(v, (list, tuple)):
            v = np.asarray(v, dtype=np.int64)
        t = _as_tensor(v, name)  # type: ignore[arg-type]
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"{name} must hold integers, not {t.dtype}")
        t = t.to(torch.int64)
        if t.dim() == 0:
            t = t.expand(channels).clone()
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{name} must have shape ({channels},) (one value per channel) "
                             f"or be a scalar, not shape {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise ValueError(f"{name} values must be in {lo}..{hi}, not "
                         f"{int(t.min())}..{int(t.max())}")
    return t


def _pair(v: IntPair, name: str, lo: int) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        p = (int(v), int(v))
    elif (isinstance(v, Sequence) and len(v) == 2
          and all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in v)):
        p = (int(v[0]), int(v[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, not {v!r}")
    if min(p) < lo:
        raise ValueError(f"{name} must be at least {lo}, not {v!r}")
    return p


def _check_shift(shift: int) -> int:
    if isinstance(shift, bool) or not isinstance(shift, (int, np.integer)):
        raise TypeError(f"shift must be an int, not {shift!r}")
    if not 0 <= shift <= 62:
        raise ValueError(f"shift must be 0..62, not {shift!r}")
    return int(shift)


def _out_size(n: int, k: int, s: int, p: int, what: str) -> int:
    o = (n + 2 * p - k) // s + 1
    if n + 2 * p < k or o < 1:
        raise ValueError(f"{what}: kernel {k} does not fit the padded input {n} + 2*{p}")
    return o


# Requantisation -----------------------------------------------------------------------------

def requantize_t(acc: torch.Tensor, bias: torch.Tensor | np.ndarray | int,
                 mult: torch.Tensor | np.ndarray | int, shift: int,
                 relu: bool) -> torch.Tensor:
    """Requantise accumulators to int8 (the numerics contract, in torch).

    Parameters
    ----------
    acc : torch.Tensor
        Integer accumulators, channels FIRST: shape ``(C, ...)``. Converted to int64.
    bias, mult : torch.Tensor, numpy.ndarray or int
        Per-channel int32 bias and multiplier, shape ``(C,)`` (a scalar is broadcast).
    shift : int
        Right shift 0..62, rounding half away from zero.
    relu : bool
        Clamp at 0 instead of -128.

    Returns
    -------
    torch.Tensor
        int8, same shape as ``acc``.

    Raises
    ------
    TypeError, ValueError
        On a non-integer ``acc``, bad per-channel shapes or values, or ``shift`` out of range.
    """
    acc = _as_tensor(acc, "acc")
    if acc.dtype.is_floating_point or acc.dtype == torch.bool or acc.dtype.is_complex:
        raise TypeError(f"acc must hold integers, not {acc.dtype}")
    if acc.dim() < 1:
        raise ValueError(f"acc must have a channel dimension first, not shape "
                         f"{tuple(acc.shape)}")
    s = _check_shift(shift)
    c = acc.shape[0]
    view = (c,) + (1,) * (acc.dim() - 1)
    b = _per_channel(bias, "bias", c).view(view)
    m = _per_channel(mult, "mult", c).view(view)
    v = acc.to(torch.int64) + b
    v = ((v + (1 << 31)) & 0xFFFF_FFFF) - (1 << 31)
    p = v * m
    if s:
        mag = (p.abs() + (1 << (s - 1))) >> s
        p = torch.where(p < 0, -mag, mag)
    return p.clamp(0 if relu else -128, 127).to(torch.int8)


# Layers -------------------------------------------------------------------------------------

def conv2d_int(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | np.ndarray | int,
               mult: torch.Tensor | np.ndarray | int, shift: int, stride: IntPair = 1,
               padding: IntPair = 0, relu: bool = False) -> torch.Tensor:
    """Integer 2-D convolution with zero padding, followed by requantisation.

    Parameters
    ----------
    x : torch.Tensor
        int8 input ``(Cin, H, W)``.
    w : torch.Tensor
        int8 weights ``(Cout, Cin, KH, KW)``.
    bias, mult : torch.Tensor, numpy.ndarray or int
        int32 per output channel ``(Cout,)``.
    shift : int
        Requantisation shift 0..62.
    stride : int or (int, int)
        Stride (the tile supports equal strides 1 and 2; the reference takes any).
    padding : int or (int, int)
        Zero padding ``(ph, pw)`` on each side.
    relu : bool
        Fused ReLU.

    Returns
    -------
    torch.Tensor
        int8 ``(Cout, Ho, Wo)``.
    """
    x = _int8(x, "x", 3)
    w = _int8(w, "w", 4)
    if w.shape[1] != x.shape[0]:
        raise ValueError(f"w has {w.shape[1]} input channels but x has {x.shape[0]} "
                         f"(w shape {tuple(w.shape)}, x shape {tuple(x.shape)})")
    st = _pair(stride, "stride", 1)
    pd = _pair(padding, "padding", 0)
    _out_size(x.shape[1], w.shape[2], st[0], pd[0], "conv2d_int rows")
    _out_size(x.shape[2], w.shape[3], st[1], pd[1], "conv2d_int cols")
    acc = F.conv2d(x.to(torch.float64)[None], w.to(torch.float64), stride=st, padding=pd)[0]
    return requantize_t(acc.to(torch.int64), bias, mult, shift, relu)


def linear_int(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | np.ndarray | int,
               mult: torch.Tensor | np.ndarray | int, shift: int,
               relu: bool = False) -> torch.Tensor:
    """Integer fully connected layer: ``requantize(w @ x)``.

    Parameters
    ----------
    x : torch.Tensor
        int8 input ``(Cin,)``.
    w : torch.Tensor
        int8 weights ``(Cout, Cin)``.
    bias, mult, shift, relu
        As for :func:`conv2d_int`.

    Returns
    -------
    torch.Tensor
        int8 ``(Cout,)``.
    """
    x = _int8(x, "x", 1)
    w = _int8(w, "w", 2)
    if w.shape[1] != x.shape[0]:
        raise ValueError(f"w has {w.shape[1]} input features but x has {x.shape[0]}")
    acc = w.to(torch.int64) @ x.to(torch.int64)
    return requantize_t(acc, bias, mult, shift, relu)


def _pool_geometry(x: torch.Tensor, kernel: IntPair, stride: IntPair | None,
                   padding: IntPair, what: str
                   ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Checked int8 input and ``(kernel, stride, padding)`` pairs of a pooling op."""
    x = _int8(x, "x", 3)
    k = _pair(kernel, "kernel", 1)
    st = _pair(kernel if stride is None else stride, "stride", 1)
    pd = _pair(padding, "padding", 0)
    _out_size(x.shape[1], k[0], st[0], pd[0], f"{what} rows")
    _out_size(x.shape[2], k[1], st[1], pd[1], f"{what} cols")
    return x, k, st, pd


def maxpool_int(x: torch.Tensor, kernel: IntPair, stride: IntPair | None = None,
                padding: IntPair = 0) -> torch.Tensor:
    """Integer max pooling; the padding value is -128 (the int8 minus infinity).

    The tile requantises a max-pool with bias 0, multiplier 1 and shift 0, the identity on
    int8, so no requantisation parameters are taken.

    Parameters
    ----------
    x : torch.Tensor
        int8 ``(C, H, W)``.
    kernel : int or (int, int)
        Window ``(kh, kw)``.
    stride : int or (int, int), optional
        Defaults to ``kernel``.
    padding : int or (int, int)
        ``(ph, pw)`` on each side.

    Returns
    -------
    torch.Tensor
        int8 ``(C, Ho, Wo)``.
    """
    x, k, st, pd = _pool_geometry(x, kernel, stride, padding, "maxpool_int")
    xp = F.pad(x.to(torch.float64), (pd[1], pd[1], pd[0], pd[0]), value=-128.0)
    y = F.max_pool2d(xp[None], k, st)[0]
    return y.to(torch.int8)


def avgpool_int(x: torch.Tensor, kernel: IntPair, stride: IntPair | None = None,
                padding: IntPair = 0, mult: torch.Tensor | np.ndarray | int = 1,
                shift: int = 0) -> torch.Tensor:
    """Integer average pooling: window SUM (zero padding counted) then requantisation.

    The ``1/k`` of the average is folded into ``mult`` by the quantiser
    (:func:`tilewright.sw.quantize.quantize_avgpool`), so this is ``count_include_pad=True``
    average pooling. Bias is 0 and ReLU off. A global average pool is ``kernel = (H, W)``.

    Parameters
    ----------
    x : torch.Tensor
        int8 ``(C, H, W)``.
    kernel, stride, padding
        As for :func:`maxpool_int`.
    mult : torch.Tensor, numpy.ndarray or int
        int32 multiplier per channel ``(C,)`` or one scalar.
    shift : int
        Requantisation shift 0..62.

    Returns
    -------
    torch.Tensor
        int8 ``(C, Ho, Wo)``.
    """
    x, k, st, pd = _pool_geometry(x, kernel, stride, padding, "avgpool_int")
    xp = F.pad(x.to(torch.float64), (pd[1], pd[1], pd[0], pd[0]), value=0.0)
    acc = F.avg_pool2d(xp[None], k, st, divisor_override=1)[0]
    return requantize_t(acc.to(torch.int64), 0, mult, shift, False)


def add_int(a: torch.Tensor, b: torch.Tensor, mul_a: int, mul_b: int,
            bias: torch.Tensor | np.ndarray | int, mult: torch.Tensor | np.ndarray | int,
            shift: int, relu: bool = False) -> torch.Tensor:
    """Integer element-wise addition: ``requantize(mul_a * a + mul_b * b)``.

    Parameters
    ----------
    a, b : torch.Tensor
        int8 tensors of equal shape, channels first ``(C, ...)``.
    mul_a, mul_b : int
        int16 operand multipliers.
    bias, mult : torch.Tensor, numpy.ndarray or int
        int32 per channel ``(C,)`` or scalars.
    shift : int
        Requantisation shift 0..62.
    relu : bool
        Fused ReLU.

    Returns
    -------
    torch.Tensor
        int8, the shape of ``a``.
    """
    a = _as_tensor(a, "a")
    b = _as_tensor(b, "b")
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"a and b must be int8 tensors, not {a.dtype} and {b.dtype}")
    if a.shape != b.shape or a.dim() < 1:
        raise ValueError(f"a and b must have the same shape (channels first), not "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    for name, m in (("mul_a", mul_a), ("mul_b", mul_b)):
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
            raise TypeError(f"{name} must be an int, not {m!r}")
        if not -(1 << 15) <= m < 1 << 15:
            raise ValueError(f"{name} must be an int16 (-32768..32767), not {m!r}")
    acc = int(mul_a) * a.to(torch.int64) + int(mul_b) * b.to(torch.int64)
    return requantize_t(acc, bias, mult, shift, relu)
