"""Verilator runs of one memtile (``tw_memtile`` as the overlay builds it) with its cocotb
regression (:mod:`tilewright.sim.memtile_tb`, ``sim/harness/memtile_harness.sv``).

:func:`run_memtile_jobs` builds (cached) and runs :class:`MemtileJob` s in one simulator
process: BDs, lock values and tasks go in through the configuration ports, both S2MM streams
and both MM2S readies are driven with seeded random handshakes, and each MM2S stream comes
back, to compare with the datamover model (:mod:`tilewright.sim.dm_model`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tilewright.hw.bd import BD_BITS, BD_INDEX_BITS, BufferDescriptor
from tilewright.hw.config import MemtileConfig
from tilewright.hw.memtile import CH_BITS, Memtile

from .verilator import RtlSimError, build_component, run_job_batch

__all__ = ["MemtileJob", "build_memtile", "run_memtile_jobs"]

HARNESS_SV = Path(__file__).resolve().parent / "harness" / "memtile_harness.sv"
HARNESS_TOP = "tw_memtile_harness"


@dataclass
class MemtileJob:
    """One memtile run: ``bds[ch]`` its channels' BDs (channels S2MM 0, 1, then MM2S 2, 3),
    ``tasks`` the channels whose task (from BD 0) is queued, in order, ``locks`` initial lock
    values, ``streams`` the words of S2MM 0 and 1, ``out_words`` how many words each MM2S
    channel sends, the handshake probabilities and the seed."""

    bds: dict[int, list[BufferDescriptor]]
    tasks: list[int]
    streams: tuple[list[int], list[int]]
    out_words: tuple[int, int]
    locks: dict[int, int] = field(default_factory=dict)
    p_valid: float = 0.6
    p_ready: float = 0.6
    seed: int = 0
    max_cycles: int = 20_000


def build_memtile(mcfg: MemtileConfig, block: int) -> Path:
    """Generate and Verilate the memtile (2 + 2 channels) with its harness (cached)."""
    if (mcfg.s2mm, mcfg.mm2s) != (2, 2):
        raise ValueError(f"the memtile harness has 2 S2MM + 2 MM2S channels, not "
                         f"{mcfg.s2mm} + {mcfg.mm2s}")
    probe = Memtile(mcfg, block)
    probe._MustUse__silence = True              # only its widths are read here
    params = {"WB": 8 * block, "AB": probe.addr_bits, "BDW": BD_BITS,
              "TB": BD_INDEX_BITS + CH_BITS}
    return build_component("memtile", {"tw_memtile": lambda: Memtile(mcfg, block)},
                           harness=[HARNESS_SV], top=HARNESS_TOP, parameters=params,
                           digest=json.dumps({"memtile": asdict(mcfg), "block": block}))


def run_memtile_jobs(mcfg: MemtileConfig, block: int,
                     jobs: list[MemtileJob]) -> list[dict[str, Any]]:
    """Run ``jobs``; per job ``mm2s`` (the two streams), ``cycles``, ``error``, ``busy`` and
    ``left`` (S2MM words not taken).

    Raises
    ------
    RtlSimError
        If the simulator failed or a job did not finish within its ``max_cycles``.
    """
    bdir = build_memtile(mcfg, block)
    rdir = Path(tempfile.mkdtemp(prefix="tw-memtile-"))
    spec = {"bd_index_bits": BD_INDEX_BITS, "jobs": [{
        "word_bits": 8 * block, "seed": j.seed, "p_valid": j.p_valid, "p_ready": j.p_ready,
        "max_cycles": j.max_cycles, "tasks": list(j.tasks),
        "bds": [[ch, i, bd.encode()] for ch, bds in sorted(j.bds.items())
                for i, bd in enumerate(bds)],
        "locks": sorted(j.locks.items()), "streams": [list(s) for s in j.streams],
        "out_words": list(j.out_words)} for j in jobs]}
    failure, report, _ = run_job_batch(bdir, top=HARNESS_TOP, test_module="tilewright.sim."
                                       "memtile_tb", run_dir=rdir, spec=spec)
    failure = failure or report.get("failure")
    results = report.get("jobs", [])
    late = [i for i, (r, j) in enumerate(zip(results, jobs, strict=False))
            if r["cycles"] >= j.max_cycles]
    if failure or len(results) != len(jobs) or late:
        raise RtlSimError(f"memtile run failed: {failure or ''} {len(results)} of {len(jobs)} "
                          f"jobs reported; not finished: {late}. Run files: {rdir}", results,
                          rdir)
    shutil.rmtree(rdir, ignore_errors=True)
    return results
