"""Sparsity schedules: objects shaped like LR schedulers that set ``sparsity_level``.

* One-shot: no schedule -- ``sparsifier.step()`` once at the target, then fine-tune.
* :class:`IterativeSL` -- the paper's incremental schedule: each round zeroes at most
  ``fraction`` of the blocks still remaining, ``s_r = min(s_f, 1 - (1 - fraction)**(r+1))``,
  with fine-tuning between rounds.
* :class:`CubicSL` -- torch.ao's gradual schedule (Zhu & Gupta),
  ``s_t = s_f + (s_0 - s_f) (1 - (t - t_0) / (n dt))**3``, re-exported unchanged.

Use them as torch.ao does::

    for r in range(schedule.rounds):
        sparsifier.step()        # masks at the current level
        fine_tune(...)
        schedule.step()          # next round's level
"""

from __future__ import annotations

import math
import warnings

from torch.ao.pruning import BaseSparsifier
from torch.ao.pruning.scheduler.base_scheduler import BaseScheduler
from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL

__all__ = ["CubicSL", "IterativeSL", "iterative_levels"]


def iterative_levels(target: float, fraction: float) -> list[float]:
    """The levels of the rounds of :class:`IterativeSL`, ending at ``target``.

    Parameters
    ----------
    target : float
        Final sparsity in ``[0, 1)``.
    fraction : float
        Fraction of the remaining groups zeroed per round, in ``(0, 1]``.

    Returns
    -------
    list of float
        Non-decreasing; the last is ``target`` (empty when ``target`` is 0).
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), not {target!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction per round must be in (0, 1], not {fraction!r}")
    out: list[float] = []
    while target > 0.0 and (not out or out[-1] < target):
        s = min(target, 1.0 - (1.0 - fraction) ** (len(out) + 1))
        out.append(target if math.isclose(s, target, rel_tol=0.0, abs_tol=1e-12) else s)
    return out


class IterativeSL(BaseScheduler):
    """Round ``r`` (0-based) sets each group to ``min(s_f, 1 - (1 - fraction)**(r + 1))``.

    ``s_f`` is the group's ``sparsity_level`` when the schedule is created (as for torch's
    schedulers). The level never decreases, and no round zeroes more than ``fraction`` of
    the groups remaining before it.

    Parameters
    ----------
    sparsifier : torch.ao.pruning.BaseSparsifier
        A prepared sparsifier.
    fraction : float
        At most this fraction of the remaining groups is zeroed per round (paper: 0.2).
    last_epoch : int
        As for torch's schedulers (-1: start).
    """

    def __init__(self, sparsifier: BaseSparsifier, fraction: float = 0.2,
                 last_epoch: int = -1) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], not {fraction!r}")
        self.fraction = float(fraction)
        super().__init__(sparsifier, last_epoch)

    @property
    def rounds(self) -> int:
        """Rounds until every group is at its final level."""
        return max((len(iterative_levels(s, self.fraction)) for s in self.base_sl), default=0)

    def get_sl(self) -> list[float]:
        if not self._get_sl_called_within_step:
            warnings.warn("To get the last sparsity level computed by the scheduler, "
                          "please use `get_last_sl()`.", stacklevel=2)
        r = self.last_epoch
        return [min(s_f, 1.0 - (1.0 - self.fraction) ** (r + 1)) for s_f in self.base_sl]
