"""Procrustes-style sparse training from scratch: Dropback at block granularity.

Every pruned weight is written ``w = d * w_init + a``: ``w_init`` is its initial value,
``d`` a decay factor (1 at the start, multiplied by ``decay`` every ``decay_every`` steps and
set to 0 once below ``zero_below``), and ``a`` the accumulated change. Only a fixed budget of
**tracked** groups (blocks) may hold a non-zero ``a``; after every optimiser step
:meth:`DropbackSparsifier.step` scores each group by its accumulated change (the L2 norm of
``a`` over the block, by default), keeps the budget of highest-scoring groups and resets the
others to ``d * w_init``. An untracked group thus competes with one step of change against
the tracked groups' whole history (Dropback, Golub et al.; Procrustes, Yang et al.). Once ``d``
reaches 0 the untracked groups are exactly zero: the model has the block pattern at the
budget's sparsity for the rest of training.

Instead of an exact top-k over all groups each step, Procrustes estimates the threshold with
a streaming quantile estimator. :class:`StreamingQuantile` does that from counts alone; the
groups above the estimate are then trimmed (or topped up from just below it) to the budget,
so the tracked count is **exactly** the budget every step while the sort only touches the
few groups the estimate got wrong. :attr:`DropbackSparsifier.estimate_error` reports how far
off the estimate was.

Unlike :class:`~tilewright.sw.prune.sparsifier.PatternSparsifier`, Dropback attaches no
parametrization: untracked weights must see their gradient to compete, so the projection is
done in place by ``step()``. ``squash_mask()`` sets ``d = 0`` and zeroes the untracked groups.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.ao.pruning import BaseSparsifier

from .patterns import SCORES, BlockPattern, NMPattern, Pattern, UnstructuredPattern
from .sparsifier import (
    RANKINGS,
    MaskError,
    MaskQueries,
    _normalised,
    _raw_weight,
    check_mask,
    resolve_config,
    row_best,
    zero_groups,
)

__all__ = ["DropbackSparsifier", "StreamingQuantile", "select_budget"]


class StreamingQuantile:
    """Streaming estimate of the score above which a given number of groups lies.

    The estimate ``tau`` starts at the exact quantile of the first batch of scores; after that
    it only sees counts: ``tau *= exp(rate * clamp((above - target) / target, -1, 1))``, where
    ``above`` is how many scores exceeded ``tau`` and ``target`` how many should have.

    Parameters
    ----------
    rate : float
        Step size of the multiplicative update.
    """

    def __init__(self, rate: float = 0.5) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, not {rate!r}")
        self.rate = float(rate)
        self.tau: float | None = None

    def update(self, scores: torch.Tensor, target: int) -> int:
        """Move the estimate after seeing ``scores``; returns how many were above it."""
        if self.tau is None or not math.isfinite(self.tau) or self.tau <= 0:
            n = scores.numel()
            if n == 0 or target <= 0:
                self.tau = float(scores.max()) if n else 1.0
            else:
                kth = torch.sort(scores.flatten(), descending=True).values[min(target, n) - 1]
                self.tau = max(float(kth), 1e-30)
            return int((scores > self.tau).sum())
        above = int((scores > self.tau).sum())
        err = (above - target) / max(target, 1)
        self.tau *= math.exp(self.rate * max(-1.0, min(1.0, err)))
        self.tau = max(self.tau, 1e-30)
        return above

    def state_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "tau": self.tau}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.rate = float(sd["rate"])
        self.tau = None if sd["tau"] is None else float(sd["tau"])


def select_budget(scores: torch.Tensor, sizes: torch.Tensor, budget: float,
                  tau: float | None) -> torch.Tensor:
    """Keep the highest-scoring groups whose sizes add up to at most ``budget``.

    Groups above ``tau`` are ranked first (only among themselves); if they do not fill the
    budget, the best of the rest follow. The result equals an exact top-``budget`` selection
    (ties to the lower index); ``tau`` only decides which subset gets sorted.

    Parameters
    ----------
    scores : torch.Tensor
        1-D group scores.
    sizes : torch.Tensor
        1-D group sizes (ones to count groups).
    budget : float
        Total size to keep.
    tau : float or None
        Threshold estimate (``None``: sort everything).

    Returns
    -------
    torch.Tensor
        bool, ``scores``' shape: True = tracked.
    """
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if budget <= 0 or scores.numel() == 0:
        return keep
    idx_all = torch.arange(scores.numel(), device=scores.device)
    above = scores > tau if tau is not None else torch.ones_like(keep)

    def ranked(sel: torch.Tensor) -> torch.Tensor:
        ids = idx_all[sel]
        order = torch.sort(-scores[ids], stable=True).indices
        return ids[order]

    first = ranked(above)
    cum = torch.cumsum(sizes[first], 0)
    n = int(torch.searchsorted(cum, torch.tensor(budget + 1e-9, dtype=cum.dtype,
                                                 device=cum.device), right=True))
    keep[first[:n]] = True
    if n == first.numel() and tau is not None:
        left = budget - (float(cum[-1]) if n else 0.0)
        rest = ranked(~above)
        cum2 = torch.cumsum(sizes[rest], 0)
        m = int(torch.searchsorted(cum2, torch.tensor(left + 1e-9, dtype=cum2.dtype,
                                                      device=cum2.device), right=True))
        keep[rest[:m]] = True
    return keep


class DropbackSparsifier(MaskQueries, BaseSparsifier):
    """Dropback sparse training with decaying initial weights and a streaming threshold.

    Call :meth:`step` after every ``optimizer.step()``.

    Parameters
    ----------
    pattern : Pattern
        :class:`BlockPattern` (default 8x8) or :class:`UnstructuredPattern`.
    sparsity : float
        Fraction of groups left untracked (zero at the end), in ``[0, 1)``.
    score : str
        Score of a group's accumulated change: ``"l2"``, ``"l1"`` or ``"variance"``.
    decay : float
        Factor applied to ``d`` every ``decay_every`` steps (Procrustes: 0.9).
    decay_every : int
        Steps between decays.
    zero_below : float
        ``d`` becomes exactly 0 once below this.
    ranking : str
        ``"layer"``: each layer tracks exactly ``round((1 - s) * groups)`` groups;
        ``"global"``: one budget of ``(1 - s)`` of all prunable weights, groups ranked across
        layers by per-weight score.
    dense_first_conv, pad
        As for :class:`~tilewright.sw.prune.sparsifier.PatternSparsifier`.
    quantile_rate : float
        Step size of the :class:`StreamingQuantile` estimators.
    keep_rows : bool
        Every block row keeps its best block tracked (default): without it the
        rich-get-richer dynamics of training from scratch can untrack every block of a row,
        cutting output channels off -- e.g. two classes of a 10-class classifier.
    """

    def __init__(self, pattern: Pattern | None = None, sparsity: float = 0.5,
                 score: str = "l2", decay: float = 0.9, decay_every: int = 10,
                 zero_below: float = 1e-3, ranking: str = "layer",
                 dense_first_conv: bool = True, pad: str = "pad",
                 quantile_rate: float = 0.5, keep_rows: bool = True) -> None:
        pattern = BlockPattern() if pattern is None else pattern
        if isinstance(pattern, NMPattern) or not isinstance(pattern, (BlockPattern,
                                                                      UnstructuredPattern)):
            raise ValueError(f"Dropback takes a block or unstructured pattern, not {pattern}")
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), not {sparsity!r}")
        if score not in SCORES or (score == "variance" and not isinstance(pattern,
                                                                           BlockPattern)):
            raise ValueError(f"score must be one of {', '.join(SCORES)} ('variance' needs "
                             f"blocks), not {score!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], not {decay!r}")
        if isinstance(decay_every, bool) or not isinstance(decay_every, int) or decay_every < 1:
            raise ValueError(f"decay_every must be a positive int, not {decay_every!r}")
        if ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, not {ranking!r}")
        super().__init__(defaults={"sparsity_level": float(sparsity)})
        self.pattern = pattern
        self.score = score
        self.decay = float(decay)
        self.decay_every = decay_every
        self.zero_below = float(zero_below)
        self.ranking = ranking
        self.dense_first_conv = dense_first_conv
        self.pad = pad
        self.quantile_rate = float(quantile_rate)
        self.keep_rows = bool(keep_rows)
        self.decay_factor = 1.0
        self.steps = 0
        self.estimate_error = 0.0
        self.estimate_error_sum = 0.0
        self.estimate_count = 0
        self.dense_layers: dict[str, str] = {}
        self.padded_layers: dict[str, str] = {}
        self.estimators: dict[str, StreamingQuantile] = {}
        self.squashed = False

    # prepare ----------------------------------------------------------------------------------
    def prepare(self, model: nn.Module,
                config: Iterable[Mapping[str, Any]] | Mapping[str, float] | None) -> None:
        """Record the initial weights and start with every group tracked at ``d = 1``.

        ``config`` is as for :meth:`PatternSparsifier.prepare`.
        """
        entries, self.dense_layers, self.padded_layers = resolve_config(
            model, config, self.pattern, float(self.defaults["sparsity_level"]),
            self.dense_first_conv, self.pad, self.ranking)
        for e in entries:
            if e["sparsity_level"] >= 1.0:
                raise ValueError(f"layer {e['tensor_fqn'].removesuffix('.weight')}: Dropback "
                                 f"sparsity must be below 1, not {e['sparsity_level']!r}")
        super().prepare(model, entries)

    def _prepare(self, *args: Any, **kwargs: Any) -> None:
        for g in self.groups:
            w = _raw_weight(g["module"])
            st = self.state[g["tensor_fqn"]]
            st["mask"] = torch.ones(self.pattern.mask_shape(w.shape), dtype=torch.bool,
                                    device=w.device)
            st["init"] = w.detach().clone()
        key = "<global>" if self.ranking == "global" else None
        names = [key] if key else [g["module_fqn"] for g in self.groups]
        self.estimators = {n: StreamingQuantile(self.quantile_rate) for n in names}

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        raise NotImplementedError("DropbackSparsifier updates all layers together in step()")

    # step -------------------------------------------------------------------------------------
    def _next_decay(self) -> float:
        d = self.decay_factor
        if self.steps % self.decay_every == 0:
            d *= self.decay
        return 0.0 if d < self.zero_below else d

    def step(self, use_path: bool = True) -> None:
        """Project every layer onto its tracked budget (call after ``optimizer.step()``)."""
        if self.squashed:
            raise RuntimeError("step() after squash_mask(): Dropback training has ended")
        if not self.enable_mask_update:
            return
        with torch.no_grad():
            d_prev = self.decay_factor
            self.steps += 1
            d_next = self._next_decay()
            ws = [_raw_weight(g["module"]) for g in self.groups]
            accs = [w - d_prev * self.state[g["tensor_fqn"]]["init"]
                    for g, w in zip(self.groups, ws, strict=True)]
            scores = [self.pattern.scores(a, self.score) for a in accs]
            errors: list[float] = []
            prot = ([row_best(sc) if self.keep_rows else None for sc in scores])
            if self.ranking == "global":
                masks = self._select_global(ws, scores, prot, errors)
            else:
                masks = []
                for g, s, pr in zip(self.groups, scores, prot, strict=True):
                    n = s.numel()
                    k = n - zero_groups(float(g["sparsity_level"]), n)
                    est = self.estimators[g["module_fqn"]]
                    tau = est.tau
                    ranked = s.flatten()
                    if pr is not None and k >= s.shape[0]:
                        ranked = ranked.clone()
                        ranked[pr.flatten()] = torch.inf      # tracked first
                    keep = select_budget(ranked, torch.ones(n, dtype=s.dtype, device=s.device),
                                         float(k), tau)
                    above = est.update(s.flatten(), k)
                    if tau is not None:
                        errors.append(abs(above - k) / max(k, 1))
                    masks.append(keep.reshape(s.shape))
            for g, w, a, m in zip(self.groups, ws, accs, masks, strict=True):
                st = self.state[g["tensor_fqn"]]
                st["mask"] = m
                keep = self.pattern.expand(m, w.shape).to(w.dtype)
                w.copy_(d_next * st["init"] + a * keep)
            self.decay_factor = d_next
            if errors:
                self.estimate_error = sum(errors) / len(errors)
                self.estimate_error_sum += self.estimate_error
                self.estimate_count += 1

    def _select_global(self, ws: list[torch.Tensor], scores: list[torch.Tensor],
                       prot: list[torch.Tensor | None], errors: list[float]
                       ) -> list[torch.Tensor]:
        level = float(self.groups[0]["sparsity_level"])
        sizes = [self.pattern.group_sizes(w.shape).to(w.device) for w in ws]
        parts = []
        for s, w, pr in zip(scores, ws, prot, strict=True):
            v = _normalised(s, self.pattern.unit_size(w.shape), self.score)
            if pr is not None:
                v = v.clone()
                v[pr] = torch.inf
            parts.append(v.flatten())
        flat = torch.cat(parts)
        zs = torch.cat([z.flatten() for z in sizes])
        budget = (1.0 - level) * float(zs.sum())
        est = self.estimators["<global>"]
        tau = est.tau
        keep = select_budget(flat, zs, budget, tau)
        k = int(keep.sum())
        above = est.update(flat, k)
        if tau is not None:
            errors.append(abs(above - k) / max(k, 1))
        out, i = [], 0
        for s in scores:
            out.append(keep[i:i + s.numel()].reshape(s.shape))
            i += s.numel()
        return out

    @property
    def mean_estimate_error(self) -> float:
        """Mean over all steps of :attr:`estimate_error`: ``|above - budget| / budget``, the
        relative miss of the streaming threshold before the exact trim."""
        return self.estimate_error_sum / self.estimate_count if self.estimate_count else 0.0

    # squash, masks, report ---------------------------------------------------------------------
    def squash_mask(self, *args: Any, **kwargs: Any) -> None:
        """End Dropback: ``d = 0``, untracked groups exactly zero, initial weights dropped."""
        if self.squashed:
            return
        with torch.no_grad():
            for g in self.groups:
                st = self.state[g["tensor_fqn"]]
                w = _raw_weight(g["module"])
                a = w - self.decay_factor * st["init"]
                w.copy_(a * self.pattern.expand(st["mask"], w.shape).to(w.dtype))
                st.pop("init", None)
        self.decay_factor = 0.0
        self.squashed = True

    def tracked(self) -> dict[str, int]:
        """``{module_name: number of tracked groups}``."""
        return {n: int(m.sum()) for n, m in self.masks().items()}

    def budget(self) -> dict[str, int]:
        """``{module_name: tracked-group budget}`` (per-layer ranking)."""
        out = {}
        for g in self.groups:
            n = self.state[g["tensor_fqn"]]["mask"].numel()
            out[g["module_fqn"]] = n - zero_groups(float(g["sparsity_level"]), n)
        return out

    # state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Masks, initial weights, decay, step count and threshold estimates."""
        sd = super().state_dict()
        sd["state"] = {k: {kk: vv.detach().cpu().clone() for kk, vv in v.items()}
                       for k, v in self.state.items()}
        sd.update(pattern=self.pattern.as_dict(), decay_factor=self.decay_factor,
                  steps=self.steps, squashed=self.squashed,
                  estimate_error=[self.estimate_error_sum, self.estimate_count],
                  estimators={k: e.state_dict() for k, e in self.estimators.items()},
                  dense_layers=dict(self.dense_layers),
                  padded_layers=dict(self.padded_layers))
        return sd

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Load a :meth:`state_dict` into this prepared sparsifier.

        Raises
        ------
        MaskError
            If the pattern differs, a layer is missing, or a mask or initial weight does not
            fit its layer (the message names the layer).
        """
        if state_dict.get("pattern") != self.pattern.as_dict():
            raise MaskError(f"Dropback state has pattern {state_dict.get('pattern')}, this "
                            f"sparsifier {self.pattern.as_dict()}")
        by_fqn = {g["tensor_fqn"]: g for g in self.groups}
        states = state_dict["state"]
        for fqn in set(by_fqn) ^ set(states):
            where = "in the saved state only" if fqn in states else "prepared here only"
            raise MaskError(f"layer {fqn.removesuffix('.weight')}: {where}")
        squashed = bool(state_dict.get("squashed", False))
        for fqn, s in states.items():
            g = by_fqn[fqn]
            w = _raw_weight(g["module"])
            check_mask(g["module_fqn"], self.pattern, s["mask"], w.shape)
            if not squashed and ("init" not in s or tuple(s["init"].shape) != tuple(w.shape)):
                raise MaskError(f"layer {g['module_fqn']}: initial weights missing or of the "
                                f"wrong shape (expected {tuple(w.shape)})")
            self.state[fqn]["mask"] = s["mask"].to(w.device).clone()
            if "init" in s:
                self.state[fqn]["init"] = s["init"].to(w.device, w.dtype).clone()
        self.decay_factor = float(state_dict["decay_factor"])
        self.steps = int(state_dict["steps"])
        err = state_dict.get("estimate_error", [0.0, 0])
        self.estimate_error_sum, self.estimate_count = float(err[0]), int(err[1])
        self.squashed = squashed
        for k, e in state_dict.get("estimators", {}).items():
            if k in self.estimators:
                self.estimators[k].load_state_dict(e)
