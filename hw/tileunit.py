"""A compute tile with its DMA: the unit an overlay instantiates in every array position.

:class:`TileUnit` holds one :class:`~tilewright.hw.tile.ComputeTile`, a
:class:`~tilewright.hw.locks.LockUnit` shared by the tile's core and its DMA, three S2MM and two
MM2S :class:`~tilewright.hw.datamover.Datamover` channels (an AIE-ML tile DMA has two S2MM; the
third lets a tile take its activations on one stream and two weight ping/pong streams on the
others, so that a column's two DDR read channels both feed weights) and two round-robin
arbiters: one puts the S2MM channels and a host port on the tile's data memory port (``dm``:
writes, host reads), the other the MM2S channels on its read-only port (``dr``), so that
outputs leave in the cycles inputs land.
The engine keeps priority on both (``dm_ready``, ``dr_ready``), so DMA traffic never changes
compute cycles; the channels take the remaining cycles.

Ping/pong: the core and the channels meet on locks. A typical input buffer pair uses a lock
per buffer "full" (released by the S2MM channel after filling, acquired by the core) and
"empty" (released by the core once it no longer reads the buffer, acquired by the channel
before it refills it); outputs mirror that with the MM2S channel.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .arbiter import RoundRobin
from .bd import BD_INDEX_BITS, BD_LAYOUT
from .config import TileConfig
from .datamover import Datamover
from .locks import LOCK_ID_BITS, LockUnit
from .packet import LockingWriter
from .tile import CONTROL_PORTS, ComputeTile, tile_ports

__all__ = ["CH_BITS", "LOCK_BITS", "N_LOCK_PORTS", "N_MM2S", "N_S2MM", "TileUnit",
           "tileunit_signature"]

N_S2MM = 3
N_MM2S = 2
#: Lock-id bits in an activation packet's header (the unit's 16 locks).
LOCK_BITS = 4
#: Bits of a channel number (``bd_ch``, the task payload).
CH_BITS = 3


#: Lock requesters of a unit: the core, then the S2MM and MM2S channels.
N_LOCK_PORTS = 1 + N_S2MM + N_MM2S


def tileunit_signature(tile: TileConfig) -> wiring.Signature:
    """The ports of a :class:`TileUnit` (the one definition: the unit, the overlay's
    instances of the generated ``tw_tileunit`` module and the generator's port check)."""
    wb = tile.word_bits
    return wiring.Signature({
        "s2mm": In(stream.Signature(wb)).array(N_S2MM),
        "mm2s": Out(stream.Signature(wb)).array(N_MM2S),
        "bd_we": In(1),
        "bd_ch": In(CH_BITS),
        "bd_addr": In(BD_INDEX_BITS),
        "bd_wdata": In(BD_LAYOUT),
        "task": In(stream.Signature(BD_INDEX_BITS + CH_BITS)),
        "lock_wr_en": In(1),
        "lock_wr_id": In(LOCK_ID_BITS),
        "lock_wr_value": In(6),
        "dma_busy": Out(N_S2MM + N_MM2S),
        "dma_error": Out(1),
        "lock_wait": Out(N_LOCK_PORTS),
        "lock_wait_id": Out(LOCK_ID_BITS * N_LOCK_PORTS),
        **{k: v for k, v in tile_ports(tile).items()
           if k in CONTROL_PORTS or k.startswith("dm_")},
    })


class TileUnit(wiring.Component):
    """Compute tile + lock unit + 3 S2MM / 2 MM2S datamover channels + memory arbiter.

    Parameters
    ----------
    tile : TileConfig
    n_locks : int
        Locks of the unit's lock unit (AIE-ML tile: 16); ACQ/REL of a higher id never grant.
    n_bds : int, optional
        Buffer descriptors per channel (default: ``tile.bds_per_channel``).

    Members
    -------
    s2mm : In(stream.Signature(word_bits)).array(3)
        Input streams, written to tile memory by S2MM channels 0 to 2.
    mm2s : Out(stream.Signature(word_bits)).array(2)
        Output streams, read from tile memory by MM2S channels 0 and 1.
    bd_we, bd_ch, bd_addr, bd_wdata :
        Write BD ``bd_addr`` of channel ``bd_ch`` (0, 1, 2: S2MM; 3, 4: MM2S).
    task : In(stream.Signature(ch + BD index))
        Queue a task (payload ``{bd, ch}``) on a channel; ``ready`` is the channel's.
    lock_wr_en, lock_wr_id, lock_wr_value :
        Set a lock (initial values).
    dma_busy : Out(5)
        Per channel: a task is queued or running.
    dma_error : Out(1)
        A channel named a missing BD, or a lock request named a missing lock / overflowed.
    lock_wait : Out(6), lock_wait_id : Out(36)
        Per lock requester (core, S2MM 0-2, MM2S 0-1): it requests a lock this cycle and is not
        granted, and the id it asks for (6 bits each) -- what a watchdog reports.
    start, busy, done, error, error_code, error_pc, cycles, pm_we, pm_addr, pm_wdata :
        As on :class:`ComputeTile`.
    dm_we, dm_re, dm_addr, dm_wdata, dm_rdata, dm_ready :
        Host access to tile memory, the lowest-priority requester of the arbiter.
    """

    def __init__(self, tile: TileConfig, *, n_locks: int = 16, n_bds: int | None = None) -> None:
        if not isinstance(tile, TileConfig):
            raise TypeError(f"tile must be a TileConfig, not {tile!r}")
        self.tile = tile
        self.n_locks = n_locks
        self.n_bds = tile.bds_per_channel if n_bds is None else n_bds
        super().__init__(tileunit_signature(tile))

    def elaborate(self, platform):
        t = self.tile
        m = Module()
        m.submodules.core = core = ComputeTile(t)
        m.submodules.locks = locks = LockUnit(self.n_locks, 1 + N_S2MM + N_MM2S)
        # channel 0: activations arrive as packets that carry their address and lock (any
        # order, from any DDR channel); channels 1..: BD-driven datamovers
        writer = LockingWriter(t.word_bits, t.addr_bits, LOCK_BITS)
        m.submodules.dma0 = writer
        chans: list = [writer]
        for i in range(1, N_S2MM + N_MM2S):
            d = Datamover("s2mm" if i < N_S2MM else "mm2s", addr_bits=t.addr_bits,
                          word_bits=t.word_bits, n_bds=self.n_bds, dims=3)
            m.submodules[f"dma{i}"] = d
            chans.append(d)
        dms = chans[1:]

        # core control and status pass through
        for name in CONTROL_PORTS:
            if name in ("start", "pm_we", "pm_addr", "pm_wdata"):
                m.d.comb += getattr(core, name).eq(getattr(self, name))
            else:
                m.d.comb += getattr(self, name).eq(getattr(core, name))

        # locks: port 0 is the core, then the channels
        p0 = locks.ports[0]
        m.d.comb += [p0.req.eq(core.lk_req), p0.op.eq(core.lk_op), p0.id.eq(core.lk_id),
                     p0.val.eq(core.lk_val), core.lk_gnt.eq(p0.gnt)]
        for i, d in enumerate(chans):
            wiring.connect(m, d.lock, locks.ports[1 + i])
        m.d.comb += [locks.wr_en.eq(self.lock_wr_en), locks.wr_id.eq(self.lock_wr_id),
                     locks.wr_value.eq(self.lock_wr_value)]

        # who waits on which lock (for the overlay's watchdog)
        for i, p in enumerate(locks.ports):
            m.d.comb += [self.lock_wait[i].eq(p.req & ~p.gnt),
                         self.lock_wait_id[6 * i:6 * i + 6].eq(p.id)]

        # streams, BDs, tasks
        for i in range(N_S2MM):
            wiring.connect(m, wiring.flipped(self.s2mm[i]), chans[i].i)
        for i in range(N_MM2S):
            wiring.connect(m, chans[N_S2MM + i].o, wiring.flipped(self.mm2s[i]))
        task_ch = self.task.payload[BD_INDEX_BITS:]
        for i, d in enumerate(dms, start=1):
            m.d.comb += [d.bd_we.eq(self.bd_we & (self.bd_ch == i)), d.bd_addr.eq(self.bd_addr),
                         d.bd_wdata.eq(self.bd_wdata),
                         d.task.payload.eq(self.task.payload[:BD_INDEX_BITS]),
                         d.task.valid.eq(self.task.valid & (task_ch == i))]
        # channel 0 takes no BDs or tasks (a task for it is accepted and ignored)
        m.d.comb += self.task.ready.eq(Cat(1, *[d.task.ready for d in dms])
                                       .bit_select(task_ch, 1))
        m.d.comb += [self.dma_busy.eq(Cat(*[d.busy for d in chans])),
                     self.dma_error.eq(Cat(*[d.error for d in dms]).any() | locks.overflow
                                       | locks.bad_id)]

        # data memory arbiters, round robin, advancing on a performed access: the S2MM
        # channels and the host on the tile's `dm` port (writes; host reads), the MM2S
        # channels on its read-only `dr` port, so outputs leave while inputs land
        req = Signal(N_S2MM + 1)
        m.d.comb += req.eq(Cat(*[d.mem.we for d in chans[:N_S2MM]], self.dm_we | self.dm_re))
        m.submodules.arbiter = rr = RoundRobin(N_S2MM + 1)
        m.d.comb += rr.req.eq(req)
        pick, found = rr.pick, rr.found
        we = Signal()
        addr = Signal(t.addr_bits)
        wdata = Signal(t.word_bits)
        for i, d in enumerate(chans[:N_S2MM]):
            with m.If(pick == i):
                m.d.comb += [addr.eq(d.mem.addr), we.eq(1), wdata.eq(d.mem.wdata)]
        with m.If(pick == N_S2MM):
            m.d.comb += [addr.eq(self.dm_addr), we.eq(self.dm_we), wdata.eq(self.dm_wdata)]
        m.d.comb += [core.dm_we.eq(found & we), core.dm_re.eq(found & ~we),
                     core.dm_addr.eq(addr), core.dm_wdata.eq(wdata)]
        grant = found & core.dm_ready
        m.d.comb += rr.served.eq(grant)
        for i, d in enumerate(chans[:N_S2MM]):
            m.d.comb += d.mem.ready.eq(grant & (pick == i))
        m.d.comb += [self.dm_ready.eq(grant & (pick == N_S2MM)),
                     self.dm_rdata.eq(core.dm_rdata)]
        readers = chans[N_S2MM:]
        m.submodules.rd_arbiter = rd = RoundRobin(N_MM2S)
        m.d.comb += rd.req.eq(Cat(*[d.mem.re for d in readers]))
        raddr = Signal(t.addr_bits)
        for i, d in enumerate(readers):
            with m.If(rd.pick == i):
                m.d.comb += raddr.eq(d.mem.addr)
        m.d.comb += [core.dr_re.eq(rd.found), core.dr_addr.eq(raddr)]
        rgrant = rd.found & core.dr_ready
        m.d.comb += rd.served.eq(rgrant)
        for i, d in enumerate(readers):
            m.d.comb += [d.mem.ready.eq(rgrant & (rd.pick == i)),
                         d.mem.rdata.eq(core.dr_rdata)]
        return m


