"""Per-layer sensitivity: accuracy against sparsity, one layer at a time.

:func:`sensitivity_scan` prunes each layer alone (one shot, no fine-tuning) at a few
sparsities and measures the model; :func:`choose_sparsities` turns the curves into
per-layer sparsities that reach a target overall sparsity (a fraction of all prunable
weights) while losing as little accuracy as the curves predict: starting from dense, it
repeatedly raises the layer whose next level costs the least accuracy per weight removed.
The result is a ``{layer: sparsity}`` dict that
:meth:`~tilewright.sw.prune.sparsifier.PatternSparsifier.prepare` accepts as ``config``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .patterns import NMPattern, Pattern
from .sparsifier import _raw_weight, compute_mask, select_layers

__all__ = ["SensitivityScan", "choose_sparsities", "overall_sparsity", "sensitivity_scan"]


@dataclass
class SensitivityScan:
    """Accuracy of the model with one layer pruned.

    Attributes
    ----------
    baseline : float
        Accuracy unpruned.
    levels : list of float
    accuracy : dict
        ``{layer: [accuracy at each level]}``.
    weights : dict
        ``{layer: weight count}``.
    group_fraction : dict
        ``{layer: [fraction of weights zeroed at each level]}`` (padded edge groups make it
        differ slightly from the level).
    """

    baseline: float
    levels: list[float]
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    group_fraction: dict[str, list[float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "levels": self.levels, "accuracy": self.accuracy,
                "weights": self.weights, "group_fraction": self.group_fraction}

    def table(self) -> str:
        """A text table, one row per layer."""
        head = f"{'layer':34s} {'weights':>9s} " + " ".join(f"{s:>7.3f}" for s in self.levels)
        rows = [head, f"{'(dense)':34s} {'':>9s} {self.baseline:7.4f}"]
        for n, accs in self.accuracy.items():
            rows.append(f"{n:34s} {self.weights[n]:9d} " + " ".join(f"{a:7.4f}" for a in accs))
        return "\n".join(rows)


@torch.no_grad()
def sensitivity_scan(model: nn.Module, evaluate: Callable[[nn.Module], float],
                     pattern: Pattern, levels: Sequence[float] = (0.25, 0.5, 0.75, 0.9),
                     score: str = "l2", layers: Sequence[str] | None = None,
                     dense_first_conv: bool = True, pad: str = "pad",
                     progress: Callable[[str], None] | None = None) -> SensitivityScan:
    """Prune each layer alone at each level and measure.

    Parameters
    ----------
    model : torch.nn.Module
        A float model without parametrizations; its weights are restored afterwards.
    evaluate : callable
        ``evaluate(model) -> accuracy`` (put the model in eval mode yourself).
    pattern : Pattern
    levels : sequence of float
        Sparsities to try (N:M: only ``1 - n/m`` is possible).
    score : str
    layers : sequence of str, optional
        Default: every prunable layer (:func:`~tilewright.sw.prune.sparsifier.select_layers`).
    dense_first_conv, pad
        Selection rules.
    progress : callable, optional
        Called with a line per layer.
    """
    if isinstance(pattern, NMPattern):
        levels = [pattern.sparsity]
    levels = [float(s) for s in levels]
    for s in levels:
        if not 0.0 < s <= 1.0:
            raise ValueError(f"scan levels must be in (0, 1], not {s!r}")
    if layers is None:
        layers, _, _ = select_layers(model, pattern, dense_first_conv, pad)
    modules = dict(model.named_modules())
    scan = SensitivityScan(float(evaluate(model)), levels)
    for name in layers:
        if name not in modules:
            raise ValueError(f"scan names layer {name!r}, which the model does not have")
        w = _raw_weight(modules[name])
        saved = w.detach().clone()
        accs, fracs = [], []
        sizes = pattern.group_sizes(w.shape)
        for s in levels:
            mask = compute_mask(saved, pattern, s, score)
            w.copy_(saved * pattern.expand(mask, w.shape).to(w.dtype))
            accs.append(float(evaluate(model)))
            fracs.append(float(sizes[~mask.cpu()].sum() / sizes.sum()))
        w.copy_(saved)
        scan.accuracy[name] = accs
        scan.weights[name] = int(w.numel())
        scan.group_fraction[name] = fracs
        if progress:
            progress(f"{name}: " + ", ".join(f"{s:.3f}->{a:.4f}" for s, a in zip(
                levels, accs, strict=True)))
    return scan


def choose_sparsities(scan: SensitivityScan, target: float,
                      max_level: float | None = None) -> dict[str, float]:
    """Per-layer sparsities reaching ``target`` of all scanned weights at least loss.

    Greedy: every layer starts dense; the move with the smallest predicted accuracy drop
    per weight removed (raising one layer to its next scanned level) is taken until the
    weight-weighted sparsity reaches ``target``.

    Parameters
    ----------
    scan : SensitivityScan
    target : float
        Overall sparsity over the scanned layers' weights, in ``[0, 1)``.
    max_level : float, optional
        Highest level a layer may get.

    Returns
    -------
    dict
        ``{layer: sparsity}`` (0 for layers left dense).

    Raises
    ------
    ValueError
        If the scanned levels cannot reach ``target``.
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), not {target!r}")
    levels = [0.0, *scan.levels]
    idx = dict.fromkeys(scan.accuracy, 0)
    total = sum(scan.weights.values())

    def acc(n: str, i: int) -> float:
        return scan.baseline if i == 0 else scan.accuracy[n][i - 1]

    def frac(n: str, i: int) -> float:
        return 0.0 if i == 0 else scan.group_fraction[n][i - 1]

    def removed() -> float:
        return sum(frac(n, i) * scan.weights[n] for n, i in idx.items())

    while removed() < target * total - 1e-9:
        best: tuple[float, str] | None = None
        for n, i in idx.items():
            if i + 1 >= len(levels) or (max_level is not None and levels[i + 1] > max_level):
                continue
            gain = (frac(n, i + 1) - frac(n, i)) * scan.weights[n]
            if gain <= 0:
                continue
            cost = max(acc(n, i) - acc(n, i + 1), 0.0) / gain
            if best is None or cost < best[0]:
                best = (cost, n)
        if best is None:
            raise ValueError(f"target sparsity {target} is out of reach of the scanned levels "
                             f"(at most {removed() / total:.4f})")
        idx[best[1]] += 1
    return {n: levels[i] for n, i in idx.items()}


def overall_sparsity(levels: Mapping[str, float], weights: Mapping[str, int]) -> float:
    """Weight-weighted sparsity of ``{layer: level}``."""
    tot = sum(weights[n] for n in levels)
    return sum(levels[n] * weights[n] for n in levels) / tot if tot else 0.0
