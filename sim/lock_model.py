"""Cycle-exact Python model of :class:`tilewright.hw.locks.LockUnit`.

:meth:`LockModel.step` takes what every port presents in one cycle and returns the grants of
that cycle, updating the lock values as the RTL does at the clock edge. The arbitration, the
saturation and the sticky flags follow the docstring of :mod:`tilewright.hw.locks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tilewright.hw.locks import MAX_LOCKS, MAX_PORTS, LockOp

__all__ = ["LockModel", "LockRequest"]


@dataclass(frozen=True)
class LockRequest:
    """What a port presents while ``req`` is high.

    Attributes
    ----------
    op : LockOp
        Acquire or release.
    id : int
        Lock id (0 to 63; ids ``>= n_locks`` are never granted).
    value : int
        The amount (``val``).
    """

    op: LockOp
    id: int
    value: int


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer from {lo} to {hi}, not {value!r}")
    return value


class LockModel:
    """The lock unit, one :meth:`step` per clock cycle.

    Parameters
    ----------
    n_locks, n_ports, value_bits : int
        As for :class:`tilewright.hw.locks.LockUnit`.

    Attributes
    ----------
    values : list of int
        The lock values (all 0 after construction, as after reset).
    overflow, bad_id : bool
        The sticky error flags.
    error_id : int
        The lock of the first offence.
    """

    def __init__(self, n_locks: int, n_ports: int, value_bits: int = 6) -> None:
        self.n_locks = _check_int("n_locks", n_locks, 1, MAX_LOCKS)
        self.n_ports = _check_int("n_ports", n_ports, 1, MAX_PORTS)
        self.value_bits = _check_int("value_bits", value_bits, 1, 16)
        self.vmax = (1 << value_bits) - 1
        self.values = [0] * n_locks
        self.last = n_ports - 1
        self.overflow = False
        self.bad_id = False
        self.error_id = 0

    def grantable(self, r: LockRequest) -> bool:
        """Whether ``r`` could be granted now (a release, or an acquire with enough value)."""
        if not 0 <= r.id < self.n_locks:
            return False
        return r.op == LockOp.RELEASE or self.values[r.id] >= r.value

    def step(self, requests: Sequence[LockRequest | None], *,
             write: tuple[int, int] | None = None, clear: bool = False) -> list[bool]:
        """One clock cycle.

        Parameters
        ----------
        requests : sequence of LockRequest or None
            What each of the ``n_ports`` ports presents (None: ``req`` low).
        write : (id, value), optional
            The ``wr_*`` port (``wr_en`` high).
        clear : bool
            The ``clear`` input.

        Returns
        -------
        list of bool
            ``gnt`` of every port in this cycle.

        Raises
        ------
        ValueError
            If ``requests`` does not have one entry per port.
        """
        if len(requests) != self.n_ports:
            raise ValueError(f"requests must have {self.n_ports} entries (n_ports), "
                             f"not {len(requests)}")
        grants = [False] * self.n_ports
        elig = [r is not None and self.grantable(r) for r in requests]
        bad = [p for p, r in enumerate(requests) if r is not None and not 0 <= r.id < self.n_locks]
        order = [*range(self.last + 1, self.n_ports), *range(self.last + 1)]
        chosen = next((p for p in order if elig[p]), None)
        overflow_now = False
        gid = 0
        updates: dict[int, int] = {}
        if chosen is not None and write is None:
            r = requests[chosen]
            assert r is not None
            grants[chosen] = True
            self.last = chosen
            gid = r.id
            cur = self.values[gid]
            if r.op == LockOp.ACQUIRE:
                updates[gid] = cur - r.value
            else:
                overflow_now = cur + r.value > self.vmax
                updates[gid] = min(cur + r.value, self.vmax)
        if write is not None:
            wid, wval = write
            if 0 <= wid < self.n_locks:
                updates[wid] = wval & self.vmax
        if clear:
            self.overflow = self.bad_id = False
        else:
            if not self.overflow and not self.bad_id:
                if overflow_now:
                    self.error_id = gid
                elif bad:
                    r = requests[bad[0]]
                    assert r is not None
                    self.error_id = r.id
            self.overflow |= overflow_now
            self.bad_id |= bool(bad)
        for i, v in updates.items():
            self.values[i] = v
        return grants
