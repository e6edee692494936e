"""Python model of a whole overlay running a compiled layer: outputs bit for bit, cycles
estimated.

:class:`OverlayModel` runs an :class:`~tilewright.sw.array_compiler.ArrayLayer` job by job
from its DDR image and configuration, without the compiler's help:

* the shim read channels execute their buffer descriptors on the DDR image
  (:func:`tilewright.sim.dm_model.bd_addresses`: padding included, reads counted);
* the stream network routes each packet by its header (column bus ``k mod 2`` for read
  channel ``k``, row buses, tile masks; headers stripped in front of the tiles), as
  :mod:`tilewright.hw.overlay` wires it;
* every tile runs its program on the golden model (:class:`tilewright.sim.golden.TileModel`)
  with a lock hook in which the tile's channels act: the activation writer (channel 0) writes
  each packet at the address in its header and releases the lock named there; an S2MM BD
  fires when its acquire lock allows and its packet has arrived, writes the tile memory and
  releases; an MM2S BD fires when the core releases its lock, reads the memory and sends its
  words to the column's DDR writer, which writes them at the address in the packet header.

Timing (an estimate; ``docs/architecture.md`` says how it compares with the RTL): every DDR
channel moves a word every ``word_bytes / bytes_per_cycle`` cycles and pays the configured
latency once per task (one task per channel); padding words cost a cycle each. A packet holds
its buses (row buses and column buses are packet-level merges of the read channels) from its
header to its last word, so packets of other channels bound for the same bus wait and stream
from DDR only afterwards; it streams once every tile it goes to can take it (its acquire lock
was released); packets streaming into a tile at the same time share the tile's memory port
(one word per cycle, max-min fair). The core is granted a lock a channel releases at the
cycle that release lands, not earlier, even when the model ran the channel ahead. Outputs
queue on the column's write channel. The tiles of a column depend on each other only through
the packets' start times, so the model iterates the tiles' golden runs until those no longer
change.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tilewright.hw.bd import BufferDescriptor
from tilewright.hw.config import OverlayConfig
from tilewright.hw.isa import ErrorCode
from tilewright.hw.overlay import array_memtile, memtile_act_channels, route_fields
from tilewright.hw.tileunit import LOCK_BITS, N_S2MM

from .dm_model import bd_addresses
from .golden import DeadlockError, TileModel

__all__ = ["JobResult", "ModelResult", "OverlayModel"]

#: Most fixed-point iterations of a job: one-buffer chunks resolve about one more chunk's start
#: per iteration (resnet50 layer4.0.downsample.0 on aie2-4x4, 12 such chunks a column, needs
#: 13; stopped at 12 the estimate was 17 % high).
_MAX_ITERATIONS = 40
#: Cycles from a shim read to the tile's memory (datamover, split, merge, broadcast, strip and
#: S2MM register stages), and from a tile's MM2S to the writer.
_PIPE_IN = 8
_PIPE_OUT = 6
#: A memtile MM2S channel: cycles from its task to its first word, and words it reads ahead.
_MT_LATENCY = 4
_MT_DEPTH = 4


@dataclass
class JobResult:
    cycles: int
    rd_words: int
    wr_words: int
    tile_cycles: dict[tuple[int, int], int] = field(default_factory=dict)
    iterations: int = 0
    mt_rd_words: int = 0           # words the memtiles' MM2S channels read
    mt_wr_words: int = 0           # words the memtiles' S2MM channels wrote


@dataclass
class ModelResult:
    """What the model predicts for a whole layer."""

    output: np.ndarray
    ddr: np.ndarray
    cycles: int
    rd_words: int
    wr_words: int
    jobs: list[JobResult]


def _task_words(ddr: np.ndarray, bds: Sequence[BufferDescriptor],
                what: str = "the DDR image") -> tuple[list[np.ndarray], list[int]]:
    """Per BD of a read channel's chain (BD 0 first): the words it streams from ``ddr`` (the
    DDR image, or a memtile's memory), and the reads."""
    out, reads = [], []
    i: int | None = 0
    seen = 0
    while i is not None:
        bd = bds[i]
        addrs, ok = bd_addresses(bd)
        if ok.any() and int(addrs[ok].max()) >= ddr.size:
            raise ValueError(f"BD {i} reads word {int(addrs[ok].max())}, beyond {what} of "
                             f"{ddr.size} words")
        words = np.where(ok, ddr[np.where(ok, addrs, 0)], np.uint64(0)).astype(np.uint64)
        out.append(words)
        reads.append(int(ok.sum()))
        i = bd.next_bd
        seen += 1
        if seen > len(bds):
            raise ValueError("a BD chain loops")
    return out, reads


@dataclass
class _Packet:
    words: np.ndarray              # payload (header stripped)
    header: int
    end: float = 0.0               # arrival of the last word at the tiles (cycles)


class _Channel:
    """One read channel (a shim's DDR read channel, or a memtile MM2S channel): its packets in
    order with the words each takes from its memory.

    ``col`` is its column, ``bus`` the column bus it feeds, ``step`` the cycles a word read
    takes, ``lat`` the cycles to its first word, ``depth`` the words it buffers ahead of its
    stream, ``rows`` whether its packets may go to the row buses (shim channels and memtile
    activation channels; memtile weight channels feed their column bus only)."""

    def __init__(self, words: list[np.ndarray], reads: list[int], *, col: int = 0,
                 bus: int = 0, step: int = 1, lat: int = 0, depth: int = 4,
                 rows: bool = True, split: int | None = None) -> None:
        self.col, self.bus, self.step, self.lat = col, bus, step, lat
        self.depth, self.rows = depth, rows
        # the column's read split the packets pass (shim read channel k and the memtile's
        # activation channel k share split k), None for the memtile's weight channels
        self.split = split
        stream = np.concatenate(words) if words else np.zeros(0, np.uint64)
        # DDR reads per stream word (1) or padding (0), to time each packet
        real = np.concatenate([np.ones(n, bool) if n == len(w) else _reads_mask(w, n)
                               for w, n in zip(words, reads, strict=True)]) \
            if words else np.zeros(0, bool)
        self.packets: list[_Packet] = []
        self.cost: list[tuple[int, int]] = []      # (real words, padding words) per packet
        pos = 0
        while pos < len(stream):
            hdr = int(stream[pos])
            n = hdr & 0xFFFF
            if pos + 1 + n > len(stream):
                raise DeadlockError(
                    f"{'shim' if rows else 'memtile'} read channel of column {col} (bus {bus}): "
                    f"packet {len(self.packets)}'s header says {n} words, its BDs bring "
                    f"{len(stream) - pos - 1}; the hardware would wait for the rest")
            self.packets.append(_Packet(stream[pos + 1:pos + 1 + n], hdr))
            seg = real[pos:pos + 1 + n]
            self.cost.append((int(seg.sum()), int((~seg).sum())))
            pos += 1 + n


def _reads_mask(words: np.ndarray, n_real: int) -> np.ndarray:
    # a BD with padding: which elements were read is not kept by _task_words; the cost model
    # only needs the count, so mark the first n_real elements as reads
    m = np.zeros(len(words), bool)
    m[:n_real] = True
    return m


def _fair_rates(flows: dict) -> dict:
    """Max-min fair rates (words per cycle) of ``flows`` (each with its own ``cap`` and the
    ``tiles`` whose one-word-per-cycle memory write ports it uses)."""
    rates: dict = {}
    left: dict = {}
    shared = False
    for f in flows.values():
        for t in f["tiles"]:
            shared = shared or t in left
            left[t] = 1.0
    if not shared:          # no port shared: each flow runs at its cap, at most a word a cycle
        return {fk: min(f["cap"], 1.0) for fk, f in flows.items()}
    todo = set(flows)
    while todo:
        cnt: dict = {}
        for fk in todo:
            for t in flows[fk]["tiles"]:
                cnt[t] = cnt.get(t, 0) + 1
        f_min = min(todo, key=lambda fk: flows[fk]["cap"])
        share = min(((left[t] / n, t) for t, n in cnt.items()), default=(float("inf"), None))
        if flows[f_min]["cap"] <= share[0]:
            fix = [(f_min, flows[f_min]["cap"])]
        else:
            fix = [(fk, share[0]) for fk in todo if share[1] in flows[fk]["tiles"]]
        for fk, r in fix:
            rates[fk] = r
            todo.discard(fk)
            for t in flows[fk]["tiles"]:
                left[t] = max(0.0, left[t] - r)
    return rates


class _TileEnv:
    """The datamover channels of one tile, driven from the golden model's lock hook."""

    def __init__(self, model: OverlayModel, job, tp, inputs: dict[int, list[_Packet]],
                 avail: dict, key: tuple[int, int], data: bool = True) -> None:
        self.model = model
        # False in timing-only runs: the S2MM channels then write nothing into the memory
        # (the MM2S channels still read it: the output headers are configuration words)
        self.data = data
        self.tp = tp
        self.key = key
        self.inputs = inputs                 # S2MM channel -> packets in order
        self.pos = {ch: 0 for ch in range(N_S2MM)}      # next BD of each S2MM chain
        self.pkt = {ch: 0 for ch in range(N_S2MM)}
        self.off = {ch: 0 for ch in range(N_S2MM)}
        self.out_pos = {ch: 0 for ch in tp.bds if ch >= N_S2MM}
        self.avail = avail                   # (ch, bd index) -> cycle its acquire was met
        self.outputs: list[tuple[int, float, np.ndarray]] = []   # (mm2s ch, cycle, words)
        self.lock_free: dict[int, float] = {}
        self.cur_avail = 0.0
        # releases by the channels not yet seen by the core: lock -> [(cycle, value)]; a lock
        # a channel releases is the core's only when it acquires it, at the release's cycle
        self.pending: dict[int, list[tuple[float, int]]] = {}

    def _release(self, lock: int, value: int, when: float) -> None:
        self.pending.setdefault(lock, []).append((when, value))

    def _pending_value(self, lock: int) -> int:
        return sum(v for _, v in self.pending.get(lock, ()))

    def _claim(self, lock: int, value: int, locks: list[int]) -> float:
        """Move pending releases of ``lock`` into ``locks`` (earliest first) until it holds
        ``value``; the cycle the last one needed landed."""
        toks = sorted(self.pending.get(lock, ()))
        t = 0.0
        while locks[lock] < value and toks:
            when, v = toks.pop(0)
            locks[lock] = min(locks[lock] + v, 63)
            t = max(t, when)
        self.pending[lock] = toks
        return t

    def _next_bd(self, ch: int, i: int | None, locks: list[int]) -> BufferDescriptor | None:
        """BD ``i`` of channel ``ch`` if its chain has one and its acquire can be granted now
        (then granted), else None."""
        bds = self.tp.bds.get(ch, [])
        if i is None or i >= len(bds):
            return None
        bd = bds[i]
        if bd.acquire is not None:
            if locks[bd.acquire.id] < bd.acquire.value:
                self._claim(bd.acquire.id, bd.acquire.value, locks)
            if locks[bd.acquire.id] < bd.acquire.value:
                return None
            locks[bd.acquire.id] -= bd.acquire.value
        return bd

    # -- the activation writer (channel 0): packets carry address and lock -------------------
    def _writer_step(self, locks: list[int], mem: np.ndarray) -> tuple[float, int] | None:
        j = self.pkt[0]
        if j >= len(self.inputs[0]):
            return None
        pk = self.inputs[0][j]
        self.pkt[0] += 1
        t = self.model.cfg.tile
        hdr = int(pk.words[0])
        n, addr = hdr & 0xFFFF, (hdr >> 16) & ((1 << t.addr_bits) - 1)
        lock = (hdr >> (16 + t.addr_bits)) & ((1 << LOCK_BITS) - 1)
        if self.data:
            words = pk.words[1:1 + n]
            wv = mem.view(np.uint8).reshape(-1, t.block)
            wv[addr:addr + n] = words.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :t.block]
        self._release(lock, 1, pk.end)
        self.avail[(self.key, 0, j)] = 0.0
        return pk.end, lock

    # -- S2MM ---------------------------------------------------------------------------------
    def _s2mm_step(self, ch: int, locks: list[int], mem: np.ndarray,
                   cycle: int) -> tuple[float, int | None] | None:
        if ch == 0:
            return self._writer_step(locks, mem)
        bd = self._next_bd(ch, self.pos[ch], locks)
        if bd is None:
            return None
        self.cur_avail = (self.lock_free.get(bd.acquire.id, 0.0)
                          if bd.acquire is not None else 0.0)
        n = bd.n_elements
        words, arrival = self._take(ch, n)
        if self.data:
            addrs, _ = bd_addresses(bd)
            b = self.model.cfg.tile.block
            wv = mem.view(np.uint8).reshape(-1, b)
            wv[addrs] = words.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :b]
        if bd.release is not None:
            self._release(bd.release.id, bd.release.value, arrival)
        self.pos[ch] = bd.next_bd
        return arrival, (bd.release.id if bd.release is not None else None)

    def _take(self, ch: int, n: int) -> tuple[np.ndarray, float]:
        got, arrival = [], 0.0
        while n > 0:
            if self.pkt[ch] >= len(self.inputs[ch]):
                raise DeadlockError(f"tile ({self.tp.r},{self.tp.c}) S2MM {ch} waits for "
                                    f"words that no packet brings")
            pk = self.inputs[ch][self.pkt[ch]]
            if self.off[ch] == 0:
                self.avail[(self.key, ch, self.pkt[ch])] = self.cur_avail
            take = min(n, len(pk.words) - self.off[ch])
            if self.data:
                got.append(pk.words[self.off[ch]:self.off[ch] + take])
            arrival = max(arrival, pk.end)
            self.off[ch] += take
            n -= take
            if self.off[ch] == len(pk.words):
                self.pkt[ch] += 1
                self.off[ch] = 0
        return (np.concatenate(got) if got else np.zeros(0, np.uint64)), arrival

    # -- MM2S ---------------------------------------------------------------------------------
    def _mm2s_step(self, ch: int, locks: list[int], mem: np.ndarray, cycle: int) -> bool:
        bd = self._next_bd(ch, self.out_pos[ch], locks)
        if bd is None:
            return False
        addrs, ok = bd_addresses(bd)
        b = self.model.cfg.tile.block
        raw = mem.view(np.uint8).reshape(-1, b)[np.where(ok, addrs, 0)]
        pad = np.zeros((len(addrs), 8), np.uint8)
        pad[:, :b] = raw
        words = np.where(ok, pad.view("<u8").reshape(-1), 0).astype(np.uint64)
        self.outputs.append((ch, cycle, words))
        if bd.release is not None:
            self._release(bd.release.id, bd.release.value, float(cycle))
        self.out_pos[ch] = bd.next_bd
        return True

    # -- the hook -----------------------------------------------------------------------------
    def acquire(self, lock: int, value: int, cycle: int, locks: list[int],
                mem: np.ndarray) -> int:
        progress = True
        while locks[lock] + self._pending_value(lock) < value and progress:
            progress = False
            for ch in range(N_S2MM):
                if self._s2mm_step(ch, locks, mem, cycle) is not None:
                    progress = True
        t = max(float(cycle), self._claim(lock, value, locks))
        if locks[lock] < value:
            raise DeadlockError(f"tile ({self.tp.r},{self.tp.c}) waits on lock {lock} for "
                                f"{value} at cycle {cycle}; no datamover channel can release "
                                f"it")
        return int(np.ceil(t))

    def final_locks(self, locks: list[int], mem: np.ndarray) -> list[int]:
        """The lock values once every packet still on its way has landed (the core has
        halted; what the channels release then stays for the next job)."""
        locks = list(locks)
        while any(self._s2mm_step(ch, locks, mem, 0) is not None for ch in range(N_S2MM)):
            pass
        for lock, toks in self.pending.items():
            locks[lock] = min(locks[lock] + sum(v for _, v in toks), 63)
        self.pending = {}
        return locks

    def release(self, lock: int, value: int, cycle: int, locks: list[int],
                mem: np.ndarray) -> None:
        self.lock_free[lock] = cycle
        for ch in list(self.out_pos):
            while self._mm2s_step(ch, locks, mem, cycle):
                pass


class OverlayModel:
    """The whole-overlay model of ``cfg``."""

    def __init__(self, cfg: OverlayConfig) -> None:
        if not isinstance(cfg, OverlayConfig):
            raise TypeError(f"cfg must be an OverlayConfig, not {cfg!r}")
        self.cfg = cfg
        self.tile_model = TileModel(cfg.tile)
        # a job's timing iterations only time the tiles; the data are computed once, in a last
        # run at the converged timing (every op's result depends on the memory, not on when
        # the op ran, and the hazard checks then see the final timing)
        self._timing_model = TileModel(cfg.tile, timing_only=True)
        self.interval = cfg.ddr_interval

    def run_layer(self, layer, memtiles: dict[int, np.ndarray] | None = None) -> ModelResult:
        """Run every job of ``layer`` (an :class:`~tilewright.sw.array_compiler.ArrayLayer`)
        in turn on one DDR image and ``memtiles`` (updated in place: what the layer's jobs
        write there is there for the next layer). Without ``memtiles``, fresh ones, holding
        the weight streams a previous layer would have prefetched for the first job
        (:attr:`~tilewright.sw.array_compiler.ArrayJob.prefetch`, read from the image)."""
        ddr = np.array(layer.ddr, dtype=np.uint64, copy=True)
        results = []
        if memtiles is None:
            memtiles = self.new_memtiles()
            for (c, _), (base, pieces) in (layer.jobs[0].prefetch.items() if layer.jobs
                                           else ()):
                for _, src, n in pieces:
                    memtiles[c][base:base + n] = ddr[src:src + n]
                    base += n
        for job in layer.jobs:
            ddr, res = self.run_job(job, ddr, memtiles)
            results.append(res)
        lo, n = layer.out_region
        out = layer.read_output(ddr[lo:lo + n])
        return ModelResult(out, ddr, sum(r.cycles for r in results),
                           sum(r.rd_words for r in results), sum(r.wr_words for r in results),
                           results)

    def new_memtiles(self) -> dict[int, np.ndarray]:
        """Every column's memtile memory, zero (a layer's jobs run on one set: what a job
        writes into a memtile is there for the next)."""
        words = self.cfg.memtile.bytes // self.cfg.tile.block
        return {c: np.zeros(words, np.uint64) for c in range(self.cfg.array.cols)}

    def run_job(self, job, ddr: np.ndarray,
                memtiles: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, JobResult]:
        """Run one job on ``ddr`` (updated in place with its outputs) and ``memtiles`` (from
        :meth:`new_memtiles`, updated with what the job captures; fresh ones if None)."""
        cfg = self.cfg
        R, C = cfg.array.rows, cfg.array.cols
        rf = route_fields(cfg)
        mcfg = array_memtile(cfg)
        if memtiles is None:
            memtiles = self.new_memtiles()
        step = self.interval
        lat = cfg.ddr.latency
        self._check_bd_counts(job, mcfg)
        # shim read channels: packets and DDR reads
        chans: dict[tuple, _Channel] = {}
        rd_words = 0
        for c, per in job.shim_bds.items():
            for ch, bds in per.items():
                if not bds:
                    continue
                words, reads = _task_words(ddr, bds)
                rd_words += sum(reads)
                chans[(c, ch)] = _Channel(words, reads, col=c, bus=ch % 2, step=step, lat=lat,
                                          depth=cfg.ddr.read_fifo_words, split=ch)
        # the memtile words the configuration writes (activation packets' headers)
        for c, words in getattr(job, "memtile_dm", {}).items():
            for a, w in words.items():
                if not 0 <= a < memtiles[c].size:
                    raise ValueError(f"memtile {c}: the configuration writes word {a}, beyond "
                                     f"its {memtiles[c].size} words")
                memtiles[c][a] = w
        # memtile MM2S channels: packets from the memtile's memory as the job found it; weight
        # channel j into column bus j (never the row buses), activation channel k through shim
        # read channel k's split (column bus k mod 2 and the row buses)
        mt_rd = 0
        n_wmm = mcfg.mm2s - memtile_act_channels(cfg)
        for c, per in job.memtile_bds.items():
            for ch, bds in per.items():
                if ch < mcfg.s2mm or not bds:
                    continue
                j = ch - mcfg.s2mm
                if j >= mcfg.mm2s:
                    raise ValueError(f"memtile {c} has {mcfg.mm2s} MM2S channels in the array, "
                                     f"a job uses channel {ch}")
                act = j >= n_wmm
                if act and any(bd.acquire or bd.release for bd in bds):
                    raise ValueError(f"memtile {c} activation channel {j - n_wmm}: a BD names "
                                     f"a lock, and the activation channels have no lock port")
                words, reads = _task_words(memtiles[c], bds, f"memtile {c}'s memory")
                mt_rd += sum(reads)
                chans[(c, "mt", j)] = _Channel(words, reads, col=c,
                                               bus=(j - n_wmm) % 2 if act else j, step=1,
                                               lat=_MT_LATENCY, depth=_MT_DEPTH, rows=act,
                                               split=j - n_wmm if act else None)
                if act and any(pk.header >> rf.mt & 1 for pk in chans[(c, "mt", j)].packets):
                    raise ValueError(f"memtile {c} activation channel {j - n_wmm}: a packet "
                                     f"has the mt bit, which would write it back into the "
                                     f"memtile")
        mt_wr, releases = self._capture(job, chans, memtiles, mcfg)
        gates = self._memtile_gates(job, chans, mcfg, releases)
        # routing: which tile S2MM channel gets which packet (in channel order)
        dest: dict[tuple, list[list[tuple[tuple[int, int], int, int]]]] = {}
        inputs = {(r, c): {ch: [] for ch in range(N_S2MM)} for r in range(R) for c in range(C)}
        for key, chan in chans.items():
            c = chan.col
            dest[key] = []
            for pk in chan.packets:
                d = []
                if pk.header >> rf.col & 1 or not chan.rows:
                    for r in range(R):
                        if pk.header >> (rf.tile + r) & 1:
                            d.append(((r, c), 1 + chan.bus))
                for r in range(R):
                    if chan.rows and pk.header >> (rf.row + r) & 1:
                        d += [((r, cc), 0) for cc in range(C) if pk.header >> (rf.cols + cc) & 1]
                dd = []
                for tkey, tch in d:
                    dd.append((tkey, tch, len(inputs[tkey][tch])))
                    inputs[tkey][tch].append(pk)
                dest[key].append(dd)
        # iterate: packet start times <- tiles' acquire times <- packet arrival times
        avail: dict = {}
        prev = None
        envs: dict = {}
        runs: dict = {}
        mems: dict = {}
        n_iter = 0
        # a tile's run depends only on the arrival times of its packets: a tile whose
        # arrivals did not change since the last iteration is not run again
        seen: dict = {}                      # tile -> (arrivals, its avail entries)
        rate_cache: dict = {}                # flows and caps -> fair rates
        for it in range(1, _MAX_ITERATIONS + 1):
            n_iter = it
            self._time_packets(chans, dest, avail, gates, releases, rate_cache)
            avail_new: dict = {}
            for tp in job.tiles:
                key = (tp.r, tp.c)
                arrivals = tuple(pk.end for ch in range(N_S2MM) for pk in inputs[key][ch])
                if key in seen and seen[key][0] == arrivals:
                    avail_new.update(seen[key][1])
                    continue
                mine: dict = {}
                envs[key], runs[key], mems[key] = self._run_tile(job, tp, inputs[key], mine,
                                                                 self._timing_model)
                seen[key] = (arrivals, mine)
                avail_new.update(mine)
            if avail_new == prev:
                break
            prev = avail = avail_new
        if not self.tile_model.timing_only:
            for tp in job.tiles:
                key = (tp.r, tp.c)
                envs[key], runs[key], mems[key] = self._run_tile(job, tp, inputs[key], {},
                                                                 self.tile_model)
        # outputs: each tile's MM2S packets through the column's write channels
        wr_words = 0
        end = 0.0
        writer_free: dict[tuple[int, int], float] = {}
        outs = sorted(((cycle, key, ch, words) for key, env in envs.items()
                       for ch, cycle, words in env.outputs), key=lambda o: (o[0], o[1]))
        mt_mask = memtiles[0].size - 1 if memtiles else 0
        for cycle, (_r, c), ch, words in outs:
            k = (ch - N_S2MM) % cfg.ddr.write_channels
            t = max(float(cycle) + _PIPE_OUT, writer_free.get((c, k), 0.0))
            pos = 0
            while pos < len(words):
                hdr = int(words[pos])
                n, addr = hdr & 0xFFFF, hdr >> 16
                if hdr >> rf.mw & 1:
                    # into the column's memtile (its writer: a word a cycle, both channels')
                    a = addr & mt_mask
                    if a + n > memtiles[c].size:
                        raise ValueError(f"column {c}: an output packet writes memtile words "
                                         f"{a}..{a + n - 1}, beyond its {memtiles[c].size}")
                    memtiles[c][a:a + n] = words[pos + 1:pos + 1 + n]
                    mt_wr += n
                    t = max(t, writer_free.get((c, "mt"), 0.0)) + 1 + n
                    writer_free[(c, "mt")] = t
                else:
                    ddr[addr:addr + n] = words[pos + 1:pos + 1 + n]
                    wr_words += n
                    t += 1 + n * step
                pos += 1 + n
            writer_free[(c, k)] = t
            end = max(end, t)
        # the job is done once every read channel has sent its last packet too (a prefetch
        # for the next layer's memtile replay may outlast the cores)
        for chan in chans.values():
            for pk in chan.packets:
                end = max(end, float(pk.end))
        for key, run in runs.items():
            end = max(end, float(run.cycles))
            if run.error is not ErrorCode.NONE:
                raise RuntimeError(f"tile {key} stopped with error {run.error!r} at pc "
                                   f"{run.error_pc}")
        # a job leaves every lock as its configuration set it: the next job's configuration
        # sets only the locks it starts from, so a leftover count would grant an early ACQ
        for tp in job.tiles:
            key = (tp.r, tp.c)
            final = envs[key].final_locks(runs[key].locks, mems[key])
            for i, v in enumerate(final):
                if v != tp.locks.get(i, 0):
                    raise RuntimeError(f"tile {key} ends the job with lock {i} at {v}, not at "
                                       f"its initial {tp.locks.get(i, 0)}")
        res = JobResult(int(np.ceil(end)), rd_words, wr_words,
                        {k: int(r.cycles) for k, r in runs.items()}, n_iter, mt_rd, mt_wr)
        return ddr, res

    def _check_bd_counts(self, job, mcfg) -> None:
        """Every channel's BDs fit its BD table (the hardware has no run-time reprogramming:
        a BD index beyond the table is an error the RTL would latch)."""
        cfg = self.cfg
        limits = [("tile", ((f"({tp.r},{tp.c})", tp.bds) for tp in job.tiles),
                   cfg.tile.bds_per_channel),
                  ("shim", ((str(c), per) for c, per in job.shim_bds.items()),
                   cfg.ddr.bds_per_channel),
                  ("memtile", ((str(c), per) for c, per in job.memtile_bds.items()),
                   mcfg.bds_per_channel)]
        for what, units, n in limits:
            for name, per in units:
                for ch, bds in per.items():
                    if len(bds) > n:
                        raise ValueError(f"{what} {name} channel {ch} has {len(bds)} BDs, "
                                         f"its BD table {n} ({cfg.name})")

    def _capture(self, job, chans: dict, memtiles: dict[int, np.ndarray],
                 mcfg) -> tuple[int, dict]:
        """Write what the shim read channels send to the memtiles (packets with the header's
        ``mt`` bit, header included, in stream order, through the memtile S2MM channel of the
        read channel's number) with that channel's BDs. Returns the words written and the
        memtile lock releases: ``(read channel key, packet) -> [((column, lock), value)]``,
        released when that packet has landed (the last word of the BD's). The memtile takes a
        word a cycle, faster than DDR, so capturing costs no time."""
        rf = route_fields(self.cfg)
        written = 0
        releases: dict = {}
        for c, per in job.memtile_bds.items():
            for ch, bds in per.items():
                if ch >= mcfg.s2mm or not bds:
                    continue
                chan = chans.get((c, ch))
                got, owner = [], []
                for p, pk in enumerate(chan.packets if chan is not None else ()):
                    if pk.header >> rf.mt & 1:
                        got.append(np.concatenate([np.array([pk.header], np.uint64),
                                                   pk.words]))
                        owner += [p] * (1 + len(pk.words))
                stream = np.concatenate(got) if got else np.zeros(0, np.uint64)
                pos, i, seen = 0, 0, 0
                while i is not None:
                    bd = bds[i]
                    addrs, _ = bd_addresses(bd)
                    n = len(addrs)
                    if pos + n > len(stream):
                        raise DeadlockError(f"memtile {c} S2MM {ch} BD {i} waits for "
                                            f"{pos + n - len(stream)} words no packet brings")
                    if int(addrs.max(initial=0)) >= memtiles[c].size:
                        raise ValueError(f"memtile {c} S2MM {ch} BD {i} writes word "
                                         f"{int(addrs.max())}, beyond its "
                                         f"{memtiles[c].size} words")
                    memtiles[c][addrs] = stream[pos:pos + n]
                    pos += n
                    if bd.release is not None and n:
                        releases.setdefault(((c, ch), owner[pos - 1]), []).append(
                            ((c, bd.release.id), bd.release.value))
                    written += n
                    i = bd.next_bd
                    seen += 1
                    if seen > len(bds):
                        raise ValueError(f"memtile {c} S2MM {ch}: its BD chain loops")
                if pos != len(stream):
                    raise DeadlockError(f"memtile {c} S2MM {ch}: {len(stream) - pos} captured "
                                        f"words find no BD (the read channel would stall)")
        for (c, ch), chan in [(k, v) for k, v in chans.items() if len(k) == 2]:
            mine = job.memtile_bds.get(c, {}).get(ch)
            if not mine and any(pk.header >> rf.mt & 1 for pk in chan.packets):
                raise DeadlockError(f"column {c} read channel {ch} sends packets to the "
                                    f"memtile, whose S2MM channel {ch} has no BDs")
        return written, releases

    def _memtile_gates(self, job, chans: dict, mcfg, releases: dict) -> dict:
        """The memtile MM2S BDs that acquire a lock: ``(channel key, first packet of the BD) ->
        ((column, lock), value the lock must have received in all)``. Checks that every lock
        a job's memtile BDs use ends the job as it started (released as much as acquired)."""
        gates: dict = {}
        acquired: dict = {}
        for c, per in job.memtile_bds.items():
            for ch, bds in per.items():
                if ch < mcfg.s2mm or not bds:
                    continue
                key = (c, "mt", ch - mcfg.s2mm)
                starts = np.cumsum([0] + [1 + len(pk.words) for pk in chans[key].packets])
                off, i, seen = 0, 0, 0
                while i is not None:
                    bd = bds[i]
                    if bd.acquire is not None:
                        lk = (c, bd.acquire.id)
                        acquired[lk] = acquired.get(lk, 0) + bd.acquire.value
                        p = int(np.searchsorted(starts, off))
                        gates[(key, p)] = (lk, acquired[lk])
                    off += bd.n_elements
                    i = bd.next_bd
                    seen += 1
                    if seen > len(bds):
                        raise ValueError(f"memtile {c} MM2S {ch}: its BD chain loops")
        released: dict = {}
        for rels in releases.values():
            for lk, v in rels:
                released[lk] = released.get(lk, 0) + v
        for lk in acquired.keys() | released.keys():
            if acquired.get(lk, 0) != released.get(lk, 0):
                raise DeadlockError(f"memtile {lk[0]} lock {lk[1]}: the job releases it "
                                    f"{released.get(lk, 0)} times and acquires it "
                                    f"{acquired.get(lk, 0)} times")
        return gates

    def _run_tile(self, job, tp, inputs: dict, avail: dict, tile_model: TileModel):
        """Run tile ``tp``'s program with its datamover channels (the packets' arrival times
        as timed so far); its acquire times go into ``avail``."""
        cfg = self.cfg
        env = _TileEnv(self, job, tp, inputs, avail, (tp.r, tp.c),
                       data=not tile_model.timing_only)
        mem = np.zeros(cfg.tile.dmem_bytes, dtype=np.uint8)
        wv = mem.view(np.uint8).reshape(-1, cfg.tile.block)
        for a, w in tp.dm.items():
            wv[a] = np.frombuffer(int(w).to_bytes(8, "little"), np.uint8)[:cfg.tile.block]
        locks = [0] * 64
        for i, v in tp.locks.items():
            locks[i] = v
        run = tile_model.run(tp.program, mem, locks=locks, lock_hook=env)
        return env, run, mem

    def _time_packets(self, chans, dest, avail, gates=None, releases=None,
                      rate_cache=None) -> None:
        """Arrival times of every packet, by a fluid simulation of the read side.

        * A read channel reads its packets from DDR in order into its FIFO
          (:attr:`~tilewright.hw.config.DdrConfig.read_fifo_words` words) as long as the FIFO
          has room: its first DDR read waits ``lat`` cycles (one task per channel), then a
          word takes ``step`` cycles (padding one). A memtile MM2S channel is the same with
          its own latency, a word a cycle and a small buffer.
        * The row buses and the column buses are packet-level round-robin merges of the read
          channels that feed them (:class:`~tilewright.hw.packet.PacketMerge`): a packet
          holds its buses from its header to its last word, and the other channels' packets
          wait, first come first served, while their channels keep filling their FIFOs.
        * A packet that holds its buses streams once every tile it goes to can take it (the
          acquire of its S2MM BD was granted: ``avail``): one word a cycle while its channel's
          FIFO holds words, at the DDR's pace once the FIFO has run dry.
        * A tile's data-memory write port takes one word per cycle, round robin over its S2MM
          channels: the packets streaming into a tile at the same time share it (max-min
          fair), and a broadcast packet runs at the pace of its slowest tile. (The MM2S
          channels read on a port of their own: outputs take nothing from the inputs.)
        * A memtile MM2S BD that acquires a memtile lock (``gates``) starts once the packets
          that release it (``releases``: a read channel's tokens) have landed.
        """
        rate_cache = {} if rate_cache is None else rate_cache
        gates = gates or {}
        releases = releases or {}
        lock_count: dict = {}
        waiting: dict = {}                               # lock -> gated requests
        eps = 1e-9
        req: list = []                                   # (cycle, order, channel, packet)
        order = 0
        # per channel: packet boundaries in stream words, DDR pace of each packet, words read
        # from DDR and words sent on (the FIFO holds the difference)
        bounds: dict = {}
        pace: dict = {}
        read: dict = {}
        sent: dict = {}
        for key, chan in chans.items():
            if chan.packets:
                gate = gates.get((key, 0))
                if gate is not None and gate[1] > 0:
                    waiting.setdefault(gate[0], []).append((key, 0))
                else:
                    req.append((float(chan.lat), order, key, 0))
                    order += 1
            sizes = [r + p for r, p in chan.cost]
            bounds[key] = np.cumsum(sizes).tolist()
            pace[key] = [(r + p) / (r * chan.step + p) if r + p else 1.0 for r, p in chan.cost]
            read[key] = 0.0
            sent[key] = 0.0
        heapq.heapify(req)
        blocked: list = []                               # requests waiting for a bus
        held: set = set()                                # buses held by a packet
        starting: list = []                              # (ready, channel, packet, buses)
        active: dict = {}                                # (channel, packet) -> flow
        streaming: dict = {}                             # channel -> its active flow key
        now = 0.0

        def grab(item) -> bool:
            _, _, key, p = item
            buses = self._buses(chans[key], chans[key].packets[p].header)
            if any(b in held for b in buses):
                return False
            held.update(buses)
            ready = now
            for tkey, tch, ordinal in dest[key][p]:
                ready = max(ready, avail.get((tkey, tch, ordinal), 0.0))
            starting.append((ready, key, p, buses))
            return True

        def producing(key) -> tuple[float, int]:
            """The DDR pace of the packet channel ``key`` is reading, and that packet."""
            i = bisect.bisect_right(bounds[key], read[key] + eps)
            if i >= len(bounds[key]):
                return 0.0, i
            return pace[key][i], i

        last_sig: tuple | None = None
        rates: dict = {}
        while req or blocked or starting or active:
            reading = {key: producing(key) for key in chans}
            for fk, f in active.items():
                level = read[fk[0]] - sent[fk[0]]
                f["cap"] = 1.0 if level > eps else reading[fk[0]][0]
            sig = tuple((fk, f["cap"]) for fk, f in active.items())
            if sig != last_sig:          # most events change neither the flows nor their caps
                rates = rate_cache.get(sig)
                if rates is None:       # the iterations of a job meet the same states again
                    rates = rate_cache[sig] = _fair_rates(active)
                last_sig = sig
            prod: dict = {key: 0.0 for key in chans}
            t_next = float("inf")
            for key in [k for k, ch in chans.items() if now + eps >= ch.lat]:
                depth = float(chans[key].depth)
                pc, i = reading[key]
                fk = streaming.get(key)
                out = rates[fk] if fk is not None else 0.0
                level = read[key] - sent[key]
                prod[key] = pc if level < depth - eps else min(pc, out)
                if prod[key] > 0:
                    t_next = min(t_next, now + (bounds[key][i] - read[key]) / prod[key])
                dl = prod[key] - out
                if dl < -eps and level > eps:
                    t_next = min(t_next, now + level / -dl)
                elif dl > eps and level < depth - eps:
                    t_next = min(t_next, now + (depth - level) / dl)
            for ch in chans.values():
                if now + eps < ch.lat:
                    t_next = min(t_next, float(ch.lat))
            if req:
                t_next = min(t_next, req[0][0])
            if starting:
                t_next = min(t_next, min(x[0] for x in starting))
            for fk, f in active.items():
                if rates[fk] > 0:
                    t_next = min(t_next, now + f["rem"] / rates[fk])
            if t_next == float("inf"):
                raise DeadlockError("the read channels wait for each other's buses")
            t_next = max(t_next, now)
            dt = t_next - now
            for key in chans:
                read[key] = min(read[key] + prod[key] * dt, float(bounds[key][-1])
                                if bounds[key] else 0.0)
            for fk, f in active.items():
                f["rem"] -= rates[fk] * dt
                sent[fk[0]] += rates[fk] * dt
            now = t_next
            for fk in [fk for fk, f in active.items() if f["rem"] <= eps]:
                f = active.pop(fk)
                key, p = fk
                streaming.pop(key, None)
                sent[key] = float(bounds[key][p])
                read[key] = max(read[key], sent[key])
                chans[key].packets[p].end = now + _PIPE_IN
                held.difference_update(f["buses"])
                for lk, v in releases.get(fk, ()):
                    lock_count[lk] = lock_count.get(lk, 0) + v
                    still = []
                    for wk, wp in waiting.get(lk, []):
                        if lock_count[lk] >= gates[(wk, wp)][1]:
                            heapq.heappush(req, (max(now, float(chans[wk].lat)), order, wk, wp))
                            order += 1
                        else:
                            still.append((wk, wp))
                    waiting[lk] = still
                if p + 1 < len(chans[key].packets):
                    gate = gates.get((key, p + 1))
                    if gate is not None and lock_count.get(gate[0], 0) < gate[1]:
                        waiting.setdefault(gate[0], []).append((key, p + 1))
                    else:
                        heapq.heappush(req, (now, order, key, p + 1))
                        order += 1
            while req and req[0][0] <= now + eps:
                blocked.append(heapq.heappop(req))
            blocked.sort(key=lambda x: (x[0], x[1]))
            blocked = [item for item in blocked if not grab(item)]
            for item in [x for x in starting if x[0] <= now + eps]:
                starting.remove(item)
                _, key, p, buses = item
                real, pad = chans[key].cost[p]
                active[(key, p)] = {
                    "rem": float(real + pad), "cap": 1.0,
                    "tiles": {tkey for tkey, _, _ in dest[key][p]}, "buses": buses}
                streaming[key] = (key, p)
        if any(waiting.values()):
            lk = next(k for k, v in waiting.items() if v)
            raise DeadlockError(f"memtile {lk[0]} MM2S waits on lock {lk[1]}, which no packet "
                                f"releases")

    def _buses(self, chan: _Channel, header: int) -> list[tuple]:
        """The merged buses a packet of read channel ``chan`` holds."""
        rf = route_fields(self.cfg)
        out: list[tuple] = []
        if chan.split is not None:
            out.append(("rd", chan.col, chan.split))
        if header >> rf.col & 1 or not chan.rows:
            out.append(("col", chan.col, chan.bus))
        if chan.rows:
            out += [("row", r) for r in range(self.cfg.array.rows)
                    if header >> (rf.row + r) & 1]
        return out
