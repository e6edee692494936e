"""The single-tile layer compiler: one layer (or a window of it) to a program and a memory image.

A :class:`TileJob` is everything one tile needs to compute an output window of a layer: the
program (64-bit words, built with :class:`tilewright.sw.asm.Program`), the initial data memory
image (``tile.dmem_bytes`` bytes) and where the int8 result lives once the tile halts.
Layouts follow ``docs/architecture.md``:

* A word is ``b = tile.block`` bytes: channels ``cg*b .. cg*b+b-1`` of one pixel.
  Activations are channel-group planes, ``word(cg, y, x) = base + cg*cg_stride +
  y*row_stride + x``. Inputs are stored padded (halo included: 0 for convolutions and
  average pools, -128 for max pools); channels are padded with zeros to a multiple of ``b``.
* Weights: per output channel group (block row), per non-zero block in ascending input-group
  order, per tap ``(kh, kw)`` row-major, one line of ``b`` words; word ``i`` of the line is
  ``w[r*b+i, cg*b:(cg+1)*b, kh, kw]``. Block rows are stored in the order of the CONV
  instructions, so the hardware's W_PTR auto-advance walks them.
* One requantisation record per op (8 words, aligned to 8): ``b`` int32 biases then ``b``
  int32 multipliers, little-endian.

Memory plan of one job (word addresses, in this order, no gaps but alignment):
requantisation records at 0, weights (aligned to ``b`` words), input planes (ADD: operand a
then operand b), output planes. Only the input channel groups that some stored block reads
are placed (a sparse layer needs fewer input planes); the CONV index words hold the position
of the group among the placed planes.

A linear layer is a 1x1 convolution on a 1x1 image: its input is ``(Cin,)`` (or
``(Cin, 1, 1)``) and its outputs here are ``(Cout, 1, 1)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tilewright.hw.config import TileConfig
from tilewright.hw.isa import INDEX_PER_WORD, Param, param_range
from tilewright.sw import reference as ref
from tilewright.sw.asm import Program
from tilewright.sw.numerics import INT32_MAX, INT32_MIN
from tilewright.sw.quantize import ConvShape, QuantAdd, QuantConv, QuantPool, block_mask

__all__ = [
    "AddLayer",
    "ConvLayer",
    "Layer",
    "OutputSpec",
    "PoolLayer",
    "TileJob",
    "Window",
    "assemble",
    "compile_layer",
    "compile_layer_tiled",
    "footprint",
    "largest_window",
    "output_shape",
    "plan_tiles",
    "reference_output",
]



def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _align(a: int, n: int) -> int:
    return _cdiv(a, n) * n


def _int(v: object, what: str, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{what} must be an int, not {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f"at least {lo}"
        raise ValueError(f"{what} must be {rng}, not {v!r}")
    return int(v)


def _pair(v: int | Sequence[int], what: str, lo: int) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        v = (v, v)
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        raise TypeError(f"{what} must be an int or a pair of ints, not {v!r}")
    return _int(v[0], what, lo), _int(v[1], what, lo)


def _stride(v: int | Sequence[int], what: str) -> int:
    sh, sw = _pair(v, what, 1)
    if sh != sw or sh not in (1, 2):
        raise ValueError(f"{what} must be 1, 2, (1, 1) or (2, 2) (equal strides the tile "
                         f"supports), not {v!r}")
    return sh


def _int_vector(v: int | np.ndarray | Sequence[int], what: str, n: int) -> np.ndarray:
    """A scalar or length-``n`` integer vector as int64 ``(n,)`` within int32."""
    a = np.asarray(v)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{what} must hold integers, not {a.dtype}")
    a = a.astype(np.int64)
    if a.ndim == 0:
        a = np.full(n, int(a), dtype=np.int64)
    if a.shape != (n,):
        raise ValueError(f"{what} must be a scalar or have shape ({n},), not {a.shape}")
    if a.size and (a.min() < INT32_MIN or a.max() > INT32_MAX):
        raise ValueError(f"{what} must fit int32, not {a.min()}..{a.max()}")
    return a


# Layer descriptions -------------------------------------------------------------------------

@dataclass
class ConvLayer(ConvShape):
    """A quantised convolution (or linear layer) in integer parameters.

    Attributes
    ----------
    weight : numpy.ndarray
        int8 ``(Cout, Cin, KH, KW)`` (a linear layer's ``(Cout, Cin)`` is reshaped).
    bias, mult : numpy.ndarray
        int32 ``(Cout,)``.
    shift : int
        0..62.
    stride : int
        1 or 2 (a pair of equal values is accepted).
    padding : (int, int)
        Zero padding ``(ph, pw)``.
    relu : bool
    is_linear : bool
        A linear layer (1x1 convolution on a 1x1 image).
    name : str
    """

    weight: np.ndarray
    bias: np.ndarray
    mult: np.ndarray
    shift: int
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = (0, 0)
    relu: bool = False
    is_linear: bool = False
    name: str = "conv"

    def __post_init__(self) -> None:
        w = np.asarray(self.weight)
        if w.ndim == 2:
            w = w[:, :, None, None]
            self.is_linear = True
        if w.ndim != 4 or w.dtype != np.int8:
            raise TypeError(f"layer {self.name!r}: weight must be int8 (Cout, Cin, KH, KW), "
                            f"not {w.dtype} shape {w.shape}")
        self.weight = w
        cout = w.shape[0]
        self.bias = _int_vector(self.bias, f"layer {self.name!r}: bias", cout)
        self.mult = _int_vector(self.mult, f"layer {self.name!r}: mult", cout)
        self.shift = _int(self.shift, f"layer {self.name!r}: shift", 0, 62)
        self.stride = _stride(self.stride, f"layer {self.name!r}: stride")
        self.padding = _pair(self.padding, f"layer {self.name!r}: padding", 0)
        if self.is_linear and (w.shape[2:] != (1, 1) or self.padding != (0, 0)):
            raise ValueError(f"layer {self.name!r}: a linear layer has a 1x1 kernel and no "
                             f"padding, not kernel {w.shape[2:]} padding {self.padding}")

    @classmethod
    def from_quant(cls, q: QuantConv, name: str = "conv") -> ConvLayer:
        """The integer layer of a :class:`~tilewright.sw.quantize.QuantConv`."""
        return cls(weight=q.weight, bias=q.bias, mult=q.mult, shift=q.shift, stride=q.stride,
                   padding=q.padding, relu=q.relu, is_linear=q.is_linear, name=name)


@dataclass
class PoolLayer:
    """A max or average pool.

    Attributes
    ----------
    kind : str
        ``"max"`` (padding -128, identity requantisation) or ``"avg"`` (window sum with zero
        padding, then ``mult``/``shift``).
    kernel : (int, int)
    stride : int
        1 or 2.
    padding : (int, int)
    mult : int or numpy.ndarray
        Average pool only: int32 multiplier, scalar or per channel. Max pool: must be 1.
    shift : int
        Average pool only; max pool: must be 0.
    name : str
    """

    kind: str
    kernel: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = (0, 0)
    mult: int | np.ndarray = 1
    shift: int = 0
    name: str = "pool"

    def __post_init__(self) -> None:
        if self.kind not in ("max", "avg"):
            raise ValueError(f"layer {self.name!r}: kind must be 'max' or 'avg', "
                             f"not {self.kind!r}")
        self.kernel = _pair(self.kernel, f"layer {self.name!r}: kernel", 1)
        self.stride = _stride(self.stride, f"layer {self.name!r}: stride")
        self.padding = _pair(self.padding, f"layer {self.name!r}: padding", 0)
        self.shift = _int(self.shift, f"layer {self.name!r}: shift", 0, 62)
        if self.kind == "max" and (np.any(np.asarray(self.mult) != 1) or self.shift != 0):
            raise ValueError(f"layer {self.name!r}: a max pool requantises with mult 1 and "
                             f"shift 0, not mult {self.mult!r} shift {self.shift!r}")

    @classmethod
    def from_quant(cls, q: QuantPool, stride: int | tuple[int, int],
                   padding: int | tuple[int, int], name: str = "pool") -> PoolLayer:
        """The layer of a :class:`~tilewright.sw.quantize.QuantPool`."""
        return cls(q.kind, q.kernel, stride, padding, q.mult, q.shift, name)


@dataclass
class AddLayer:
    """Element-wise ``requantize(mul_a*a + mul_b*b + bias)``.

    Attributes
    ----------
    mul_a, mul_b : int
        int16 operand multipliers.
    mult : int or numpy.ndarray
        int32, scalar or per channel.
    shift : int
    relu : bool
    bias : int or numpy.ndarray
        int32, scalar or per channel (0 from :func:`~tilewright.sw.quantize.quantize_add`).
    name : str
    """

    mul_a: int
    mul_b: int
    mult: int | np.ndarray
    shift: int
    relu: bool = False
    bias: int | np.ndarray = 0
    name: str = "add"

    def __post_init__(self) -> None:
        self.mul_a = _int(self.mul_a, f"layer {self.name!r}: mul_a", -(1 << 15), (1 << 15) - 1)
        self.mul_b = _int(self.mul_b, f"layer {self.name!r}: mul_b", -(1 << 15), (1 << 15) - 1)
        self.shift = _int(self.shift, f"layer {self.name!r}: shift", 0, 62)

    @classmethod
    def from_quant(cls, q: QuantAdd, name: str = "add") -> AddLayer:
        """The layer of a :class:`~tilewright.sw.quantize.QuantAdd`."""
        return cls(q.mul_a, q.mul_b, q.mult, q.shift, q.relu, 0, name)


Layer = ConvLayer | PoolLayer | AddLayer


@dataclass(frozen=True)
class Window:
    """An output window: rows ``[r0, r1)``, columns ``[c0, c1)``, channel groups ``[g0, g1)``."""

    r0: int
    r1: int
    c0: int
    c1: int
    g0: int
    g1: int

    @property
    def rows(self) -> int:
        return self.r1 - self.r0

    @property
    def cols(self) -> int:
        return self.c1 - self.c0

    @property
    def groups(self) -> int:
        return self.g1 - self.g0


@dataclass(frozen=True)
class OutputSpec:
    """Where a job's int8 output lives in the tile's data memory.

    Attributes
    ----------
    base : int
        Word address of the output region (plane 0 of the region).
    planes : int
        Channel-group planes in the region (``cg_offset + groups`` or more).
    cg_offset : int
        First plane written by this job.
    groups : int
        Planes written by this job.
    cg_stride, row_stride : int
        Words between planes and between rows.
    height, width : int
        Output window size.
    channels : int
        Real channels of the window (the last group may be partly padding).
    block : int
        Bytes per word.
    """

    base: int
    planes: int
    cg_offset: int
    groups: int
    cg_stride: int
    row_stride: int
    height: int
    width: int
    channels: int
    block: int


@dataclass
class TileJob:
    """One tile run: program, initial memory image and where its output lands.

    Attributes
    ----------
    name : str
    program : list[int]
        64-bit instruction words.
    dmem : numpy.ndarray
        uint8 initial data memory image of exactly ``tile.dmem_bytes`` bytes.
    outputs : OutputSpec
    window : Window
        The output window computed (in the layer's full output coordinates).
    out_shape : (int, int, int)
        The layer's full output ``(C, Ho, Wo)``.
    macs : int
        Dense-equivalent multiply-accumulates of the window (real channels). Pools count one
        per tap and output element, ADD two per output element.
    sparse_macs : int
        MACs the engine issues on stored blocks (channel padding included, discarded lanes
        excluded): ``nnz_blocks * b * b * KH * KW * rows * cols``; pools/ADD as ``macs`` over
        padded channels.
    nnz_blocks : int
        Stored weight blocks.
    regions : dict[str, (int, int)]
        ``name -> (first word, words)`` of the memory plan (``q``, ``w``, ``in``, ``in_b``,
        ``out``).
    params : dict[str, int]
        The SETP values of the program.
    """

    name: str
    program: list[int]
    dmem: np.ndarray
    outputs: OutputSpec
    window: Window
    out_shape: tuple[int, int, int]
    macs: int
    sparse_macs: int
    nnz_blocks: int
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)

    def region_bytes(self, name: str) -> int:
        """Bytes of one region of the memory plan (0 if absent)."""
        return self.regions.get(name, (0, 0))[1] * self.outputs.block

    def read_output(self, final_dmem: np.ndarray) -> np.ndarray:
        """The int8 output window ``(channels, height, width)`` from a final memory image."""
        o = self.outputs
        mem = np.asarray(final_dmem)
        if mem.dtype != np.uint8 or mem.shape != self.dmem.shape:
            raise ValueError(f"job {self.name!r}: final_dmem must be uint8 of shape "
                             f"{self.dmem.shape}, not {mem.dtype} {mem.shape}")
        words = mem.view(np.int8).reshape(-1, o.block)
        g = np.arange(o.cg_offset, o.cg_offset + o.groups)[:, None, None]
        y = np.arange(o.height)[None, :, None]
        x = np.arange(o.width)[None, None, :]
        addr = o.base + g * o.cg_stride + y * o.row_stride + x
        vals = words[addr]                                   # (G, H, W, b)
        out = vals.transpose(0, 3, 1, 2).reshape(o.groups * o.block, o.height, o.width)
        return np.ascontiguousarray(out[:o.channels])


# Geometry and planning ----------------------------------------------------------------------

def _in_shape(layer: Layer, shape: Sequence[int]) -> tuple[int, int, int]:
    s = tuple(int(v) for v in shape)
    if isinstance(layer, ConvLayer) and layer.is_linear and len(s) == 1:
        s = (s[0], 1, 1)
    if len(s) != 3:
        raise ValueError(f"layer {layer.name!r}: input must be (C, H, W)"
                         f"{' or (Cin,)' if isinstance(layer, ConvLayer) else ''}, "
                         f"not shape {shape}")
    if isinstance(layer, ConvLayer) and s[0] != layer.cin:
        raise ValueError(f"layer {layer.name!r}: input has {s[0]} channels but the weights "
                         f"take {layer.cin}")
    if isinstance(layer, ConvLayer) and layer.is_linear and s[1:] != (1, 1):
        raise ValueError(f"layer {layer.name!r}: a linear layer takes a (Cin,) or (Cin, 1, 1) "
                         f"input, not shape {shape}")
    return s  # type: ignore[return-value]


def _kernel_stride_pad(layer: Layer) -> tuple[tuple[int, int], int, tuple[int, int]]:
    if isinstance(layer, ConvLayer):
        return layer.kernel, layer.stride, layer.padding  # type: ignore[return-value]
    if isinstance(layer, PoolLayer):
        return layer.kernel, layer.stride, layer.padding  # type: ignore[return-value]
    return (1, 1), 1, (0, 0)


def output_shape(layer: Layer, in_shape: Sequence[int]) -> tuple[int, int, int]:
    """The layer's output ``(C, Ho, Wo)`` for an input of shape ``in_shape``.

    Raises
    ------
    ValueError
        If the (padded) input is smaller than the kernel.
    """
    c, h, w = _in_shape(layer, in_shape)
    (kh, kw), s, (ph, pw) = _kernel_stride_pad(layer)
    if h + 2 * ph < kh or w + 2 * pw < kw:
        raise ValueError(f"layer {layer.name!r}: kernel {(kh, kw)} is larger than the padded "
                         f"input {(h + 2 * ph, w + 2 * pw)}")
    cout = layer.cout if isinstance(layer, ConvLayer) else c
    return cout, (h + 2 * ph - kh) // s + 1, (w + 2 * pw - kw) // s + 1


def _full_window(out_shape: tuple[int, int, int], b: int) -> Window:
    c, ho, wo = out_shape
    return Window(0, ho, 0, wo, 0, _cdiv(c, b))


def _check_window(layer: Layer, win: Window, out_shape: tuple[int, int, int], b: int) -> None:
    c, ho, wo = out_shape
    g = _cdiv(c, b)
    if not (0 <= win.r0 < win.r1 <= ho and 0 <= win.c0 < win.c1 <= wo
            and 0 <= win.g0 < win.g1 <= g):
        raise ValueError(f"layer {layer.name!r}: window {win} is not a non-empty part of the "
                         f"output (rows 0..{ho}, cols 0..{wo}, channel groups 0..{g})")


@dataclass
class _Plan:
    """The memory plan of one job (word addresses)."""

    win: Window
    in_groups: np.ndarray            # input groups placed, in plane order
    in_rows: tuple[int, int]         # input rows [a0, a1) in padded coordinates
    in_cols: tuple[int, int]         # input cols [c0, c1) in padded coordinates
    nnz: int                         # stored weight blocks
    q_base: int
    q_words: int
    w_base: int
    w_words: int
    in_base: int
    in_words: int
    b_base: int
    out_base: int
    out_words: int
    out_planes: int
    cg_offset: int
    prog_words: int

    @property
    def total_words(self) -> int:
        return self.out_base + self.out_words


_N_SETP = 14
_N_SETP_ADD = 17


def _plan(layer: Layer, win: Window, tile: TileConfig, mask: np.ndarray | None,
          cg_offset: int = 0, out_planes: int | None = None) -> _Plan:
    """Plan one job; ``mask`` is the layer's block mask (CONV) at ``tile.block``."""
    b = tile.block
    (kh, kw), s, _ = _kernel_stride_pad(layer)
    nrows = win.groups
    if isinstance(layer, ConvLayer):
        assert mask is not None
        sub = mask[win.g0:win.g1]
        per_row = sub.sum(axis=1)
        nnz = int(per_row.sum())
        in_groups = np.flatnonzero(sub.any(axis=0))
        op_words = nrows + int(((per_row + INDEX_PER_WORD - 1) // INDEX_PER_WORD).sum())
    else:
        nnz = 0
        in_groups = np.arange(win.g0, win.g1)
        op_words = nrows
    a0, a1 = win.r0 * s, (win.r1 - 1) * s + kh
    c0, c1 = win.c0 * s, (win.c1 - 1) * s + kw
    plane = (a1 - a0) * (c1 - c0)
    q_words = nrows * tile.qrec_words
    w_base = _align(q_words, b)
    w_words = nnz * kh * kw * b
    in_base = w_base + w_words
    in_words = len(in_groups) * plane
    b_base = in_base + in_words
    out_base = b_base + in_words if isinstance(layer, AddLayer) else b_base
    planes = cg_offset + nrows if out_planes is None else out_planes
    out_words = planes * win.rows * win.cols
    nsetp = _N_SETP_ADD if isinstance(layer, AddLayer) else _N_SETP
    return _Plan(win, in_groups, (a0, a1), (c0, c1), nnz, 0, q_words, w_base, w_words,
                 in_base, in_words, b_base, out_base, out_words, planes, cg_offset,
                 nsetp + op_words + 1)


def _fits(p: _Plan, tile: TileConfig) -> bool:
    return p.total_words <= tile.dmem_words and p.prog_words <= tile.pmem_words


def _layer_mask(layer: Layer, b: int) -> np.ndarray | None:
    return block_mask(layer.weight, b) if isinstance(layer, ConvLayer) else None


def footprint(layer: Layer, in_shape: Sequence[int], tile: TileConfig,
              window: Window | None = None) -> dict[str, int]:
    """Bytes of data memory (per region) and program words one job of ``window`` needs.

    Returns
    -------
    dict[str, int]
        ``q``, ``w``, ``in`` (all input operands), ``out``, ``total`` (bytes, alignment
        included), ``program_words``, ``dmem_bytes`` (what the tile has).
    """
    shp = _in_shape(layer, in_shape)
    oshape = output_shape(layer, shp)
    win = window if window is not None else _full_window(oshape, tile.block)
    _check_window(layer, win, oshape, tile.block)
    p = _plan(layer, win, tile, _layer_mask(layer, tile.block))
    b = tile.block
    return {"q": p.q_words * b, "w": p.w_words * b, "in": (p.out_base - p.in_base) * b,
            "out": p.out_words * b, "total": p.total_words * b, "program_words": p.prog_words,
            "dmem_bytes": tile.dmem_bytes}


# Building a job -----------------------------------------------------------------------------

def _to_numpy_int8(x: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{what} must be a torch.Tensor or numpy array, not {type(x).__name__}")
    if x.dtype != np.int8:
        raise TypeError(f"{what} must be int8, not {x.dtype}")
    return x


def _input_slab(x: np.ndarray, groups: list[int], b: int, rows: tuple[int, int],
                cols: tuple[int, int], pad: tuple[int, int], pad_value: int) -> np.ndarray:
    """Input planes ``(n, rows, cols, b)`` int8 for padded coordinates ``rows``, ``cols``."""
    c, h, w = x.shape
    a0, a1 = rows
    c0, c1 = cols
    ph, pw = pad
    slab = np.full((len(groups), b, a1 - a0, c1 - c0), pad_value, dtype=np.int8)
    # real-image part of the window
    y0, y1 = max(a0 - ph, 0), min(a1 - ph, h)
    x0, x1 = max(c0 - pw, 0), min(c1 - pw, w)
    for k, g in enumerate(groups):
        ch0, ch1 = g * b, min(g * b + b, c)
        slab[k, ch1 - ch0:] = 0                            # channel padding
        if y1 > y0 and x1 > x0 and ch1 > ch0:
            slab[k, :ch1 - ch0, y0 + ph - a0:y1 + ph - a0, x0 + pw - c0:x1 + pw - c0] = \
                x[ch0:ch1, y0:y1, x0:x1]
    return slab.transpose(0, 2, 3, 1)


def _qrecords(bias: np.ndarray, mult: np.ndarray, rows: list[int], b: int,
              qrec_words: int) -> np.ndarray:
    """uint8 bytes of the requantisation records of ``rows`` (output channel groups)."""
    c = bias.shape[0]
    out = np.zeros((len(rows), qrec_words * b), dtype=np.uint8)
    for k, r in enumerate(rows):
        bb = np.zeros(b, dtype="<i4")
        mm = np.zeros(b, dtype="<i4")
        n = max(0, min(b, c - r * b))
        bb[:n] = bias[r * b:r * b + n]
        mm[:n] = mult[r * b:r * b + n]
        out[k, :4 * b] = bb.view(np.uint8)
        out[k, 4 * b:8 * b] = mm.view(np.uint8)
    return out.reshape(-1)


def _weight_lines(w: np.ndarray, g0: int, blocks: list[list[int]], b: int) -> np.ndarray:
    """uint8 bytes of the weight lines of block rows ``g0, g0+1, ...`` (module docstring)."""
    _, cin, kh, kw = w.shape
    sub = np.zeros((len(blocks) * b, _cdiv(cin, b) * b, kh, kw), dtype=np.int8)
    part = w[g0 * b:(g0 + len(blocks)) * b]
    sub[:part.shape[0], :cin] = part
    lines = [sub[k * b:(k + 1) * b, j * b:(j + 1) * b].transpose(2, 3, 0, 1).reshape(-1)
             for k, bl in enumerate(blocks) for j in bl]      # taps, word i, byte k
    if not lines:
        return np.zeros(0, dtype=np.uint8)
    return np.concatenate(lines).view(np.uint8)


def compile_layer(layer: Layer, x: torch.Tensor | np.ndarray, tile: TileConfig, *,
                  x_b: torch.Tensor | np.ndarray | None = None, window: Window | None = None,
                  out_cg_offset: int = 0, out_planes: int | None = None,
                  name: str | None = None) -> TileJob:
    """Compile one layer, or one output window of it, into a :class:`TileJob`.

    Parameters
    ----------
    layer : ConvLayer, PoolLayer or AddLayer
    x : torch.Tensor or numpy.ndarray
        The whole int8 input ``(C, H, W)`` (linear: ``(Cin,)``); the job takes its window.
    tile : TileConfig
    x_b : torch.Tensor or numpy.ndarray, optional
        ADD only: the second operand, the shape of ``x``.
    window : Window, optional
        Output rows, columns and channel groups to compute (default: all).
    out_cg_offset : int
        Write the output starting at this channel-group plane of the output region (a
        concatenation of several layers' outputs, as in Inception blocks).
    out_planes : int, optional
        Planes of the output region (default ``out_cg_offset + window groups``).
    name : str, optional
        Job name (default: the layer's name, with the window when it is not the whole layer).

    Returns
    -------
    TileJob

    Raises
    ------
    TypeError, ValueError
        On bad arguments, parameters the tile cannot encode, or a job that does not fit the
        data or program memory (the message gives bytes needed and available).
    """
    if not isinstance(tile, TileConfig):
        raise TypeError(f"tile must be a TileConfig, not {tile!r}")
    if not isinstance(layer, (ConvLayer, PoolLayer, AddLayer)):
        raise TypeError(f"layer must be a ConvLayer, PoolLayer or AddLayer, "
                        f"not {type(layer).__name__}")
    b = tile.block
    xa = _to_numpy_int8(x, f"layer {layer.name!r}: input x")
    shp = _in_shape(layer, xa.shape)
    xa = xa.reshape(shp)
    xb = None
    if isinstance(layer, AddLayer):
        if x_b is None:
            raise ValueError(f"layer {layer.name!r}: an ADD needs the second operand x_b")
        xb = _to_numpy_int8(x_b, f"layer {layer.name!r}: input x_b")
        if xb.shape != xa.shape:
            raise ValueError(f"layer {layer.name!r}: x_b has shape {xb.shape}, x has "
                             f"{xa.shape}; they must be equal")
    elif x_b is not None:
        raise ValueError(f"layer {layer.name!r}: x_b is for ADD layers only")
    oshape = output_shape(layer, shp)
    win = window if window is not None else _full_window(oshape, b)
    if not isinstance(win, Window):
        raise TypeError(f"window must be a Window, not {win!r}")
    _check_window(layer, win, oshape, b)
    out_cg_offset = _int(out_cg_offset, f"layer {layer.name!r}: out_cg_offset", 0)
    if out_planes is not None:
        out_planes = _int(out_planes, f"layer {layer.name!r}: out_planes",
                          out_cg_offset + win.groups)
    return _compile_window(layer, xa, xb, oshape, win, tile, _layer_mask(layer, b),
                           out_cg_offset, out_planes, name)


def _compile_window(layer: Layer, xa: np.ndarray, xb: np.ndarray | None,
                    oshape: tuple[int, int, int], win: Window, tile: TileConfig,
                    mask: np.ndarray | None, out_cg_offset: int, out_planes: int | None,
                    name: str | None) -> TileJob:
    """:func:`compile_layer` after argument checks (``mask``: the layer's block mask)."""
    b = tile.block
    p = _plan(layer, win, tile, mask, out_cg_offset, out_planes)
    jname = name if name is not None else (
        layer.name if win == _full_window(oshape, b) else
        f"{layer.name}[r{win.r0}:{win.r1},c{win.c0}:{win.c1},g{win.g0}:{win.g1}]")
    if p.total_words > tile.dmem_words:
        raise ValueError(
            f"layer {layer.name!r} window {win}: needs {p.total_words * b} bytes of data "
            f"memory (requantisation {p.q_words * b}, weights {p.w_words * b}, input "
            f"{(p.out_base - p.in_base) * b}, output {p.out_words * b}, alignment "
            f"{(p.w_base - p.q_words) * b}) but the tile has {tile.dmem_bytes}; use a smaller "
            f"window or compile_layer_tiled")
    if p.prog_words > tile.pmem_words:
        raise ValueError(f"layer {layer.name!r} window {win}: the program needs "
                         f"{p.prog_words} words but program memory holds {tile.pmem_words}; "
                         f"use fewer output channel groups per job")

    # memory image ---------------------------------------------------------------------------
    mem = np.zeros(tile.dmem_bytes, dtype=np.uint8)
    (kh, kw), s, pad = _kernel_stride_pad(layer)
    cout = oshape[0]
    if isinstance(layer, ConvLayer):
        bias, mult = layer.bias, layer.mult
    elif isinstance(layer, PoolLayer):
        bias = np.zeros(cout, dtype=np.int64)
        mult = _int_vector(layer.mult, f"layer {layer.name!r}: mult", cout)
    else:
        bias = _int_vector(layer.bias, f"layer {layer.name!r}: bias", cout)
        mult = _int_vector(layer.mult, f"layer {layer.name!r}: mult", cout)
    rows = list(range(win.g0, win.g1))
    blocks = ([np.flatnonzero(mask[r]).tolist() for r in rows] if mask is not None
              else [[] for _ in rows])
    q = _qrecords(bias, mult, rows, b, tile.qrec_words)
    mem[p.q_base * b:p.q_base * b + q.size] = q
    if isinstance(layer, ConvLayer):
        wl = _weight_lines(layer.weight, win.g0, blocks, b)
        assert wl.size == p.w_words * b
        mem[p.w_base * b:p.w_base * b + wl.size] = wl
    pad_value = -128 if isinstance(layer, PoolLayer) and layer.kind == "max" else 0
    operands = [(p.in_base, xa)] + ([(p.b_base, xb)] if xb is not None else [])
    for base, arr in operands:
        slab = _input_slab(arr, p.in_groups.tolist(), b, p.in_rows, p.in_cols, pad, pad_value)
        raw = slab.reshape(-1).view(np.uint8)
        mem[base * b:base * b + raw.size] = raw

    # program --------------------------------------------------------------------------------
    in_row = p.in_cols[1] - p.in_cols[0]
    in_cg = (p.in_rows[1] - p.in_rows[0]) * in_row
    out_cg = win.rows * win.cols
    words_max = tile.dmem_words - 1
    params: dict[str, int] = {
        "IN_BASE": p.in_base if p.in_words else 0,
        "IN_ROW": in_row,
        "IN_CG": in_cg,
        "OUT_BASE": p.out_base + out_cg_offset * out_cg,
        "OUT_ROW": win.cols,
        "OUT_CG": out_cg,
        "HO": win.rows,
        "WO": win.cols,
        "KH": kh,
        "KW": kw,
        "STRIDE": s,
        "W_PTR": p.w_base if p.w_words else 0,
        "Q_PTR": p.q_base,
        "SHIFT": layer.shift,
    }
    if isinstance(layer, AddLayer):
        params.update(B_BASE=p.b_base, MUL_A=layer.mul_a, MUL_B=layer.mul_b)
    # the last op advances OUT_BASE past the region: only the value SETP writes is checked
    for key, v in params.items():
        rng = param_range(Param[key], tile)
        if not rng.accepts(v):
            raise ValueError(f"layer {layer.name!r} window {win}: parameter {key} = {v} is "
                             f"outside what the tile accepts ({rng.describe()}; data memory "
                             f"has {words_max + 1} words)")
    prog = Program().setps(**params)
    relu = bool(getattr(layer, "relu", False))
    if isinstance(layer, ConvLayer):
        pos = {int(g): k for k, g in enumerate(p.in_groups)}
        for bl in blocks:
            prog.conv([pos[j] for j in bl], relu=relu)
    else:
        emit = {"max": prog.maxpool, "avg": prog.avgpool}[layer.kind] \
            if isinstance(layer, PoolLayer) else prog.add
        for k in range(len(rows)):
            emit(k, relu=relu)
    prog.halt()
    assert len(prog.words) == p.prog_words

    # metadata -------------------------------------------------------------------------------
    ch0 = win.g0 * b
    channels = min(cout, win.g1 * b) - ch0
    npix = win.rows * win.cols
    nnz = p.nnz
    if isinstance(layer, ConvLayer):
        macs = npix * channels * layer.cin * kh * kw
        sparse = npix * nnz * b * b * kh * kw
    elif isinstance(layer, PoolLayer):
        macs, sparse = npix * channels * kh * kw, npix * win.groups * b * kh * kw
    else:
        macs, sparse = 2 * npix * channels, 2 * npix * win.groups * b
    regions = {"q": (p.q_base, p.q_words), "w": (p.w_base, p.w_words),
               "in": (p.in_base, p.in_words)}
    if isinstance(layer, AddLayer):
        regions["in_b"] = (p.b_base, p.in_words)
    regions["out"] = (p.out_base, p.out_words)
    spec = OutputSpec(base=p.out_base, planes=p.out_planes, cg_offset=out_cg_offset,
                      groups=win.groups, cg_stride=out_cg, row_stride=win.cols,
                      height=win.rows, width=win.cols, channels=channels, block=b)
    return TileJob(name=jname, program=list(prog.words), dmem=mem, outputs=spec, window=win,
                   out_shape=oshape, macs=macs, sparse_macs=sparse, nnz_blocks=nnz,
                   regions=regions, params=params)


# Tiling -------------------------------------------------------------------------------------

def _bisect_max(ok: Callable[[int], bool], hi: int) -> int:
    """The largest ``v`` in ``1..hi`` with ``ok(v)`` for a monotone ``ok`` (0: none)."""
    if not ok(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _chunk_windows(layer: Layer, g0: int, g1: int, ho: int, wo: int, tile: TileConfig,
                   mask: np.ndarray | None) -> tuple[int, list[Window]] | None:
    """The best split of output groups ``[g0, g1)`` into windows: (words moved, windows).

    Strips of as many full-width rows as fit; when not one full row fits, the ``r x c``
    windows that move the fewest words. None when not one output pixel fits.
    """
    def size(r: int, c: int) -> _Plan:
        return _plan(layer, Window(0, r, 0, c, g0, g1), tile, mask)

    rows = _bisect_max(lambda r: _fits(size(r, wo), tile), ho)
    if rows:
        wins = [Window(r0, min(r0 + rows, ho), 0, wo, g0, g1) for r0 in range(0, ho, rows)]
        last = size(wins[-1].rows, wo).total_words
        return size(rows, wo).total_words * (len(wins) - 1) + last, wins
    best: tuple[tuple[int, int], int, int] | None = None
    for r in range(1, ho + 1):
        c = _bisect_max(lambda c, r=r: _fits(size(r, c), tile), wo)
        if not c:
            break
        n = _cdiv(ho, r) * _cdiv(wo, c)
        key = (n * size(r, c).total_words, n)
        if best is None or key < best[0]:
            best = (key, r, c)
    if best is None:
        return None
    (cost, _), r, c = best
    return cost, [Window(r0, min(r0 + r, ho), c0, min(c0 + c, wo), g0, g1)
                  for r0 in range(0, ho, r) for c0 in range(0, wo, c)]


def largest_window(layer: Layer, tile: TileConfig, in_shape: Sequence[int]) -> int:
    """The largest number of full-width output rows, all output channels, that one job fits.

    Parameters
    ----------
    layer : ConvLayer, PoolLayer or AddLayer
    tile : TileConfig
    in_shape : sequence of int
        The layer's input shape ``(C, H, W)``.

    Returns
    -------
    int
        Rows (at most the output height); 0 when not even one row fits.
    """
    shp = _in_shape(layer, in_shape)
    c, ho, wo = output_shape(layer, shp)
    mask = _layer_mask(layer, tile.block)
    g = _cdiv(c, tile.block)
    return _bisect_max(lambda r: _fits(_plan(layer, Window(0, r, 0, wo, 0, g), tile, mask),
                                       tile), ho)


def plan_tiles(layer: Layer, in_shape: Sequence[int], tile: TileConfig) -> list[Window]:
    """Split a layer into output windows that each fit one tile job.

    The output channel groups are split into ``n`` chunks of (nearly) equal size, each chunk
    into strips of as many full-width rows as fit (or, when not one full row fits, into the
    rows x columns windows that move the fewest words). ``n`` is chosen to minimise the data
    moved into and out of the tile over all jobs (every job reloads its weights and
    requantisation records, every chunk the input), then the number of jobs.

    Returns
    -------
    list[Window]
        Covering the output exactly once.

    Raises
    ------
    ValueError
        If not even one output pixel of one channel group fits (e.g. a block row whose
        weights exceed the data memory: the ISA has no partial sums to split input channels).
    """
    if not isinstance(tile, TileConfig):
        raise TypeError(f"tile must be a TileConfig, not {tile!r}")
    shp = _in_shape(layer, in_shape)
    c, ho, wo = output_shape(layer, shp)
    b = tile.block
    ngroups = _cdiv(c, b)
    mask = _layer_mask(layer, b)
    full = Window(0, ho, 0, wo, 0, ngroups)
    if _fits(_plan(layer, full, tile, mask), tile):
        return [full]
    best: tuple[tuple[int, int], list[Window]] | None = None
    # one candidate per largest chunk size: the fewest chunks that reach it
    for n in sorted({_cdiv(ngroups, size) for size in range(1, ngroups + 1)}):
        bounds = [k * ngroups // n for k in range(n + 1)]
        wins: list[Window] = []
        cost = 0
        single = True
        for g0, g1 in itertools.pairwise(bounds):
            res = _chunk_windows(layer, g0, g1, ho, wo, tile, mask)
            if res is None:
                break
            cost += res[0]
            wins += res[1]
            single = single and len(res[1]) == 1
        else:
            key = (cost, len(wins))
            if best is None or key < best[0]:
                best = (key, wins)
            if single:
                break           # more chunks would only reload the input more often
    if best is None:
        one = _plan(layer, Window(0, 1, 0, 1, 0, 1), tile, mask)
        raise ValueError(f"layer {layer.name!r}: even one output pixel of one channel group "
                         f"needs {one.total_words * b} bytes of data memory and "
                         f"{one.prog_words} program words; the tile has {tile.dmem_bytes} "
                         f"bytes and {tile.pmem_words} words (a block row's weights must fit "
                         f"one tile: prune the layer or use a larger tile)")
    return best[1]


def compile_layer_tiled(layer: Layer, x: torch.Tensor | np.ndarray, tile: TileConfig, *,
                        x_b: torch.Tensor | np.ndarray | None = None) -> list[TileJob]:
    """Compile a whole layer as one or several tile jobs (see :func:`plan_tiles`).

    Returns
    -------
    list[TileJob]
        Run each, then :func:`assemble` their final memory images.
    """
    xa = _to_numpy_int8(x, f"layer {getattr(layer, 'name', '?')!r}: input x")
    wins = plan_tiles(layer, xa.shape, tile)
    first = compile_layer(layer, xa, tile, x_b=x_b, window=wins[0])   # checks the arguments
    if len(wins) == 1:
        return [first]
    shp = _in_shape(layer, xa.shape)
    xa = xa.reshape(shp)
    xb = None if x_b is None else _to_numpy_int8(x_b, "x_b")
    oshape = output_shape(layer, shp)
    mask = _layer_mask(layer, tile.block)
    return [first] + [_compile_window(layer, xa, xb, oshape, w, tile, mask, 0, None, None)
                      for w in wins[1:]]


def assemble(jobs: Sequence[TileJob], final_dmems: Sequence[np.ndarray]) -> np.ndarray:
    """The full int8 output ``(C, Ho, Wo)`` of a layer from its jobs' final memory images.

    Raises
    ------
    ValueError
        If the lists differ in length, the jobs are of different layers, or the windows do
        not cover the output.
    """
    if len(jobs) != len(final_dmems) or not jobs:
        raise ValueError(f"assemble needs one final image per job and at least one job, not "
                         f"{len(jobs)} jobs and {len(final_dmems)} images")
    shape = jobs[0].out_shape
    out = np.zeros(shape, dtype=np.int8)
    seen = np.zeros(shape, dtype=bool)
    for job, mem in zip(jobs, final_dmems, strict=True):
        if job.out_shape != shape:
            raise ValueError(f"job {job.name!r} has output shape {job.out_shape}, not "
                             f"{shape} like job {jobs[0].name!r}")
        w = job.window
        y = job.read_output(mem)
        c0 = w.g0 * job.outputs.block
        out[c0:c0 + y.shape[0], w.r0:w.r1, w.c0:w.c1] = y
        seen[c0:c0 + y.shape[0], w.r0:w.r1, w.c0:w.c1] = True
    if not seen.all():
        c, yy, xx = np.argwhere(~seen)[0]
        raise ValueError(f"the jobs do not cover the output {shape}: element "
                         f"(c={c}, y={yy}, x={xx}) is missing")
    return out


def reference_output(layer: Layer, x: torch.Tensor | np.ndarray,
                     x_b: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """The PyTorch integer reference (:mod:`tilewright.sw.reference`) of a whole layer.

    Returns
    -------
    numpy.ndarray
        int8 ``(C, Ho, Wo)`` (linear layers ``(Cout, 1, 1)``), as :func:`assemble` gives.
    """
    xa = _to_numpy_int8(x, f"layer {getattr(layer, 'name', '?')!r}: input x")
    shp = _in_shape(layer, xa.shape)
    xt = torch.from_numpy(np.ascontiguousarray(xa.reshape(shp)))
    if isinstance(layer, ConvLayer):
        y = ref.conv2d_int(xt, torch.from_numpy(layer.weight), layer.bias, layer.mult,
                           layer.shift, layer.stride, layer.padding, layer.relu)
    elif isinstance(layer, PoolLayer):
        if layer.kind == "max":
            y = ref.maxpool_int(xt, layer.kernel, layer.stride, layer.padding)
        else:
            y = ref.avgpool_int(xt, layer.kernel, layer.stride, layer.padding,
                                _int_vector(layer.mult, f"layer {layer.name!r}: mult",
                                            shp[0]), layer.shift)
    elif isinstance(layer, AddLayer):
        if x_b is None:
            raise ValueError(f"layer {layer.name!r}: an ADD needs the second operand x_b")
        xb = _to_numpy_int8(x_b, f"layer {layer.name!r}: input x_b")
        y = ref.add_int(xt, torch.from_numpy(np.ascontiguousarray(xb)), layer.mul_a,
                        layer.mul_b, _int_vector(layer.bias, "bias", shp[0]),
                        _int_vector(layer.mult, "mult", shp[0]), layer.shift, layer.relu)
    else:
        raise TypeError(f"layer must be a ConvLayer, PoolLayer or AddLayer, "
                        f"not {type(layer).__name__}")
    return y.numpy()
