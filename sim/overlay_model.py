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
latency once per task; a packet on a column bus is broadcast, so it starts when the channel
has finished the previous one *and* every tile it goes to can take it (its acquire lock was
released); padding words cost a cycle each; outputs queue on the column's write channel. The
tiles of a column depend on each other only through those start times, so the model iterates
the tiles' golden runs until the start times no longer change.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tilewright.hw.bd import BufferDescriptor
from tilewright.hw.config import OverlayConfig
from tilewright.hw.isa import ErrorCode
from tilewright.hw.overlay import route_fields
from tilewright.hw.tileunit import LOCK_BITS, N_S2MM

from .dm_model import bd_addresses
from .golden import DeadlockError, TileModel

__all__ = ["JobResult", "ModelResult", "OverlayModel"]

_MAX_ITERATIONS = 12
#: Cycles from a shim read to the tile's memory (datamover, split, merge, broadcast, strip and
#: S2MM register stages), and from a tile's MM2S to the writer.
_PIPE_IN = 8
_PIPE_OUT = 6


@dataclass
class JobResult:
    cycles: int
    rd_words: int
    wr_words: int
    tile_cycles: dict[tuple[int, int], int] = field(default_factory=dict)
    iterations: int = 0


@dataclass
class ModelResult:
    """What the model predicts for a whole layer."""

    output: np.ndarray
    ddr: np.ndarray
    cycles: int
    rd_words: int
    wr_words: int
    jobs: list[JobResult]


def _task_words(ddr: np.ndarray, bds: Sequence[BufferDescriptor]) -> tuple[list[np.ndarray],
                                                                           list[int]]:
    """Per BD of a read channel's chain (BD 0 first): the words it streams, and the DDR reads."""
    out, reads = [], []
    i: int | None = 0
    seen = 0
    while i is not None:
        bd = bds[i]
        addrs, ok = bd_addresses(bd)
        if ok.any() and int(addrs[ok].max()) >= ddr.size:
            raise ValueError(f"shim BD {i} reads word {int(addrs[ok].max())}, beyond the DDR "
                             f"image of {ddr.size} words")
        words = np.where(ok, ddr[np.where(ok, addrs, 0)], np.uint64(0)).astype(np.uint64)
        out.append(words)
        reads.append(int(ok.sum()))
        i = bd.next_bd
        seen += 1
        if seen > len(bds):
            raise ValueError("a shim BD chain loops")
    return out, reads


@dataclass
class _Packet:
    words: np.ndarray              # payload (header stripped)
    header: int
    end: float = 0.0               # arrival of the last word at the tiles (cycles)


class _Channel:
    """One DDR read channel: its packets in order with the words each takes from DDR."""

    def __init__(self, words: list[np.ndarray], reads: list[int]) -> None:
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


class _TileEnv:
    """The datamover channels of one tile, driven from the golden model's lock hook."""

    def __init__(self, model: OverlayModel, job, tp, inputs: dict[int, list[_Packet]],
                 avail: dict, key: tuple[int, int]) -> None:
        self.model = model
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

    def _next_bd(self, ch: int, i: int | None, locks: list[int]) -> BufferDescriptor | None:
        """BD ``i`` of channel ``ch`` if its chain has one and its acquire can be granted now
        (then granted), else None."""
        bds = self.tp.bds.get(ch, [])
        if i is None or i >= len(bds):
            return None
        bd = bds[i]
        if bd.acquire is not None:
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
        words = pk.words[1:1 + n]
        wv = mem.view(np.uint8).reshape(-1, t.block)
        wv[addr:addr + n] = words.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :t.block]
        locks[lock] = min(locks[lock] + 1, 63)
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
        addrs, _ = bd_addresses(bd)
        b = self.model.cfg.tile.block
        wv = mem.view(np.uint8).reshape(-1, b)
        wv[addrs] = words.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :b]
        if bd.release is not None:
            locks[bd.release.id] = min(locks[bd.release.id] + bd.release.value, 63)
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
            got.append(pk.words[self.off[ch]:self.off[ch] + take])
            arrival = max(arrival, pk.end)
            self.off[ch] += take
            n -= take
            if self.off[ch] == len(pk.words):
                self.pkt[ch] += 1
                self.off[ch] = 0
        return np.concatenate(got), arrival

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
            locks[bd.release.id] = min(locks[bd.release.id] + bd.release.value, 63)
        self.out_pos[ch] = bd.next_bd
        return True

    # -- the hook -----------------------------------------------------------------------------
    def acquire(self, lock: int, value: int, cycle: int, locks: list[int],
                mem: np.ndarray) -> int:
        t = float(cycle)
        progress = True
        while locks[lock] < value and progress:
            progress = False
            for ch in range(N_S2MM):
                step = self._s2mm_step(ch, locks, mem, cycle)
                if step is not None:
                    progress = True
                    if step[1] == lock:
                        t = max(t, step[0])
        if locks[lock] < value:
            raise DeadlockError(f"tile ({self.tp.r},{self.tp.c}) waits on lock {lock} for "
                                f"{value} at cycle {cycle}; no datamover channel can release "
                                f"it")
        return int(np.ceil(t))

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
        self.interval = max(1, cfg.tile.word_bytes // cfg.ddr.bytes_per_cycle)

    def run_layer(self, layer) -> ModelResult:
        """Run every job of ``layer`` (an :class:`~tilewright.sw.array_compiler.ArrayLayer`)
        in turn on one DDR image."""
        ddr = np.array(layer.ddr, dtype=np.uint64, copy=True)
        results = []
        for job in layer.jobs:
            ddr, res = self.run_job(job, ddr)
            results.append(res)
        lo, n = layer.out_region
        out = layer.read_output(ddr[lo:lo + n])
        return ModelResult(out, ddr, sum(r.cycles for r in results),
                           sum(r.rd_words for r in results), sum(r.wr_words for r in results),
                           results)

    def run_job(self, job, ddr: np.ndarray) -> tuple[np.ndarray, JobResult]:
        cfg = self.cfg
        R, C = cfg.array.rows, cfg.array.cols
        rf = route_fields(cfg)
        step = self.interval
        lat = cfg.ddr.latency
        # shim read channels: packets and DDR reads
        chans: dict[tuple[int, int], _Channel] = {}
        rd_words = 0
        for c, per in job.shim_bds.items():
            for ch, bds in per.items():
                if not bds:
                    continue
                words, reads = _task_words(ddr, bds)
                rd_words += sum(reads)
                chans[(c, ch)] = _Channel(words, reads)
        # routing: which tile S2MM channel gets which packet (in channel order)
        dest: dict[tuple[int, int], list[list[tuple[tuple[int, int], int]]]] = {}
        inputs = {(r, c): {ch: [] for ch in range(N_S2MM)} for r in range(R) for c in range(C)}
        for (c, ch), chan in chans.items():
            dest[(c, ch)] = []
            for pk in chan.packets:
                d = []
                if pk.header >> rf.col & 1:
                    for r in range(R):
                        if pk.header >> (rf.tile + r) & 1:
                            d.append(((r, c), 1 + ch % 2))
                for r in range(R):
                    if pk.header >> (rf.row + r) & 1:
                        d += [((r, cc), 0) for cc in range(C)]
                dd = []
                for tkey, tch in d:
                    dd.append((tkey, tch, len(inputs[tkey][tch])))
                    inputs[tkey][tch].append(pk)
                dest[(c, ch)].append(dd)
        # iterate: packet start times <- tiles' acquire times <- packet arrival times
        avail: dict = {}
        prev = None
        envs: dict = {}
        runs: dict = {}
        n_iter = 0
        for it in range(1, _MAX_ITERATIONS + 1):
            n_iter = it
            self._time_packets(chans, dest, avail, step, lat)
            envs, runs = {}, {}
            avail_new: dict = {}
            for tp in job.tiles:
                key = (tp.r, tp.c)
                env = _TileEnv(self, job, tp, inputs[key], avail_new, key)
                mem = np.zeros(cfg.tile.dmem_bytes, dtype=np.uint8)
                wv = mem.view(np.uint8).reshape(-1, cfg.tile.block)
                for a, w in tp.dm.items():
                    wv[a] = np.frombuffer(int(w).to_bytes(8, "little"), np.uint8)[
                        :cfg.tile.block]
                locks = [0] * 64
                for i, v in tp.locks.items():
                    locks[i] = v
                runs[key] = self.tile_model.run(tp.program, mem, locks=locks, lock_hook=env)
                envs[key] = env
            if avail_new == prev:
                break
            prev = avail = avail_new
        # outputs: each tile's MM2S packets through the column's write channels
        wr_words = 0
        end = 0.0
        writer_free: dict[tuple[int, int], float] = {}
        outs = []
        for key, env in envs.items():
            for ch, cycle, words in env.outputs:
                outs.append((cycle, key, ch, words))
        outs.sort(key=lambda o: (o[0], o[1]))
        for cycle, (_r, c), ch, words in outs:
            k = (ch - N_S2MM) % cfg.ddr.write_channels
            t = max(float(cycle) + _PIPE_OUT, writer_free.get((c, k), 0.0))
            pos = 0
            while pos < len(words):
                hdr = int(words[pos])
                n, addr = hdr & 0xFFFF, hdr >> 16
                ddr[addr:addr + n] = words[pos + 1:pos + 1 + n]
                wr_words += n
                t += 1 + n * step
                pos += 1 + n
            writer_free[(c, k)] = t
            end = max(end, t)
        for key, run in runs.items():
            end = max(end, float(run.cycles))
            if run.error is not ErrorCode.NONE:
                raise RuntimeError(f"tile {key} stopped with error {run.error!r} at pc "
                                   f"{run.error_pc}")
        res = JobResult(int(np.ceil(end)), rd_words, wr_words,
                        {k: int(r.cycles) for k, r in runs.items()}, n_iter)
        return ddr, res

    def _time_packets(self, chans, dest, avail, step, lat) -> None:
        """Arrival times of every packet: a channel's packets in order, each starting when the
        previous has left and every destination can take it; a tile's data-memory port takes
        one word per cycle, so packets bound for the same tile share it (in start order)."""
        heap = []
        for key, chan in chans.items():
            if chan.packets:
                heapq.heappush(heap, (float(lat), key, 0))
        port: dict = {}                      # tile -> cycle its memory port is free
        while heap:
            t, key, p = heapq.heappop(heap)
            chan = chans[key]
            pk = chan.packets[p]
            ready = t
            for tkey, tch, ordinal in dest[key][p]:
                ready = max(ready, avail.get((tkey, tch, ordinal), 0.0))
            real, pad = chan.cost[p]
            n = len(pk.words)
            end = ready + real * step + pad
            for tkey, _, _ in dest[key][p]:
                end = max(end, port.get(tkey, 0.0) + n)
            for tkey, _, _ in dest[key][p]:
                port[tkey] = end
            pk.end = end + _PIPE_IN
            if p + 1 < len(chan.packets):
                heapq.heappush(heap, (end, key, p + 1))
