# amaranth: UnusedElaboratable=no
"""Datamover channels: BD encoding, the Python model, the RTL in Amaranth's simulator (small
channels) and the Verilator regression (MM2S + S2MM sharing a lock unit, pseudo-random
back-pressure on both streams and both memory ports).

Every random case is seeded and its failure message names the case and the seed; rerun one
with e.g. ``random_chains_case(seed)`` from :mod:`tilewright.sim.dm_cases`.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from amaranth.sim import Simulator

from tilewright.hw import bd as bdmod
from tilewright.hw.bd import BD_BITS, BD_LAYOUT, BufferDescriptor, LockAction
from tilewright.hw.datamover import Datamover
from tilewright.sim.datamover_sim import BackPressure, DmHarnessConfig, DmJob, run_datamover_jobs
from tilewright.sim.dm_cases import (
    BACKPRESSURES,
    DmCase,
    ping_pong_case,
    random_bd,
    random_chains_case,
)
from tilewright.sim.dm_model import (
    bd_elements,
    run_mm2s,
    run_s2mm,
    task_bds,
    task_words,
    transfer_cycles,
)
from tilewright.sim.verilator import RtlTimeoutError

REPO = Path(__file__).resolve().parents[1]
B = BufferDescriptor


# BD encoding ----------------------------------------------------------------------------------

def test_layout_positions():
    assert BD_BITS == BD_LAYOUT.size == 257
    # base = 5, every size 1 (the fill), chain to 3, release lock 2 by 7
    bd = B(5, (1,), (0,), next_bd=3, release=LockAction(2, 7))
    v = bd.encode()
    assert v & 0xFFFF_FFFF == 5
    for d in range(4):   # dim[d] = {size: 16 bits, stride: 20 bits}
        assert (v >> (32 + 36 * d)) & 0xFFFF == 1
    assert (v >> 224) & 0x3F == 3 and (v >> 230) & 1 == 1   # next_bd, chain
    assert (v >> 231) & 1 == 0                               # acq.en
    assert (v >> 244) & 1 == 1 and (v >> 245) & 0x3F == 2 and (v >> 251) & 0x3F == 7
    # strides are two's complement
    assert (B(0, (2,), (-1,)).encode() >> 48) & 0xFFFFF == 0xFFFFF


def test_encode_decode_round_trip():
    rng = np.random.default_rng(5)
    for _ in range(200):
        direction = str(rng.choice(["mm2s", "s2mm"]))
        bd = random_bd(rng, direction=direction, dims=4, region=(0, 1 << 20))
        nxt = int(rng.integers(64)) if rng.random() < 0.5 else None
        acq = LockAction(int(rng.integers(64)), int(rng.integers(1, 64))) \
            if rng.random() < 0.5 else None
        bd = replace(bd, next_bd=nxt, acquire=acq, release=acq)
        assert B.decode(bd.encode()) == bd


@pytest.mark.parametrize("kwargs, exc, msg", [
    ({"sizes": (0,)}, ValueError, r"sizes\[0\] must be an integer from 1 to 65535, not 0"),
    ({"sizes": (2, 3), "strides": (1,)}, ValueError, "strides .* must have one entry per size"),
    ({"strides": (1 << 19,)}, ValueError,
     r"strides\[0\] must be an integer from -524288 to 524287, not 524288"),
    ({"sizes": (1,) * 5, "strides": (0,) * 5}, ValueError, "sizes has 5 entries, at most 4"),
    ({"pad_before": (0, 0, 0, 1)}, ValueError, "pad_before has 4 entries, at most 3"),
    ({"pad_after": (256,)}, ValueError, r"pad_after\[0\] must be an integer from 0 to 255"),
    ({"base": -1}, ValueError, "base must be an integer from 0 to 4294967295, not -1"),
    ({"next_bd": 64}, ValueError, "next_bd must be an integer from 0 to 63, not 64"),
    ({"sizes": 4}, TypeError, "sizes must be a sequence of integers, not 4"),
    ({"acquire": (1, 2)}, TypeError, r"acquire must be a LockAction or None, not \(1, 2\)"),
])
def test_bd_validation(kwargs, exc, msg):
    args = {"base": 0, "sizes": (1,), "strides": (1,), **kwargs}
    with pytest.raises(exc, match=msg):
        B(**args)


def test_lock_action_validation():
    with pytest.raises(ValueError, match="lock value must be an integer from 1 to 63, not 0"):
        LockAction(1, 0)
    with pytest.raises(ValueError, match="lock id must be an integer from 0 to 63, not 64"):
        LockAction(64, 1)


def test_decode_rejects_non_bd_words():
    with pytest.raises(ValueError, match="BD word must be an integer from 0 to 2315"):
        B.decode(1 << BD_BITS)


@pytest.mark.parametrize("bd, kwargs, msg", [
    (B(0, (2, 2, 2, 2), (1, 2, 4, 8)), {"dims": 3},
     "BD 4 uses 4 dimensions .* but the channel implements 3"),
    (B(0, (2,), (1,), pad_before=(1,)), {"direction": "s2mm"},
     "BD 4 has padding .* S2MM channels accept none"),
    (B(0, (2,), (1,), next_bd=12), {"n_bds": 12}, "BD 4 chains to BD 12; the channel has 12"),
    (B(0, (2,), (1,), acquire=LockAction(16, 1)), {"n_locks": 16},
     "BD 4 acquires lock 16; the lock unit has 16"),
    (B(0, (2,), (1,), release=LockAction(1, 9)), {"lock_value_bits": 3},
     "BD 4 releases value 9; lock values have 3 bits"),
    (B(2, (3,), (-2,)), {}, r"BD 4 addresses words -2..2, outside the channel's 0..4095"),
    (B(4090, (3,), (3,)), {}, r"BD 4 addresses words 4090..4096, outside"),
])
def test_bd_check_against_a_channel(bd, kwargs, msg):
    args = {"direction": "mm2s", "addr_bits": 12, "index": 4, **kwargs}
    with pytest.raises(ValueError, match=msg):
        bd.check(**args)


def test_docs_table_is_generated_from_the_layout():
    doc = (REPO / "docs" / "datamover.md").read_text()
    body = doc.split("<!-- BEGIN GENERATED -->\n")[1].split("<!-- END GENERATED -->")[0]
    assert body == bdmod.encoding_table(), \
        "docs/datamover.md is stale: run python -m tilewright.hw.bd"


# The model ----------------------------------------------------------------------------------

def _reference_elements(bd: BufferDescriptor) -> list[int | None]:
    """Nested loops straight from the definition (independent of bd_addresses)."""
    pb = (*bd.pad_before, 0)
    out: list[int | None] = []
    ranges = [range(e) for e in bd.extents]
    for i3, i2, i1, i0 in itertools.product(*reversed(ranges)):
        idx = (i0, i1, i2, i3)
        if all(pb[d] <= idx[d] < pb[d] + bd.sizes[d] for d in range(4)):
            out.append((bd.base + sum((idx[d] - pb[d]) * bd.strides[d] for d in range(4)))
                       % (1 << 32))
        else:
            out.append(None)
    return out


def test_bd_elements_by_hand():
    # d0: 1 zero, 2 words, no zero after; d1: 3 rows going down (stride -4), 1 zero row after
    bd = B(10, (2, 3), (1, -4), pad_before=(1,), pad_after=(0, 1))
    assert bd_elements(bd) == [None, 10, 11, None, 6, 7, None, 2, 3, None, None, None]
    assert bd.n_elements == 12 and bd.n_accesses == 6 and bd.n_dims == 2


def test_bd_elements_match_the_definition():
    rng = np.random.default_rng(7)
    for _ in range(150):
        bd = random_bd(rng, direction="mm2s", dims=4, region=(1000, 3000))
        assert bd_elements(bd) == _reference_elements(bd), bd


def test_chains_and_tasks():
    bds = {0: B(0, (2,), (1,), next_bd=4), 4: B(10, (3,), (1,))}
    assert task_bds(bds, 0) == [0, 4] and task_words(bds, 0) == 5
    mem = np.arange(20, dtype=np.uint64) * 3
    assert run_mm2s(mem, bds, 0) == [0, 3, 30, 33, 36]
    with pytest.raises(ValueError, match="BD 0's next_bd names BD 4, which is not defined"):
        task_bds([B(0, (1,), (1,), next_bd=4)], 0)
    with pytest.raises(ValueError, match="longer than 100000 BDs"):
        task_bds([B(0, (1,), (1,), next_bd=0)], 0)


def test_run_s2mm_writes_in_order():
    bds = [B(2, (2, 2), (1, 0))]       # rows overwrite each other: the later row wins
    out = run_s2mm(np.zeros(6, np.uint64), bds, 0, [1, 2, 3, 4])
    assert out.tolist() == [0, 0, 3, 4, 0, 0]
    assert run_s2mm([0] * 6, bds, 0, [1, 2, 3, 4]) == [0, 0, 3, 4, 0, 0]
    with pytest.raises(ValueError, match="the task from BD 0 takes 4 words, not 3"):
        run_s2mm([0] * 6, bds, 0, [1, 2, 3])
    with pytest.raises(ValueError, match="BD 0 has padding; S2MM channels accept none"):
        run_s2mm([0] * 6, [B(0, (1,), (1,), pad_after=(1,))], 0, [1, 2])
    with pytest.raises(ValueError, match="BD 0, element 1: address 6 is outside the memory "
                                         "of 6 words"):
        run_mm2s([0] * 6, [B(5, (2,), (1,))], 0)


def test_transfer_cycles_formula():
    bds = [B(0, (4,), (1,), next_bd=1, acquire=LockAction(0, 1)),
           B(0, (2, 3), (1, 2), release=LockAction(1, 1))]
    # 1 queue + 1 IDLE + (1 LOAD + 1 ACQ + 4) + (1 LOAD + 6 + 1 REL) [+ 2 - 1 MM2S drain]
    assert transfer_cycles(bds, [0], direction="s2mm") == 16
    assert transfer_cycles(bds, [0], direction="mm2s") == 17
    assert transfer_cycles(bds, [1], direction="mm2s") == 1 + 1 + 8 + 1
    assert transfer_cycles(bds, [0, 1], direction="s2mm", lock_wait=5) == 16 + 5 + 9
    assert transfer_cycles([B(0, (4,), (1,))], [0], direction="mm2s") == 1 + 1 + 5 + 2
    with pytest.raises(ValueError, match="lock_wait must be a non-negative integer, not -1"):
        transfer_cycles(bds, [0], direction="mm2s", lock_wait=-1)


@pytest.mark.parametrize("kwargs, exc, msg", [
    ({"direction": "up"}, ValueError, "direction must be 'mm2s' or 's2mm', not 'up'"),
    ({"addr_bits": 0}, ValueError, "addr_bits must be an integer from 1 to 32, not 0"),
    ({"n_bds": 65}, ValueError, "n_bds must be an integer from 1 to 64, not 65"),
    ({"dims": 5}, ValueError, "dims must be an integer from 1 to 4, not 5"),
    ({"skid_depth": 2}, ValueError, "skid_depth must be an integer from 3 to 4096, not 2"),
    ({"word_bits": 8.0}, TypeError, "word_bits must be an integer, not 8.0"),
])
def test_datamover_constructor_validation(kwargs, exc, msg):
    args = {"direction": "mm2s", "addr_bits": 12, "word_bits": 32, **kwargs}
    with pytest.raises(exc, match=msg):
        Datamover(args.pop("direction"), **args)


# RTL in Amaranth's simulator: small channels (dims < 4, BD count not a power of two) --------

def _pysim(dm: Datamover, bds: dict[int, int], tasks: list[int], mem: list[int],
           stream: list[int], seed: int, max_cycles: int = 3000) -> dict:
    """Drive one channel: BD writes, tasks, a memory with a random grant, a random stream."""
    rng = np.random.default_rng(seed)
    res: dict = {"out": [], "mem": list(mem)}

    async def bench(ctx):
        for i, v in bds.items():
            ctx.set(dm.bd_we, 1)
            ctx.set(dm.bd_addr, i)
            ctx.set(dm.bd_wdata.as_value(), v)
            await ctx.tick()
        ctx.set(dm.bd_we, 0)
        rdata, t, k = 0, 0, 0
        for cyc in range(max_cycles):
            ready = bool(rng.random() < 0.6)
            ctx.set(dm.mem.ready, ready)
            ctx.set(dm.task.valid, t < len(tasks))
            ctx.set(dm.task.payload, tasks[t] if t < len(tasks) else 0)
            if dm.direction == "mm2s":
                ctx.set(dm.mem.rdata, rdata)
                ctx.set(dm.o.ready, bool(rng.random() < 0.6))
                if ctx.get(dm.o.valid) and ctx.get(dm.o.ready):
                    res["out"].append(ctx.get(dm.o.payload))
                rdata = res["mem"][ctx.get(dm.mem.addr)] if ctx.get(dm.mem.re) and ready \
                    else int(rng.integers(1 << 30))   # junk unless a read was performed
            else:
                ctx.set(dm.i.valid, k < len(stream))
                ctx.set(dm.i.payload, stream[k] if k < len(stream) else 0)
                if ctx.get(dm.mem.we) and ready:
                    res["mem"][ctx.get(dm.mem.addr)] = ctx.get(dm.mem.wdata)
                if k < len(stream) and ctx.get(dm.i.ready):
                    k += 1
            if t < len(tasks) and ctx.get(dm.task.ready):
                t += 1
            if t == len(tasks) and not ctx.get(dm.busy) and cyc > 2:
                break
            await ctx.tick()
        res.update(done=ctx.get(dm.tasks_done), error=ctx.get(dm.error),
                   busy=ctx.get(dm.busy), consumed=k)

    sim = Simulator(dm)
    sim.add_clock(1e-9)
    sim.add_testbench(bench)
    sim.run()
    return res


def test_pysim_mm2s_three_dims_and_a_bad_task():
    dm = Datamover("mm2s", addr_bits=8, word_bits=16, n_bds=3, dims=3, task_depth=2,
                   skid_depth=3)
    mem = [(a * 37 + 11) & 0xFFFF for a in range(256)]
    bd0 = B(200, (3, 2, 2, 5), (-1, 10, 40, 7), pad_before=(1, 0, 1), pad_after=(0, 2, 0),
            next_bd=2)   # dim 3 (size 5) is beyond the channel's 3 dimensions: ignored
    bd2 = B(7, (4,), (3,))
    enc = {0: bd0.encode(), 2: bd2.encode()}
    model = {0: replace(bd0, sizes=(3, 2, 2, 1)), 2: bd2}
    res = _pysim(dm, enc, [0, 5, 2], mem, [], seed=3)   # BD 5 does not exist: dropped
    want = run_mm2s(mem, model, 0) + run_mm2s(mem, model, 2)
    assert res["out"] == want, "seed 3"
    assert res["done"] == 2 and res["error"] == 1 and not res["busy"]


def test_pysim_s2mm_one_dim_ignores_padding_fields():
    dm = Datamover("s2mm", addr_bits=6, word_bits=8, n_bds=5, dims=1)
    bd = B(40, (6, 3), (-3, 1), pad_before=(2,))   # dim 1 and the padding: ignored
    stream = list(range(1, 7))
    res = _pysim(dm, {4: bd.encode()}, [4], [0] * 64, stream, seed=4)
    want = run_s2mm([0] * 64, {4: B(40, (6,), (-3,))}, 4, stream)
    assert res["mem"] == want and res["consumed"] == 6 and res["done"] == 1, "seed 4"


# Verilator regression -------------------------------------------------------------------------

HC = DmHarnessConfig()


def _problems(case: DmCase, r) -> list[str]:
    bad = []
    if not np.array_equal(r.mm2s_out, case.mm2s_out):
        n = min(len(r.mm2s_out), len(case.mm2s_out))
        diff = np.nonzero(r.mm2s_out[:n] != case.mm2s_out[:n])[0]
        first = f", first difference at word {diff[0]}" if diff.size else ""
        bad.append(f"MM2S stream: {len(r.mm2s_out)} words, model {len(case.mm2s_out)}{first}")
    if not np.array_equal(r.mem, case.mem):
        diff = np.nonzero(r.mem != case.mem)[0]
        bad.append(f"memory: {diff.size} words differ, first at {diff[0]}")
    if r.locks != case.locks:
        bad.append(f"locks {r.locks}, model {case.locks}")
    if r.lock_overflow != case.overflow:
        bad.append(f"lock overflow flag {r.lock_overflow}, model {case.overflow}")
    if r.s2mm_consumed != len(case.job.s2mm_in):
        bad.append(f"S2MM took {r.s2mm_consumed} of {len(case.job.s2mm_in)} words")
    if (r.mm2s_tasks_done, r.s2mm_tasks_done) != (len(case.job.mm2s_tasks),
                                                   len(case.job.s2mm_tasks)):
        bad.append(f"tasks done {r.mm2s_tasks_done}/{r.s2mm_tasks_done}")
    if r.mm2s_error or r.s2mm_error or r.lock_bad_id:
        bad.append("an error flag is set")
    return bad


def _check_all(cases: list[DmCase], run) -> None:
    failures = [f"{c.name} ({c.job.backpressure}): " + "; ".join(p)
                for c, r in zip(cases, run, strict=True) if (p := _problems(c, r))]
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + \
        "\n".join(failures)


@pytest.mark.verilator
def test_random_chains_bit_exact():
    cases = [random_chains_case(seed, HC) for seed in range(1, 41)]
    assert sum(c.overflow for c in cases) >= 5, "the cases must exercise lock saturation"
    _check_all(cases, run_datamover_jobs([c.job for c in cases], hc=HC))


@pytest.mark.verilator
def test_full_speed_matches_the_cycle_model():
    cases = [random_chains_case(seed, HC, backpressure=BackPressure(), channels=(ch,))
             for seed in range(50, 60) for ch in ("mm2s", "s2mm")]
    run = run_datamover_jobs([c.job for c in cases], hc=HC)
    _check_all(cases, run)
    for c, r in zip(cases, run, strict=True):
        for ch, bds, tasks, got in (("mm2s", c.job.mm2s_bds, c.job.mm2s_tasks, r.mm2s_cycles),
                                    ("s2mm", c.job.s2mm_bds, c.job.s2mm_tasks, r.s2mm_cycles)):
            want = transfer_cycles(bds, tasks, direction=ch)
            assert got == want, f"{c.name}: {ch.upper()} took {got} cycles, model {want}"


@pytest.mark.verilator
def test_ping_pong_over_two_buffers():
    cases = [ping_pong_case(seed, HC, backpressure=bp)
             for seed, bp in zip(range(100, 110), itertools.cycle(BACKPRESSURES))]
    # the control: without locks the producer overwrites buffers still being read
    control = ping_pong_case(200, HC, locks=False, backpressure=BackPressure(0.2, 1, 1, 1))
    run = run_datamover_jobs([c.job for c in [*cases, control]], hc=HC)
    _check_all(cases, run[:-1])
    assert not np.array_equal(run[-1].mm2s_out, control.mm2s_out), \
        "without locks the ping-pong should have read overwritten buffers (seed 200)"


@pytest.mark.verilator
def test_deadlock_ends_in_a_clear_timeout():
    rng = np.random.default_rng(77)
    mem = rng.integers(0, 1 << 63, 1 << HC.addr_bits, dtype=np.uint64)
    stuck = DmJob(mem=mem, mm2s_bds=[B(0, (8,), (1,), acquire=LockAction(5, 3))],
                  mm2s_tasks=[0], locks=[0] * 16, seed=77, name="deadlock")
    after = random_chains_case(78, HC)
    with pytest.raises(RtlTimeoutError) as info:
        run_datamover_jobs([stuck, after.job], hc=HC, timeout_cycles=30_000)
    msg = str(info.value)
    assert "1 of 2 datamover job(s) did not finish within 30000 cycles" in msg
    assert "job 0 (deadlock), seed 77: MM2S waits to acquire 3 from lock 5 (holds 0)" in msg
    res = info.value.results
    assert res[0].timed_out and res[0].cycles >= 30_000 and len(res[0].mm2s_out) == 0
    assert not _problems(after, res[1]), "the job after a timeout runs normally (seed 78)"


@pytest.mark.verilator
def test_bad_task_index_is_dropped_with_an_error():
    case = random_chains_case(90, HC, locks=False, channels=("mm2s",))
    first = case.job.mm2s_tasks[0]
    job = replace(case.job, mm2s_tasks=[first, HC.n_bds + 1, first])
    r = run_datamover_jobs([job], hc=HC, check_bds=False)[0]
    want = run_mm2s(case.job.mem, case.job.mm2s_bds, first) * 2
    assert r.mm2s_out.tolist() == want, "seed 90"
    assert r.mm2s_error and r.mm2s_tasks_done == 2 and not r.s2mm_error
