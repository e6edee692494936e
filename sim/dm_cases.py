"""Seeded datamover test cases: random BD chains and a lock-synchronised ping-pong.

Each generator returns a :class:`DmCase`: a :class:`tilewright.sim.datamover_sim.DmJob` and
what the Python model (:mod:`tilewright.sim.dm_model`) expects from it. Every case carries its
seed; the same seed gives the same case.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from tilewright.hw.bd import DIMS, PAD_DIMS, BufferDescriptor, LockAction
from tilewright.sim.datamover_sim import BackPressure, DmHarnessConfig, DmJob
from tilewright.sim.dm_model import run_mm2s, run_s2mm, task_words

__all__ = [
    "BACKPRESSURES", "DmCase", "ping_pong_case", "random_bd", "random_chains_case",
    "streaming_case",
]

#: Back-pressure settings the random cases cycle through: none, mild, harsh, asymmetric.
BACKPRESSURES = (
    BackPressure(),
    BackPressure(0.7, 0.7, 0.8, 0.8),
    BackPressure(0.15, 0.2, 0.25, 0.3),
    BackPressure(1.0, 0.3, 0.1, 1.0),
    BackPressure(0.25, 1.0, 1.0, 0.2),
)

# Lock groups of the random cases (the harness has 16 locks):
BALANCED = range(0, 4)      # acquire v, release v in the same BD: final value = initial
RELEASE_ONLY = range(4, 6)  # releases only: final = min(sum, max), overflow if clipped
ACQUIRE_ONLY = range(8, 12)  # acquires only, initialised with enough: final = init - sum
BALANCED_INIT = 6           # two channels hold at most 3 + 3 of a balanced lock


@dataclass
class DmCase:
    """A job and the model's expectation.

    Attributes
    ----------
    name : str
        Names the generator and its seed.
    seed : int
        The seed (also the job's back-pressure seed).
    job : DmJob
        The harness job.
    mm2s_out : numpy.ndarray
        Expected MM2S stream.
    mem : numpy.ndarray
        Expected final memory.
    locks : list of int
        Expected final lock values.
    overflow : bool
        Whether a release is expected to saturate a lock.
    """

    name: str
    seed: int
    job: DmJob
    mm2s_out: np.ndarray
    mem: np.ndarray
    locks: list[int] = field(default_factory=list)
    overflow: bool = False


def random_bd(rng: np.random.Generator, *, direction: str, dims: int, region: tuple[int, int],
              max_accesses: int = 160) -> BufferDescriptor:
    """A random BD inside the word range ``region = (lo, hi)``: 1 to ``dims`` dimensions,
    dense, strided, broadcast (stride 0) or reversed (negative) strides, and for MM2S random
    zero padding. No chaining or locks (the caller adds them)."""
    lo, hi = region
    n = int(rng.integers(1, dims + 1))
    for _ in range(100):
        sizes = [1] * DIMS
        budget = max_accesses
        for d in range(n):
            s = int(rng.integers(1, max(2, min(12, budget) + 1)))
            sizes[d] = s
            budget = max(1, budget // s)
        strides = [0] * DIMS
        dense = 1
        for d in range(n):
            kind = rng.random()
            if kind < 0.5:
                t = dense                                  # row-major
            elif kind < 0.9:
                t = int(rng.integers(1, 2 * dense + 2))   # gaps / overlaps
            else:
                t = 0                                      # broadcast
            strides[d] = -t if rng.random() < 0.3 else t
            dense *= sizes[d]
        neg = sum(min(0, (s - 1) * t) for s, t in zip(sizes, strides, strict=True))
        pos = sum(max(0, (s - 1) * t) for s, t in zip(sizes, strides, strict=True))
        if pos - neg < hi - lo:
            break
    else:  # pragma: no cover - 100 tries always find one for sane regions
        raise ValueError(f"no BD fits the region {region}")
    base = int(rng.integers(lo - neg, hi - pos))
    pb = pa = (0,) * PAD_DIMS
    if direction == "mm2s" and rng.random() < 0.6:
        pb = tuple(int(x) if rng.random() < 0.5 else 0 for x in rng.integers(0, 4, PAD_DIMS))
        pa = tuple(int(x) if rng.random() < 0.5 else 0 for x in rng.integers(0, 4, PAD_DIMS))
        if dims < PAD_DIMS + 1:
            pb = pb[:dims] + (0,) * (PAD_DIMS - dims)
            pa = pa[:dims] + (0,) * (PAD_DIMS - dims)
    return BufferDescriptor(base=base, sizes=tuple(sizes), strides=tuple(strides),
                            pad_before=pb, pad_after=pa)


def random_chains_case(seed: int, hc: DmHarnessConfig | None = None, *,
                       locks: bool = True, backpressure: BackPressure | None = None,
                       channels: tuple[str, ...] = ("mm2s", "s2mm")) -> DmCase:
    """Both channels at once on disjoint memory halves: random BD chains (several tasks each),
    random lock operations in three groups with predictable final values (balanced pairs,
    release-only with saturation, acquire-only), random back-pressure. ``channels`` selects
    which channels get tasks (the other one's BDs are still loaded)."""
    hc = DmHarnessConfig() if hc is None else hc
    rng = np.random.default_rng(seed)
    words = 1 << hc.addr_bits
    half = words // 2
    vmax = (1 << hc.lock_value_bits) - 1
    mem = rng.integers(0, 1 << 63, words, dtype=np.uint64) | np.uint64(1)   # never 0

    def add_locks(bd: BufferDescriptor) -> BufferDescriptor:
        if not locks:
            return bd
        acq = rel = None
        u = rng.random()
        if u < 0.3:
            lock = LockAction(int(rng.choice(list(BALANCED))), int(rng.integers(1, 4)))
            acq = rel = lock
        elif u < 0.45:
            rel = LockAction(int(rng.choice(list(RELEASE_ONLY))), int(rng.integers(1, 64)))
        elif u < 0.6:
            acq = LockAction(int(rng.choice(list(ACQUIRE_ONLY))), int(rng.integers(1, 8)))
        return BufferDescriptor(bd.base, bd.sizes, bd.strides, bd.pad_before, bd.pad_after,
                                bd.next_bd, acq, rel)

    tables: dict[str, list[BufferDescriptor]] = {}
    tasks: dict[str, list[int]] = {}
    for direction, region in (("mm2s", (0, half)), ("s2mm", (half, words))):
        bds: list[BufferDescriptor] = []
        starts: list[int] = []
        # chains of 1-4 BDs laid out consecutively, until the BD table is full
        while len(bds) < hc.n_bds:
            length = min(int(rng.integers(1, 5)), hc.n_bds - len(bds))
            first = len(bds)
            for k in range(length):
                bd = random_bd(rng, direction=direction, dims=hc.dims, region=region)
                nxt = first + k + 1 if k + 1 < length else None
                bds.append(add_locks(BufferDescriptor(bd.base, bd.sizes, bd.strides,
                                                      bd.pad_before, bd.pad_after, nxt)))
            starts.append(first)
        tables[direction] = bds
        picked = [int(t) for t in rng.choice(starts, int(rng.integers(1, 7)))]
        tasks[direction] = picked if direction in channels else []
    want_out: list[int] = []
    for t in tasks["mm2s"]:
        want_out += run_mm2s(mem, tables["mm2s"], t)
    n_in = sum(task_words(tables["s2mm"], t) for t in tasks["s2mm"])
    stream = rng.integers(0, 1 << 63, n_in, dtype=np.uint64)
    want_mem = mem
    pos = 0
    for t in tasks["s2mm"]:
        n = task_words(tables["s2mm"], t)
        want_mem = run_s2mm(want_mem, tables["s2mm"], t, stream[pos:pos + n])
        pos += n
    # lock values: sum the lock operations of the BDs the tasks run
    init = [0] * hc.n_locks
    for i in BALANCED:
        init[i] = BALANCED_INIT
    rel_run = dict.fromkeys(RELEASE_ONLY, 0)
    acq_run = dict.fromkeys(ACQUIRE_ONLY, 0)
    for direction in ("mm2s", "s2mm"):
        for t in tasks[direction]:
            i: int | None = t
            while i is not None:
                bd = tables[direction][i]
                if bd.release is not None and bd.release.id in rel_run:
                    rel_run[bd.release.id] += bd.release.value
                if bd.acquire is not None and bd.acquire.id in acq_run:
                    acq_run[bd.acquire.id] += bd.acquire.value
                i = bd.next_bd
    final = list(init)
    overflow = False
    for i, total in rel_run.items():
        final[i] = min(total, vmax)
        overflow |= total > vmax
    for i, total in acq_run.items():
        if total > vmax:
            raise AssertionError(f"seed {seed}: the acquires of lock {i} need {total} > {vmax}")
        init[i] = min(vmax, total + int(rng.integers(0, 3)))   # exactly enough, or a bit more
        final[i] = init[i] - total
    bp = backpressure or BACKPRESSURES[seed % len(BACKPRESSURES)]
    job = DmJob(mem=mem, mm2s_bds=tables["mm2s"], s2mm_bds=tables["s2mm"],
                mm2s_tasks=tasks["mm2s"], s2mm_tasks=tasks["s2mm"], s2mm_in=stream,
                locks=init, seed=seed, backpressure=bp,
                name=f"random chains ({'+'.join(channels)}) seed {seed}")
    return DmCase(job.name, seed, job, np.array(want_out, np.uint64), want_mem, final,
                  overflow)


def ping_pong_case(seed: int, hc: DmHarnessConfig | None = None, *, rounds: int = 6,
                   locks: bool = True, backpressure: BackPressure | None = None) -> DmCase:
    """S2MM produces into two buffers A and B in turn, MM2S consumes them, synchronised by
    four locks (A empty/full, B empty/full; "empty" starts at 2 and is acquired and released
    in steps of 2). The producer writes each buffer row-major; the consumer reads it
    transposed, with zero padding. ``rounds`` tasks each (one task = A then B). With
    ``locks=False`` the same transfers run unsynchronised (a control: the data must then
    differ from the model's)."""
    hc = DmHarnessConfig() if hc is None else hc
    rng = np.random.default_rng(seed)
    words = 1 << hc.addr_bits
    rows, cols = 6, 10
    n = rows * cols
    bufs = (100, 100 + n + 7)
    EMPTY_A, FULL_A, EMPTY_B, FULL_B = 0, 1, 2, 3

    def lk(i: int, v: int) -> LockAction | None:
        return LockAction(i, v) if locks else None

    wr, rd = [], []
    for k, (base, empty, full) in enumerate(((bufs[0], EMPTY_A, FULL_A),
                                             (bufs[1], EMPTY_B, FULL_B))):
        nxt = 1 if k == 0 else None
        wr.append(BufferDescriptor(base, (cols, rows), (1, cols), next_bd=nxt,
                                   acquire=lk(empty, 2), release=lk(full, 1)))
        # transposed read with a zero column before and a zero row after the data
        rd.append(BufferDescriptor(base, (rows, cols), (cols, 1), pad_before=(1,),
                                   pad_after=(0, 1), next_bd=nxt, acquire=lk(full, 1),
                                   release=lk(empty, 2)))
    mem = rng.integers(0, 1 << 63, words, dtype=np.uint64)
    stream = rng.integers(0, 1 << 63, 2 * n * rounds, dtype=np.uint64)
    want_out: list[int] = []
    want_mem = mem
    for r in range(rounds):
        for k in range(2):
            chunk = stream[(2 * r + k) * n:(2 * r + k + 1) * n]
            want_mem = run_s2mm(want_mem, [replace(wr[k], next_bd=None)], 0, chunk)
            want_out += run_mm2s(want_mem, [replace(rd[k], next_bd=None)], 0)
    init = [0] * hc.n_locks
    init[EMPTY_A] = init[EMPTY_B] = 2
    bp = backpressure or BACKPRESSURES[seed % len(BACKPRESSURES)]
    job = DmJob(mem=mem, mm2s_bds=rd, s2mm_bds=wr, mm2s_tasks=[0] * rounds,
                s2mm_tasks=[0] * rounds, s2mm_in=stream, locks=init, seed=seed,
                backpressure=bp,
                name=f"ping-pong{'' if locks else ' without locks'} seed {seed}")
    return DmCase(job.name, seed, job, np.array(want_out, np.uint64), want_mem, init)



def streaming_case(words: int = 2048, tasks: int = 4, hc: DmHarnessConfig | None = None,
                   seed: int = 0) -> DmCase:
    """Both channels streaming at full speed (no back-pressure, no locks): MM2S reads the low
    half of memory as one 1-D BD per task, S2MM writes the high half. For speed measurements
    (cycles per second of the simulator)."""
    hc = DmHarnessConfig() if hc is None else hc
    rng = np.random.default_rng(seed)
    half = (1 << hc.addr_bits) // 2
    if not 1 <= words <= half or words * tasks > hc.max_stream:
        raise ValueError(f"words must be 1..{half} and words * tasks at most "
                         f"{hc.max_stream}, not {words} x {tasks}")
    mem = rng.integers(0, 1 << 63, 2 * half, dtype=np.uint64)
    rd = [BufferDescriptor(0, (words,), (1,))]
    wr = [BufferDescriptor(half, (words,), (1,))]
    stream = rng.integers(0, 1 << 63, words * tasks, dtype=np.uint64)
    want_mem = run_s2mm(mem, wr, 0, stream[-words:])
    job = DmJob(mem=mem, mm2s_bds=rd, s2mm_bds=wr, mm2s_tasks=[0] * tasks,
                s2mm_tasks=[0] * tasks, s2mm_in=stream, seed=seed,
                name=f"streaming {tasks} x {words} words")
    return DmCase(job.name, seed, job, np.tile(mem[:words], tasks), want_mem, [0] * hc.n_locks)
