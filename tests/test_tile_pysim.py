"""The tile RTL in Amaranth's simulator (tiny configuration) against the golden model.

The Verilator regression (test_tile_verilator.py) covers every op on both shipped tiles; this
file keeps a fast RTL check that needs no external simulator.
"""

from pathlib import Path

import numpy as np
import pytest

from tilewright.hw.config import load_config
from tilewright.hw.isa import ErrorCode
from tilewright.sim.golden import TileModel
from tilewright.sim.pysim import run_pysim
from tilewright.sim.randprog import illegal_programs, random_case
from tilewright.sw.asm import Program

REPO = Path(__file__).resolve().parents[1]
TINY = load_config(REPO / "overlay_configs" / "tiny-1x1.yaml").tile


@pytest.mark.parametrize("op, sparsity, seed", [
    ("conv", 0.0, 11), ("conv", 0.5, 12), ("conv", 1.0, 13), ("maxpool", 0.0, 14),
    ("avgpool", 0.0, 15), ("add", 0.0, 16),
])
def test_rtl_matches_golden(op, sparsity, seed):
    c = random_case(TINY, seed, op, sparsity)
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
