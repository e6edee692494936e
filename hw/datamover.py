"""A datamover channel: buffer descriptors driving a memory port and a stream (Amaranth 0.5).

:class:`Datamover` is one DMA channel, MM2S (memory to stream) or S2MM (stream to memory),
the block that tile DMAs, memtile DMAs and DDR shim DMAs instantiate. It holds ``n_bds``
buffer descriptors (:data:`tilewright.hw.bd.BD_LAYOUT`, written through the ``bd_*`` port), a
queue of tasks (a task is the index of the first BD of a chain) and runs each task's chain:

    IDLE --task--> LOAD --(acq.en)--> ACQ --gnt--> RUN --last access--> (rel.en) REL --gnt-->
         next BD (chain: LOAD) or task done (IDLE)

* LOAD (1 cycle) latches the BD read from the BD memory and its derived bounds.
* ACQ holds an acquire request on the lock port until it is granted.
* RUN walks the elements, one per cycle when nothing back-pressures. Dimension counters
  ``i_d`` run over ``pad_before_d + size_d + pad_after_d`` positions; per dimension an address
  register ``r_d`` holds ``base + sum_{e >= d} c_e * stride_e`` with ``c_e`` the index clamped
  into the data range, so addresses are updated by additions only (no multiplier).
* REL holds a release request until it is granted: after the last *memory access* of the BD
  (MM2S: the last read granted; words may still be on their way to the stream).

Memory side: a request (``re``/``we`` with ``addr``) is held until a cycle in which the
memory arbiter's ``ready`` is high; that cycle performs the access. MM2S read data
(``rdata``) is taken the cycle after the performed read. Once raised, a request is not
withdrawn before it is performed.

Stream side: :func:`amaranth.lib.stream.Signature` with valid/ready. MM2S pushes every element
(zero words for padding, produced without a memory access) through a one-cycle read stage
into a ``skid_depth``-word FIFO and issues a read only when the FIFO has room for it, so no
word is dropped or duplicated under any back-pressure and the channel sustains one word per
cycle. S2MM has no buffering: ``i.ready`` is ``mem.ready`` while running, and a word is taken
in the cycle its write is performed.

:mod:`tilewright.sim.dm_model` is the Python model (element order, memory contents, cycle
estimate).
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import fifo, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .bd import (
    BD_INDEX_BITS,
    BD_LAYOUT,
    DIMS,
    LOCK_VALUE_BITS,
    MAX_BDS,
    PAD_DIMS,
    SIZE_BITS,
)
from .locks import LockOp, check_int, lock_port_signature

__all__ = ["DIRECTIONS", "Datamover", "mem_read_signature", "mem_write_signature"]

DIRECTIONS = ("mm2s", "s2mm")
#: Width of the dimension counters: pad_before + size + pad_after <= 255 + 65535 + 255.
_CNT_BITS = SIZE_BITS + 1


def mem_read_signature(addr_bits: int, word_bits: int) -> wiring.Signature:
    """Memory read port of an MM2S channel, from the channel's side.

    ``addr``/``re`` out, ``ready`` (the arbiter's grant) in, ``rdata`` in: valid the cycle after
    a cycle with ``re & ready``.
    """
    return wiring.Signature({
        "addr": Out(addr_bits),
        "re": Out(1),
        "ready": In(1),
        "rdata": In(word_bits),
    })


def mem_write_signature(addr_bits: int, word_bits: int) -> wiring.Signature:
    """Memory write port of an S2MM channel, from the channel's side.

    ``addr``/``we``/``wdata`` out, ``ready`` in: the write is performed in a cycle with
    ``we & ready``.
    """
    return wiring.Signature({
        "addr": Out(addr_bits),
        "we": Out(1),
        "wdata": Out(word_bits),
        "ready": In(1),
    })


class Datamover(wiring.Component):
    """One datamover (DMA) channel.

    Parameters
    ----------
    direction : {"mm2s", "s2mm"}
        Memory to stream or stream to memory.
    addr_bits : int
        Word address width of the memory port, 1 to 32.
    word_bits : int
        Width of a memory word and of a stream word, 1 to 4096.
    n_bds : int
        Buffer descriptors held, 1 to 64 (AIE-ML: 16 per tile channel group, 48 per memtile).
    dims : int
        Dimensions implemented, 1 to 4 (AIE-ML tile DMA 3, memtile 4); BD fields of higher
        dimensions are ignored (read as size 1, no padding).
    lock_value_bits : int
        ``value_bits`` of the lock unit on the ``lock`` port (BD lock values are 6 bits and
        are zero-extended or truncated to it).
    task_depth : int
        Tasks the queue holds, 1 to 64.
    skid_depth : int
        MM2S output FIFO depth, 3 to 4096 (3 sustains one word per cycle; more lets the
        channel read ahead while its stream is held up, e.g. the shim's DDR channels while
        another channel's packet holds a bus).

    Members
    -------
    bd_we, bd_addr, bd_wdata : In
        Write BD ``bd_addr`` (``BD_LAYOUT``); indices ``>= n_bds`` are ignored. Write BDs only
        while no task uses them.
    task : In(stream.Signature(BD_INDEX_BITS))
        Queue a task: the payload is the index of its first BD.
    busy : Out(1)
        A task is queued or running, or (MM2S) words are still on their way to the stream.
    tasks_done : Out(16)
        Tasks completed since reset (wraps): incremented when a task's last BD has done its
        last memory access and its release.
    error : Out(1)
        Sticky: a task or chain named a BD ``>= n_bds``; that task was dropped.
    mem : Out(mem_read_signature) for MM2S, Out(mem_write_signature) for S2MM
        The memory port.
    o : Out(stream.Signature(word_bits))
        MM2S only: the output stream.
    i : In(stream.Signature(word_bits))
        S2MM only: the input stream.
    lock : Out(lock_port_signature(lock_value_bits))
        The lock port (to a :class:`tilewright.hw.locks.LockUnit`).

    Raises
    ------
    TypeError, ValueError
        If a parameter has the wrong type or is out of range.
    """

    def __init__(self, direction: str, *, addr_bits: int, word_bits: int, n_bds: int = 16,
                 dims: int = DIMS, lock_value_bits: int = LOCK_VALUE_BITS, task_depth: int = 4,
                 skid_depth: int = 4) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'mm2s' or 's2mm', not {direction!r}")
        self.direction = direction
        self.addr_bits = check_int("addr_bits", addr_bits, 1, 32)
        self.word_bits = check_int("word_bits", word_bits, 1, 4096)
        self.n_bds = check_int("n_bds", n_bds, 1, MAX_BDS)
        self.dims = check_int("dims", dims, 1, DIMS)
        self.lock_value_bits = check_int("lock_value_bits", lock_value_bits, 1, 16)
        self.task_depth = check_int("task_depth", task_depth, 1, 64)
        self.skid_depth = check_int("skid_depth", skid_depth, 3, 4096)
        members = {
            "bd_we": In(1),
            "bd_addr": In(BD_INDEX_BITS),
            "bd_wdata": In(BD_LAYOUT),
            "task": In(stream.Signature(BD_INDEX_BITS)),
            "busy": Out(1),
            "tasks_done": Out(16),
            "error": Out(1),
            "lock": Out(lock_port_signature(lock_value_bits)),
        }
        if direction == "mm2s":
            members["mem"] = Out(mem_read_signature(addr_bits, word_bits))
            members["o"] = Out(stream.Signature(word_bits))
        else:
            members["mem"] = Out(mem_write_signature(addr_bits, word_bits))
            members["i"] = In(stream.Signature(word_bits))
        super().__init__(members)

    @property
    def pad_dims(self) -> int:
        """Dimensions with padding in this channel (0 for S2MM)."""
        return min(self.dims, PAD_DIMS) if self.direction == "mm2s" else 0

    def elaborate(self, platform):
        m = Module()
        D, AW = self.dims, self.addr_bits
        mm2s = self.direction == "mm2s"

        # ---- BD memory and task queue ------------------------------------------------------
        m.submodules.bdmem = bdmem = memory.Memory(shape=BD_LAYOUT, depth=self.n_bds, init=[])
        bd_wr = bdmem.write_port()
        bd_rd = bdmem.read_port()
        m.d.comb += [
            bd_wr.addr.eq(self.bd_addr),
            bd_wr.data.eq(self.bd_wdata),
            bd_wr.en.eq(self.bd_we & (self.bd_addr < self.n_bds)),
        ]
        m.submodules.tasks = tq = fifo.SyncFIFO(width=BD_INDEX_BITS, depth=self.task_depth)
        m.d.comb += [
            tq.w_data.eq(self.task.payload),
            tq.w_en.eq(self.task.valid),
            self.task.ready.eq(tq.w_rdy),
        ]

        # ---- the current BD (datapath registers: no reset) -----------------------------------
        cur = Signal(BD_LAYOUT, reset_less=True)
        lo = [Signal(8, name=f"lo{d}", reset_less=True) for d in range(D)]
        hi = [Signal(_CNT_BITS, name=f"hi{d}", reset_less=True) for d in range(D)]
        last = [Signal(_CNT_BITS, name=f"last{d}", reset_less=True) for d in range(D)]
        idx = [Signal(_CNT_BITS, name=f"i{d}", reset_less=True) for d in range(D)]
        raddr = [Signal(AW, name=f"r{d}", reset_less=True) for d in range(D)]

        # ---- element walk ----------------------------------------------------------------------
        padded = [d < self.pad_dims for d in range(D)]
        wrap = [idx[d] == last[d] for d in range(D)]
        in_range = Signal()
        m.d.comb += in_range.eq(1)
        for d in range(D):
            if padded[d]:
                with m.If((idx[d] < lo[d]) | (idx[d] >= hi[d])):
                    m.d.comb += in_range.eq(0)
        # r_d moves by stride_d when dimension d steps from a data position (past the last one
        # only zeros follow until the dimension wraps and r_d is reloaded from above, so the
        # address there does not matter)
        step = [(idx[d] >= lo[d]) if padded[d] else 1 for d in range(D)]
        nxt = [Signal(AW, name=f"r{d}_next") for d in range(D)]
        for d in range(D):
            m.d.comb += nxt[d].eq(Mux(step[d], raddr[d] + cur.dim[d].stride, raddr[d]))
        # the new r_d: nxt of the lowest dimension >= d that does not wrap
        top = [Signal(AW, name=f"r{d}_new") for d in range(D)]
        for d in reversed(range(D)):
            above = top[d + 1] if d + 1 < D else raddr[d]
            m.d.comb += top[d].eq(Mux(wrap[d], above, nxt[d]))
        carry = [Signal(name=f"carry{d}") for d in range(D + 1)]
        m.d.comb += carry[0].eq(1)
        for d in range(D):
            m.d.comb += carry[d + 1].eq(carry[d] & wrap[d])
        last_elem = carry[D]
        fire = Signal()      # the current element is done this cycle
        with m.If(fire):
            for d in range(D):
                with m.If(carry[d]):
                    m.d.sync += [idx[d].eq(Mux(wrap[d], 0, idx[d] + 1)), raddr[d].eq(top[d])]

        # ---- MM2S read stage and skid FIFO / S2MM pass-through ------------------------------
        running = Signal()
        if mm2s:
            skid = fifo.SyncFIFO(width=self.word_bits, depth=self.skid_depth)
            m.submodules.skid = skid
            s1_valid = Signal()
            s1_pad = Signal(reset_less=True)
            room = (skid.level + s1_valid) < self.skid_depth
            m.d.comb += [
                self.mem.addr.eq(raddr[0]),
                self.mem.re.eq(running & in_range & room),
                fire.eq(running & room & (~in_range | self.mem.ready)),
            ]
            m.d.sync += s1_valid.eq(fire)
            with m.If(fire):
                m.d.sync += s1_pad.eq(~in_range)
            m.d.comb += [
                skid.w_en.eq(s1_valid),
                skid.w_data.eq(Mux(s1_pad, 0, self.mem.rdata)),
                self.o.valid.eq(skid.r_rdy),
                self.o.payload.eq(skid.r_data),
                skid.r_en.eq(self.o.ready),
            ]
            draining = s1_valid | skid.r_rdy
        else:
            m.d.comb += [
                self.mem.addr.eq(raddr[0]),
                self.mem.wdata.eq(self.i.payload),
                self.mem.we.eq(running & self.i.valid),
                self.i.ready.eq(running & self.mem.ready),
                fire.eq(running & self.i.valid & self.mem.ready),
            ]
            draining = 0

        # ---- control ---------------------------------------------------------------------------
        bd_idx = Signal(BD_INDEX_BITS)

        def start_bd(index):
            """Read BD ``index`` (its data arrives in LOAD), or drop the task."""
            with m.If(index < self.n_bds):
                m.d.comb += bd_rd.addr.eq(index)
                m.d.sync += bd_idx.eq(index)
                m.next = "LOAD"
            with m.Else():
                m.d.sync += self.error.eq(1)
                m.next = "IDLE"

        def end_bd():
            with m.If(cur.chain):
                start_bd(cur.next_bd)
            with m.Else():
                m.d.sync += self.tasks_done.eq(self.tasks_done + 1)
                m.next = "IDLE"

        vb = self.lock_value_bits
        with m.FSM() as fsm:
            with m.State("IDLE"), m.If(tq.r_rdy):
                m.d.comb += tq.r_en.eq(1)
                start_bd(tq.r_data)
            with m.State("LOAD"):
                bd = bd_rd.data
                m.d.sync += cur.eq(bd)
                for d in range(D):
                    size = Mux(bd.dim[d].size == 0, 1, bd.dim[d].size)
                    before = bd.pad[d].before if padded[d] else 0
                    after = bd.pad[d].after if padded[d] else 0
                    m.d.sync += [
                        lo[d].eq(before),
                        hi[d].eq(before + size),
                        last[d].eq(before + size + after - 1),
                        idx[d].eq(0),
                        raddr[d].eq(bd.base[:AW]),
                    ]
                with m.If(bd.acq.en):
                    m.next = "ACQ"
                with m.Else():
                    m.next = "RUN"
            with m.State("ACQ"):
                m.d.comb += [
                    self.lock.req.eq(1),
                    self.lock.op.eq(LockOp.ACQUIRE),
                    self.lock.id.eq(cur.acq.id),
                    self.lock.val.eq(cur.acq.value[:vb]),
                ]
                with m.If(self.lock.gnt):
                    m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += running.eq(1)
                with m.If(fire & last_elem):
                    with m.If(cur.rel.en):
                        m.next = "REL"
                    with m.Else():
                        end_bd()
            with m.State("REL"):
                m.d.comb += [
                    self.lock.req.eq(1),
                    self.lock.op.eq(LockOp.RELEASE),
                    self.lock.id.eq(cur.rel.id),
                    self.lock.val.eq(cur.rel.value[:vb]),
                ]
                with m.If(self.lock.gnt):
                    end_bd()
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE") | tq.r_rdy | draining)
        return m
