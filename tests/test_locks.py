# amaranth: UnusedElaboratable=no
"""The lock unit: its Python model (semantics, arbitration, saturation) and the RTL against the
model cycle by cycle in Amaranth's simulator. The Verilator regression of the lock unit, shared
by an MM2S and an S2MM channel, is in test_datamover.py."""

from __future__ import annotations

import numpy as np
import pytest
from amaranth.sim import Simulator

from tilewright.hw.locks import LockOp, LockUnit, lock_port_signature
from tilewright.sim.lock_model import LockModel, LockRequest

ACQ, REL = LockOp.ACQUIRE, LockOp.RELEASE


# Constructors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, exc, msg", [
    ((0, 2), ValueError, "n_locks must be an integer from 1 to 64, not 0"),
    ((65, 2), ValueError, "n_locks must be an integer from 1 to 64, not 65"),
    ((16, 0), ValueError, "n_ports must be an integer from 1 to 32, not 0"),
    ((16, 2, 17), ValueError, "value_bits must be an integer from 1 to 16, not 17"),
    (("16", 2), TypeError, "n_locks must be an integer, not '16'"),
    ((16, True), TypeError, "n_ports must be an integer, not True"),
])
def test_constructor_validation(args, exc, msg):
    with pytest.raises(exc, match=msg):
        LockUnit(*args)
    with pytest.raises(exc, match=msg):
        LockModel(*args)


def test_port_signature():
    sig = lock_port_signature(4)
    assert {n: (m.flow.value, m.shape) for n, m in sig.members.items()} == {
        "req": ("Out", 1), "op": ("Out", LockOp), "id": ("Out", 6), "val": ("Out", 4),
        "gnt": ("In", 1)}
    with pytest.raises(ValueError, match="value_bits must be an integer from 1 to 16, not 0"):
        lock_port_signature(0)


# The model ----------------------------------------------------------------------------------

def test_acquire_waits_for_enough_value():
    lm = LockModel(4, 1)
    want = LockRequest(ACQ, 2, 3)
    assert lm.step([want]) == [False]
    lm.step([None], write=(2, 2))
    assert lm.step([want]) == [False] and lm.values[2] == 2
    assert lm.step([LockRequest(REL, 2, 1)]) == [True] and lm.values[2] == 3
    assert lm.step([want]) == [True] and lm.values[2] == 0
    assert lm.step([LockRequest(ACQ, 2, 0)]) == [True]   # v = 0: value >= 0 always


def test_release_saturates_and_flags_overflow():
    lm = LockModel(4, 2, value_bits=3)
    lm.step([LockRequest(REL, 1, 5), None])
    assert lm.step([LockRequest(REL, 1, 4), None]) == [True, False]
    assert lm.values[1] == 7 and lm.overflow and lm.error_id == 1
    lm.step([LockRequest(REL, 3, 7), None])
    assert lm.error_id == 1, "error_id keeps the first offence"
    lm.step([None, None], clear=True)
    assert not lm.overflow


def test_unknown_lock_is_never_granted():
    lm = LockModel(4, 2)
    for _ in range(3):
        assert lm.step([LockRequest(REL, 9, 1), LockRequest(REL, 0, 1)]) == [False, True]
    assert lm.bad_id and lm.error_id == 9 and lm.values[0] == 3


def test_round_robin_among_grantable_requests():
    lm = LockModel(2, 3)
    lm.step([None, None, None], write=(0, 10))
    reqs = [LockRequest(ACQ, 0, 1)] * 3
    order = [lm.step(reqs).index(True) for _ in range(6)]
    assert order == [0, 1, 2, 0, 1, 2]
    # a blocked acquire (lock 1 is 0) does not hold up the others
    reqs = [LockRequest(ACQ, 1, 1), LockRequest(ACQ, 0, 1), LockRequest(REL, 1, 1)]
    assert lm.step(reqs) == [False, True, False]
    assert lm.step(reqs) == [False, False, True]
    assert lm.step(reqs) == [True, False, False]   # lock 1 now holds 1


def test_write_blocks_grants_in_its_cycle():
    lm = LockModel(2, 1)
    assert lm.step([LockRequest(REL, 0, 1)], write=(1, 5)) == [False]
    assert lm.values == [0, 5]


def test_requests_must_match_the_ports():
    with pytest.raises(ValueError, match="requests must have 2 entries"):
        LockModel(2, 2).step([None])


# RTL == model, cycle by cycle (Amaranth simulator) ------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rtl_matches_model(seed):
    n_locks, n_ports, vb, cycles = 4, 3, 3, 400
    rng = np.random.default_rng(seed)
    dut = LockUnit(n_locks, n_ports, vb)
    model = LockModel(n_locks, n_ports, vb)
    seen = {"grant": 0, "blocked acquire": 0, "overflow": 0, "bad id": 0, "contention": 0}

    async def bench(ctx):
        pending: list[LockRequest | None] = [None] * n_ports
        for cyc in range(cycles):
            for p in range(n_ports):
                # a pending request is held until granted, or (rarely) withdrawn: the unit
                # keeps no state per request, and stuck requesters would starve the stimulus
                if pending[p] is not None and rng.random() < 0.05:
                    pending[p] = None
                if pending[p] is None and rng.random() < 0.5:
                    lock = n_locks if rng.random() < 0.03 else int(rng.integers(n_locks))
                    pending[p] = LockRequest(LockOp(int(rng.integers(2))), lock,
                                             int(rng.integers(0, 1 << vb)))
                r = pending[p]
                port = dut.ports[p]
                ctx.set(port.req, r is not None)
                if r is not None:
                    ctx.set(port.op, r.op)
                    ctx.set(port.id, r.id)
                    ctx.set(port.val, r.value)
            write = None
            if rng.random() < 0.08:
                write = (int(rng.integers(n_locks)), int(rng.integers(1 << vb)))
            clear = bool(rng.random() < 0.03)
            ctx.set(dut.wr_en, write is not None)
            if write:
                ctx.set(dut.wr_id, write[0])
                ctx.set(dut.wr_value, write[1])
            ctx.set(dut.clear, clear)
            rd = int(rng.integers(n_locks + 1))
            ctx.set(dut.rd_id, rd)
            got = [bool(ctx.get(dut.ports[p].gnt)) for p in range(n_ports)]
            rd_value = ctx.get(dut.rd_value)
            want_rd = model.values[rd] if rd < n_locks else 0
            want = model.step(pending, write=write, clear=clear)
            what = f"seed {seed}, cycle {cyc}, requests {pending}, write {write}"
            seen["grant"] += any(want)
            seen["contention"] += sum(r is not None and model.grantable(r) for r in pending) > 1
            seen["blocked acquire"] += any(r is not None and r.op == ACQ and r.id < n_locks
                                           and not model.grantable(r) for r in pending)
            assert got == want, f"{what}: grants {got}, model {want}"
            assert rd_value == want_rd, f"{what}: rd_value {rd_value}, model {want_rd}"
            await ctx.tick()
            got_flags = (ctx.get(dut.overflow), ctx.get(dut.bad_id), ctx.get(dut.error_id))
            assert got_flags == (model.overflow, model.bad_id, model.error_id), \
                f"{what}: flags {got_flags}"
            seen["overflow"] += model.overflow
            seen["bad id"] += model.bad_id
            pending = [None if g else r for g, r in zip(want, pending, strict=True)]
        got_values = []
        for i in range(n_locks):
            ctx.set(dut.rd_id, i)
            got_values.append(ctx.get(dut.rd_value))
        assert got_values == model.values, f"seed {seed}: final values"

    sim = Simulator(dut)
    sim.add_clock(1e-9)
    sim.add_testbench(bench)
    sim.run()
    # the random stimulus reached every case worth checking
    assert all(n > 0 for n in seen.values()), f"seed {seed}: stimulus coverage {seen}"
