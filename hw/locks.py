"""Lock unit: counting semaphores shared by datamover channels and tile cores (Amaranth 0.5).

A :class:`LockUnit` holds ``n_locks`` unsigned lock values and serves ``n_ports`` requesters,
each through a :func:`lock_port_signature` port. Two operations, as on AIE-ML:

* **acquire-greater-equal** ``v``: granted only when ``value >= v``; then ``value -= v``;
* **release** ``v``: always granted; ``value += v``, saturating at ``2**value_bits - 1`` and
  setting the sticky ``overflow`` flag when the sum does not fit.

Protocol of a port (like a stream's valid/ready): the requester raises ``req`` with ``op``,
``id`` and ``val`` and holds all four stable until the cycle in which ``gnt`` is high; the
operation takes effect at the end of that cycle. ``gnt`` is combinational (it depends on
``req``, ``op``, ``id``, ``val`` and the lock values), so a request can be granted in its first
cycle.

Arbitration: at most one operation per cycle over the whole unit. Among the ports whose
request *can* be granted this cycle (a release, or an acquire whose lock holds enough), the
grant goes round-robin: to the first such port after the one granted last (port 0 first after
reset). An acquire that cannot be satisfied never blocks other ports, and a port whose
request stays grantable is served within ``n_ports`` cycles.

Requests naming a lock ``>= n_locks`` are never granted and set the sticky ``bad_id`` flag
(the requester stalls, which a watchdog sees). The ``wr_*`` port sets a lock value (an
initialisation or debug write); no request is granted in a cycle with ``wr_en``. The
``rd_*`` port reads a lock value combinationally (debug, watchdog: which lock holds what).
:mod:`tilewright.sim.lock_model` is the cycle-exact Python model.
"""

from __future__ import annotations

from amaranth.hdl import Array, Module, Mux, Signal
from amaranth.lib import enum, wiring
from amaranth.lib.wiring import In, Out

__all__ = [
    "LOCK_ID_BITS", "MAX_LOCKS", "LockOp", "LockUnit", "lock_port_signature",
]

#: Width of a lock id on every lock port (64 locks at most: the memtile's count, and the
#: tile ISA's ACQ/REL lock field).
LOCK_ID_BITS = 6
MAX_LOCKS = 1 << LOCK_ID_BITS
#: Most requesters one unit serves (a memtile has 6 + 6 channels; cores and neighbours add a
#: few). The round-robin arbiter is a priority chain over the ports.
MAX_PORTS = 32


class LockOp(enum.Enum, shape=1):
    """Operation on a lock port (``op``): the same encoding as the tile's ``lk_op``."""

    #: Wait until ``value >= val``, then ``value -= val``.
    ACQUIRE = 0
    #: ``value += val`` (saturating; ``overflow`` flags a clipped sum).
    RELEASE = 1


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    """``value`` if it is an int (not a bool) in ``lo..hi``; otherwise TypeError/ValueError
    naming ``name``, the value and the accepted range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer from {lo} to {hi}, not {value!r}")
    return value


def lock_port_signature(value_bits: int = 6) -> wiring.Signature:
    """The signature of a lock port, from the requester's side.

    Parameters
    ----------
    value_bits : int
        Width of ``val`` (1 to 16); the lock unit's ``value_bits``.

    Returns
    -------
    wiring.Signature
        Members ``req: Out(1)``, ``op: Out(LockOp)``, ``id: Out(LOCK_ID_BITS)``,
        ``val: Out(value_bits)`` and ``gnt: In(1)``.

    Raises
    ------
    TypeError, ValueError
        If ``value_bits`` is not an integer from 1 to 16.
    """
    check_int("value_bits", value_bits, 1, 16)
    return wiring.Signature({
        "req": Out(1),
        "op": Out(LockOp),
        "id": Out(LOCK_ID_BITS),
        "val": Out(value_bits),
        "gnt": In(1),
    })


class LockUnit(wiring.Component):
    """``n_locks`` counting semaphores behind ``n_ports`` round-robin arbitrated ports.

    Parameters
    ----------
    n_locks : int
        Number of locks, 1 to 64 (AIE-ML: 16 per tile, 64 per memtile).
    n_ports : int
        Number of requester ports, 1 to 32.
    value_bits : int
        Width of a lock value (unsigned), 1 to 16. Default 6 (0..63, as on AIE-ML).

    Members
    -------
    ports : In(lock_port_signature(value_bits)).array(n_ports)
        Requester ports (``req``, ``op``, ``id``, ``val`` in; ``gnt`` out).
    wr_en, wr_id, wr_value : In
        Set lock ``wr_id`` to ``wr_value`` (ignored for ``wr_id >= n_locks``). Blocks every
        grant in its cycle.
    rd_id : In(LOCK_ID_BITS)
        Lock to read.
    rd_value : Out(value_bits)
        Its value, combinationally (0 for ``rd_id >= n_locks``).
    overflow : Out(1)
        Sticky: a release was clipped at ``2**value_bits - 1``.
    bad_id : Out(1)
        Sticky: a port requested a lock ``>= n_locks``.
    error_id : Out(LOCK_ID_BITS)
        The lock named by the first request that set ``overflow`` or ``bad_id``.
    clear : In(1)
        Clears ``overflow`` and ``bad_id``.

    Raises
    ------
    TypeError, ValueError
        If a parameter is not an integer in its range.
    """

    def __init__(self, n_locks: int, n_ports: int, value_bits: int = 6) -> None:
        self.n_locks = check_int("n_locks", n_locks, 1, MAX_LOCKS)
        self.n_ports = check_int("n_ports", n_ports, 1, MAX_PORTS)
        self.value_bits = check_int("value_bits", value_bits, 1, 16)
        super().__init__({
            "ports": In(lock_port_signature(value_bits)).array(n_ports),
            "wr_en": In(1),
            "wr_id": In(LOCK_ID_BITS),
            "wr_value": In(value_bits),
            "rd_id": In(LOCK_ID_BITS),
            "rd_value": Out(value_bits),
            "overflow": Out(1),
            "bad_id": Out(1),
            "error_id": Out(LOCK_ID_BITS),
            "clear": In(1),
        })

    def elaborate(self, platform):
        m = Module()
        NL, NP, VB = self.n_locks, self.n_ports, self.value_bits
        vmax = (1 << VB) - 1

        values = [Signal(VB, name=f"lock{i}") for i in range(NL)]
        varr = Array(values)

        # Which ports could be granted now.
        elig = Signal(NP)
        bad = Signal(NP)
        for p, port in enumerate(self.ports):
            known = port.id < NL
            enough = varr[port.id] >= port.val
            m.d.comb += [
                elig[p].eq(port.req & known & ((port.op == LockOp.RELEASE) | enough)),
                bad[p].eq(port.req & ~known),
            ]

        # Round-robin: the first eligible port after `last`, else the first eligible port.
        last = Signal(range(NP), init=NP - 1)
        after = Signal(NP)
        m.d.comb += [after[p].eq(last < p) for p in range(NP)]
        pick = Signal(NP)
        m.d.comb += pick.eq(Mux((elig & after).any(), elig & after, elig))
        onehot = Signal(NP)
        m.d.comb += onehot.eq(pick & (~pick + 1))
        grant = Signal(NP)
        m.d.comb += grant.eq(Mux(self.wr_en, 0, onehot))
        for p, port in enumerate(self.ports):
            m.d.comb += port.gnt.eq(grant[p])

        # The granted request.
        gidx = Signal(range(NP))
        for p in range(NP):
            with m.If(onehot[p]):
                m.d.comb += gidx.eq(p)
        gid = Array(port.id for port in self.ports)[gidx]
        gop = Array(port.op for port in self.ports)[gidx]
        gval = Array(port.val for port in self.ports)[gidx]
        cur = varr[gid]
        total = Signal(VB + 1)
        m.d.comb += total.eq(cur + gval)
        clipped = (gop == LockOp.RELEASE) & (total > vmax)
        new = Mux(gop == LockOp.ACQUIRE, cur - gval, Mux(total > vmax, vmax, total))

        with m.If(grant.any()):
            m.d.sync += last.eq(gidx)
            for i in range(NL):
                with m.If(gid == i):
                    m.d.sync += values[i].eq(new[:VB])
        with m.If(self.wr_en):
            for i in range(NL):
                with m.If(self.wr_id == i):
                    m.d.sync += values[i].eq(self.wr_value)

        # Sticky error flags; error_id names the lock of the first offence.
        first_bad_id = Signal(LOCK_ID_BITS)
        for p in reversed(range(NP)):
            with m.If(bad[p]):
                m.d.comb += first_bad_id.eq(self.ports[p].id)
        overflow_now = grant.any() & clipped
        with m.If(self.clear):
            m.d.sync += [self.overflow.eq(0), self.bad_id.eq(0)]
        with m.Else():
            with m.If(~self.overflow & ~self.bad_id):
                with m.If(overflow_now):
                    m.d.sync += self.error_id.eq(gid)
                with m.Elif(bad.any()):
                    m.d.sync += self.error_id.eq(first_bad_id)
            with m.If(overflow_now):
                m.d.sync += self.overflow.eq(1)
            with m.If(bad.any()):
                m.d.sync += self.bad_id.eq(1)

        m.d.comb += self.rd_value.eq(Mux(self.rd_id < NL, varr[self.rd_id], 0))
        return m
