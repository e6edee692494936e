"""cocotb + Verilator regression of the compute tile, on both shipped tile configurations.

* seeded random programs of every op (CONV at 0/50/90/100 % block sparsity, both pools, ADD):
  RTL == golden model, whole data memory and cycle count;
* layers of ResNet50, InceptionV3 and VGG16 compiled for the tile (stem 7x7/2, 1x1, 1x1/2,
  3x3/2, 5x5, 1x7, 7x1, 1x3, 3x1, VGG 3x3, FC, max/avg/global-avg pools, residual add, an
  Inception concat written at a channel offset) at 0/50/90/100 % block sparsity:
  RTL == golden model == PyTorch integer reference, bit for bit;
* illegal programs stop the RTL with the golden model's error code, pc and cycle count;
* nested hardware loops, locks and fences.

Each test runs all its programs in one simulator process (sim/verilator.py).
"""

from pathlib import Path

import numpy as np
import pytest

from tilewright.hw.config import load_config
from tilewright.hw.isa import ErrorCode
from tilewright.sim.golden import TileModel
from tilewright.sim.layercases import network_cases
from tilewright.sim.randprog import OP_KINDS, illegal_programs, loop_lock_case, random_case
from tilewright.sim.verilator import run_tile_jobs
from tilewright.sw.asm import Program

pytestmark = pytest.mark.verilator

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["tiny-1x1", "aie2-1x1"]
SEEDS = (1, 2, 3)


def _cfg(name):
    return load_config(REPO / "overlay_configs" / f"{name}.yaml")


def _first_diff(a: np.ndarray, b: np.ndarray, block: int) -> str:
    bad = np.nonzero(a != b)[0]
    return f"{bad.size} bytes differ, first in word {bad[0] // block}" if bad.size else "equal"


@pytest.mark.parametrize("config", CONFIGS)
def test_random_programs(config):
    cfg = _cfg(config)
    t = cfg.tile
    cases = [random_case(t, seed, op, sp)
             for op in OP_KINDS
             for sp in ((0.0, 0.5, 0.9, 1.0) if op == "conv" else (0.0,))
             for seed in SEEDS]
    golden = [TileModel(t).run(c.program, c.dmem) for c in cases]
    rtl = run_tile_jobs(cfg, [(c.program, c.dmem) for c in cases])
    for c, g, r in zip(cases, golden, rtl, strict=True):
        what = f"{c.name} on {config} (seed {c.seed})"
        assert g.ok and not r.error, f"{what}: golden {g.error.name}, rtl code {r.error_code}"
        assert np.array_equal(r.dmem, g.dmem), f"{what}: {_first_diff(r.dmem, g.dmem, t.block)}"
        assert r.cycles == g.cycles, f"{what}: RTL {r.cycles} cycles, golden {g.cycles}"


@pytest.mark.parametrize("config", CONFIGS)
def test_network_layers_bit_exact(config):
    cfg = _cfg(config)
    t = cfg.tile
    cases = network_cases(t, seed=7)
    jobs = [(case, j, e) for case in cases for j, e in zip(case.jobs, case.expected, strict=True)]
    rtl = run_tile_jobs(cfg, [(j.program, j.dmem) for _, j, _ in jobs])
    for (case, job, want), r in zip(jobs, rtl, strict=True):
        what = f"{case.name} job {job.name} on {config} (seed 7)"
        g = TileModel(t).run(job.program, job.dmem)
        assert g.ok and not r.error, f"{what}: golden {g.error.name}, rtl code {r.error_code}"
        got = job.read_output(r.dmem)
        bad = np.argwhere(got != want)
        assert bad.size == 0, (f"{what}: {len(bad)} outputs differ from the PyTorch reference, "
                               f"first at (c, y, x) = {tuple(bad[0])}")
        assert np.array_equal(r.dmem, g.dmem), f"{what}: {_first_diff(r.dmem, g.dmem, t.block)}"
        assert r.cycles == g.cycles, f"{what}: RTL {r.cycles} cycles, golden {g.cycles}"
    assert len(cases) == 4 * 11 + 5


@pytest.mark.parametrize("config", CONFIGS)
def test_illegal_programs(config):
    cfg = _cfg(config)
    t = cfg.tile
    progs = illegal_programs()
    mem = np.zeros(t.dmem_bytes, np.uint8)
    rtl = run_tile_jobs(cfg, [(w, mem) for _, w, _, _ in progs])
    for (name, words, code, pc), r in zip(progs, rtl, strict=True):
        g = TileModel(t).run(words, mem)
        assert (g.error, g.error_pc) == (code, pc), name
        assert r.error and (ErrorCode(r.error_code), r.error_pc) == (code, pc), \
            f"{name} on {config}: RTL stopped with {ErrorCode(r.error_code).name} at {r.error_pc}"
        assert r.cycles == g.cycles, name


@pytest.mark.parametrize("config", CONFIGS)
def test_loops_and_locks(config):
    """Nested hardware loops, lock releases/acquires and a fence NOP (locks start at 0 in the
    harness, so the program's lock 7 preset is moved into a REL first)."""
    cfg = _cfg(config)
    t = cfg.tile
    words, mem, locks = loop_lock_case(t)
    words = Program().release(7, locks[7]).words + words
    g = TileModel(t).run(words, mem)
    (r,) = run_tile_jobs(cfg, [(words, mem)])
    assert g.ok and not r.error
    assert np.array_equal(r.dmem, g.dmem), _first_diff(r.dmem, g.dmem, t.block)
    assert r.cycles == g.cycles
