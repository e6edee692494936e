"""Round-robin arbitration for memory ports shared by datamover channels (Amaranth 0.5)."""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["RoundRobin"]


class RoundRobin(wiring.Component):
    """Picks one of ``n`` requesters, starting after the one last served.

    Parameters
    ----------
    n : int
        Requesters, at least 1.

    Members
    -------
    req : In(n)
        Requests.
    pick : Out(range(n))
        The first requester after the last served one (cyclically) that requests.
    found : Out(1)
        Some requester requests.
    served : In(1)
        The picked requester was served this cycle: the next search starts after it. A pick
        that was not served (its target was busy) keeps the search where it was.
    """

    def __init__(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, not {n!r}")
        self.n = n
        super().__init__({"req": In(n), "pick": Out(range(n)), "found": Out(1),
                          "served": In(1)})

    def elaborate(self, platform):
        m = Module()
        n = self.n
        last = Signal(range(n), init=n - 1)
        # Priority from the farthest to the nearest candidate after `last`: the nearest wins.
        for off in reversed(range(1, n + 1)):
            for cand in range(n):
                with m.If((last == (cand - off) % n) & self.req[cand]):
                    m.d.comb += [self.pick.eq(cand), self.found.eq(1)]
        with m.If(self.found & self.served):
            m.d.sync += last.eq(self.pick)
        return m
