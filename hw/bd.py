"""Buffer descriptors (BDs) of the datamover channels: one definition for RTL, model and encoder.

A BD describes one multi-dimensional transfer between a memory and a stream. :data:`BD_LAYOUT`
is its bit layout (an :class:`amaranth.lib.data.StructLayout`); the datamover RTL
(:mod:`tilewright.hw.datamover`) stores and decodes it, :class:`BufferDescriptor` encodes and
decodes it in Python, and :mod:`tilewright.sim.dm_model` executes it. The generated table of
``docs/datamover.md`` comes from :func:`encoding_table` (``python -m tilewright.hw.bd``).

Semantics (d0 is the innermost, fastest dimension):

* dimension ``d`` runs over ``ext_d = pad_before_d + size_d + pad_after_d`` positions
  ``i_d = 0 .. ext_d-1``; elements come out in row-major order of ``(i_3, i_2, i_1, i_0)``;
* an element is *in range* when ``pad_before_d <= i_d < pad_before_d + size_d`` for every
  ``d``; its word address is ``base + sum_d (i_d - pad_before_d) * stride_d`` (modulo
  ``2**32``; a channel uses the low ``addr_bits``); strides are signed, in words;
* an element out of range is a zero word produced without a memory access (MM2S only; padding
  exists on dimensions 0 to 2);
* before the first access the channel acquires ``acq`` (if enabled), after the last access it
  releases ``rel`` (if enabled); then, if ``chain`` is set, it continues with BD ``next_bd``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from amaranth.hdl import Shape, signed
from amaranth.lib import data

from .locks import LOCK_ID_BITS, check_int

__all__ = [
    "BASE_BITS", "BD_BITS", "BD_INDEX_BITS", "BD_LAYOUT", "DIMS", "LOCK_VALUE_BITS",
    "MAX_BDS", "PAD_BITS", "PAD_DIMS", "SIZE_BITS", "STRIDE_BITS", "BufferDescriptor",
    "LockAction", "encoding_table",
]

#: Dimensions of a BD (AIE-ML memtile: 4; a tile DMA channel implements the first 3).
DIMS = 4
#: Dimensions with zero padding (memtile MM2S: 0, 1 and 2).
PAD_DIMS = 3
BASE_BITS = 32
SIZE_BITS = 16
#: Signed stride width: +-2**19 words (4 MiB of 8-byte words) per step of a dimension.
STRIDE_BITS = 20
PAD_BITS = 8
#: Width of a BD index (``next_bd``, the task port): 64 BDs at most (a memtile has 48).
BD_INDEX_BITS = 6
MAX_BDS = 1 << BD_INDEX_BITS
#: Width of a lock value in a BD (the tile ISA's ACQ/REL accept 1..63 too).
LOCK_VALUE_BITS = 6

LOCK_ACTION_LAYOUT = data.StructLayout({
    "en": 1,
    "id": LOCK_ID_BITS,
    "value": LOCK_VALUE_BITS,
})

DIM_LAYOUT = data.StructLayout({
    "size": SIZE_BITS,
    "stride": signed(STRIDE_BITS),
})

PAD_LAYOUT = data.StructLayout({
    "before": PAD_BITS,
    "after": PAD_BITS,
})

BD_LAYOUT = data.StructLayout({
    "base": BASE_BITS,
    "dim": data.ArrayLayout(DIM_LAYOUT, DIMS),
    "pad": data.ArrayLayout(PAD_LAYOUT, PAD_DIMS),
    "next_bd": BD_INDEX_BITS,
    "chain": 1,
    "acq": LOCK_ACTION_LAYOUT,
    "rel": LOCK_ACTION_LAYOUT,
})

#: Bits of one BD.
BD_BITS = BD_LAYOUT.size


def _ints(name: str, values: object, n: int, lo: int, hi: int, fill: int) -> tuple[int, ...]:
    # the common case first (compilers build BDs by the hundred thousand): plain ints in range
    if (type(values) is tuple or type(values) is list) and len(values) <= n and \
            all(type(v) is int and lo <= v <= hi for v in values):
        return (*values, *([fill] * (n - len(values))))
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of integers, not {values!r}")
    if len(values) > n:
        raise ValueError(f"{name} has {len(values)} entries, at most {n} are accepted: "
                         f"{tuple(values)!r}")
    out = [check_int(f"{name}[{k}]", v, lo, hi) for k, v in enumerate(values)]
    return (*out, *([fill] * (n - len(out))))


@dataclass(frozen=True)
class LockAction:
    """A lock operation of a BD (acquire before the first access, release after the last).

    Attributes
    ----------
    id : int
        Lock id, 0 to 63.
    value : int
        Amount, 1 to 63.

    Raises
    ------
    TypeError, ValueError
        If a field is not an integer in its range.
    """

    id: int
    value: int

    def __post_init__(self) -> None:
        check_int("lock id", self.id, 0, (1 << LOCK_ID_BITS) - 1)
        check_int("lock value", self.value, 1, (1 << LOCK_VALUE_BITS) - 1)


@dataclass(frozen=True)
class BufferDescriptor:
    """One buffer descriptor (see the module docstring for the semantics).

    Sequences shorter than the layout are filled up: ``sizes`` with 1, ``strides`` with 0,
    the paddings with 0; the stored fields always have :data:`DIMS` (:data:`PAD_DIMS`)
    entries, so that ``decode(encode(bd)) == bd``.

    Attributes
    ----------
    base : int
        Word address of the element with every ``i_d = pad_before_d`` (0 to 2**32-1).
    sizes : tuple of int
        Elements per dimension without padding, d0 first, each 1 to 65535.
    strides : tuple of int
        Signed word strides, each -2**19 to 2**19-1.
    pad_before, pad_after : tuple of int
        Zero elements before / after the data of dimensions 0..2, each 0 to 255.
    next_bd : int or None
        Continue with this BD after this one (chain); None ends the task here.
    acquire, release : LockAction or None
        Lock operations of this BD.

    Raises
    ------
    TypeError, ValueError
        If a field has the wrong type or is out of range; the message names the field.
    """

    base: int
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    pad_before: tuple[int, ...] = ()
    pad_after: tuple[int, ...] = ()
    next_bd: int | None = None
    acquire: LockAction | None = None
    release: LockAction | None = None

    def __post_init__(self) -> None:
        check_int("base", self.base, 0, (1 << BASE_BITS) - 1)
        smax = 1 << (STRIDE_BITS - 1)
        fields = {
            "sizes": _ints("sizes", self.sizes, DIMS, 1, (1 << SIZE_BITS) - 1, 1),
            "strides": _ints("strides", self.strides, DIMS, -smax, smax - 1, 0),
            "pad_before": _ints("pad_before", self.pad_before, PAD_DIMS, 0,
                                (1 << PAD_BITS) - 1, 0),
            "pad_after": _ints("pad_after", self.pad_after, PAD_DIMS, 0, (1 << PAD_BITS) - 1, 0),
        }
        if len(self.strides) != len(self.sizes):
            raise ValueError(f"strides {tuple(self.strides)!r} must have one entry per size "
                             f"{tuple(self.sizes)!r}")
        for k, v in fields.items():
            object.__setattr__(self, k, v)
        if self.next_bd is not None:
            check_int("next_bd", self.next_bd, 0, MAX_BDS - 1)
        for name in ("acquire", "release"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, LockAction):
                raise TypeError(f"{name} must be a LockAction or None, not {v!r}")

    # Derived quantities -----------------------------------------------------------------------

    @functools.cached_property
    def extents(self) -> tuple[int, ...]:
        """Positions per dimension, padding included (``ext_d``)."""
        pb = (*self.pad_before, 0)
        pa = (*self.pad_after, 0)
        return tuple(pb[d] + self.sizes[d] + pa[d] for d in range(DIMS))

    @property
    def n_elements(self) -> int:
        """Words this BD moves over the stream (padding included)."""
        return math.prod(self.extents)

    @property
    def n_accesses(self) -> int:
        """Memory accesses of this BD (in-range elements)."""
        return math.prod(self.sizes)

    @property
    def has_padding(self) -> bool:
        return any(self.pad_before) or any(self.pad_after)

    @property
    def n_dims(self) -> int:
        """Dimensions in use: 1 + the highest dimension with more than one position."""
        ext = self.extents
        return max((d + 1 for d in range(DIMS) if ext[d] > 1), default=1)

    # Encoding ---------------------------------------------------------------------------------

    def fields(self) -> dict[str, Any]:
        """The BD as a nested dict shaped like :data:`BD_LAYOUT` (for ``BD_LAYOUT.const``)."""
        def lock(a: LockAction | None) -> dict[str, int]:
            return {"en": 0, "id": 0, "value": 0} if a is None else \
                {"en": 1, "id": a.id, "value": a.value}

        return {
            "base": self.base,
            "dim": [{"size": s, "stride": t} for s, t in zip(self.sizes, self.strides,
                                                             strict=True)],
            "pad": [{"before": b, "after": a} for b, a in zip(self.pad_before, self.pad_after,
                                                              strict=True)],
            "next_bd": 0 if self.next_bd is None else self.next_bd,
            "chain": int(self.next_bd is not None),
            "acq": lock(self.acquire),
            "rel": lock(self.release),
        }

    def encode(self) -> int:
        """The BD as a :data:`BD_BITS`-bit unsigned integer laid out by :data:`BD_LAYOUT`."""
        return BD_LAYOUT.const(self.fields()).as_value().value

    @classmethod
    def decode(cls, value: int) -> BufferDescriptor:
        """The BD encoded in ``value``.

        Raises
        ------
        ValueError
            If ``value`` is not a :data:`BD_BITS`-bit unsigned integer, or a field holds a
            value the encoder never produces (a size of 0, a lock value of 0).
        """
        check_int("BD word", value, 0, (1 << BD_BITS) - 1)
        c = data.Const(BD_LAYOUT, value)

        def lock(f: Any) -> LockAction | None:
            return LockAction(f.id, f.value) if f.en else None

        return cls(
            base=c.base,
            sizes=tuple(c.dim[d].size for d in range(DIMS)),
            strides=tuple(c.dim[d].stride for d in range(DIMS)),
            pad_before=tuple(c.pad[d].before for d in range(PAD_DIMS)),
            pad_after=tuple(c.pad[d].after for d in range(PAD_DIMS)),
            next_bd=c.next_bd if c.chain else None,
            acquire=lock(c.acq),
            release=lock(c.rel),
        )

    def check(self, *, direction: str, dims: int = DIMS, n_bds: int = MAX_BDS,
              n_locks: int = 1 << LOCK_ID_BITS, lock_value_bits: int = LOCK_VALUE_BITS,
              addr_bits: int = BASE_BITS, index: int | None = None) -> None:
        """Check that a channel with these parameters executes this BD as the model does.

        Parameters
        ----------
        direction : {"mm2s", "s2mm"}
            S2MM channels have no padding.
        dims : int
            Dimensions the channel implements (higher ones must have size 1).
        n_bds : int
            BDs of the channel (``next_bd`` must be below).
        n_locks, lock_value_bits : int
            Of the lock unit the channel is connected to.
        addr_bits : int
            The channel's address width: every in-range address must be below
            ``2**addr_bits``.
        index : int, optional
            Index of this BD, for the message.

        Raises
        ------
        ValueError
            Naming the BD, the field and what the channel accepts.
        """
        who = "BD" if index is None else f"BD {index}"
        if direction not in ("mm2s", "s2mm"):
            raise ValueError(f"direction must be 'mm2s' or 's2mm', not {direction!r}")
        if self.n_dims > dims:
            raise ValueError(f"{who} uses {self.n_dims} dimensions (sizes {self.sizes}, "
                             f"paddings {self.pad_before}/{self.pad_after}) but the channel "
                             f"implements {dims}")
        if direction == "s2mm" and self.has_padding:
            raise ValueError(f"{who} has padding (pad_before {self.pad_before}, pad_after "
                             f"{self.pad_after}); S2MM channels accept none")
        if self.next_bd is not None and self.next_bd >= n_bds:
            raise ValueError(f"{who} chains to BD {self.next_bd}; the channel has {n_bds} BDs")
        for name, a in (("acquire", self.acquire), ("release", self.release)):
            if a is None:
                continue
            if a.id >= n_locks:
                raise ValueError(f"{who} {name}s lock {a.id}; the lock unit has {n_locks}")
            if a.value >= 1 << lock_value_bits:
                raise ValueError(f"{who} {name}s value {a.value}; lock values have "
                                 f"{lock_value_bits} bits")
        lo, hi = self.address_range()
        if lo < 0 or hi >= 1 << addr_bits:
            raise ValueError(f"{who} addresses words {lo}..{hi}, outside the channel's "
                             f"0..{(1 << addr_bits) - 1}")

    def address_range(self) -> tuple[int, int]:
        """Lowest and highest in-range word address (before any wrap-around)."""
        lo = hi = self.base
        for s, t in zip(self.sizes, self.strides, strict=True):
            lo += min(0, (s - 1) * t)
            hi += max(0, (s - 1) * t)
        return lo, hi


_MEANING = {
    "base": "word address of the first in-range element",
    "dim[d].size": "elements of dimension {d} without padding, 1..65535 (0 is read as 1)",
    "dim[d].stride": "word stride of dimension {d}",
    "pad[d].before": "MM2S: zero elements before the data of dimension {d}, 0..255",
    "pad[d].after": "MM2S: zero elements after the data of dimension {d}, 0..255",
    "next_bd": "BD to continue with when `chain` is set",
    "chain": "1: continue with `next_bd`; 0: the task ends after this BD",
    "acq.en": "1: acquire before the first access",
    "acq.id": "lock to acquire",
    "acq.value": "wait until lock >= value, then lock -= value (1..63)",
    "rel.en": "1: release after the last access",
    "rel.id": "lock to release",
    "rel.value": "lock += value (1..63)",
}


def _rows(layout: data.Layout, prefix: str, offset: int) -> list[tuple[int, int, str, str]]:
    rows: list[tuple[int, int, str, str]] = []
    if isinstance(layout, data.ArrayLayout):
        for k in range(layout.length):
            rows += _rows(layout.elem_shape, f"{prefix}[{k}]", offset + k * layout.elem_shape.size)
        return rows
    for name, f in layout:
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(f.shape, data.Layout):
            rows += _rows(f.shape, path, offset + f.offset)
        else:
            idx = re.search(r"\[(\d+)\]", path)
            meaning = _MEANING[re.sub(r"\[\d+\]", "[d]", path)].format(
                d=idx.group(1) if idx else "")
            sig = " (signed)" if Shape.cast(f.shape).signed else ""
            rows.append((offset + f.offset + f.width - 1, offset + f.offset, path,
                         meaning + sig))
    return rows


def encoding_table() -> str:
    """The Markdown BD encoding table of ``docs/datamover.md``, generated from :data:`BD_LAYOUT`.
    """
    lines = [f"A BD is {BD_BITS} bits; bit 0 is the least significant bit of the BD word "
             f"(`BufferDescriptor.encode()`).", "",
             "| bits | field | meaning |", "|---|---|---|"]
    for hi, lo, path, meaning in _rows(BD_LAYOUT, "", 0):
        bits = f"[{hi}]" if hi == lo else f"[{hi}:{lo}]"
        lines.append(f"| {bits} | `{path}` | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(encoding_table(), end="")
