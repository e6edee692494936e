"""The overlay top: an R x C array of tile units, a shim per column and the stream network.

:class:`Overlay` is the generated top ``tw_overlay``. Its tile units (``tw_tileunit``,
:class:`~tilewright.hw.tileunit.TileUnit`) and shims (``tw_shim``,
:class:`~tilewright.hw.shim.Shim`) are each generated once and instantiated here by name, so
converting an 8x8 array costs one tile unit's conversion plus a small network.

Stream network (packet switched, :mod:`tilewright.hw.packet`; header bits in
:func:`route_fields`):

* every shim read channel feeds a :class:`~tilewright.hw.packet.PacketSplit` that sends each
  packet to its column bus (header bit ``COL``) and/or to any of the R *row buses* (header
  bits ``ROW + r``; several bits multicast a packet, e.g. a halo row two tile rows share);
* row bus ``r`` merges the packets of all shim read channels bound for it (packet-level round
  robin) and broadcasts them to the S2MM 0 channel of the tiles of array row ``r`` that the
  header's column mask names (bits ``COLS + c``; the header is stripped in front of each
  tile): activations travel along rows, read from DDR once, and a packet for one tile (a
  residual operand) reaches only that tile;
* column ``c`` has two column buses: read channel ``k``'s column packets go to bus ``k mod 2``,
  which sends each to the S2MM ``1 + k mod 2`` channel of the tiles of column ``c`` named by
  the header's tile mask (bits ``TILE + r``): weights travel down columns, a packet for
  several tiles read once, and the two buses fill a tile's weight ping and pong buffers in
  parallel;
* MM2S channel ``k`` of every tile of a column is merged into write channel ``k mod W`` of the
  column's shim; tile output packets carry their DDR address in the header, or, with header
  bit ``mw``, go to the column's memtile instead: a writer on its host port puts them at the
  memtile word the header names;
* each memtile's activation MM2S channel ``k`` (:func:`memtile_act_channels`) is merged into
  shim read channel ``k``'s stream before its split (column bus ``k mod 2``, row buses), so
  a layer's input can come from the memtile, where the previous layer's outputs went.

Control plane (``cfg_*``): one configuration write per cycle (``cfg_we`` held until
``cfg_ready``) of a program word, a buffer descriptor, a lock value, a data memory word or a
task, addressed to unit ``cfg_unit`` (tiles ``r * C + c``, then shims ``R * C + c``, then
memtiles ``R * C + C + c``: BDs, tasks, locks and memory words).
``start`` starts every tile; ``done`` rises once every tile has halted and every channel,
writer and network stream is idle; ``cycles`` counts the cycles in between. ``st_sel`` /
``st_data`` read a unit's status (busy, error, lock waits) and ``progress`` is high in a cycle
in which something moved -- what the simulation's watchdog reports from.
"""

from __future__ import annotations

import dataclasses

from amaranth.hdl import (
    Cat,
    ClockSignal,
    Const,
    Instance,
    Module,
    Mux,
    ResetSignal,
    Signal,
    Value,
)
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .bd import BD_BITS, BD_INDEX_BITS
from .config import MemtileConfig, OverlayConfig
from .memtile import CH_BITS as MT_CH_BITS
from .memtile import memtile_signature
from .packet import DdrWriter, PacketMerge, PacketSplit, StreamBroadcast
from .shim import DDR_ADDR_BITS, SHIM_CH_BITS, ddr_write_addr_bits, shim_signature
from .tileunit import CH_BITS, N_LOCK_PORTS, N_MM2S, N_S2MM, tileunit_signature

N_DMA = N_S2MM + N_MM2S

__all__ = [
    "CFG_KINDS",
    "MEMTILE_MODULE",
    "SHIM_MODULE",
    "STATUS_BITS",
    "TILEUNIT_MODULE",
    "TOP_MODULE",
    "Overlay",
    "RouteFields",
    "array_memtile",
    "memtile_act_channels",
    "route_fields",
    "unit_of",
]

TOP_MODULE = "tw_overlay"
TILEUNIT_MODULE = "tw_tileunit"
SHIM_MODULE = "tw_shim"
MEMTILE_MODULE = "tw_memtile"

#: ``cfg_kind`` values.
CFG_KINDS = {"pm": 0, "bd": 1, "lock": 2, "dm": 3, "task": 4}
#: Width of ``st_data``.
STATUS_BITS = 128


class RouteFields:
    """Header bit positions of the overlay's packets (above the 16-bit length).

    Attributes
    ----------
    col : int
        Send to the column bus.
    row : int
        Row bus ``r`` is bit ``row + r``.
    mt : int
        A packet a shim read channel reads: also write it (header included) into the
        column's memtile, on the memtile's S2MM channel of the same number.
    tile : int
        On a column bus, tile row ``r`` is bit ``tile + r``.
    cols : int
        On a row bus, tile column ``c`` is bit ``cols + c``.
    bits : int
        Header bits used (length included).
    mw : int
        A tile output packet (header ``{len, word address}``): write it into the column's
        memtile instead of DDR. The top bit of the shim writers' address field, so DDR
        writes address ``2**(mw - 16)`` words at most.
    """

    def __init__(self, rows: int, cols: int, word_bits: int = 64) -> None:
        self.col = 16
        self.row = 17
        self.mt = 17 + rows
        self.tile = 18 + rows
        self.cols = 18 + 2 * rows
        self.bits = 18 + 2 * rows + cols
        self.mw = 16 + ddr_write_addr_bits(word_bits) - 1

    def all_cols(self, n: int) -> int:
        """The header bits that send a row-bus packet to all ``n`` columns."""
        return ((1 << n) - 1) << self.cols


def array_memtile(cfg: OverlayConfig) -> MemtileConfig:
    """The memtile the generated array holds per column: the configured memory, BDs and
    locks, with the channels the stream network wires (at most the configured ones):
    an S2MM channel per shim read channel (what that channel reads with the header's ``mt``
    bit set), an MM2S channel per column bus (memtile MM2S ``j`` streams into column bus
    ``j``), then up to one *activation* MM2S channel per shim read channel
    (:func:`memtile_act_channels`: into the row buses, as a shim read channel), and as many
    banks as the S2MM and column-bus channels need to be served every cycle (at most the
    configured ones: banks cost simulation speed, 17 381 against 21 258 cycles/s on aie2-4x4
    with 16 banks instead of 4); the activation channels and the host port (configuration
    writes, and the writer of the tile outputs sent to the memtile) share them."""
    mt = cfg.memtile
    s2mm = min(mt.s2mm, cfg.ddr.read_channels)
    wmm = min(mt.mm2s, 2)
    mm2s = wmm + min(mt.mm2s - wmm, cfg.ddr.read_channels)
    banks = min(mt.banks, 1 << (s2mm + wmm - 1).bit_length())
    return dataclasses.replace(mt, s2mm=s2mm, mm2s=mm2s, banks=banks)


def memtile_act_channels(cfg: OverlayConfig) -> int:
    """The memtile's activation MM2S channels in the array: channel ``s2mm + 2 + k``
    (:func:`array_memtile`) is merged (packet by packet) into shim read channel ``k``'s
    stream before its split, so it streams as that channel does (header bit ``col`` to column
    bus ``k mod 2``, bits ``row + r`` and the column mask to the row buses), from the
    memtile's memory instead of DDR. Its packets must not carry the ``mt`` bit (the split
    would write them into the memtile)."""
    return array_memtile(cfg).mm2s - min(cfg.memtile.mm2s, 2)


def unit_of(cfg: OverlayConfig, kind: str, index: int) -> int:
    """The control-plane unit number (``cfg_unit``, ``st_sel``) of tile ``r * cols + c``
    (``kind="tile"``), of column ``c``'s shim (``"shim"``) or memtile (``"memtile"``)."""
    R, C = cfg.array.rows, cfg.array.cols
    n = {"tile": R * C, "shim": C, "memtile": C}
    if kind not in n:
        raise ValueError(f"unit kind must be 'tile', 'shim' or 'memtile', not {kind!r}")
    if not 0 <= index < n[kind]:
        raise ValueError(f"{kind} {index} does not exist in {cfg.name} ({n[kind]} of them)")
    return {"tile": 0, "shim": R * C, "memtile": R * C + C}[kind] + index


def route_fields(cfg: OverlayConfig) -> RouteFields:
    """The packet header fields of an overlay (one definition: RTL, compiler and model)."""
    return RouteFields(cfg.array.rows, cfg.array.cols, cfg.tile.word_bits)


def _instance(m: Module, module: str, name: str, sig: wiring.Signature):
    """Instantiate a generated module ``module`` whose ports are ``sig`` (from the module's
    side) and return an interface with the same members to connect it with."""
    intf = sig.create(path=(name,))
    ports = {"i_clk": ClockSignal(), "i_rst": ResetSignal()}
    for path, member, value in sig.flatten(intf):
        pname = "__".join(str(p) for p in path)
        ports[f"{'i' if member.flow == In else 'o'}_{pname}"] = Value.cast(value)
    m.submodules[name] = Instance(module, **ports)
    return intf


def _merge_into(m: Module, srcs: list, dst, name: str, net_valid: list) -> None:
    """Drive stream ``dst`` from ``srcs``: nothing, the one source, or a
    :class:`~tilewright.hw.packet.PacketMerge` (submodule ``name``) of them."""
    if not srcs:
        m.d.comb += dst.valid.eq(0)
    elif len(srcs) == 1:
        wiring.connect(m, srcs[0], dst)
    else:
        mg = PacketMerge(len(dst.payload), len(srcs))
        m.submodules[name] = mg
        for j, src in enumerate(srcs):
            wiring.connect(m, src, mg.i[j])
        wiring.connect(m, mg.o, dst)
        net_valid.append(mg.o.valid)


class Overlay(wiring.Component):
    """The overlay top (``tw_overlay``).

    Parameters
    ----------
    cfg : OverlayConfig

    Members
    -------
    cfg_we, cfg_unit, cfg_kind, cfg_ch, cfg_addr, cfg_data, cfg_ready :
        Configuration writes (see the module docstring and :data:`CFG_KINDS`).
    start : In(1), done : Out(1), busy : Out(1), error : Out(1), cycles : Out(32)
        Run control.
    st_sel : In(8), st_data : Out(128), progress : Out(1)
        Status for the watchdog.
    ddr_rd_addr, ddr_rd_re, ddr_rd_new, ddr_rd_ready, ddr_rd_rdata :
        The C x read_channels DDR read ports, packed (port ``c * read_channels + k`` is
        column ``c``'s channel ``k``; ``addr`` 28 bits and ``rdata`` a word per port;
        ``rdata`` is valid the cycle after ``re & ready``; ``new``: see
        :class:`~tilewright.hw.shim.Shim`).
    ddr_wr_addr, ddr_wr_we, ddr_wr_wdata, ddr_wr_ready :
        The C x write_channels DDR write ports, packed the same way.
    """

    def __init__(self, cfg: OverlayConfig) -> None:
        if not isinstance(cfg, OverlayConfig):
            raise TypeError(f"cfg must be an OverlayConfig, not {cfg!r}")
        self.cfg = cfg
        wb = cfg.tile.word_bits
        C = cfg.array.cols
        self.cfg_bits = max(BD_BITS, 64, wb)
        NRD = C * cfg.ddr.read_channels
        NWR = C * cfg.ddr.write_channels
        super().__init__({
            "cfg_we": In(1),
            "cfg_unit": In(8),
            "cfg_kind": In(3),
            "cfg_ch": In(4),
            "cfg_addr": In(16),
            "cfg_data": In(self.cfg_bits),
            "cfg_ready": Out(1),
            "start": In(1),
            "done": Out(1),
            "busy": Out(1),
            "error": Out(1),
            "cycles": Out(32),
            "st_sel": In(8),
            "st_data": Out(STATUS_BITS),
            "progress": Out(1),
            "ddr_rd_addr": Out(NRD * DDR_ADDR_BITS),
            "ddr_rd_re": Out(NRD),
            "ddr_rd_new": Out(NRD),
            "ddr_rd_ready": In(NRD),
            "ddr_rd_rdata": In(NRD * wb),
            "ddr_wr_addr": Out(NWR * DDR_ADDR_BITS),
            "ddr_wr_we": Out(NWR),
            "ddr_wr_wdata": Out(NWR * wb),
            "ddr_wr_ready": In(NWR),
        })

    def elaborate(self, platform):
        cfg = self.cfg
        R, C = cfg.array.rows, cfg.array.cols
        NR, NW = cfg.ddr.read_channels, cfg.ddr.write_channels
        wb = cfg.tile.word_bits
        rf = route_fields(cfg)
        m = Module()

        tsig = tileunit_signature(cfg.tile)
        ssig = shim_signature(cfg)
        tiles = [[_instance(m, TILEUNIT_MODULE, f"tile_{r}_{c}", tsig) for c in range(C)]
                 for r in range(R)]
        shims = [_instance(m, SHIM_MODULE, f"shim_{c}", ssig) for c in range(C)]
        mcfg = array_memtile(cfg)
        msig = memtile_signature(mcfg, cfg.tile.block)
        mts = [_instance(m, MEMTILE_MODULE, f"memtile_{c}", msig) for c in range(C)]
        NMS, NMM = mcfg.s2mm, mcfg.mm2s
        n_act = memtile_act_channels(cfg)
        NWM = NMM - n_act                          # weight (column bus) MM2S channels
        mt_aw = len(mts[0].dm_addr)
        if rf.mw < 16 + mt_aw:
            raise ValueError(f"{cfg.name}: a {wb}-bit output header cannot hold a memtile "
                             f"address of {mt_aw} bits below its memtile bit {rf.mw}")
        flat = [tiles[r][c] for r in range(R) for c in range(C)]

        # ---- DDR ports ---------------------------------------------------------------------
        A = DDR_ADDR_BITS
        for c in range(C):
            for k in range(NR):
                p, i = shims[c].rd[k], c * NR + k
                m.d.comb += [self.ddr_rd_addr[A * i:A * (i + 1)].eq(p.addr),
                             self.ddr_rd_re[i].eq(p.re), self.ddr_rd_new[i].eq(shims[c].rd_new[k]),
                             p.ready.eq(self.ddr_rd_ready[i]),
                             p.rdata.eq(self.ddr_rd_rdata[wb * i:wb * (i + 1)])]
            for k in range(NW):
                p, i = shims[c].wr[k], c * NW + k
                m.d.comb += [self.ddr_wr_addr[A * i:A * (i + 1)].eq(p.addr),
                             self.ddr_wr_we[i].eq(p.we),
                             self.ddr_wr_wdata[wb * i:wb * (i + 1)].eq(p.wdata),
                             p.ready.eq(self.ddr_wr_ready[i])]

        # ---- stream network ----------------------------------------------------------------
        net_valid = []
        row_inputs: list[list] = [[] for _ in range(R)]
        col_inputs: list[list] = [[] for _ in range(C)]
        for c in range(C):
            for k in range(NR):
                # outputs: column bus, row buses, and (read channels with a memtile S2MM
                # channel) the memtile: header bits col, row.., mt are contiguous; the
                # memtile's activation channel k shares the split with shim read channel k
                sp = PacketSplit(wb, 1 + R + (k < NMS), rf.col, strip=False)
                m.submodules[f"rdsplit_{c}_{k}"] = sp
                if k < n_act:
                    am = PacketMerge(wb, 2)
                    m.submodules[f"rdmerge_{c}_{k}"] = am
                    wiring.connect(m, shims[c].rd_o[k], am.i[0])
                    wiring.connect(m, mts[c].mm2s[NWM + k], am.i[1])
                    wiring.connect(m, am.o, sp.i)
                    net_valid.append(am.o.valid)
                else:
                    wiring.connect(m, shims[c].rd_o[k], sp.i)
                col_inputs[c].append((k % 2, sp.o[0]))
                for r in range(R):
                    row_inputs[r].append(sp.o[1 + r])
                if k < NMS:
                    wiring.connect(m, sp.o[1 + R], mts[c].s2mm[k])
                    net_valid.append(sp.o[1 + R].valid)
                net_valid.append(shims[c].rd_o[k].valid)
            for j in range(NMM):
                net_valid.append(mts[c].mm2s[j].valid)
                if j < NWM:
                    col_inputs[c].append((j, mts[c].mm2s[j]))
        for r in range(R):
            mg = PacketMerge(wb, len(row_inputs[r]))
            m.submodules[f"rowmerge_{r}"] = mg
            for j, src in enumerate(row_inputs[r]):
                wiring.connect(m, src, mg.i[j])
            bc = StreamBroadcast(wb, C)
            m.submodules[f"rowbc_{r}"] = bc
            wiring.connect(m, mg.o, bc.i)
            net_valid.append(mg.o.valid)
            for c in range(C):
                # the tile of column c takes what the header's column mask gives it
                st = PacketSplit(wb, 1, rf.cols + c, strip=True)
                m.submodules[f"rowstrip_{r}_{c}"] = st
                wiring.connect(m, bc.o[c], st.i)
                wiring.connect(m, st.o[0], tiles[r][c].s2mm[0])
                net_valid.append(bc.o[c].valid)
        mt_writers: list[DdrWriter] = []
        for c in range(C):
            # two column buses (weight ping/pong): read channel k feeds bus k % 2 and memtile
            # MM2S channel j bus j, which feeds S2MM 1 + bus of the tiles its header's tile
            # mask names
            for bus in range(2):
                srcs = [src for b, src in col_inputs[c] if b == bus]
                sp = PacketSplit(wb, R, rf.tile, strip=True)
                m.submodules[f"colsplit_{c}_{bus}"] = sp
                _merge_into(m, srcs, sp.i, f"colmerge_{c}_{bus}", net_valid)
                net_valid.append(sp.i.valid)
                for r in range(R):
                    wiring.connect(m, sp.o[r], tiles[r][c].s2mm[1 + bus])
                    net_valid.append(sp.o[r].valid)
            # tile outputs: write channel k, or (header bit mw) the memtile's writer
            to_mt = []
            for k in range(NW):
                srcs = [tiles[r][c].mm2s[j] for r in range(R) for j in range(N_MM2S)
                        if j % NW == k]
                if not srcs:
                    m.d.comb += shims[c].wr_i[k].valid.eq(0)
                    continue
                wm = PacketMerge(wb, len(srcs))
                m.submodules[f"wrmerge_{c}_{k}"] = wm
                for j, src in enumerate(srcs):
                    wiring.connect(m, src, wm.i[j])
                    net_valid.append(src.valid)
                sel = PacketSplit(wb, 2, rf.mw, strip=False, one_of=True)
                m.submodules[f"wrsel_{c}_{k}"] = sel
                wiring.connect(m, wm.o, sel.i)
                wiring.connect(m, sel.o[0], shims[c].wr_i[k])
                to_mt.append(sel.o[1])
                net_valid += [wm.o.valid, sel.o[0].valid, sel.o[1].valid]
            mtw = DdrWriter(wb, mt_aw)
            m.submodules[f"mtwriter_{c}"] = mtw
            mt_writers.append(mtw)
            _merge_into(m, to_mt, mtw.i, f"mtwmerge_{c}", net_valid)

        # ---- configuration -----------------------------------------------------------------
        kind = self.cfg_kind
        ready = Signal()
        m.d.comb += ready.eq(1)
        for u, t in enumerate(flat):
            sel = self.cfg_we & (self.cfg_unit == u)
            m.d.comb += [
                t.pm_we.eq(sel & (kind == CFG_KINDS["pm"])),
                t.pm_addr.eq(self.cfg_addr),
                t.pm_wdata.eq(self.cfg_data[:64]),
                t.bd_we.eq(sel & (kind == CFG_KINDS["bd"])),
                t.bd_ch.eq(self.cfg_ch),
                t.bd_addr.eq(self.cfg_addr),
                t.bd_wdata.eq(self.cfg_data[:BD_BITS]),
                t.lock_wr_en.eq(sel & (kind == CFG_KINDS["lock"])),
                t.lock_wr_id.eq(self.cfg_addr),
                t.lock_wr_value.eq(self.cfg_data),
                t.dm_we.eq(sel & (kind == CFG_KINDS["dm"])),
                t.dm_re.eq(0),
                t.dm_addr.eq(self.cfg_addr),
                t.dm_wdata.eq(self.cfg_data),
                t.task.valid.eq(sel & (kind == CFG_KINDS["task"])),
                t.task.payload.eq(Cat(self.cfg_addr[:BD_INDEX_BITS], self.cfg_ch[:CH_BITS])),
                t.start.eq(self.start),
            ]
            with m.If(self.cfg_unit == u):
                with m.If(kind == CFG_KINDS["dm"]):
                    m.d.comb += ready.eq(t.dm_ready)
                with m.If(kind == CFG_KINDS["task"]):
                    m.d.comb += ready.eq(t.task.ready)
        # shims and memtiles take BDs and tasks the same way (memtiles locks as well)
        dma_units = [(R * C + c, s, SHIM_CH_BITS) for c, s in enumerate(shims)]
        dma_units += [(R * C + C + c, mt, MT_CH_BITS) for c, mt in enumerate(mts)]
        for u, unit, ch_bits in dma_units:
            sel = self.cfg_we & (self.cfg_unit == u)
            m.d.comb += [
                unit.bd_we.eq(sel & (kind == CFG_KINDS["bd"])),
                unit.bd_ch.eq(self.cfg_ch[:ch_bits]),
                unit.bd_addr.eq(self.cfg_addr),
                unit.bd_wdata.eq(self.cfg_data[:BD_BITS]),
                unit.task.valid.eq(sel & (kind == CFG_KINDS["task"])),
                unit.task.payload.eq(Cat(self.cfg_addr[:BD_INDEX_BITS], self.cfg_ch[:ch_bits])),
            ]
            with m.If((self.cfg_unit == u) & (kind == CFG_KINDS["task"])):
                m.d.comb += ready.eq(unit.task.ready)
        for c, mt in enumerate(mts):
            # the host port: configuration writes (memory constants: the headers of the
            # activation channels' packets) before a run, the output writer during it
            w = mt_writers[c].mem
            unit = self.cfg_unit == R * C + C + c
            cfg_dm = self.cfg_we & unit & (kind == CFG_KINDS["dm"])
            m.d.comb += [
                mt.lock_wr_en.eq(self.cfg_we & unit & (kind == CFG_KINDS["lock"])),
                mt.lock_wr_id.eq(self.cfg_addr),
                mt.lock_wr_value.eq(self.cfg_data),
                mt.dm_we.eq(cfg_dm | w.we), mt.dm_re.eq(0),
                mt.dm_addr.eq(Mux(cfg_dm, self.cfg_addr, w.addr)),
                mt.dm_wdata.eq(Mux(cfg_dm, self.cfg_data[:wb], w.wdata)),
                w.ready.eq(mt.dm_ready & ~cfg_dm),
            ]
            with m.If(unit & (kind == CFG_KINDS["dm"])):
                m.d.comb += ready.eq(mt.dm_ready)
        m.d.comb += self.cfg_ready.eq(ready)

        # ---- run control -------------------------------------------------------------------
        all_done = Cat(*[t.done for t in flat]).all()
        dma_idle = ~Cat(*[t.dma_busy for t in flat], *[s.busy for s in shims],
                        *[mt.dma_busy for mt in mts], *[w.busy for w in mt_writers]).any()
        net_idle = ~Cat(*net_valid).any()
        any_error = Cat(*[t.error for t in flat], *[t.dma_error for t in flat],
                        *[s.error for s in shims], *[mt.dma_error for mt in mts]).any()
        running = Signal()
        settle = Signal(2)
        with m.If(self.start):
            m.d.sync += [running.eq(1), settle.eq(0), self.cycles.eq(0), self.done.eq(0)]
        with m.Elif(running):
            m.d.sync += self.cycles.eq(self.cycles + 1)
            with m.If(settle != 3):
                m.d.sync += settle.eq(settle + 1)
            with m.Elif(all_done & dma_idle & net_idle):
                m.d.sync += [running.eq(0), self.done.eq(1)]
        m.d.comb += [self.busy.eq(running), self.error.eq(any_error)]

        # ---- status and progress -----------------------------------------------------------
        for u, t in enumerate(flat):
            with m.If(self.st_sel == u):
                m.d.comb += self.st_data.eq(Cat(
                    t.busy, t.done, t.error, t.dma_error, t.dma_busy,
                    Const(0, 12 - N_DMA), t.lock_wait, Const(0, 8 - N_LOCK_PORTS),
                    t.error_code, t.lock_wait_id, Const(0, 40 - 6 * N_LOCK_PORTS),
                    t.error_pc, Const(0, 24 - len(t.error_pc)), t.cycles))
        for c, s in enumerate(shims):
            with m.If(self.st_sel == R * C + c):
                m.d.comb += self.st_data.eq(Cat(Const(0, 2), s.error, Const(0, 1), s.busy))
        for c, mt in enumerate(mts):
            with m.If(self.st_sel == R * C + C + c):
                m.d.comb += self.st_data.eq(Cat(Const(0, 3), mt.dma_error, mt.dma_busy))
        # status word of a tile: busy 0, done 1, error 2, dma_error 3, dma_busy 4.. (one bit
        # per channel: S2MM then MM2S), lock_wait 16.. (core, S2MM, MM2S), error_code 24..31,
        # lock ids 6 bits each from 32, error_pc from 72, the tile's cycle counter from 96;
        # of a shim: error 2, busy 4.. (read channels, then write channels); of a memtile:
        # dma_error 3, dma_busy 4.. (S2MM, then MM2S channels)
        moving = [t.busy & ~t.lock_wait[0] for t in flat]
        moving += [t.s2mm[k].valid & t.s2mm[k].ready for t in flat for k in range(N_S2MM)]
        moving += [t.mm2s[k].valid & t.mm2s[k].ready for t in flat for k in range(N_MM2S)]
        moving += [self.ddr_rd_re & self.ddr_rd_ready, self.ddr_wr_we & self.ddr_wr_ready]
        moving += [mt.s2mm[k].valid & mt.s2mm[k].ready for mt in mts for k in range(NMS)]
        moving += [mt.mm2s[j].valid & mt.mm2s[j].ready for mt in mts for j in range(NMM)]
        moving += [w.mem.we & w.mem.ready for w in mt_writers]
        m.d.comb += self.progress.eq(Cat(*moving).any())
        return m

