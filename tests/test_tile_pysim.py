"""The tile RTL in Amaranth's simulator (tiny configuration) against the golden model.

The Verilator regression (test_tile_verilator.py) covers every op on both shipped tiles; this
file keeps a fast RTL check that needs no external simulator.
"""

from pathlib import Path

import numpy as np
import pytest
from amaranth.sim import Simulator

from tilewright.hw.config import load_config
from tilewright.hw.isa import ErrorCode
from tilewright.sim.golden import DeadlockError, TileModel
from tilewright.sim.pysim import TileWithLocks, load_program, load_words, run_pysim, words_of
from tilewright.sim.randprog import illegal_programs, loop_lock_case, random_case
from tilewright.sw.asm import Program

REPO = Path(__file__).resolve().parents[1]
TINY = load_config(REPO / "overlay_configs" / "tiny-1x1.yaml").tile


@pytest.mark.parametrize("op, sparsity, seed", [
    ("conv", 0.0, 11), ("conv", 0.5, 12), ("conv", 1.0, 13), ("maxpool", 0.0, 14),
    ("avgpool", 0.0, 15), ("add", 0.0, 16),
])
def test_rtl_matches_golden(op, sparsity, seed):
    c = random_case(TINY, seed, op, sparsity)
    _compare(c)


@pytest.mark.parametrize("seed", [40, 43, 44, 48])
def test_block_rows_split_with_hold_and_acc(seed):
    """Every splittable block row as 2-3 CONVs (HOLD ... ACC): the RTL keeps the sums in the
    accumulators between them exactly as the golden model does."""
    from tilewright.sw.asm import disassemble

    c = random_case(TINY, seed, "conv", 0.0, split=1.0)
    text = "\n".join(disassemble(c.program))
    assert ".hold" in text and ".acc" in text, f"seed {seed}: no split row"
    _compare(c)


def _compare(c):
    want = TileModel(TINY).run(c.program, c.dmem)
    got = run_pysim(TINY, c.program, c.dmem)
    bad = np.nonzero(got.dmem != want.dmem)[0]
    assert bad.size == 0, f"{c.name}: first mismatching word {bad[0] // TINY.block}"
    assert got.cycles == want.cycles, f"{c.name}: cycles {got.cycles} != {want.cycles}"
    assert not got.error


@pytest.mark.parametrize("name, words, code, pc", illegal_programs())
def test_illegal_programs_stop_with_a_code(name, words, code, pc):
    mem = np.zeros(TINY.dmem_bytes, np.uint8)
    want = TileModel(TINY).run(words, mem)
    got = run_pysim(TINY, words, mem, max_cycles=1000)
    assert (want.error, want.error_pc) == (code, pc), name
    assert got.error and (ErrorCode(got.error_code), got.error_pc) == (code, pc), name
    assert got.cycles == want.cycles, name


def test_fence_orders_a_dependent_op():
    # op 2 reads what op 1 writes (8 pixel groups of writeback still in flight without FENCE)
    rng = np.random.default_rng(21)
    mem = np.zeros(TINY.dmem_bytes, np.uint8)
    mem[100 * TINY.block:116 * TINY.block] = rng.integers(0, 256, 16 * TINY.block)
    q = np.zeros(8 * TINY.block, np.uint8)
    q[4 * TINY.block:] = np.ones(TINY.block, "<i4").view(np.uint8)   # identity requant
    mem[:q.size] = q
    mem[q.size:2 * q.size] = q
    p = Program().setps(IN_BASE=100, IN_CG=100, OUT_BASE=200, OUT_CG=100, HO=1, WO=16)
    p.maxpool(0).maxpool(1, fence=True).halt()
    want = TileModel(TINY).run(p.words, mem)
    got = run_pysim(TINY, p.words, mem)
    assert np.array_equal(got.dmem, want.dmem) and got.cycles == want.cycles
    out = want.dmem.view(np.int8).reshape(-1, TINY.block)
    assert np.array_equal(out[300:316], mem.view(np.int8).reshape(-1, TINY.block)[100:116])


def test_loops_locks_and_fence_nop():
    words, mem, locks = loop_lock_case(TINY)
    want = TileModel(TINY).run(words, mem, locks=locks)
    got = run_pysim(TINY, words, mem, locks=locks)
    assert want.ok and not got.error
    assert np.array_equal(got.dmem, want.dmem) and got.cycles == want.cycles
    assert got.locks == want.locks and (want.locks[5], want.locks[7]) == (6, 5)
    out = want.dmem.view(np.int8).reshape(-1, TINY.block)
    assert np.array_equal(out[400:416], mem.view(np.int8).reshape(-1, TINY.block)[100:116])


def test_acquire_that_never_comes_is_a_deadlock():
    mem = np.zeros(TINY.dmem_bytes, np.uint8)
    p = Program().release(1, 1).acquire(1, 2).halt()
    with pytest.raises(DeadlockError, match="lock 1 for 2 at pc 1 waits forever"):
        TileModel(TINY).run(p.words, mem)
    with pytest.raises(TimeoutError):
        run_pysim(TINY, p.words, mem, max_cycles=200)


def test_datamover_access_while_running():
    """Writes through the data memory port land while the tile computes; the engine keeps
    priority, so its results and cycle count are those of the golden model."""
    c = random_case(TINY, 31, "conv", 0.0)
    want = TileModel(TINY).run(c.program, c.dmem)
    dut_top = TileWithLocks(TINY)
    dut = dut_top.tile
    # 64 writes to the 8 words of bank 0 in a free region (a word written 8 times, the last
    # value stays): a write waits only while the writeback writes its bank
    region = range(TINY.dmem_words // 2 - 64, TINY.dmem_words // 2)
    writes = [(a, 0x5A5A0000 + 0x100 * n + a) for n in range(8)
              for a in region if a % TINY.dmem_banks == 0]
    extra = dict(writes)
    seen: dict = {}

    async def bench(ctx):
        await load_program(ctx, dut, c.program)
        await load_words(ctx, dut, dict(enumerate(words_of(c.dmem, TINY.block))))
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        todo = list(writes)
        refused = 0
        while not ctx.get(dut.done):
            if todo:
                ctx.set(dut.dm_we, 1)
                ctx.set(dut.dm_addr, todo[0][0])
                ctx.set(dut.dm_wdata, todo[0][1])
                if ctx.get(dut.dm_ready):
                    todo.pop(0)
                else:
                    refused += 1
            else:
                ctx.set(dut.dm_we, 0)
            await ctx.tick()
        ctx.set(dut.dm_we, 0)
        seen["refused"], seen["cycles"], seen["left"] = refused, ctx.get(dut.cycles), len(todo)
        for a in sorted(extra) + list(range(TINY.dmem_words - 512, TINY.dmem_words)):
            ctx.set(dut.dm_re, 1)
            ctx.set(dut.dm_addr, a)
            await ctx.tick()
            seen[a] = ctx.get(dut.dm_rdata)
        ctx.set(dut.dm_re, 0)

    sim = Simulator(dut_top)
    sim.add_clock(1e-9)
    sim.add_testbench(bench)
    sim.run()
    assert seen["cycles"] == want.cycles and seen["left"] == 0
    assert seen["refused"] > 0, "the writeback never held the datamover back"
    final = want.dmem.reshape(TINY.dmem_words, TINY.block)
    for a, v in extra.items():
        assert seen[a] == v, f"word {a}"
    for a in range(TINY.dmem_words - 512, TINY.dmem_words):     # the program's output region
        assert seen[a] == int.from_bytes(final[a].tobytes(), "little"), f"output word {a}"
