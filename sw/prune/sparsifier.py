"""The pattern sparsifier: torch.ao.pruning's shape, the overlay's patterns.

:class:`PatternSparsifier` is a :class:`torch.ao.pruning.BaseSparsifier`: ``prepare(model,
config)`` attaches a :class:`GroupMask` parametrization to every selected weight, ``step()``
recomputes the masks at each group's ``sparsity_level`` (set by a schedule from
:mod:`tilewright.sw.prune.schedule` or torch's own ``CubicSL``), ``squash_mask()`` folds the
masks into the weights (pruned weights become exactly zero) and ``state_dict()`` /
``load_state_dict()`` carry the masks.

Masks only ever lose groups: a group pruned once stays pruned (its score is taken as minus
infinity), so an iterative or gradual schedule is monotone.

Layer selection (:func:`select_layers`): every ``nn.Conv2d`` and ``nn.Linear``; the first
convolution (in module order) stays dense unless ``dense_first_conv=False``; grouped
convolutions stay dense (a block spans output x input channels of one dense weight); a layer
whose channels the pattern does not divide is padded logically (``pad="pad"``, the default)
or left dense (``pad="dense"``). :meth:`PatternSparsifier.report` says which layer got what
and why.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.ao.pruning import BaseSparsifier
from torch.nn.utils import parametrize

from .options import PADS, RANKINGS
from .patterns import SCORES, BlockPattern, NMPattern, Pattern, UnstructuredPattern

__all__ = [
    "RANKINGS",
    "GroupMask",
    "LayerReport",
    "MaskError",
    "PatternSparsifier",
    "check_mask",
    "compute_mask",
    "format_report",
    "layer_reports",
    "resolve_config",
    "row_best",
    "select_layers",
    "zero_groups",
]



class MaskError(ValueError):
    """A mask does not fit its layer or pattern. The message names the layer."""


# Masks as parametrizations --------------------------------------------------------------------

class GroupMask(nn.Module):
    """Parametrization ``weight = original * expand(mask)``.

    ``mask`` is the group mask (bool, ``pattern.mask_shape``); the element-wise copy used in
    ``forward`` is a non-persistent buffer refreshed by :meth:`set_mask`. Neither is part of
    the model's ``state_dict`` (the sparsifier's ``state_dict`` carries the masks), as with
    torch's ``FakeSparsity``.
    """

    def __init__(self, pattern: Pattern, mask: torch.Tensor,
                 weight_shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> None:
        super().__init__()
        self.pattern = pattern
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.register_buffer("mask", mask.to(torch.bool).clone(), persistent=False)
        self.register_buffer("elementwise", torch.empty(0), persistent=False)
        self.elementwise = self._expand(dtype)

    def _expand(self, dtype: torch.dtype) -> torch.Tensor:
        return self.pattern.expand(self.mask, self.weight_shape).to(dtype).contiguous()

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask's contents (same shape) and refresh the element-wise copy."""
        if tuple(mask.shape) != tuple(self.mask.shape):
            raise MaskError(f"mask shape {tuple(mask.shape)} does not match "
                            f"{tuple(self.mask.shape)}")
        self.mask.copy_(mask.to(self.mask.device, torch.bool))
        self.elementwise = self._expand(self.elementwise.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.elementwise.to(x.dtype)


# Layer selection ------------------------------------------------------------------------------

@dataclass
class LayerReport:
    """What the sparsifier did to one convolution or fully connected layer.

    Attributes
    ----------
    name : str
        Module name (``model.get_submodule(name)``).
    kind : str
        ``"conv"`` or ``"linear"``.
    weight_shape : tuple of int
    pruned : bool
        Whether the layer carries the pattern.
    reason : str
        Why a layer is dense, or ``"padded logically: ..."`` for a padded pruned layer.
    groups, zero_groups : int
        Groups of the pattern (blocks; weights for N:M and unstructured) and how many are zero.
    sparsity : float
        ``zero_groups / groups``.
    weight_sparsity : float
        Fraction of the layer's weights inside zero groups.
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    pruned: bool
    reason: str = ""
    groups: int = 0
    zero_groups: int = 0
    sparsity: float = 0.0
    weight_sparsity: float = 0.0


def _is_prunable(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Linear))


def _raw_weight(m: nn.Module) -> torch.Tensor:
    """The weight of ``m`` without parametrizations (``original`` when parametrized)."""
    if parametrize.is_parametrized(m, "weight"):
        return m.parametrizations["weight"].original
    return m.weight


def select_layers(model: nn.Module, pattern: Pattern, dense_first_conv: bool = True,
                  pad: str = "pad") -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Which conv/FC layers of ``model`` can carry ``pattern``.

    Parameters
    ----------
    model : torch.nn.Module
    pattern : Pattern
    dense_first_conv : bool
        Keep the first ``nn.Conv2d`` (in module order) dense.
    pad : str
        ``"pad"``: prune layers the pattern does not divide, with logically padded edge
        groups; ``"dense"``: leave them dense.

    Returns
    -------
    (list of str, dict, dict)
        Names of the prunable layers; ``{name: reason}`` of the layers kept dense;
        ``{name: note}`` of the prunable layers that are padded.
    """
    if pad not in PADS:
        raise ValueError(f"pad must be one of {', '.join(PADS)}, not {pad!r}")
    prunable: list[str] = []
    dense: dict[str, str] = {}
    padded: dict[str, str] = {}
    first_seen = False
    for name, m in model.named_modules():
        if not _is_prunable(m):
            continue
        w = _raw_weight(m)
        if isinstance(m, nn.Conv2d):
            first = not first_seen
            first_seen = True
            if first and dense_first_conv:
                dense[name] = "first convolution (kept dense)"
                continue
            if m.groups != 1:
                dense[name] = f"grouped convolution (groups={m.groups})"
                continue
        if not pattern.divides(w.shape):
            note = (f"channels {w.shape[0]}x{w.shape[1]} (out x in) do not divide the "
                    f"{pattern}")
            if pad == "dense":
                dense[name] = note + " (left dense)"
                continue
            padded[name] = "padded logically: " + note
        prunable.append(name)
    return prunable, dense, padded


# Mask computation -----------------------------------------------------------------------------

def _round_half_away(x: float) -> int:
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def zero_groups(level: float, groups: int) -> int:
    """Groups zeroed at sparsity ``level``: ``round(level * groups)`` (half away from zero),
    but never all of them unless ``level`` is 1 (a layer is not removed by rounding)."""
    if level >= 1.0:
        return groups
    return min(_round_half_away(float(level) * groups), max(groups - 1, 0))


def row_best(scores: torch.Tensor, pruned: torch.Tensor | None = None) -> torch.Tensor:
    """The best-scoring live group of every row (output channel group) of a mask, as bool.

    Rows whose groups are all in ``pruned`` get none.
    """
    s2 = scores.reshape(scores.shape[0], -1).clone()
    if pruned is not None:
        s2[pruned.reshape(s2.shape).to(s2.device)] = -torch.inf
    top = s2.max(1)
    out = torch.zeros_like(s2, dtype=torch.bool)
    rows = torch.arange(s2.shape[0], device=s2.device)[torch.isfinite(top.values)]
    out[rows, top.indices[rows]] = True
    return out.reshape(scores.shape)


def compute_mask(w: torch.Tensor, pattern: Pattern, level: float, score: str = "l2",
                 pruned: torch.Tensor | None = None, keep_rows: bool = False) -> torch.Tensor:
    """The group mask of one layer at sparsity ``level`` (True = kept).

    Blocks and single weights: exactly :func:`zero_groups` groups are zeroed
    (``round(level * groups)``, half away from zero, at least one group kept when
    ``level < 1``), the lowest scores first, ties to the lower index; groups in ``pruned``
    stay zero (and count). N:M: the ``n`` highest of every group of ``m`` are kept when ``level``
    is positive, all when it is 0.

    Parameters
    ----------
    w : torch.Tensor
        The layer's weights.
    pattern : Pattern
    level : float
        Sparsity in ``[0, 1]``.
    score : str
        ``"l2"``, ``"l1"`` or ``"variance"``.
    pruned : torch.Tensor, optional
        bool group mask of groups already pruned.
    keep_rows : bool
        Every row of the mask (a block row: ``b_out`` output channels) keeps its best group,
        so no output channel is cut off entirely -- as long as the count allows it (at most
        ``groups - rows`` zeroed); the count stays exact either way.

    Returns
    -------
    torch.Tensor
        bool, ``pattern.mask_shape(w.shape)``, on ``w``'s device.
    """
    if not 0.0 <= float(level) <= 1.0:
        raise ValueError(f"sparsity level must be in [0, 1], not {level!r}")
    scores = pattern.scores(w, score)
    if isinstance(pattern, NMPattern):
        if level <= 0:
            return ~pruned if pruned is not None else torch.ones_like(scores, dtype=torch.bool)
        return pattern.keep_mask(scores, pruned)
    flat = scores.flatten().clone()
    already = 0
    if pruned is not None:
        pf = pruned.flatten().to(flat.device)
        flat[pf] = -torch.inf
        already = int(pf.sum())
    nzero = max(zero_groups(level, flat.numel()), already)
    if keep_rows:
        flat[row_best(scores, pruned).flatten()] = torch.inf   # pruned last, if at all
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if nzero:
        order = torch.sort(flat, stable=True).indices
        keep[order[:nzero]] = False
    return keep.reshape(scores.shape)


def check_mask(name: str, pattern: Pattern, mask: torch.Tensor,
               weight_shape: torch.Size | tuple[int, ...]) -> None:
    """Raise :class:`MaskError` naming ``name`` unless ``mask`` fits the layer and pattern."""
    if not isinstance(mask, torch.Tensor):
        raise MaskError(f"layer {name}: mask must be a bool torch.Tensor, not "
                        f"{type(mask).__name__}")
    want = tuple(pattern.mask_shape(weight_shape))
    if tuple(mask.shape) != want:
        raise MaskError(f"layer {name}: mask shape {tuple(mask.shape)} does not match weight "
                        f"{tuple(weight_shape)} under the {pattern} pattern; expected {want}")
    if mask.dtype != torch.bool:
        raise MaskError(f"layer {name}: mask dtype must be torch.bool, not {mask.dtype}")
    if isinstance(pattern, NMPattern) and not pattern.holds(mask):
        raise MaskError(f"layer {name}: mask keeps more than {pattern.n} weights in some group "
                        f"of {pattern.m} input channels; not a {pattern} mask")


def _normalised(scores: torch.Tensor, unit: float, score: str) -> torch.Tensor:
    """Per-weight scores for ranking across layers (``unit``: weights in a full group)."""
    if score == "l2":
        return scores / math.sqrt(unit)
    if score == "l1":
        return scores / unit
    return scores


def resolve_config(model: nn.Module,
                   config: Iterable[Mapping[str, Any]] | Mapping[str, float] | None,
                   pattern: Pattern, default_level: float, dense_first_conv: bool = True,
                   pad: str = "pad", ranking: str = "layer"
                   ) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, str]]:
    """Turn a sparsifier ``config`` into torch.ao config entries, checking every layer.

    Parameters
    ----------
    model : torch.nn.Module
    config : None, list of dict, or dict
        See :meth:`PatternSparsifier.prepare`.
    pattern : Pattern
    default_level : float
        ``sparsity_level`` of entries that give none.
    dense_first_conv, pad : bool, str
        Selection rules (:func:`select_layers`).
    ranking : str
        ``"global"`` requires one level for all entries.

    Returns
    -------
    (list of dict, dict, dict)
        ``[{"tensor_fqn": ..., "sparsity_level": ...}]``; ``{name: reason}`` of the conv/FC
        layers left dense; ``{name: note}`` of the chosen layers that are padded.

    Raises
    ------
    ValueError
        If a configured layer does not exist, is not a Conv2d/Linear weight, is kept dense by
        the selection rules (the message says why), or has a bad sparsity.
    """
    prunable, dense, padded = select_layers(model, pattern, dense_first_conv, pad)
    modules = dict(model.named_modules())
    raw: list[dict[str, Any]]
    if config is None:
        raw = [{"tensor_fqn": f"{n}.weight"} for n in prunable]
    elif isinstance(config, Mapping):
        raw = [{"tensor_fqn": f"{n}.weight", "sparsity_level": float(s)}
               for n, s in config.items()]
    else:
        raw = [dict(e) for e in config]
    entries: list[dict[str, Any]] = []
    chosen: set[str] = set()
    for e in raw:
        fqn = e.get("tensor_fqn")
        if not isinstance(fqn, str) or not fqn.endswith(".weight"):
            raise ValueError(f"config entry {e!r}: 'tensor_fqn' must name a layer's weight, "
                             f"e.g. 'layer1.0.conv1.weight'")
        name = fqn[: -len(".weight")]
        if name not in modules:
            raise ValueError(f"config names layer {name!r}, which the model does not have")
        if not _is_prunable(modules[name]):
            raise ValueError(f"config names layer {name!r}, a {type(modules[name]).__name__}; "
                             f"accepted: Conv2d, Linear")
        if name in dense:
            hint = ("; pass dense_first_conv=False to prune it"
                    if "first convolution" in dense[name] else "")
            raise ValueError(f"config names layer {name!r}, which stays dense: "
                             f"{dense[name]}{hint}")
        if name in chosen:
            raise ValueError(f"config names layer {name!r} twice")
        lvl = e.get("sparsity_level", default_level)
        if isinstance(lvl, bool) or not isinstance(lvl, (int, float)) or not 0.0 <= lvl <= 1.0:
            raise ValueError(f"layer {name}: sparsity_level must be a float in [0, 1], "
                             f"not {lvl!r}")
        if isinstance(pattern, NMPattern):
            PatternSparsifier._check_nm_level(pattern, float(lvl),
                                              f"layer {name}: sparsity_level")
        e["sparsity_level"] = float(lvl)
        entries.append(e)
        chosen.add(name)
    if ranking == "global" and len({e["sparsity_level"] for e in entries}) > 1:
        raise ValueError(f"global ranking needs one sparsity for every layer, not "
                         f"{sorted({e['sparsity_level'] for e in entries})}; use "
                         f"ranking='layer' for per-layer sparsities")
    dense_out = dict(dense)
    for n in prunable:
        if n not in chosen:
            dense_out[n] = "not in the sparsity configuration"
    return entries, dense_out, {n: v for n, v in padded.items() if n in chosen}


# The sparsifier -------------------------------------------------------------------------------

class MaskQueries:
    """Mask queries shared by the sparsifiers (both keep ``state[fqn]["mask"]`` per group)."""

    groups: list[dict[str, Any]]
    state: dict[str, dict[str, Any]]
    model: nn.Module
    pattern: Pattern
    dense_layers: dict[str, str]
    padded_layers: dict[str, str]

    def masks(self) -> dict[str, torch.Tensor]:
        """``{module_name: group mask}`` (bool, on the CPU; True = kept / tracked)."""
        return {g["module_fqn"]: self.state[g["tensor_fqn"]]["mask"].detach().cpu().clone()
                for g in self.groups}

    def sparsity(self) -> dict[str, float]:
        """``{module_name: fraction of zero (untracked) groups}``."""
        return {n: 1.0 - float(m.sum()) / m.numel() for n, m in self.masks().items()}

    def report(self, model: nn.Module | None = None) -> list[LayerReport]:
        """One :class:`LayerReport` per Conv2d/Linear layer of the model, in module order."""
        return layer_reports(self.model if model is None else model, self.pattern,
                             self.masks(), self.dense_layers, self.padded_layers)


class PatternSparsifier(MaskQueries, BaseSparsifier):
    """Prune conv and FC weights to a block, N:M or unstructured pattern.

    Parameters
    ----------
    pattern : Pattern
        :class:`~tilewright.sw.prune.patterns.BlockPattern` (default 8x8),
        :class:`~tilewright.sw.prune.patterns.NMPattern` or
        :class:`~tilewright.sw.prune.patterns.UnstructuredPattern`.
    sparsity : float
        Default ``sparsity_level`` of every layer (the target; schedules ramp towards it).
        For N:M it must be ``1 - n/m`` (the default when ``None``).
    score : str
        Group score: ``"l2"``, ``"l1"`` or ``"variance"`` (blocks only).
    ranking : str
        ``"layer"``: each layer zeroes its own fraction; ``"global"``: one fraction of all
        prunable weights, groups ranked across layers by per-weight score (all layers must
        then share one ``sparsity_level``).
    dense_first_conv : bool
        Keep the first convolution dense (the paper's rule).
    pad : str
        ``"pad"`` or ``"dense"``: what to do with layers the pattern does not divide.
    keep_rows : bool
        Every block row keeps at least one block (see :func:`compute_mask`).

    Examples
    --------
    >>> sp = PatternSparsifier(BlockPattern(8, 8), sparsity=0.5)
    >>> sp.prepare(model, None)            # every conv/FC but the first conv
    >>> sp.step()                          # masks at 50 % of the blocks of every layer
    >>> ...fine-tune...
    >>> sp.squash_mask()                   # pruned weights are now exactly 0
    """

    def __init__(self, pattern: Pattern | None = None, sparsity: float | None = 0.5,
                 score: str = "l2", ranking: str = "layer", dense_first_conv: bool = True,
                 pad: str = "pad", keep_rows: bool = False) -> None:
        pattern = BlockPattern() if pattern is None else pattern
        if not isinstance(pattern, (BlockPattern, NMPattern, UnstructuredPattern)):
            raise TypeError(f"pattern must be a BlockPattern, NMPattern or UnstructuredPattern, "
                            f"not {type(pattern).__name__}")
        if isinstance(pattern, NMPattern):
            if sparsity is None:
                sparsity = pattern.sparsity
            self._check_nm_level(pattern, float(sparsity), "sparsity")
            if ranking != "layer":
                raise ValueError(f"ranking {ranking!r} is not possible with the {pattern} "
                                 f"pattern (its sparsity is fixed per group); accepted: 'layer'")
        if sparsity is None or not 0.0 <= float(sparsity) <= 1.0:
            raise ValueError(f"sparsity must be a float in [0, 1], not {sparsity!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, not {score!r}")
        if score == "variance" and not isinstance(pattern, BlockPattern):
            raise ValueError(f"score 'variance' needs block groups; the {pattern} pattern "
                             f"accepts 'l2' or 'l1'")
        if ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, not {ranking!r}")
        if pad not in PADS:
            raise ValueError(f"pad must be one of {', '.join(PADS)}, not {pad!r}")
        super().__init__(defaults={"sparsity_level": float(sparsity)})
        self.pattern = pattern
        self.score = score
        self.ranking = ranking
        self.dense_first_conv = dense_first_conv
        self.pad = pad
        self.keep_rows = bool(keep_rows) and not isinstance(pattern, NMPattern)
        self.dense_layers: dict[str, str] = {}
        self.padded_layers: dict[str, str] = {}
        self.squashed = False

    @staticmethod
    def _check_nm_level(pattern: NMPattern, level: float, what: str) -> None:
        if level != 0.0 and not math.isclose(level, pattern.sparsity, abs_tol=1e-9):
            raise ValueError(f"{what} {level!r} is not possible with the {pattern} pattern; "
                             f"accepted: 0 or {pattern.sparsity!r} (1 - n/m)")

    # prepare ----------------------------------------------------------------------------------
    def prepare(self, model: nn.Module,
                config: Iterable[Mapping[str, Any]] | Mapping[str, float] | None) -> None:
        """Attach a mask parametrization (all kept) to every selected layer.

        Parameters
        ----------
        model : torch.nn.Module
            Modified in place.
        config : None, list of dict, or dict
            ``None``: every prunable layer (:func:`select_layers`) at the default sparsity.
            A list of torch.ao-style dicts ``{"tensor_fqn": "layer1.0.conv1.weight",
            "sparsity_level": 0.6}`` (``sparsity_level`` optional). A dict ``{module_name:
            sparsity}`` (e.g. from :func:`~tilewright.sw.prune.sensitivity.choose_sparsities`).

        Raises
        ------
        ValueError
            If a configured layer does not exist, is not a Conv2d/Linear weight, is kept dense
            by the selection rules (the message says why), or has a bad sparsity.
        """
        entries, self.dense_layers, self.padded_layers = resolve_config(
            model, config, self.pattern, float(self.defaults["sparsity_level"]),
            self.dense_first_conv, self.pad, self.ranking)
        super().prepare(model, entries)

    def _prepare(self, *args: Any, **kwargs: Any) -> None:
        for g in self.groups:
            module, name = g["module"], g["tensor_name"]
            w = getattr(module, name)
            mask = torch.ones(self.pattern.mask_shape(w.shape), dtype=torch.bool,
                              device=w.device)
            p = GroupMask(self.pattern, mask, w.shape, w.dtype)
            parametrize.register_parametrization(module, name, p)
            self.state[g["tensor_fqn"]]["mask"] = p.mask

    def _param(self, g: Mapping[str, Any]) -> GroupMask:
        for p in g["module"].parametrizations[g["tensor_name"]]:
            if isinstance(p, GroupMask):
                return p
        raise MaskError(f"layer {g['module_fqn']}: no GroupMask parametrization (was the "
                        f"model prepared by this sparsifier?)")

    # step -------------------------------------------------------------------------------------
    def update_mask(self, module: nn.Module, tensor_name: str, sparsity_level: float,
                    **kwargs: Any) -> None:
        """Recompute one layer's mask at ``sparsity_level`` (per-layer ranking)."""
        g = {"module": module, "tensor_name": tensor_name,
             "module_fqn": kwargs.get("module_fqn", "?")}
        p = self._param(g)
        w = getattr(module, tensor_name)
        p.set_mask(compute_mask(w, self.pattern, sparsity_level, self.score, pruned=~p.mask,
                                keep_rows=self.keep_rows))

    def step(self, use_path: bool = True) -> None:
        """Recompute every mask at the groups' current ``sparsity_level``."""
        if self.squashed:
            raise RuntimeError("step() after squash_mask(): the masks are folded into the "
                               "weights; prepare a new sparsifier to prune further")
        if not self.enable_mask_update:
            return
        with torch.no_grad():
            if self.ranking == "global":
                self._step_global()
            else:
                for g in self.groups:
                    self.update_mask(**g)

    def _step_global(self) -> None:
        levels = {float(g["sparsity_level"]) for g in self.groups}
        if len(levels) != 1:
            raise ValueError(f"global ranking needs one sparsity for every layer, not "
                             f"{sorted(levels)}")
        level = levels.pop()
        params = [self._param(g) for g in self.groups]
        ws = [getattr(g["module"], g["tensor_name"]) for g in self.groups]
        sc, sz, pr = [], [], []
        for p, w in zip(params, ws, strict=True):
            sizes = self.pattern.group_sizes(w.shape).to(w.device)
            s = _normalised(self.pattern.scores(w, self.score), self.pattern.unit_size(w.shape),
                            self.score)
            if self.keep_rows:
                s[row_best(s, ~p.mask)] = torch.inf
            sc.append(s.flatten())
            sz.append(sizes.flatten())
            pr.append((~p.mask).flatten())
        scores, sizes, pruned = torch.cat(sc), torch.cat(sz), torch.cat(pr)
        # every layer keeps its best group: global ranking never removes a whole layer
        i = 0
        for s in sc:
            if level < 1.0 and s.numel():
                scores[i + int(torch.argmax(s))] = torch.inf
            i += s.numel()
        scores[pruned] = -torch.inf
        order = torch.sort(scores, stable=True).indices
        cum = torch.cumsum(sizes[order], 0)
        target = level * float(sizes.sum())
        k = int(torch.searchsorted(cum, torch.tensor(target * (1 + 1e-12) + 1e-9,
                                                     dtype=cum.dtype, device=cum.device),
                                   right=True))
        k = max(k, int(pruned.sum()))
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep[order[:k]] = False
        i = 0
        for p, s in zip(params, sc, strict=True):
            p.set_mask(keep[i:i + s.numel()].reshape(p.mask.shape))
            i += s.numel()

    # squash, masks, report ---------------------------------------------------------------------
    def squash_mask(self, *args: Any, **kwargs: Any) -> None:
        """Fold the masks into the weights and remove the parametrizations.

        Pruned weights become exactly zero; the masks stay available from :meth:`masks`.
        """
        if self.squashed:
            return
        for g in self.groups:
            self.state[g["tensor_fqn"]]["mask"] = self._param(g).mask.detach().clone()
        super().squash_mask(*args, **kwargs)
        self.squashed = True

    # state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.ao's ``{"state", "groups"}`` plus the pattern and the selection settings."""
        sd = super().state_dict()
        sd["state"] = {k: {"mask": v["mask"].detach().cpu().clone()}
                       for k, v in self.state.items()}
        sd["pattern"] = self.pattern.as_dict()
        sd["score"] = self.score
        sd["ranking"] = self.ranking
        sd["dense_layers"] = dict(self.dense_layers)
        sd["padded_layers"] = dict(self.padded_layers)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Load masks saved by :meth:`state_dict` into this prepared sparsifier.

        Raises
        ------
        MaskError
            If the pattern differs, a layer is missing on either side, or a mask does not fit
            its layer (the message names the layer).
        """
        got = state_dict.get("pattern")
        if got is not None and got != self.pattern.as_dict():
            raise MaskError(f"sparsifier state has pattern {got}, this sparsifier "
                            f"{self.pattern.as_dict()}")
        states = state_dict.get("state", {})
        by_fqn = {g["tensor_fqn"]: g for g in self.groups}
        for fqn in states:
            if fqn not in by_fqn:
                raise MaskError(f"layer {fqn.removesuffix('.weight')}: in the saved state but not "
                                f"prepared here (prepared: "
                                f"{', '.join(g['module_fqn'] for g in self.groups) or 'none'})")
        if strict:
            missing = [f for f in by_fqn if f not in states]
            if missing:
                raise MaskError(f"layer {missing[0].removesuffix('.weight')}: prepared here but "
                                f"has no mask in the saved state")
        levels = {g["tensor_fqn"]: g.get("sparsity_level")
                  for g in state_dict.get("groups", [])}
        for fqn, s in states.items():
            g = by_fqn[fqn]
            p = self._param(g)
            w = getattr(g["module"], g["tensor_name"])
            check_mask(g["module_fqn"], self.pattern, s["mask"], w.shape)
            p.set_mask(s["mask"])
            self.state[fqn]["mask"] = p.mask
            if levels.get(fqn) is not None:
                g["sparsity_level"] = float(levels[fqn])

    @classmethod
    def from_masks(cls, model: nn.Module, masks: Mapping[str, torch.Tensor],
                   pattern: Pattern, dense_layers: Mapping[str, str] | None = None,
                   padded_layers: Mapping[str, str] | None = None) -> PatternSparsifier:
        """A frozen sparsifier holding ``masks`` (no further pruning: ``step()`` is a no-op).

        Used to keep a pruned model's pattern during fine-tuning or QAT. ``dense_layers`` and
        ``padded_layers`` carry the reasons of the sparsifier that made the masks into
        :meth:`report`.

        Raises
        ------
        MaskError
            If a mask names no Conv2d/Linear layer of ``model`` or does not fit it.
        """
        modules = dict(model.named_modules())
        for name, mk in masks.items():
            if name not in modules or not _is_prunable(modules[name]):
                raise MaskError(f"layer {name}: has a mask but the model has no Conv2d/Linear "
                                f"of that name")
            check_mask(name, pattern, mk, _raw_weight(modules[name]).shape)
        lv = {n: 1.0 - float(m.sum()) / m.numel() for n, m in masks.items()}
        if isinstance(pattern, NMPattern):
            lv = {n: (pattern.sparsity if v > 0 else 0.0) for n, v in lv.items()}
        sp = cls(pattern, sparsity=0.0 if isinstance(pattern, NMPattern) else 0.5,
                 dense_first_conv=False)
        sp.prepare(model, [{"tensor_fqn": f"{n}.weight", "sparsity_level": lv[n]}
                           for n in masks])
        for g in sp.groups:
            sp._param(g).set_mask(masks[g["module_fqn"]])
        sp.enable_mask_update = False
        if dense_layers is not None:
            sp.dense_layers = dict(dense_layers)
        if padded_layers is not None:
            sp.padded_layers = {n: v for n, v in padded_layers.items() if n in masks}
        return sp


def layer_reports(model: nn.Module, pattern: Pattern, masks: Mapping[str, torch.Tensor],
                  dense_layers: Mapping[str, str] | None = None,
                  padded_layers: Mapping[str, str] | None = None) -> list[LayerReport]:
    """One :class:`LayerReport` per Conv2d/Linear layer of ``model``, in module order.

    Parameters
    ----------
    model : torch.nn.Module
    pattern : Pattern
    masks : dict
        ``{module_name: group mask}`` of the pruned layers.
    dense_layers, padded_layers : dict, optional
        ``{module_name: reason}`` as kept by the sparsifiers.
    """
    dense_layers = dense_layers or {}
    padded_layers = padded_layers or {}
    out: list[LayerReport] = []
    for name, m in model.named_modules():
        if not _is_prunable(m):
            continue
        w = _raw_weight(m)
        kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
        shape = tuple(int(s) for s in w.shape)
        if name in masks:
            mk = masks[name].cpu()
            sizes = pattern.group_sizes(shape)
            zero = ~mk
            out.append(LayerReport(
                name, kind, shape, True, padded_layers.get(name, ""), mk.numel(),
                int(zero.sum()), float(zero.sum()) / mk.numel(),
                float(sizes[zero].sum() / sizes.sum())))
        else:
            out.append(LayerReport(name, kind, shape, False,
                                   dense_layers.get(name, "not prepared")))
    return out


def format_report(reports: list[LayerReport]) -> str:
    """The layer table printed by ``tilewright prune``."""
    lines = [f"{'layer':34s} {'kind':6s} {'weight':>20s} {'groups':>7s} {'zero':>7s} "
             f"{'sparsity':>8s}  note"]
    for r in reports:
        shape = "x".join(str(s) for s in r.weight_shape)
        if r.pruned:
            lines.append(f"{r.name:34s} {r.kind:6s} {shape:>20s} {r.groups:7d} "
                         f"{r.zero_groups:7d} {r.sparsity:8.4f}  {r.reason}")
        else:
            lines.append(f"{r.name:34s} {r.kind:6s} {shape:>20s} {'-':>7s} {'-':>7s} "
                         f"{'dense':>8s}  {r.reason}")
    pr = [r for r in reports if r.pruned]
    if pr:
        tot = sum(r.weight_sparsity * math.prod(r.weight_shape) for r in pr)
        allw = sum(math.prod(r.weight_shape) for r in reports)
        lines.append(f"{len(pr)} of {len(reports)} conv/FC layers pruned; {tot / allw:.4f} of "
                     f"all conv/FC weights are in zero groups")
    return "\n".join(lines)
