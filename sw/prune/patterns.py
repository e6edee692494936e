"""Sparsity patterns: which groups of weights are zeroed together, and how groups are scored.

A pattern maps a weight of shape ``(Cout, Cin, KH, KW)`` (convolution) or ``(Cout, Cin)``
(fully connected) to a boolean **mask** over its *groups* and back:

* :class:`BlockPattern` -- blocks of ``b_out`` output x ``b_in`` input channels, each block
  spanning all kernel taps (the weight-block sparsity of D'Alberto et al., 8x8 by default).
  The mask has shape ``(ceil(Cout/b_out), ceil(Cin/b_in))``, the layout
  :func:`tilewright.sw.quantize.block_mask` and the tile compiler use. A layer whose channels
  do not divide the block is *padded logically*: its edge blocks are smaller.
* :class:`NMPattern` -- N:M: in every run of M consecutive input channels of one output
  channel and one kernel tap at most N weights are non-zero. The mask is element-wise.
* :class:`UnstructuredPattern` -- single weights. The mask is element-wise.

Groups are scored by ``"l2"`` (Euclidean norm), ``"l1"`` (sum of magnitudes) or
``"variance"`` (variance of the group's weights); the lowest scores are pruned first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .options import SCORES

__all__ = [
    "SCORES",
    "BlockPattern",
    "NMPattern",
    "Pattern",
    "UnstructuredPattern",
    "parse_pattern",
    "pattern_from_dict",
]



def _check_score(score: str, accepted: tuple[str, ...], what: str) -> str:
    if score not in accepted:
        raise ValueError(f"{what}: score must be one of {', '.join(accepted)}, not {score!r}")
    return score


def _as3(w: torch.Tensor, what: str) -> torch.Tensor:
    """``w`` as ``(Cout, Cin, taps)``."""
    if w.dim() == 2:
        return w[:, :, None]
    if w.dim() == 4:
        return w.reshape(w.shape[0], w.shape[1], -1)
    raise ValueError(f"{what}: weights must be (Cout, Cin, KH, KW) or (Cout, Cin), not shape "
                     f"{tuple(w.shape)}")


class Pattern(Protocol):
    """What the sparsifiers need of a pattern."""

    kind: str

    def mask_shape(self, weight_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]: ...

    def divides(self, weight_shape: torch.Size | tuple[int, ...]) -> bool: ...

    def group_sizes(self, weight_shape: torch.Size | tuple[int, ...]) -> torch.Tensor: ...

    def unit_size(self, weight_shape: torch.Size | tuple[int, ...]) -> float: ...

    def scores(self, w: torch.Tensor, score: str) -> torch.Tensor: ...

    def expand(self, mask: torch.Tensor,
               weight_shape: torch.Size | tuple[int, ...]) -> torch.Tensor: ...

    def as_dict(self) -> dict[str, Any]: ...


# Blocks ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockPattern:
    """Blocks of ``b_out`` output x ``b_in`` input channels spanning all kernel taps.

    Parameters
    ----------
    b_out, b_in : int
        Block shape (default 8x8, the overlay's ``tile.block``).
    """

    b_out: int = 8
    b_in: int = 8
    kind: str = "block"

    def __post_init__(self) -> None:
        for name in ("b_out", "b_in"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockPattern: {name} must be a positive int, not {v!r}")

    def __str__(self) -> str:
        return f"{self.b_out}x{self.b_in} blocks"

    def mask_shape(self, weight_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """``(ceil(Cout/b_out), ceil(Cin/b_in))``."""
        return (-(-int(weight_shape[0]) // self.b_out), -(-int(weight_shape[1]) // self.b_in))

    def divides(self, weight_shape: torch.Size | tuple[int, ...]) -> bool:
        """Whether the block divides both channel counts (no logical padding needed)."""
        return int(weight_shape[0]) % self.b_out == 0 and int(weight_shape[1]) % self.b_in == 0

    def group_sizes(self, weight_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Weights per block (edge blocks of a padded layer hold fewer), float64."""
        cout, cin = int(weight_shape[0]), int(weight_shape[1])
        taps = 1
        for k in weight_shape[2:]:
            taps *= int(k)
        go, gi = self.mask_shape(weight_shape)
        rows = torch.full((go,), float(self.b_out), dtype=torch.float64)
        rows[-1] = cout - (go - 1) * self.b_out
        cols = torch.full((gi,), float(self.b_in), dtype=torch.float64)
        cols[-1] = cin - (gi - 1) * self.b_in
        return rows[:, None] * cols[None, :] * taps

    def _blocks(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` zero-padded and viewed as ``(Go, Gi, b_out * b_in * taps)``."""
        w3 = _as3(w, str(self))
        cout, cin, taps = w3.shape
        go, gi = self.mask_shape(w.shape)
        pad = torch.zeros(go * self.b_out, gi * self.b_in, taps, dtype=w3.dtype,
                          device=w3.device)
        pad[:cout, :cin] = w3
        v = pad.reshape(go, self.b_out, gi, self.b_in, taps).permute(0, 2, 1, 3, 4)
        return v.reshape(go, gi, -1)

    def scores(self, w: torch.Tensor, score: str = "l2") -> torch.Tensor:
        """Score of every block, ``(Go, Gi)`` float64 (padding does not count).

        Parameters
        ----------
        w : torch.Tensor
            The layer's weights.
        score : str
            ``"l2"``, ``"l1"`` or ``"variance"``. An edge block of a padded layer is scored
            per weight, as a full block of the same RMS / mean magnitude would be.
        """
        _check_score(score, SCORES, str(self))
        v = self._blocks(w.detach().to(torch.float64))
        n = self.group_sizes(w.shape).to(v.device)
        full = self.unit_size(w.shape)
        if score == "l2":
            # an edge block of a padded layer is scored as a full block of its RMS: logical
            # padding must not make it look small (it would be pruned first, e.g. a whole
            # row of a 10-class classifier)
            return v.pow(2).sum(-1).mul(full / n).sqrt()
        if score == "l1":
            return v.abs().sum(-1).mul(full / n)
        mean = v.sum(-1) / n
        return (v.pow(2).sum(-1) / n - mean.pow(2)).clamp_min(0.0)

    def unit_size(self, weight_shape: torch.Size | tuple[int, ...]) -> float:
        """Weights in a full block: ``b_out * b_in * taps``."""
        return float(self.b_out * self.b_in * math.prod(int(k) for k in weight_shape[2:]))

    def expand(self, mask: torch.Tensor,
               weight_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """The element-wise mask (bool, ``weight_shape``) of a block mask."""
        cout, cin = int(weight_shape[0]), int(weight_shape[1])
        m = mask.repeat_interleave(self.b_out, 0).repeat_interleave(self.b_in, 1)[:cout, :cin]
        m = m.reshape(cout, cin, *([1] * (len(weight_shape) - 2)))
        return m.expand(*weight_shape)

    def as_dict(self) -> dict[str, Any]:
        """``{"kind": "block", "block": [b_out, b_in]}`` (what checkpoints store)."""
        return {"kind": "block", "block": [self.b_out, self.b_in]}


# N:M ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NMPattern:
    """At most ``n`` non-zero weights in every ``m`` consecutive input channels.

    Groups run along the input channels of one output channel and one kernel tap; a layer
    whose input channels do not divide ``m`` has a shorter last group (padded logically with
    zeros, which count as pruned). The sparsity is fixed at ``1 - n/m``.
    """

    n: int = 2
    m: int = 4
    kind: str = "nm"

    def __post_init__(self) -> None:
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.n, self.m))
        if not ok or not 1 <= self.n <= self.m:
            raise ValueError(f"NMPattern: need integers 1 <= n <= m, not n={self.n!r}, "
                             f"m={self.m!r}")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        """The fraction of weights zeroed, ``1 - n/m``."""
        return 1.0 - self.n / self.m

    def mask_shape(self, weight_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        return tuple(int(s) for s in weight_shape)

    def divides(self, weight_shape: torch.Size | tuple[int, ...]) -> bool:
        return int(weight_shape[1]) % self.m == 0

    def group_sizes(self, weight_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return torch.ones(tuple(int(s) for s in weight_shape), dtype=torch.float64)

    def unit_size(self, weight_shape: torch.Size | tuple[int, ...]) -> float:
        return 1.0

    def scores(self, w: torch.Tensor, score: str = "l2") -> torch.Tensor:
        """Magnitude of every weight (``"l2"`` and ``"l1"`` agree on single weights)."""
        _check_score(score, ("l2", "l1"), f"{self} pattern (single weights have no variance)")
        return w.detach().to(torch.float64).abs()

    def expand(self, mask: torch.Tensor,
               weight_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return mask.reshape(weight_shape)

    def keep_mask(self, scores: torch.Tensor, pruned: torch.Tensor | None = None) -> torch.Tensor:
        """Keep the ``n`` highest scores of every group of ``m`` input channels.

        Parameters
        ----------
        scores : torch.Tensor
            Element-wise scores, the weight's shape.
        pruned : torch.Tensor, optional
            Weights already pruned (bool); they stay pruned.

        Returns
        -------
        torch.Tensor
            bool, the weight's shape.
        """
        s3 = _as3(scores, str(self)).permute(0, 2, 1)            # (Cout, taps, Cin)
        cout, taps, cin = s3.shape
        g = -(-cin // self.m)
        full = torch.full((cout, taps, g * self.m), -torch.inf, dtype=torch.float64,
                          device=scores.device)
        full[..., :cin] = s3
        if pruned is not None:
            p3 = _as3(pruned, str(self)).permute(0, 2, 1)
            full[..., :cin] = torch.where(p3, -torch.inf, full[..., :cin])
        grp = full.reshape(cout, taps, g, self.m)
        # stable ranking: higher score first, then lower channel index
        order = torch.sort(grp, dim=-1, descending=True, stable=True).indices
        keep = torch.zeros_like(grp, dtype=torch.bool)
        keep.scatter_(-1, order[..., :self.n], True)
        keep &= grp > -torch.inf
        keep = keep.reshape(cout, taps, g * self.m)[..., :cin].permute(0, 2, 1)
        return keep.reshape(scores.shape)

    def holds(self, mask: torch.Tensor) -> bool:
        """Whether every group of ``mask`` keeps at most ``n`` weights."""
        m3 = _as3(mask, str(self)).permute(0, 2, 1)
        cout, taps, cin = m3.shape
        g = -(-cin // self.m)
        full = torch.zeros(cout, taps, g * self.m, dtype=torch.int64, device=mask.device)
        full[..., :cin] = m3.to(torch.int64)
        return bool((full.reshape(cout, taps, g, self.m).sum(-1) <= self.n).all())

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "nm", "n": self.n, "m": self.m}


# Unstructured ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class UnstructuredPattern:
    """Single weights, ranked by magnitude."""

    kind: str = "unstructured"

    def __str__(self) -> str:
        return "unstructured"

    def mask_shape(self, weight_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        return tuple(int(s) for s in weight_shape)

    def divides(self, weight_shape: torch.Size | tuple[int, ...]) -> bool:
        return True

    def group_sizes(self, weight_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return torch.ones(tuple(int(s) for s in weight_shape), dtype=torch.float64)

    def unit_size(self, weight_shape: torch.Size | tuple[int, ...]) -> float:
        return 1.0

    def scores(self, w: torch.Tensor, score: str = "l2") -> torch.Tensor:
        _check_score(score, ("l2", "l1"), "unstructured pattern (single weights have no "
                                          "variance)")
        return w.detach().to(torch.float64).abs()

    def expand(self, mask: torch.Tensor,
               weight_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return mask.reshape(weight_shape)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "unstructured"}


# Parsing --------------------------------------------------------------------------------------

def parse_pattern(text: str) -> BlockPattern | NMPattern | UnstructuredPattern:
    """A pattern from its command-line spelling.

    Accepted: ``"8x8"`` / ``"block8x8"`` / ``"16x4"`` (blocks ``b_out x b_in``), ``"2:4"`` (N:M),
    ``"unstructured"``.

    Raises
    ------
    ValueError
        On any other spelling (the message lists the accepted ones).
    """
    t = text.strip().lower()
    if t == "unstructured":
        return UnstructuredPattern()
    mb = re.fullmatch(r"(?:block)?(\d+)x(\d+)", t)
    if mb:
        return BlockPattern(int(mb.group(1)), int(mb.group(2)))
    mn = re.fullmatch(r"(\d+):(\d+)", t)
    if mn:
        return NMPattern(int(mn.group(1)), int(mn.group(2)))
    raise ValueError(f"pattern {text!r} not understood; accepted: BOUTxBIN blocks (e.g. 8x8, "
                     f"16x4), N:M (e.g. 2:4) or 'unstructured'")


def pattern_from_dict(d: dict[str, Any]) -> BlockPattern | NMPattern | UnstructuredPattern:
    """The inverse of ``pattern.as_dict()`` (a checkpoint's ``pattern`` entry).

    Raises
    ------
    ValueError
        If ``d`` is not such a dict (the message says what is accepted).
    """
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"pattern must be a dict with a 'kind' ('block', 'nm' or "
                         f"'unstructured'), not {d!r}")
    kind = d["kind"]
    try:
        if kind == "block":
            b = d["block"]
            return BlockPattern(int(b[0]), int(b[1]))
        if kind == "nm":
            return NMPattern(int(d["n"]), int(d["m"]))
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"pattern {d!r}: missing or malformed field ({e}); accepted: "
                         f"{{'kind': 'block', 'block': [8, 8]}} or "
                         f"{{'kind': 'nm', 'n': 2, 'm': 4}}") from None
    if kind == "unstructured":
        return UnstructuredPattern()
    raise ValueError(f"pattern kind {kind!r} unknown; accepted: 'block', 'nm', 'unstructured'")
