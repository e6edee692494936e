"""Verilator runs of the datamover channels and the lock unit (``sim/harness/dm_harness.sv``).

:func:`build_datamover_harness` generates ``tw_dm_mm2s``, ``tw_dm_s2mm`` and ``tw_lock_unit``
from a :class:`DmHarnessConfig` and Verilates them with the harness
(:func:`tilewright.sim.verilator.build_component`, cached). :func:`run_datamover_jobs` runs any
number of :class:`DmJob` in one simulator process: memories, BDs, tasks, lock values and the
S2MM stream go in through ``$readmemh`` files, the final memory, the captured MM2S stream and
the lock values come back through ``$writememh``; cocotb (:mod:`tilewright.sim.datamover_tb`)
only issues commands. Back-pressure on both streams and both memory ports is pseudo-random,
driven by generators in the harness seeded with the job's ``seed``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from amaranth.lib import wiring

from tilewright.hw.bd import BD_BITS, BufferDescriptor
from tilewright.hw.locks import LockOp
from tilewright.sim.dm_model import BdTable, task_words
from tilewright.sim.verilator import (
    RtlSimError,
    RtlTimeoutError,
    RunTotals,
    build_component,
    run_job_batch,
)

__all__ = [
    "BackPressure", "DmHarnessConfig", "DmJob", "DmResult", "DmRun", "build_datamover_harness",
    "run_datamover_jobs",
]

_PKG = Path(__file__).resolve().parent
HARNESS_SV = _PKG / "harness" / "dm_harness.sv"
HARNESS_TOP = "tw_dm_harness"
TB_MODULE = "tilewright.sim.datamover_tb"
#: Default per-job limit of :func:`run_datamover_jobs`, in simulated cycles.
DEFAULT_TIMEOUT_CYCLES = 200_000


def _pos_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer from {lo} to {hi}, not {value!r}")
    return value


@dataclass(frozen=True)
class DmHarnessConfig:
    """Parameters of the harness's channels, lock unit and memory.

    Attributes
    ----------
    addr_bits : int
        The memory has ``2**addr_bits`` words (4 to 20).
    word_bits : int
        Memory and stream word width: 8, 16, 32 or 64.
    n_bds, dims, task_depth, skid_depth :
        Of both channels (:class:`tilewright.hw.datamover.Datamover`).
    n_locks, lock_value_bits :
        Of the lock unit.
    max_tasks : int
        Tasks per channel per job (harness array size).
    max_stream : int
        S2MM input words and captured MM2S words per job (harness array size).
    """

    addr_bits: int = 12
    word_bits: int = 64
    n_bds: int = 12
    dims: int = 4
    task_depth: int = 4
    skid_depth: int = 4
    n_locks: int = 16
    lock_value_bits: int = 6
    max_tasks: int = 64
    max_stream: int = 8192

    def __post_init__(self) -> None:
        _pos_int("addr_bits", self.addr_bits, 4, 20)
        if self.word_bits not in (8, 16, 32, 64):
            raise ValueError(f"word_bits must be 8, 16, 32 or 64, not {self.word_bits!r}")
        _pos_int("max_tasks", self.max_tasks, 1, 1 << 16)
        _pos_int("max_stream", self.max_stream, 1, 1 << 24)
        for n in ("max_tasks", "max_stream"):
            v = getattr(self, n)
            if v & (v - 1):
                raise ValueError(f"{n} must be a power of two, not {v!r}")

    def modules(self) -> dict[str, Callable[[], wiring.Component]]:
        """The Verilog modules of the harness: name -> factory."""
        from tilewright.hw.datamover import Datamover
        from tilewright.hw.locks import LockUnit

        def channel(direction: str) -> Callable[[], wiring.Component]:
            return lambda: Datamover(direction, addr_bits=self.addr_bits,
                                     word_bits=self.word_bits, n_bds=self.n_bds, dims=self.dims,
                                     lock_value_bits=self.lock_value_bits,
                                     task_depth=self.task_depth, skid_depth=self.skid_depth)

        return {
            "tw_dm_mm2s": channel("mm2s"),
            "tw_dm_s2mm": channel("s2mm"),
            "tw_lock_unit": lambda: LockUnit(self.n_locks, 2, self.lock_value_bits),
        }

    def parameters(self) -> dict[str, int]:
        """Parameters of ``tw_dm_harness``."""
        return {"ADDR_BITS": self.addr_bits, "WORD_BITS": self.word_bits, "BD_BITS": BD_BITS,
                "N_BDS": self.n_bds, "N_LOCKS": self.n_locks,
                "LOCK_VALUE_BITS": self.lock_value_bits, "MAX_TASKS": self.max_tasks,
                "MAX_STREAM": self.max_stream}

    def digest(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def build_datamover_harness(hc: DmHarnessConfig | None = None, *,
                            rebuild: bool = False) -> Path:
    """Generate and Verilate the datamover harness of ``hc`` (default
    :class:`DmHarnessConfig`); cached like the tile builds. Returns the build directory."""
    hc = DmHarnessConfig() if hc is None else hc
    if not isinstance(hc, DmHarnessConfig):
        raise TypeError(f"hc must be a DmHarnessConfig, not {hc!r}")
    import tilewright.hw

    hw = Path(tilewright.hw.__file__).resolve().parent
    return build_component(
        "datamover", hc.modules(), harness=[HARNESS_SV], top=HARNESS_TOP,
        parameters=hc.parameters(), digest=hc.digest(),
        sources=[hw / "bd.py", hw / "locks.py", hw / "datamover.py"], rebuild=rebuild)


@dataclass(frozen=True)
class BackPressure:
    """Probabilities (0 to 1, in steps of 1/256) that a source is on in a cycle.

    Attributes
    ----------
    out_ready : float
        The MM2S stream's consumer is ready.
    in_valid : float
        The S2MM stream's producer offers a word (held until taken).
    rd_grant, wr_grant : float
        The memory grants the MM2S read / S2MM write port.
    """

    out_ready: float = 1.0
    in_valid: float = 1.0
    rd_grant: float = 1.0
    wr_grant: float = 1.0

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"BackPressure.{k} must be a probability in (0, 1], not {v!r}")

    def thresholds(self) -> dict[str, int]:
        return {f"thr_{k}": max(1, round(v * 256)) for k, v in asdict(self).items()}


@dataclass
class DmJob:
    """One harness run: the memory, both channels' BDs and tasks, locks, stream and seed.

    Attributes
    ----------
    mem : numpy.ndarray
        The initial memory, ``2**addr_bits`` unsigned words.
    mm2s_bds, s2mm_bds : sequence or mapping of BufferDescriptor
        BDs of each channel (index -> BD; missing BDs are written as zeros).
    mm2s_tasks, s2mm_tasks : sequence of int
        First BD of each task, queued in order.
    s2mm_in : sequence of int
        The S2MM stream.
    locks : sequence of int
        Initial lock values (locks not given start at 0).
    seed : int
        Seeds the back-pressure generators.
    backpressure : BackPressure
        How often each source is on.
    name : str
        For messages.
    """

    mem: np.ndarray
    mm2s_bds: BdTable = ()
    s2mm_bds: BdTable = ()
    mm2s_tasks: Sequence[int] = ()
    s2mm_tasks: Sequence[int] = ()
    s2mm_in: Sequence[int] | np.ndarray = ()
    locks: Sequence[int] = ()
    seed: int = 1
    backpressure: BackPressure = field(default_factory=BackPressure)
    name: str = ""


@dataclass
class DmResult:
    """Outcome of one :class:`DmJob`.

    Attributes
    ----------
    mem : numpy.ndarray
        The final memory.
    mm2s_out : numpy.ndarray
        Every word the MM2S stream delivered, in order.
    s2mm_consumed : int
        S2MM stream words taken.
    locks : list of int
        Final lock values.
    cycles : int
        Cycles of the START phase (until both channels were idle, or the timeout).
    mm2s_cycles, s2mm_cycles : int
        Cycles from the START phase's first cycle (when the first task is queued) to the
        channel's last busy cycle; 0 if it never was busy. Comparable to
        :func:`tilewright.sim.dm_model.transfer_cycles`.
    mm2s_tasks_done, s2mm_tasks_done : int
        The channels' ``tasks_done``.
    mm2s_error, s2mm_error, lock_overflow, lock_bad_id : bool
        Sticky error flags.
    timed_out : bool
        The job hit its cycle limit.
    waiting : list of str
        At the end of the run, each channel's pending lock request, in words.
    wall_s : float
        Wall-clock seconds of the START phase.
    """

    mem: np.ndarray
    mm2s_out: np.ndarray
    s2mm_consumed: int
    locks: list[int]
    cycles: int
    mm2s_cycles: int
    s2mm_cycles: int
    mm2s_tasks_done: int
    s2mm_tasks_done: int
    mm2s_error: bool
    s2mm_error: bool
    lock_overflow: bool
    lock_bad_id: bool
    timed_out: bool
    waiting: list[str]
    wall_s: float


class DmRun(RunTotals[DmResult]):
    """The results of :func:`run_datamover_jobs` (see
    :class:`~tilewright.sim.verilator.RunTotals`)."""


# Files ----------------------------------------------------------------------------------------

def _hex(values: Sequence[int] | np.ndarray, bits: int, n: int) -> str:
    """``n`` lines of ``bits``-bit hex words (zero-padded beyond ``values``)."""
    digits = math.ceil(bits / 4)
    vals = [int(v) for v in values] + [0] * (n - len(values))
    return "".join(f"{v:0{digits}x}\n" for v in vals)


def _words_hex(words: np.ndarray, word_bits: int, n: int) -> bytes:
    arr = np.zeros(n, np.uint64)
    arr[:len(words)] = np.asarray(words, dtype=np.uint64)
    nb = word_bits // 8
    be = arr.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - nb:]
    digits = np.frombuffer(be.tobytes().hex().encode(), np.uint8).reshape(n, 2 * nb)
    out = np.empty((n, 2 * nb + 1), np.uint8)
    out[:, :-1] = digits
    out[:, -1] = ord("\n")
    return out.tobytes()


def _words_from_hex(text: str, word_bits: int, n: int) -> np.ndarray:
    lines = [ln for ln in (s.strip() for s in text.split("\n"))
             if ln and not ln.startswith(("//", "@"))]
    if len(lines) != n:
        raise ValueError(f"dump has {len(lines)} words, expected {n}")
    d = word_bits // 4
    joined = "".join(ln.rjust(d, "0")[-d:] for ln in lines).lower().replace("x", "0")
    be = np.frombuffer(bytes.fromhex(joined), np.uint8).reshape(n, d // 2)
    full = np.zeros((n, 8), np.uint8)
    full[:, 8 - d // 2:] = be
    return full.view(">u8").reshape(n).astype(np.uint64)


def _bd_table(bds: BdTable, n_bds: int, who: str) -> list[BufferDescriptor | None]:
    items = bds.items() if isinstance(bds, Mapping) else enumerate(bds)
    table: list[BufferDescriptor | None] = [None] * n_bds
    for i, bd in items:
        if bd is None:
            continue
        if not isinstance(bd, BufferDescriptor):
            raise TypeError(f"{who} BD {i} must be a BufferDescriptor, not {bd!r}")
        if not isinstance(i, int) or not 0 <= i < n_bds:
            raise ValueError(f"{who} BD index {i!r} is outside the channel's 0..{n_bds - 1}")
        table[i] = bd
    return table


def _check_job(hc: DmHarnessConfig, i: int, job: DmJob, check_bds: bool) -> None:
    who = f"job {i}" + (f" ({job.name})" if job.name else "")
    if not isinstance(job, DmJob):
        raise TypeError(f"job {i} must be a DmJob, not {job!r:.80}")
    mem = job.mem
    if not isinstance(mem, np.ndarray) or mem.ndim != 1 or mem.size != 1 << hc.addr_bits \
            or mem.dtype.kind not in "ui":
        got = f"{mem.dtype} array of shape {mem.shape}" if isinstance(mem, np.ndarray) \
            else type(mem).__name__
        raise ValueError(f"{who}: mem must be an integer array of {1 << hc.addr_bits} words "
                         f"(2**addr_bits), not a {got}")
    for name in ("mm2s_tasks", "s2mm_tasks"):
        tasks = getattr(job, name)
        if len(tasks) > hc.max_tasks:
            raise ValueError(f"{who}: {len(tasks)} {name}, the harness takes {hc.max_tasks}")
        for t in tasks:
            _pos_int(f"{who}: {name} entry", t, 0, 63)
    if len(job.s2mm_in) > hc.max_stream:
        raise ValueError(f"{who}: {len(job.s2mm_in)} s2mm_in words, the harness takes "
                         f"{hc.max_stream}")
    if len(job.locks) > hc.n_locks:
        raise ValueError(f"{who}: {len(job.locks)} initial lock values for {hc.n_locks} locks")
    for v in job.locks:
        _pos_int(f"{who}: lock value", v, 0, (1 << hc.lock_value_bits) - 1)
    _pos_int(f"{who}: seed", job.seed, 0, (1 << 32) - 1)
    if not check_bds:
        return
    for direction, bds in (("mm2s", job.mm2s_bds), ("s2mm", job.s2mm_bds)):
        for k, bd in enumerate(_bd_table(bds, hc.n_bds, f"{who}: {direction}")):
            if bd is not None:
                try:
                    bd.check(direction=direction, dims=hc.dims, n_bds=hc.n_bds,
                             n_locks=hc.n_locks, lock_value_bits=hc.lock_value_bits,
                             addr_bits=hc.addr_bits, index=k)
                except ValueError as e:
                    raise ValueError(f"{who}: {direction} {e}") from None
    out = sum(task_words(job.mm2s_bds, t) for t in job.mm2s_tasks)
    if out > hc.max_stream:
        raise ValueError(f"{who}: the MM2S tasks stream {out} words, the harness captures "
                         f"{hc.max_stream}")


def _waiting(r: dict[str, int], locks: list[int]) -> list[str]:
    out = []
    for ch in ("mm2s", "s2mm"):
        if not r[f"{ch}_lock_req"]:
            if r[f"{ch}_busy"]:
                out.append(f"{ch.upper()} busy, no lock request pending")
            continue
        lid, val = r[f"{ch}_lock_id"], r[f"{ch}_lock_val"]
        have = locks[lid] if lid < len(locks) else None
        if LockOp(r[f"{ch}_lock_op"]) == LockOp.ACQUIRE:
            out.append(f"{ch.upper()} waits to acquire {val} from lock {lid} (holds {have})")
        else:
            out.append(f"{ch.upper()} waits to release {val} to lock {lid} (holds {have})")
    return out


def run_datamover_jobs(jobs: Sequence[DmJob], *, hc: DmHarnessConfig | None = None,
                       timeout_cycles: int = DEFAULT_TIMEOUT_CYCLES,
                       run_dir: str | Path | None = None, check_bds: bool = True) -> DmRun:
    """Run datamover jobs on the Verilator model of the harness, all in one simulator process.

    For each job: load the files and reset the channels and the lock unit, write the BDs and
    the initial lock values, queue the tasks and run until every task was queued and both
    channels are idle, then dump memory, MM2S stream and lock values.

    Parameters
    ----------
    jobs : sequence of DmJob
        The jobs.
    hc : DmHarnessConfig, optional
        The harness (built and cached with :func:`build_datamover_harness`).
    timeout_cycles : int
        A job still running after this many cycles fails the run.
    run_dir : path-like, optional
        Directory for job files and the simulator log, kept. By default a temporary directory,
        removed after a successful run and kept (named in the error) otherwise.
    check_bds : bool
        Check every BD against the channels (:meth:`BufferDescriptor.check`) first; tests of
        the RTL's error handling turn it off.

    Returns
    -------
    DmRun
        One :class:`DmResult` per job, with the run's totals.

    Raises
    ------
    RtlTimeoutError
        If a job did not finish within ``timeout_cycles``; the message names the job, its seed
        and what each channel waits for; every job's result is in the exception's ``results``.
    RtlSimError
        If the simulator failed.
    TypeError, ValueError
        If a job is malformed (the message names the job and the field).
    """
    hc = DmHarnessConfig() if hc is None else hc
    _pos_int("timeout_cycles", timeout_cycles, 1, (1 << 32) - 1)
    for i, job in enumerate(jobs):
        _check_job(hc, i, job, check_bds)
    bdir = build_datamover_harness(hc)
    run = DmRun()
    run.build_dir = bdir
    if not jobs:
        return run
    keep = run_dir is not None
    rdir = Path(run_dir).resolve() if keep else Path(tempfile.mkdtemp(prefix="tw-dm-"))
    rdir.mkdir(parents=True, exist_ok=True)
    words = 1 << hc.addr_bits
    specs = []
    for i, job in enumerate(jobs):
        jd = rdir / f"job{i}"
        jd.mkdir(exist_ok=True)
        for f in ("mem_out.hex", "out.hex", "locks_out.hex"):
            (jd / f).unlink(missing_ok=True)
        (jd / "mem.hex").write_bytes(_words_hex(job.mem, hc.word_bits, words))
        for direction, bds in (("mm2s", job.mm2s_bds), ("s2mm", job.s2mm_bds)):
            table = _bd_table(bds, hc.n_bds, f"job {i}: {direction}")
            enc = [0 if bd is None else bd.encode() for bd in table]
            (jd / f"bd_{direction}.hex").write_text(_hex(enc, BD_BITS, hc.n_bds))
        (jd / "tasks_mm2s.hex").write_text(_hex(job.mm2s_tasks, 8, hc.max_tasks))
        (jd / "tasks_s2mm.hex").write_text(_hex(job.s2mm_tasks, 8, hc.max_tasks))
        (jd / "locks.hex").write_text(_hex(job.locks, hc.lock_value_bits, hc.n_locks))
        (jd / "in.hex").write_bytes(_words_hex(np.asarray(job.s2mm_in, dtype=np.uint64),
                                               hc.word_bits, hc.max_stream))
        specs.append({"seed": job.seed, "n_tasks_mm2s": len(job.mm2s_tasks),
                      "n_tasks_s2mm": len(job.s2mm_tasks), "n_in_words": len(job.s2mm_in),
                      "timeout_cycles": timeout_cycles, **job.backpressure.thresholds()})
    failure, report, run.process_wall_s = run_job_batch(
        bdir, top=HARNESS_TOP, test_module=TB_MODULE, run_dir=rdir, indent=1,
        spec={"jobs": specs, "init_cycles": max(hc.n_bds, hc.n_locks) + 16})
    for r in report["jobs"]:
        jd = rdir / f"job{r['index']}"
        try:
            mem = _words_from_hex((jd / "mem_out.hex").read_text(), hc.word_bits, words)
            out = _words_from_hex((jd / "out.hex").read_text(), hc.word_bits, hc.max_stream)
            locks = [int(x, 16) for x in (jd / "locks_out.hex").read_text().split()
                     if not x.startswith("//")]
        except (OSError, ValueError) as e:
            failure = failure or f"job {r['index']}: cannot read its dumps: {e}"
            break
        n_out = min(r["out_words"], hc.max_stream)
        run.append(DmResult(
            mem=mem, mm2s_out=out[:n_out], s2mm_consumed=r["in_words"], locks=locks,
            cycles=r["run_cycles"],
            mm2s_cycles=r["mm2s_last_busy"] + 1 if r["mm2s_first_busy"] != 0xFFFFFFFF else 0,
            s2mm_cycles=r["s2mm_last_busy"] + 1 if r["s2mm_first_busy"] != 0xFFFFFFFF else 0,
            mm2s_tasks_done=r["mm2s_done"], s2mm_tasks_done=r["s2mm_done"],
            mm2s_error=bool(r["mm2s_error"]), s2mm_error=bool(r["s2mm_error"]),
            lock_overflow=bool(r["lock_overflow"]), lock_bad_id=bool(r["lock_bad_id"]),
            timed_out=bool(r["timed_out"]), waiting=_waiting(r, locks),
            wall_s=r["start_wall_s"]))
        if r["out_overflow"]:
            failure = failure or f"job {r['index']}: the MM2S stream overflowed the capture"
    run.sim_cycles = sum(r.cycles for r in run)
    run.start_wall_s = sum(r.wall_s for r in run)
    run.cycles_per_s = run.sim_cycles / run.start_wall_s if run.start_wall_s > 0 else 0.0

    late = [i for i, r in enumerate(run) if r.timed_out]
    if late:
        lines = [f"job {i}{f' ({jobs[i].name})' if jobs[i].name else ''}, seed "
                 f"{jobs[i].seed}: " + ("; ".join(run[i].waiting) or "no lock request pending")
                 for i in late]
        raise RtlTimeoutError(
            f"{len(late)} of {len(jobs)} datamover job(s) did not finish within "
            f"{timeout_cycles} cycles (timeout_cycles):\n  " + "\n  ".join(lines)
            + f"\nRun files and log: {rdir}", list(run), rdir)
    if failure is None and report.get("failure"):
        failure = report["failure"]
    if failure is None and len(run) != len(jobs):
        failure = f"only {len(run)} of {len(jobs)} jobs reported results"
    if failure is not None:
        raise RtlSimError(f"datamover run failed: {failure}. Run files: {rdir}", list(run),
                          rdir)
    if not keep:
        shutil.rmtree(rdir, ignore_errors=True)
    return run
