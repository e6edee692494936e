"""The shim: one column's DDR ports (Amaranth 0.5).

A :class:`Shim` holds ``ddr.read_channels`` MM2S :class:`~tilewright.hw.datamover.Datamover`
channels that read the DDR image with 4-D buffer descriptors (zero padding on read, so that
convolution halos never cross DDR), and ``ddr.write_channels``
:class:`~tilewright.hw.packet.DdrWriter` channels that write the packets arriving from the
array at the address in each packet's header. The DDR itself is outside the generated RTL:
the simulation's DDR model (``sim/harness/overlay_harness.sv``) serves the ``rd`` / ``wr``
memory ports with the bandwidth and latency of the configuration.

Shim channels have no lock unit: their BDs must not name locks (the compiler never emits
such BDs; a BD that does would wait forever, which the overlay's watchdog reports).
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .bd import BD_INDEX_BITS, BD_LAYOUT
from .config import OverlayConfig
from .datamover import Datamover, mem_read_signature, mem_write_signature
from .packet import DdrWriter

__all__ = ["DDR_ADDR_BITS", "SHIM_CH_BITS", "Shim", "shim_signature"]

#: Word address width of the DDR ports (2**28 words: 2 GiB of 8-byte words).
DDR_ADDR_BITS = 28


def ddr_write_addr_bits(word_bits: int) -> int:
    """Address bits of a shim write channel's :class:`~tilewright.hw.packet.DdrWriter`: the
    header's field above its 16-bit length, at most :data:`DDR_ADDR_BITS`."""
    return min(DDR_ADDR_BITS, word_bits - 16)
#: Bits of a channel number in ``bd_ch`` and in the task payload.
SHIM_CH_BITS = 3


def shim_signature(cfg: OverlayConfig) -> wiring.Signature:
    """The ports of a :class:`Shim` (the one definition: the shim and the overlay's instances
    of the generated ``tw_shim`` module)."""
    wb = cfg.tile.word_bits
    nr, nw = cfg.ddr.read_channels, cfg.ddr.write_channels
    return wiring.Signature({
        "rd": Out(mem_read_signature(DDR_ADDR_BITS, wb)).array(nr),
        "wr": Out(mem_write_signature(DDR_ADDR_BITS, wb)).array(nw),
        "rd_o": Out(stream.Signature(wb)).array(nr),
        "wr_i": In(stream.Signature(wb)).array(nw),
        "bd_we": In(1),
        "bd_ch": In(SHIM_CH_BITS),
        "bd_addr": In(BD_INDEX_BITS),
        "bd_wdata": In(BD_LAYOUT),
        "task": In(stream.Signature(BD_INDEX_BITS + SHIM_CH_BITS)),
        "busy": Out(nr + nw),
        "error": Out(1),
        "rd_new": Out(nr),
    })


class Shim(wiring.Component):
    """One column's DDR read (BD-driven MM2S) and write (packet-addressed) channels.

    Parameters
    ----------
    cfg : OverlayConfig
        Word width (``tile.block``), channel counts and BDs per channel (``ddr``).

    Members
    -------
    rd : Out(mem_read_signature).array(ddr.read_channels)
        DDR read ports (``rdata`` the cycle after a granted read).
    wr : Out(mem_write_signature).array(ddr.write_channels)
        DDR write ports.
    rd_o : Out(stream.Signature(word_bits)).array(ddr.read_channels)
        What the read channels read (packets: the compiler puts the headers in the image).
    wr_i : In(stream.Signature(word_bits)).array(ddr.write_channels)
        Packets to write: header ``{len[15:0], word address[word_bits-1:16]}``, then the words.
    bd_we, bd_ch, bd_addr, bd_wdata :
        Write BD ``bd_addr`` of read channel ``bd_ch``.
    task : In(stream.Signature(BD_INDEX_BITS + 3))
        Queue a task ``{bd, ch}`` on a read channel.
    busy : Out(read_channels + write_channels)
        Per channel: a task or packet is under way.
    error : Out(1)
        A read channel named a missing BD.
    rd_new : Out(read_channels)
        Per read channel: no read granted since its current task started (the DDR model
        charges its latency to such a read: a task is one prefetched stream).
    """

    def __init__(self, cfg: OverlayConfig) -> None:
        if not isinstance(cfg, OverlayConfig):
            raise TypeError(f"cfg must be an OverlayConfig, not {cfg!r}")
        self.cfg = cfg
        super().__init__(shim_signature(cfg))

    def elaborate(self, platform):
        cfg = self.cfg
        wb = cfg.tile.word_bits
        m = Module()
        readers = []
        for k in range(cfg.ddr.read_channels):
            d = Datamover("mm2s", addr_bits=DDR_ADDR_BITS, word_bits=wb,
                          n_bds=cfg.ddr.bds_per_channel, dims=4,
                          skid_depth=cfg.ddr.read_fifo_words)
            m.submodules[f"rd{k}"] = d
            readers.append(d)
            wiring.connect(m, d.mem, wiring.flipped(self.rd[k]))
            wiring.connect(m, d.o, wiring.flipped(self.rd_o[k]))
            m.d.comb += [d.lock.gnt.eq(0),
                         d.bd_we.eq(self.bd_we & (self.bd_ch == k)),
                         d.bd_addr.eq(self.bd_addr), d.bd_wdata.eq(self.bd_wdata),
                         d.task.payload.eq(self.task.payload[:BD_INDEX_BITS]),
                         d.task.valid.eq(self.task.valid
                                         & (self.task.payload[BD_INDEX_BITS:] == k))]
            fresh = Signal(init=1)
            with m.If(~d.busy):
                m.d.sync += fresh.eq(1)
            with m.Elif(d.mem.re & d.mem.ready):
                m.d.sync += fresh.eq(0)
            m.d.comb += self.rd_new[k].eq(fresh)
        writers = []
        for k in range(cfg.ddr.write_channels):
            # the header holds word_bits - 16 address bits (16 for 4-byte words)
            w = DdrWriter(wb, ddr_write_addr_bits(wb))
            m.submodules[f"wr{k}"] = w
            writers.append(w)
            m.d.comb += [self.wr[k].addr.eq(w.mem.addr), self.wr[k].we.eq(w.mem.we),
                         self.wr[k].wdata.eq(w.mem.wdata), w.mem.ready.eq(self.wr[k].ready)]
            wiring.connect(m, wiring.flipped(self.wr_i[k]), w.i)
        task_ch = self.task.payload[BD_INDEX_BITS:]
        m.d.comb += [
            self.task.ready.eq(Cat(*[d.task.ready for d in readers]).bit_select(task_ch, 1)),
            self.busy.eq(Cat(*[d.busy for d in readers], *[w.busy for w in writers])),
            self.error.eq(Cat(*[d.error for d in readers]).any()),
        ]
        return m
