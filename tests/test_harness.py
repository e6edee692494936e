"""The Verilator harness, the build cache and the batch job runner (tilewright.sim.verilator).

Tests marked ``verilator`` build a Verilator model (cached under build/verilator; the first
build of a configuration takes 15-40 s). The stand-in tile (tests/stand_in_tile.py) exercises
the harness on its own; the ComputeTile tests check the real tile on the same harness.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from stand_in_tile import StandInTile, copy_word, spin_word

from tilewright.hw.config import OverlayConfig, load_config
from tilewright.hw.isa import ErrorCode, Instr, Opcode
from tilewright.sim.verilator import (
    RtlTimeoutError,
    build_tile,
    dmem_from_hex,
    dmem_to_hex,
    pmem_to_hex,
    run_tile_jobs,
)
from tilewright.sw.asm import Program

CONFIGS = Path(__file__).resolve().parent.parent / "overlay_configs"


@pytest.fixture(scope="module")
def tiny() -> OverlayConfig:
    return load_config(CONFIGS / "tiny-1x1.yaml")


def _image(cfg: OverlayConfig, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, cfg.tile.dmem_bytes, dtype=np.uint8)


def _word(img: np.ndarray, cfg: OverlayConfig, a: int) -> np.ndarray:
    b = cfg.tile.word_bytes
    return img[a * b:(a + 1) * b]


# Memory image files (no simulator) ------------------------------------------------------------

def test_dmem_hex_round_trip() -> None:
    img = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8)
    text = dmem_to_hex(img, 8)
    lines = text.decode().splitlines()
    assert len(lines) == 8
    # byte 0 of a word is its least significant byte
    assert lines[0] == "".join(f"{b:02x}" for b in img[7::-1])
    assert np.array_equal(dmem_from_hex(text.decode(), 8, 8), img)
    # $writememh style: comments, short lines and x digits are accepted
    assert np.array_equal(dmem_from_hex("// dump\n1\nx0\n", 2, 2),
                          np.array([1, 0, 0, 0], np.uint8))
    with pytest.raises(ValueError, match="memory dump has 2 words, expected 3"):
        dmem_from_hex("00\n00\n", 1, 3)


def test_pmem_hex() -> None:
    words = Program().nop().halt().words
    lines = pmem_to_hex(words, 4).decode().splitlines()
    assert lines == [f"{words[0]:016x}", f"{words[1]:016x}", "0" * 16, "0" * 16]
    assert pmem_to_hex([(1 << 64) - 1], 1) == b"f" * 16 + b"\n"


def test_job_validation(tiny: OverlayConfig) -> None:
    img = _image(tiny, 0)
    with pytest.raises(ValueError, match=r"job 0: dmem must be a uint8 array of 16384 bytes "
                                         r"\(tile.dmem_bytes\), not a int64 array"):
        run_tile_jobs(tiny, [([0], img.astype(np.int64))])
    with pytest.raises(ValueError, match="job 1: the program has 1025 words, more than the "
                                         "1024 words of program memory"):
        run_tile_jobs(tiny, [([0], img), ([0] * 1025, img)])
    with pytest.raises(ValueError, match="program word 1 must be an unsigned 64-bit integer"):
        run_tile_jobs(tiny, [([0, -1], img)])
    with pytest.raises(TypeError, match="job 0 must be a"):
        run_tile_jobs(tiny, [[img]])
    with pytest.raises(ValueError, match="timeout_cycles must be an integer"):
        run_tile_jobs(tiny, [([0], img)], timeout_cycles=0)


# Harness with the stand-in tile ---------------------------------------------------------------

@pytest.mark.verilator
def test_build_is_cached(tiny: OverlayConfig) -> None:
    bdir = build_tile(tiny, tile_factory=StandInTile)
    record = json.loads((bdir / "build.json").read_text())
    assert record["verilator_build_s"] > 0 and record["config"] == "tiny-1x1"
    assert (bdir / "tw_tile.v").is_file() and (bdir / "manifest.json").is_file()
    t0 = time.perf_counter()
    assert build_tile(tiny, tile_factory=StandInTile) == bdir
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.verilator
def test_stand_in_jobs(tiny: OverlayConfig) -> None:
    imgs = [_image(tiny, s) for s in range(4)]
    jobs = [
        # 0: HALT only: the image comes back bit-exact
        (Program().halt().words, imgs[0]),
        # 1: program round trip: three copies, then HALT
        ([copy_word(1, 0), copy_word(4095, 7), copy_word(7, 8), *Program().halt().words],
         imgs[1]),
        # 2: one copy and no HALT: the rest of program memory must have been cleared (no
        #    word of job 1 left behind), so the tile stops on ILLEGAL_OPCODE at pc 1
        ([copy_word(2, 3)], imgs[2]),
        # 3: an unknown opcode at pc 2
        (Program().nop().nop().raw(0x55).halt().words, imgs[3]),
    ]
    run = run_tile_jobs(tiny, jobs, tile_factory=StandInTile)
    assert len(run) == 4

    r = run[0]
    assert np.array_equal(r.dmem, imgs[0])
    assert (r.error, r.error_code, r.cycles) == (False, 0, 2)
    assert r.sim_cycles >= r.cycles and r.wall_s > 0

    want = imgs[1].copy()
    for src, dst in ((1, 0), (4095, 7), (7, 8)):
        _word(want, tiny, dst)[:] = _word(want, tiny, src)
    assert np.array_equal(run[1].dmem, want)
    assert (run[1].error, run[1].cycles) == (False, 3 * 3 + 2)

    want = imgs[2].copy()
    _word(want, tiny, 3)[:] = _word(want, tiny, 2)
    assert np.array_equal(run[2].dmem, want)
    assert (run[2].error, run[2].error_code, run[2].error_pc) == (
        True, ErrorCode.ILLEGAL_OPCODE.value, 1)

    assert (run[3].error, run[3].error_code, run[3].error_pc) == (
        True, ErrorCode.ILLEGAL_OPCODE.value, 2)
    assert np.array_equal(run[3].dmem, imgs[3])
    assert run.cycles_per_s > 0 and run.sim_cycles == sum(r.sim_cycles for r in run)


@pytest.mark.verilator
def test_timeout_is_reported_and_run_goes_on(tiny: OverlayConfig) -> None:
    img = _image(tiny, 5)
    jobs = [(Program().halt().words, img),
            ([spin_word(10 ** 9), *Program().halt().words], img),
            ([copy_word(0, 1), *Program().halt().words], img)]
    with pytest.raises(RtlTimeoutError, match=r"job\(s\) \[1\] of 3 did not finish within "
                                              r"2000 cycles \(timeout_cycles\)") as e:
        run_tile_jobs(tiny, jobs, timeout_cycles=2000, tile_factory=StandInTile)
    results = e.value.results
    assert [r.timed_out for r in results] == [False, True, False]
    assert results[1].sim_cycles >= 2000
    # the tile was reset after the timeout and ran job 2
    want = img.copy()
    _word(want, tiny, 1)[:] = _word(want, tiny, 0)
    assert np.array_equal(results[2].dmem, want) and not results[2].error
    assert e.value.run_dir is not None and (e.value.run_dir / "sim.log").is_file()


@pytest.mark.verilator
def test_simulation_speed_stand_in(tiny: OverlayConfig) -> None:
    n = 200_000
    run = run_tile_jobs(tiny, [([spin_word(n), *Program().halt().words], _image(tiny, 0))],
                        tile_factory=StandInTile)
    assert run[0].cycles >= n
    # far below what the harness reaches (> 1 M cycles/s): only catches a harness that makes
    # Python wake up every clock edge
    assert run.cycles_per_s > 100_000, run.cycles_per_s


# Harness with the real tile -------------------------------------------------------------------

@pytest.mark.verilator
def test_compute_tile_halt_and_illegal(tiny: OverlayConfig) -> None:
    pytest.importorskip("tilewright.hw.tile", reason="hw/tile.py (ComputeTile) not there yet")
    img = _image(tiny, 7)
    jobs = [
        (Program().halt().words, img),
        ([Instr(Opcode.ILLEGAL.value).encode()], img),
        (Program().nop().nop().halt().words, img),
    ]
    run = run_tile_jobs(tiny, jobs)
    halt, illegal, nops = run
    assert (halt.error, halt.error_code) == (False, ErrorCode.NONE.value)
    assert np.array_equal(halt.dmem, img)  # memory image round trip through the tile
    assert (illegal.error, illegal.error_code, illegal.error_pc) == (
        True, ErrorCode.ILLEGAL_OPCODE.value, 0)
    assert np.array_equal(illegal.dmem, img)
    assert not nops.error
    # every instruction costs FETCH + DECODE (docs/architecture.md)
    assert nops.cycles - halt.cycles == 4


def test_build_refuses_sources_changed_while_running(tmp_path: Path) -> None:
    """A process that built from an RTL source must not build again after the file changed
    on disk: its loaded generator is stale and the build would poison the cache."""
    from tilewright.sim import verilator as v

    src = tmp_path / "block.py"
    src.write_text("x = 1\n")
    v._check_sources_unchanged([src])
    v._check_sources_unchanged([src])          # unchanged: fine
    src.write_text("x = 2\n")
    with pytest.raises(v.RtlBuildError, match=r"block\.py changed on disk"):
        v._check_sources_unchanged([src])
