"""The memtile: one column's staging memory with multi-channel 4-D DMA (Amaranth 0.5).

A :class:`Memtile` holds ``memtile.bytes`` of memory in ``memtile.banks`` banks of
``block``-byte words (word ``a`` lives in bank ``a % banks``), ``memtile.s2mm`` stream-to-memory
and ``memtile.mm2s`` memory-to-stream :class:`~tilewright.hw.datamover.Datamover` channels with
4-D buffer descriptors and zero padding on read (convolution halos), and a
:class:`~tilewright.hw.locks.LockUnit` the channels share (and the overlay's control plane
initialises). Every bank serves one access per cycle; requesters for the same bank are served
round-robin, so channels working in different banks never wait for each other. A host port
(the lowest-priority requester) loads and reads memory directly.
"""

from __future__ import annotations

from amaranth.hdl import Array, Cat, Module, Signal
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from .arbiter import RoundRobin
from .bd import BD_INDEX_BITS, BD_LAYOUT
from .config import MemtileConfig
from .datamover import Datamover
from .locks import LOCK_ID_BITS, LockUnit, check_int

__all__ = ["Memtile", "memtile_signature"]

#: Bits of the channel number in ``bd_ch`` and in the task payload.
CH_BITS = 4


def memtile_signature(memtile: MemtileConfig, block: int) -> wiring.Signature:
    """The ports of a :class:`Memtile` (the one definition: the memtile and the overlay's
    instances of the generated ``tw_memtile`` module)."""
    wb = 8 * block
    nch = memtile.s2mm + memtile.mm2s
    return wiring.Signature({
        "s2mm": In(stream.Signature(wb)).array(memtile.s2mm),
        "mm2s": Out(stream.Signature(wb)).array(memtile.mm2s),
        "bd_we": In(1),
        "bd_ch": In(CH_BITS),
        "bd_addr": In(BD_INDEX_BITS),
        "bd_wdata": In(BD_LAYOUT),
        "task": In(stream.Signature(BD_INDEX_BITS + CH_BITS)),
        "lock_wr_en": In(1),
        "lock_wr_id": In(LOCK_ID_BITS),
        "lock_wr_value": In(6),
        "dma_busy": Out(nch),
        "dma_error": Out(1),
        "dm_we": In(1),
        "dm_re": In(1),
        "dm_addr": In(ceil_log2(memtile.bytes // block)),
        "dm_wdata": In(wb),
        "dm_rdata": Out(wb),
        "dm_ready": Out(1),
    })


class Memtile(wiring.Component):
    """A memtile.

    Parameters
    ----------
    memtile : MemtileConfig
        Size, banks, channels, BDs and locks.
    block : int
        Bytes per word (the tile's block size: one word is one pixel's channel group).
    unlocked : int
        The last ``unlocked`` MM2S channels have no lock port (the overlay's activation
        channels: what they send is ordered by the job boundary, not by locks). A BD of
        theirs that names a lock is an error (``dma_error``; the channel waits). Each lock
        port costs simulation speed: the lock unit's per-port lock lookups were half as
        expensive as the 16 tile cores on aie2-4x4 with 6 ports.

    Members
    -------
    s2mm : In(stream.Signature(word_bits)).array(memtile.s2mm)
    mm2s : Out(stream.Signature(word_bits)).array(memtile.mm2s)
        The channels' streams (channel numbers: S2MM first, then MM2S).
    bd_we, bd_ch, bd_addr, bd_wdata :
        Write BD ``bd_addr`` of channel ``bd_ch``.
    task : In(stream.Signature(BD_INDEX_BITS + 4))
        Queue a task ``{bd, ch}`` on a channel.
    lock_wr_en, lock_wr_id, lock_wr_value :
        Set a lock.
    dma_busy : Out(channels), dma_error : Out(1)
        Per channel busy; any channel or lock error.
    dm_we, dm_re, dm_addr, dm_wdata, dm_rdata, dm_ready :
        Host word access (``dm_rdata`` valid the cycle after a read with ``dm_ready``).
    """

    def __init__(self, memtile: MemtileConfig, block: int, unlocked: int = 0) -> None:
        if not isinstance(memtile, MemtileConfig):
            raise TypeError(f"memtile must be a MemtileConfig, not {memtile!r}")
        if block not in (4, 8, 16):
            raise ValueError(f"block must be 4, 8 or 16, not {block!r}")
        self.unlocked = check_int("unlocked", unlocked, 0, memtile.mm2s)
        self.cfg = memtile
        self.block = block
        self.words = memtile.bytes // block
        self.addr_bits = ceil_log2(self.words)
        super().__init__(memtile_signature(memtile, block))

    def elaborate(self, platform):
        c = self.cfg
        m = Module()
        wb = 8 * self.block
        NB = c.banks
        BB = ceil_log2(NB)
        nch = c.s2mm + c.mm2s
        chans: list[Datamover] = []
        for i in range(nch):
            d = Datamover("s2mm" if i < c.s2mm else "mm2s", addr_bits=self.addr_bits,
                          word_bits=wb, n_bds=c.bds_per_channel, dims=4)
            m.submodules[f"dma{i}"] = d
            chans.append(d)
        nlk = nch - self.unlocked
        m.submodules.locks = locks = LockUnit(c.locks, nlk)
        misuse = Signal()
        for i, d in enumerate(chans):
            if i < nlk:
                wiring.connect(m, d.lock, locks.ports[i])
            else:
                m.d.comb += d.lock.gnt.eq(0)
                with m.If(d.lock.req):
                    m.d.sync += misuse.eq(1)
        m.d.comb += [locks.wr_en.eq(self.lock_wr_en), locks.wr_id.eq(self.lock_wr_id),
                     locks.wr_value.eq(self.lock_wr_value)]
        for i in range(c.s2mm):
            wiring.connect(m, wiring.flipped(self.s2mm[i]), chans[i].i)
        for i in range(c.mm2s):
            wiring.connect(m, chans[c.s2mm + i].o, wiring.flipped(self.mm2s[i]))
        task_ch = self.task.payload[BD_INDEX_BITS:]
        for i, d in enumerate(chans):
            m.d.comb += [d.bd_we.eq(self.bd_we & (self.bd_ch == i)), d.bd_addr.eq(self.bd_addr),
                         d.bd_wdata.eq(self.bd_wdata),
                         d.task.payload.eq(self.task.payload[:BD_INDEX_BITS]),
                         d.task.valid.eq(self.task.valid & (task_ch == i))]
        m.d.comb += [
            self.task.ready.eq(Cat(*[d.task.ready for d in chans]).bit_select(task_ch, 1)),
            self.dma_busy.eq(Cat(*[d.busy for d in chans])),
            self.dma_error.eq(Cat(*[d.error for d in chans]).any() | locks.overflow
                              | locks.bad_id | misuse),
        ]

        # requesters: the channels, then the host
        nreq = nch + 1
        addr = [d.mem.addr for d in chans] + [self.dm_addr]
        is_wr = [d.mem.we if i < c.s2mm else 0 for i, d in enumerate(chans)] + [self.dm_we]
        req = [d.mem.we if i < c.s2mm else d.mem.re for i, d in enumerate(chans)]
        req.append(self.dm_we | self.dm_re)
        wdata = [chans[i].mem.wdata if i < c.s2mm else 0 for i in range(nch)] + [self.dm_wdata]
        granted = Signal(nreq)
        rd_bank = [Signal(BB, name=f"rd_bank{i}") for i in range(nreq)]
        bank_data = []
        for k in range(NB):
            mem = memory.Memory(shape=wb, depth=self.words // NB, init=[])
            m.submodules[f"bank{k}"] = mem
            rp, wp = mem.read_port(), mem.write_port()
            bank_data.append(rp.data)
            m.submodules[f"arb{k}"] = rr = RoundRobin(nreq)
            m.d.comb += rr.req.eq(Cat(*[r & (a[:BB] == k if BB else 1)
                                        for r, a in zip(req, addr, strict=True)]))
            m.d.comb += rr.served.eq(rr.found)
            sel_addr = Array(addr)[rr.pick]
            m.d.comb += [rp.addr.eq(sel_addr[BB:]), wp.addr.eq(sel_addr[BB:]),
                         wp.data.eq(Array(wdata)[rr.pick]),
                         wp.en.eq(rr.found & Array(is_wr)[rr.pick])]
            for i in range(nreq):
                with m.If(rr.found & (rr.pick == i)):
                    m.d.comb += granted[i].eq(1)
        for i in range(nreq):
            m.d.sync += rd_bank[i].eq(addr[i][:BB] if BB else 0)
        data = Array(bank_data)
        for i, d in enumerate(chans):
            m.d.comb += d.mem.ready.eq(granted[i])
            if i >= c.s2mm:
                m.d.comb += d.mem.rdata.eq(data[rd_bank[i]])
        m.d.comb += [self.dm_ready.eq(granted[nch]), self.dm_rdata.eq(data[rd_bank[nch]])]
        return m
