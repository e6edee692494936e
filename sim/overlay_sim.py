"""Run compiled layers on the Verilator model of a whole overlay (``tw_overlay`` + DDR model).

:func:`build_overlay` generates the overlay's modules (:func:`tilewright.hw.generate.
overlay_modules`: the tile unit and the shim once each, the top instantiating them) and
Verilates them with ``sim/harness/overlay_harness.sv``; the build is cached by a hash of the
configuration and the sources. :func:`run_overlay_jobs` runs :class:`OverlayJob` s -- a DDR
image, configuration records, the range to read back -- in one simulator process. A job that
stops making progress ends with :attr:`OverlayResult.waits`, saying which tile or channel waits
on which lock.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tilewright.hw.config import OverlayConfig
from tilewright.hw.overlay import STATUS_BITS, array_memtile
from tilewright.hw.tileunit import N_LOCK_PORTS

from .verilator import (
    RtlSimError,
    RunTotals,
    _hex_lines,
    _log_tail,
    build_component,
    run_job_batch,
)

__all__ = ["CfgRecord", "OverlayJob", "OverlayResult", "OverlayRun", "build_overlay",
           "cfg_data_bits", "overlay_harness_parameters", "record_lines", "run_overlay_jobs"]

HARNESS_SV = Path(__file__).resolve().parent / "harness" / "overlay_harness.sv"
HARNESS_TOP = "tw_overlay_harness"
TB_MODULE = "tilewright.sim.overlay_tb"
#: Maximum configuration records of a job (the harness's buffer).
CFG_MAX = 65536
#: DDR model size: 2**DDR_WORDS_LOG2 words (256 MB of 8-byte words: a whole VGG16 image of
#: about 150 MB, or its 103 MB classifier.0 layer, fits).
DDR_WORDS_LOG2 = 25
_LOCK_PORT_NAMES = ("core", "s2mm0", "s2mm1", "s2mm2", "mm2s0", "mm2s1")


@dataclass(frozen=True)
class CfgRecord:
    """One configuration write: ``kind`` (see :data:`tilewright.hw.overlay.CFG_KINDS`),
    ``unit`` (tile ``r * cols + c``, shim ``rows * cols + c``, memtile ``rows * cols + cols +
    c``: :func:`tilewright.hw.overlay.unit_of`), channel, address, data."""

    kind: int
    unit: int
    ch: int
    addr: int
    data: int


@dataclass
class OverlayJob:
    """A run of the overlay.

    Attributes
    ----------
    ddr : np.ndarray
        The DDR image as unsigned words (``uint64`` for 8-byte words, ``uint32`` for 4);
        the rest of the DDR model is zero. A job whose ``ddr`` is the previous job's array
        (the same object: the runs of one layer) is not loaded again: it runs on the DDR as
        the previous job left it, outputs included, as the overlay model runs a layer.
    records : sequence of CfgRecord
        Configuration, applied in order before ``start``.
    dump : tuple of int
        Word range ``[lo, hi)`` read back after the run.
    timeout_cycles, watchdog_cycles : int
        Limits: total cycles, and cycles without any progress (then the watchdog report).
    """

    ddr: np.ndarray
    records: Sequence[CfgRecord]
    dump: tuple[int, int]
    timeout_cycles: int = 50_000_000
    watchdog_cycles: int = 20_000


@dataclass
class OverlayResult:
    """What one job did.

    Attributes
    ----------
    ddr_out : np.ndarray
        The dumped DDR words (``dump`` range).
    cycles : int
        The overlay's cycle count from ``start`` to ``done``.
    rd_words, wr_words : int
        DDR words read and written during the run.
    stalled, timed_out, error, ddr_oob : bool
        The watchdog fired; the time limit passed; a unit reported an error; an access fell
        outside the DDR model.
    waits : list of str
        For a stalled run: who waits on which lock (``tile(r,c) core waits on lock 3``).
    status : list of int
        Every unit's raw status word.
    tile_cycles : dict of (int, int) to int
        Each tile's own cycle count from start to its HALT.
    wall_s : float
        Wall-clock seconds of the START phase.
    """

    ddr_out: np.ndarray
    cycles: int
    rd_words: int
    wr_words: int
    stalled: bool
    timed_out: bool
    error: bool
    ddr_oob: bool
    waits: list[str] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    tile_cycles: dict[tuple[int, int], int] = field(default_factory=dict)
    wall_s: float = 0.0
    sim_cycles: int = 0


class OverlayRun(RunTotals[OverlayResult]):
    """The results of :func:`run_overlay_jobs` (see :class:`RunTotals`)."""


def overlay_harness_parameters(cfg: OverlayConfig) -> dict[str, int]:
    """Parameters of ``tw_overlay_harness`` for ``cfg``."""
    from tilewright.hw.overlay import Overlay

    R, C = cfg.array.rows, cfg.array.cols
    top = Overlay(cfg)
    top._MustUse__silence = True  # only its widths are read here
    return {
        "NRD": C * cfg.ddr.read_channels,
        "NWR": C * cfg.ddr.write_channels,
        "NUNITS": R * C + 2 * C,
        "WORD_BITS": cfg.tile.word_bits,
        "CFG_BITS": top.cfg_bits,
        "DDR_WORDS_LOG2": DDR_WORDS_LOG2,
        "INTERVAL": cfg.ddr_interval,
        "LATENCY": cfg.ddr.latency,
        "CFG_MAX": CFG_MAX,
    }


def overlay_build_args() -> tuple[str, ...]:
    """Extra Verilator flags of overlay builds: ``TILEWRIGHT_VERILATOR_THREADS=N`` builds a
    model that runs on N threads (the array's tiles evaluate in parallel)."""
    n = os.environ.get("TILEWRIGHT_VERILATOR_THREADS", "")
    if not n:
        return ()
    if not n.isdigit() or not 1 <= int(n) <= 64:
        raise ValueError(f"TILEWRIGHT_VERILATOR_THREADS must be an integer from 1 to 64, "
                         f"not {n!r}")
    return ("--threads", n) if int(n) > 1 else ()


#: Tiles from which an overlay's tile unit is Verilated as a hierarchical block. Verilator
#: emits a copy of a flattened module's code per instance, and on aie2-4x4 the 16 copies no
#: longer fit the caches: the bench layer ran at 13.0 k cycles/s flat and 26.8 k with the tile
#: unit a hierarchical block (one copy, shared; 25.4 k with the memtile one too), and built in
#: 62 s instead of 275 s. A block's ports cost a little every cycle, so small arrays are
#: faster flat: aie2-2x2 135 k cycles/s flat, 90 k hierarchical (docs/results.md).
HIER_MIN_TILES = 9


def overlay_hier_blocks(cfg: OverlayConfig) -> tuple[str, ...]:
    """The modules of ``cfg``'s overlay that its Verilator build compiles as hierarchical
    blocks: the tile unit from :data:`HIER_MIN_TILES` tiles on, none below.
    ``TILEWRIGHT_VERILATOR_HIER`` overrides the rule: ``none``, or a comma-separated list of
    ``tileunit``, ``memtile`` and ``shim``."""
    from tilewright.hw.overlay import MEMTILE_MODULE, SHIM_MODULE, TILEUNIT_MODULE

    names = {"tileunit": TILEUNIT_MODULE, "memtile": MEMTILE_MODULE, "shim": SHIM_MODULE}
    env = os.environ.get("TILEWRIGHT_VERILATOR_HIER", "").strip()
    if not env:
        if cfg.array.rows * cfg.array.cols >= HIER_MIN_TILES:
            return (TILEUNIT_MODULE,)
        return ()
    if env == "none":
        return ()
    parts = [p.strip() for p in env.split(",")]
    bad = [p for p in parts if p not in names]
    if bad:
        raise ValueError(f"TILEWRIGHT_VERILATOR_HIER must be 'none' or a comma-separated "
                         f"list of {', '.join(names)}, not {env!r}")
    return tuple(names[p] for p in dict.fromkeys(parts))


def build_overlay(cfg: OverlayConfig, *, rebuild: bool = False) -> Path:
    """Generate and Verilate ``cfg``'s overlay with its harness (cached by configuration hash).

    Returns the build directory (``build.json`` holds ``generate_s`` and
    ``verilator_build_s``)."""
    from tilewright.hw.generate import overlay_modules

    name = "overlay_" + re.sub(r"[^A-Za-z0-9_.]", "_", cfg.name)
    return build_component(name, overlay_modules(cfg), harness=[HARNESS_SV],
                           top=HARNESS_TOP, parameters=overlay_harness_parameters(cfg),
                           digest=cfg.digest(), rebuild=rebuild,
                           extra_args=overlay_build_args(),
                           hier_blocks=overlay_hier_blocks(cfg))


def _record_hex(r: CfgRecord, cfg_bits: int) -> str:
    for name, v, bits in (("kind", r.kind, 3), ("unit", r.unit, 8), ("ch", r.ch, 4),
                          ("addr", r.addr, 16), ("data", r.data, cfg_bits)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < 1 << bits:
            raise ValueError(f"configuration record {r}: {name} must be an integer from 0 to "
                             f"{(1 << bits) - 1}, not {v!r}")
    value = (((((int(r.kind) << 8 | r.unit) << 4 | r.ch) << 16 | r.addr) << cfg_bits)
             | int(r.data))
    return f"{value:0{(32 + cfg_bits + 3) // 4}x}"


def cfg_data_bits(cfg: OverlayConfig) -> int:
    """Data bits of the overlay's configuration port (``Overlay(cfg).cfg_bits``)."""
    from tilewright.hw.overlay import Overlay

    top = Overlay(cfg)
    top._MustUse__silence = True
    return top.cfg_bits


def record_lines(records: Sequence[CfgRecord], cfg_bits: int) -> list[str]:
    """The harness's ``cfg.hex`` lines for ``records`` (``Overlay(cfg).cfg_bits`` data bits),
    with the terminating record (kind 15)."""
    lines = [_record_hex(r, cfg_bits) for r in records]
    lines.append(f"{15 << (28 + cfg_bits):0{(32 + cfg_bits + 3) // 4}x}")
    return lines


def _waits(cfg: OverlayConfig, status: list[int]) -> list[str]:
    R, C = cfg.array.rows, cfg.array.cols
    out = []
    for u, st in enumerate(status[:R * C]):
        r, c = divmod(u, C)
        wait = (st >> 16) & ((1 << N_LOCK_PORTS) - 1)
        for p in range(N_LOCK_PORTS):
            if wait >> p & 1:
                lock = (st >> (32 + 6 * p)) & 63
                out.append(f"tile({r},{c}) {_LOCK_PORT_NAMES[p]} waits on lock {lock}")
        if st & 1 and not wait & 1:
            out.append(f"tile({r},{c}) core is busy (not waiting on a lock)")
        dma = (st >> 4) & ((1 << (N_LOCK_PORTS - 1)) - 1)
        for p in range(N_LOCK_PORTS - 1):
            if dma >> p & 1 and not wait >> (p + 1) & 1:
                out.append(f"tile({r},{c}) {_LOCK_PORT_NAMES[p + 1]} is busy, waiting on its "
                           f"stream")
    for c, st in enumerate(status[R * C:R * C + C]):
        busy = st >> 4
        for k in range(cfg.ddr.read_channels + cfg.ddr.write_channels):
            if busy >> k & 1:
                kind = ("read" if k < cfg.ddr.read_channels else "write")
                out.append(f"shim({c}) {kind} channel {k % cfg.ddr.read_channels} is busy, "
                           f"waiting on its stream")
    mt = array_memtile(cfg)
    for c, st in enumerate(status[R * C + C:R * C + 2 * C]):
        busy = st >> 4
        for k in range(mt.s2mm + mt.mm2s):
            if busy >> k & 1:
                kind = "S2MM" if k < mt.s2mm else "MM2S"
                out.append(f"memtile({c}) {kind} channel {k if k < mt.s2mm else k - mt.s2mm} "
                           f"is busy, waiting on its stream or a lock")
    return out


def run_overlay_jobs(cfg: OverlayConfig, jobs: Sequence[OverlayJob], *,
                     run_dir: str | os.PathLike[str] | None = None) -> OverlayRun:
    """Run jobs on the Verilator model of ``cfg``'s overlay, in one simulator process.

    Raises
    ------
    RtlSimError
        If the simulator failed or a job stalled, timed out, reported an error or left the DDR
        model (the message carries the watchdog's report; the results are attached).
    """

    cfg_bits = cfg_data_bits(cfg)
    wb = cfg.tile.word_bits
    digits = wb // 4
    bdir = build_overlay(cfg)
    run = OverlayRun()
    run.build_dir = bdir
    if not jobs:
        return run
    keep = run_dir is not None
    rdir = Path(run_dir).resolve() if keep else Path(tempfile.mkdtemp(prefix="tw-ovl-"))
    rdir.mkdir(parents=True, exist_ok=True)
    job_list = []
    for i, job in enumerate(jobs):
        if len(job.records) >= CFG_MAX:
            raise ValueError(f"job {i}: {len(job.records)} configuration records, at most "
                             f"{CFG_MAX - 1} fit the harness")
        lo, hi = job.dump
        if not 0 <= lo < hi <= 1 << DDR_WORDS_LOG2:
            raise ValueError(f"job {i}: dump range {job.dump} is not inside the DDR model "
                             f"(2**{DDR_WORDS_LOG2} words)")
        if job.ddr.size > 1 << DDR_WORDS_LOG2:
            raise ValueError(f"job {i}: the DDR image has {job.ddr.size} words, the model "
                             f"holds 2**{DDR_WORDS_LOG2}")
        jd = rdir / f"job{i}"
        jd.mkdir(exist_ok=True)
        load = i == 0 or job.ddr is not jobs[i - 1].ddr
        if load:
            # in bulk: big-endian bytes of each word to hex lines
            words = np.asarray(job.ddr).astype(">u8").view(np.uint8).reshape(-1, 8)
            (jd / "ddr.hex").write_bytes(_hex_lines(words[:, 8 - digits // 2:]) if words.size
                                         else b"\n")
        (jd / "cfg.hex").write_text("\n".join(record_lines(job.records, cfg_bits)) + "\n")
        for name in ("ddr_out.hex", "status.hex"):
            (jd / name).unlink(missing_ok=True)
        job_list.append({"load_ddr": load, "timeout_cycles": job.timeout_cycles,
                         "watchdog_cycles": job.watchdog_cycles,
                         "dump_lo": lo, "dump_hi": hi - 1, "cfg_records": len(job.records)})
    spec = {"job_list": job_list, "units": cfg.array.rows * cfg.array.cols + 2 * cfg.array.cols}
    failure, report, run.process_wall_s = run_job_batch(
        bdir, top=HARNESS_TOP, test_module=TB_MODULE, run_dir=rdir, spec=spec, indent=1)
    problems = []
    for r in report["jobs"]:
        i = r["index"]
        jd = rdir / f"job{i}"
        try:
            out = np.array([int(x, 16) for x in (jd / "ddr_out.hex").read_text().split()
                            if not x.startswith("//")], dtype=np.uint64)
            status = [int(x, 16) for x in (jd / "status.hex").read_text().split()
                      if not x.startswith("//")]
        except (OSError, ValueError) as e:
            failure = failure or f"job {i}: cannot read its dumps: {e}"
            break
        status = [s & ((1 << STATUS_BITS) - 1) for s in status]
        res = OverlayResult(ddr_out=out, cycles=r["cycles"], rd_words=r["rd_words"],
                            wr_words=r["wr_words"], stalled=r["stalled"],
                            timed_out=r["timed_out"], error=bool(r["error"]),
                            ddr_oob=bool(r["ddr_oob"]), status=status,
                            wall_s=r["start_wall_s"], sim_cycles=r["run_cycles"])
        C = cfg.array.cols
        res.tile_cycles = {divmod(u, C): (st >> 96) & 0xFFFFFFFF
                           for u, st in enumerate(status[:cfg.array.rows * C])}
        if res.stalled or res.timed_out:
            res.waits = _waits(cfg, status)
        run.append(res)
        what = [k for k in ("stalled", "timed_out", "error", "ddr_oob") if getattr(res, k)]
        if what:
            problems.append(f"job {i}: {', '.join(what)} after {res.sim_cycles} cycles"
                            + (": " + "; ".join(res.waits) if res.waits else ""))
    run.sim_cycles = sum(r.sim_cycles for r in run)
    run.start_wall_s = sum(r.wall_s for r in run)
    run.cycles_per_s = run.sim_cycles / run.start_wall_s if run.start_wall_s > 0 else 0.0
    if failure is None and report.get("failure"):
        failure = report["failure"]
    if failure is None and len(run) != len(jobs):
        failure = f"only {len(run)} of {len(jobs)} jobs reported results"
    if failure is not None or problems:
        log = rdir / "sim.log"
        raise RtlSimError(f"overlay run of '{cfg.name}' failed: "
                          f"{failure or '; '.join(problems)}. Run files: {rdir}; last lines "
                          f"of {log.name}:\n{_log_tail(log)}", list(run), rdir)
    if not keep:
        shutil.rmtree(rdir, ignore_errors=True)
    return run
