"""Packet-switched streams for the overlay's stream network (Amaranth 0.5).

Every stream is :func:`amaranth.lib.stream.Signature` ``(word_bits)`` (valid/ready/payload; a
word moves in a cycle with ``valid & ready``). A *packet* is one header word followed by ``L``
payload words, ``L = header[15:0]`` (0 to 65535; ``L = 0`` is a header-only packet). The
header bits from :data:`LEN_BITS` up are routing fields whose meaning depends on the component:

* :class:`PacketSplit`: bits ``sel_lo .. sel_lo + n_out - 1`` select the outputs (multicast);
* :class:`PacketMerge`: none (the header is forwarded unchanged);
* :class:`DdrWriter`: bits 16 up are the word address of the first payload word.

:class:`StreamBroadcast` has no notion of packets: it copies every word to every output.

Timing, common to all four components: the forward path (``valid``, ``payload``, and
``we``/``addr``/``wdata`` of :class:`DdrWriter`) comes straight from registers, one register
stage deep, so a word accepted in cycle ``t`` is offered on the outputs from cycle ``t + 1``.
``ready`` is combinational (an input's ``ready`` depends on the outputs' ``ready`` in the same
cycle), and no ``valid`` depends on any ``ready``. With the outputs always ready every
component sustains one word per cycle, headers included, with no bubble between packets:
``N`` input words leave in ``N + 1`` cycles. A fan-out stage keeps one *pending* flag per
output, so each selected output receives each word exactly once, in order, even when the
outputs take it in different cycles; the input advances once every selected output has taken
the held word (the slowest output sets the pace).

:mod:`tilewright.sim.packet_model` holds the Python reference models.
"""

from __future__ import annotations

from amaranth.hdl import Array, Cat, Module, Mux, Signal, Value
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .arbiter import RoundRobin
from .datamover import mem_write_signature
from .locks import check_int

__all__ = [
    "LEN_BITS", "MAX_PORTS", "DdrWriter", "LockingWriter", "PacketMerge", "PacketSplit",
    "StreamBroadcast",
    "header", "write_header",
]

#: Width of the length field ``header[15:0]``; the routing fields start at this bit.
LEN_BITS = 16
#: Most inputs of a :class:`PacketMerge` / outputs of a :class:`StreamBroadcast`.
MAX_PORTS = 64
#: Widest stream word the components accept (the narrowest is 32 bits).
MAX_WORD_BITS = 4096
MIN_WORD_BITS = 32


def _check_word_bits(word_bits: object) -> int:
    return check_int("word_bits", word_bits, MIN_WORD_BITS, MAX_WORD_BITS)


def _header(length: int, route: int, word_bits: int, route_name: str) -> int:
    word_bits = _check_word_bits(word_bits)
    check_int("length", length, 0, (1 << LEN_BITS) - 1)
    check_int(route_name, route, 0, (1 << (word_bits - LEN_BITS)) - 1)
    return (route << LEN_BITS) | length


def header(length: int, route: int = 0, *, word_bits: int) -> int:
    """A packet header word.

    Parameters
    ----------
    length : int
        Payload words that follow the header, 0 to 65535.
    route : int
        The routing fields, placed at bit :data:`LEN_BITS` upward: 0 to
        ``2**(word_bits - 16) - 1``. For a :class:`PacketSplit` with ``sel_lo = s`` the output
        mask ``mask`` is ``route = mask << (s - 16)``.
    word_bits : int
        Stream word width, 32 to 4096.

    Returns
    -------
    int
        ``route << 16 | length``.

    Raises
    ------
    TypeError, ValueError
        If an argument is not an integer or is out of range.
    """
    return _header(length, route, word_bits, "route")


def write_header(length: int, addr: int, *, word_bits: int) -> int:
    """The header of a :class:`DdrWriter` packet: write ``length`` words from word ``addr``.

    Parameters
    ----------
    length : int
        Payload words, 0 to 65535.
    addr : int
        Word address of the first payload word, 0 to ``2**(word_bits - 16) - 1`` (the writer
        uses its low ``addr_bits``).
    word_bits : int
        Stream word width, 32 to 4096.

    Returns
    -------
    int
        ``addr << 16 | length``.

    Raises
    ------
    TypeError, ValueError
        If an argument is not an integer or is out of range.
    """
    return _header(length, addr, word_bits, "addr")


def _fanout(m: Module, src: wiring.PureInterface, outs: list[wiring.PureInterface],
            sel: Value) -> Signal:
    """One register stage from ``src`` to every output in ``sel``, with per-output pending flags.

    The held word is offered to the outputs whose pending flag is set; a flag clears when its
    output takes the word. ``src`` is taken (``src.ready``) when every pending output takes the
    held word this cycle or none is pending; the new word becomes pending on the outputs in
    ``sel`` (a word with an empty ``sel`` is dropped). Returns the signal that is high in a
    cycle in which ``src`` transfers a word.
    """
    n = len(outs)
    data = Signal(len(src.payload), reset_less=True)
    pending = Signal(n)
    ready = Cat(o.ready for o in outs)
    free = ((pending & ~ready) == 0)
    take = Signal()
    m.d.comb += [src.ready.eq(free), take.eq(src.valid & free)]
    for j, o in enumerate(outs):
        m.d.comb += [o.valid.eq(pending[j]), o.payload.eq(data)]
    with m.If(take):
        m.d.sync += [data.eq(src.payload), pending.eq(sel)]
    with m.Else():
        m.d.sync += pending.eq(pending & ~ready)
    return take


class _PacketCounter:
    """Tracks packet boundaries of a stream: ``in_packet`` is high while payload words of the
    current packet are still to come; :meth:`step` advances it by one transferred word."""

    def __init__(self, m: Module, name: str = "") -> None:
        self.m = m
        self.in_packet = Signal(name=f"{name}in_packet")
        self.left = Signal(LEN_BITS, name=f"{name}left", reset_less=True)

    def step(self, word: Value) -> None:
        """Call inside the ``If`` of a cycle in which ``word`` is transferred."""
        m, length = self.m, word[:LEN_BITS]
        with m.If(self.in_packet):
            m.d.sync += [self.left.eq(self.left - 1), self.in_packet.eq(self.left != 1)]
        with m.Else():
            m.d.sync += [self.left.eq(length), self.in_packet.eq(length != 0)]


class PacketSplit(wiring.Component):
    """Routes each packet to the outputs selected by its header (multicast).

    A packet goes to every output ``j`` whose header bit ``sel_lo + j`` is set; the header
    (unless ``strip``) and each payload word are held in one register and offered to all
    selected outputs at once, each taking it once, in its own cycle (per-output pending flags);
    the next word is taken from ``i`` when every selected output has taken the held one. A
    packet with no selected output is consumed and dropped at one word per cycle.

    Timing: a word accepted in cycle ``t`` is offered from cycle ``t + 1``. One word per cycle
    when every selected output is ready; a stripped header takes one input cycle and produces
    no output word.

    Parameters
    ----------
    word_bits : int
        Stream word width, 32 to 4096.
    n_out : int
        Outputs, 1 to ``word_bits - 16``.
    sel_lo : int
        Header bit of output 0's select flag, 16 to ``word_bits - n_out``.
    strip : bool
        Drop the header: outputs receive the payload words only.
    one_of : bool
        Two outputs selected by one header bit instead of a mask (``n_out`` must be 2): a
        packet goes to output 1 if header bit ``sel_lo`` is set, else to output 0.

    Members
    -------
    i : In(stream.Signature(word_bits))
        The input packets.
    o : Out(stream.Signature(word_bits)).array(n_out)
        The outputs.

    Raises
    ------
    TypeError, ValueError
        If a parameter has the wrong type or is out of range.
    """

    def __init__(self, word_bits: int, n_out: int, sel_lo: int = LEN_BITS,
                 strip: bool = False, *, one_of: bool = False) -> None:
        self.word_bits = _check_word_bits(word_bits)
        self.n_out = check_int("n_out", n_out, 1, word_bits - LEN_BITS)
        if not isinstance(one_of, bool):
            raise TypeError(f"one_of must be a bool, not {one_of!r}")
        if one_of and n_out != 2:
            raise ValueError(f"a one_of PacketSplit has 2 outputs, not {n_out}")
        self.one_of = one_of
        self.sel_lo = check_int("sel_lo", sel_lo, LEN_BITS,
                                word_bits - (1 if one_of else n_out))
        if not isinstance(strip, bool):
            raise TypeError(f"strip must be a bool, not {strip!r}")
        self.strip = strip
        super().__init__({
            "i": In(stream.Signature(word_bits)),
            "o": Out(stream.Signature(word_bits)).array(n_out),
        })

    def elaborate(self, platform):
        m = Module()
        pkt = _PacketCounter(m)
        mask = Signal(self.n_out, reset_less=True)
        if self.one_of:
            bit = self.i.payload[self.sel_lo]
            hdr_mask = Cat(~bit, bit)
        else:
            hdr_mask = self.i.payload[self.sel_lo:self.sel_lo + self.n_out]
        sel = Mux(pkt.in_packet, mask, 0 if self.strip else hdr_mask)
        take = _fanout(m, self.i, list(self.o), sel)
        with m.If(take):
            pkt.step(self.i.payload)
            with m.If(~pkt.in_packet):
                m.d.sync += mask.eq(hdr_mask)
        return m


class StreamBroadcast(wiring.Component):
    """Copies every word of one stream to ``n_out`` outputs (no packet awareness).

    The word is held in one register and offered to every output; each output takes it once,
    in its own cycle (per-output pending flags), and the next word is taken when all have.

    Timing: a word accepted in cycle ``t`` is offered from cycle ``t + 1``; one word per cycle
    when every output is ready.

    Parameters
    ----------
    word_bits : int
        Stream word width, 32 to 4096.
    n_out : int
        Outputs, 1 to 64.

    Members
    -------
    i : In(stream.Signature(word_bits))
        The input.
    o : Out(stream.Signature(word_bits)).array(n_out)
        The outputs.

    Raises
    ------
    TypeError, ValueError
        If a parameter has the wrong type or is out of range.
    """

    def __init__(self, word_bits: int, n_out: int) -> None:
        self.word_bits = _check_word_bits(word_bits)
        self.n_out = check_int("n_out", n_out, 1, MAX_PORTS)
        super().__init__({
            "i": In(stream.Signature(word_bits)),
            "o": Out(stream.Signature(word_bits)).array(n_out),
        })

    def elaborate(self, platform):
        m = Module()
        _fanout(m, self.i, list(self.o), (1 << self.n_out) - 1)
        return m


class PacketMerge(wiring.Component):
    """Merges ``n_in`` packet streams into one, round robin at packet granularity.

    Between packets, the input that supplies the next header is the first input after the one
    that supplied the last packet (cyclically; input 0 first after reset) that offers a word.
    Once a header is taken from input ``k``, the ``L`` payload words of that packet come from
    input ``k`` only (the other inputs wait, even if ``k`` leaves gaps). Headers are forwarded
    unchanged.

    Timing: one output register; a word accepted in cycle ``t`` is offered from cycle
    ``t + 1``. One word per cycle when the output is ready and the inputs offer words, with no
    bubble between packets of the same or of different inputs.

    Parameters
    ----------
    word_bits : int
        Stream word width, 32 to 4096.
    n_in : int
        Inputs, 1 to 64.

    Members
    -------
    i : In(stream.Signature(word_bits)).array(n_in)
        The input packet streams.
    o : Out(stream.Signature(word_bits))
        The merged packets.

    Raises
    ------
    TypeError, ValueError
        If a parameter has the wrong type or is out of range.
    """

    def __init__(self, word_bits: int, n_in: int) -> None:
        self.word_bits = _check_word_bits(word_bits)
        self.n_in = check_int("n_in", n_in, 1, MAX_PORTS)
        super().__init__({
            "i": In(stream.Signature(word_bits)).array(n_in),
            "o": Out(stream.Signature(word_bits)),
        })

    def elaborate(self, platform):
        m = Module()
        n = self.n_in
        m.submodules.arbiter = rr = RoundRobin(n)
        pkt = _PacketCounter(m)
        cur = Signal(range(n))          # the input of the packet in progress

        valids = Cat(p.valid for p in self.i)
        src = Signal(range(n))
        src_valid = Signal()
        m.d.comb += rr.req.eq(valids)
        with m.If(pkt.in_packet):
            m.d.comb += [src.eq(cur), src_valid.eq(valids.bit_select(cur, 1))]
        with m.Else():
            m.d.comb += [src.eq(rr.pick), src_valid.eq(rr.found)]
        word = Array(p.payload for p in self.i)[src]

        full = Signal()
        data = Signal(self.word_bits, reset_less=True)
        free = ~full | self.o.ready
        take = Signal()
        m.d.comb += [
            self.o.valid.eq(full),
            self.o.payload.eq(data),
            take.eq(src_valid & free),
            rr.served.eq(take & ~pkt.in_packet),
        ]
        for k, p in enumerate(self.i):
            m.d.comb += p.ready.eq(free & (src == k))
        with m.If(take):
            m.d.sync += [full.eq(1), data.eq(word)]
            pkt.step(word)
            with m.If(~pkt.in_packet):
                m.d.sync += cur.eq(rr.pick)
        with m.Elif(self.o.ready):
            m.d.sync += full.eq(0)
        return m


class DdrWriter(wiring.Component):
    """Writes the payload of each packet to memory from the address in its header.

    A packet's header holds ``L = header[15:0]`` and the word address ``A = header[16:]``, of
    which the low ``addr_bits`` are used; its payload words are written to ``A``, ``A + 1``,
    ... (modulo ``2**addr_bits``) through ``mem``.

    Timing: a payload word accepted in cycle ``t`` is written from cycle ``t + 1`` on
    (``we``/``addr``/``wdata`` come from a register and are held until ``mem.ready``); a header
    is taken in one cycle and writes nothing, even while the last write of the previous packet
    waits. One word per cycle (headers included) when ``mem.ready`` is always high.

    Parameters
    ----------
    word_bits : int
        Stream and memory word width, 32 to 4096.
    addr_bits : int
        Memory word address width, 1 to ``min(32, word_bits - 16)``.

    Members
    -------
    i : In(stream.Signature(word_bits))
        The packets.
    mem : Out(mem_write_signature(addr_bits, word_bits))
        The memory write port (:func:`tilewright.hw.datamover.mem_write_signature`): a write
        is performed in a cycle with ``we & ready``; a raised ``we`` is held, with ``addr`` and
        ``wdata`` stable, until performed.
    busy : Out(1)
        Payload words of the current packet are still to come, or a write is pending.
    words : Out(32)
        Payload words written since reset (wraps).

    Raises
    ------
    TypeError, ValueError
        If a parameter has the wrong type or is out of range.
    """

    def __init__(self, word_bits: int, addr_bits: int) -> None:
        self.word_bits = _check_word_bits(word_bits)
        self.addr_bits = check_int("addr_bits", addr_bits, 1, min(32, word_bits - LEN_BITS))
        super().__init__({
            "i": In(stream.Signature(word_bits)),
            "mem": Out(mem_write_signature(addr_bits, word_bits)),
            "busy": Out(1),
            "words": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        aw = self.addr_bits
        pkt = _PacketCounter(m)
        nxt = Signal(aw, reset_less=True)        # address of the next payload word
        pending = Signal()
        wr_addr = Signal(aw, reset_less=True)
        wr_data = Signal(self.word_bits, reset_less=True)
        done = pending & self.mem.ready
        # a header never waits; a payload word waits for the write register
        ready = Mux(pkt.in_packet, ~pending | self.mem.ready, 1)
        take = Signal()
        m.d.comb += [
            self.mem.we.eq(pending),
            self.mem.addr.eq(wr_addr),
            self.mem.wdata.eq(wr_data),
            self.i.ready.eq(ready),
            take.eq(self.i.valid & ready),
            self.busy.eq(pkt.in_packet | pending),
        ]
        with m.If(done):
            m.d.sync += self.words.eq(self.words + 1)
        with m.If(take & pkt.in_packet):
            m.d.sync += [
                pending.eq(1),
                wr_addr.eq(nxt),
                wr_data.eq(self.i.payload),
                nxt.eq(nxt + 1),
            ]
        with m.Elif(done):
            m.d.sync += pending.eq(0)
        with m.If(take):
            pkt.step(self.i.payload)
            with m.If(~pkt.in_packet):
                m.d.sync += nxt.eq(self.i.payload[LEN_BITS:LEN_BITS + aw])
        return m


class LockingWriter(wiring.Component):
    """Writes each packet's payload at the address in its header, then releases a lock.

    The tile unit's activation input (S2MM 0): packets from several DDR channels may arrive in
    any order, because each carries where it goes. Header: ``L = header[15:0]``, word address
    ``A = header[16:16 + addr_bits]``, lock ``K = header[16 + addr_bits:][:lock_bits]``; the
    payload goes to ``A, A + 1, ...`` through ``mem``, and once its last word is written the
    writer releases lock ``K`` by 1 (a header-only packet releases at once) -- the consumer
    acquires the lock once per packet it waits for.

    Timing: as :class:`DdrWriter`, except that a header waits until the previous packet's
    writes and release are done, and nothing is taken while a release waits for its grant.

    Members
    -------
    i : In(stream.Signature(word_bits))
    mem : Out(mem_write_signature(addr_bits, word_bits))
    lock : Out(lock_port_signature(6))
        Release requests only.
    busy : Out(1)
        Inside a packet, a write pending or a release waiting.
    """

    def __init__(self, word_bits: int, addr_bits: int, lock_bits: int) -> None:
        from .locks import lock_port_signature

        self.word_bits = _check_word_bits(word_bits)
        self.addr_bits = check_int("addr_bits", addr_bits, 1, 32)
        self.lock_bits = check_int("lock_bits", lock_bits, 1, 6)
        if LEN_BITS + addr_bits + lock_bits > word_bits:
            raise ValueError(f"a {word_bits}-bit header cannot hold a 16-bit length, "
                             f"{addr_bits} address bits and {lock_bits} lock bits")
        super().__init__({
            "i": In(stream.Signature(word_bits)),
            "mem": Out(mem_write_signature(addr_bits, word_bits)),
            "lock": Out(lock_port_signature(6)),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        from .locks import LockOp

        m = Module()
        aw, lb = self.addr_bits, self.lock_bits
        pkt = _PacketCounter(m)
        nxt = Signal(aw, reset_less=True)
        pending = Signal()
        last = Signal()                      # the pending write is its packet's last word
        rel = Signal()                       # a release waits for its grant
        lock_id = Signal(lb, reset_less=True)
        wr_addr = Signal(aw, reset_less=True)
        wr_data = Signal(self.word_bits, reset_less=True)
        done = pending & self.mem.ready
        ready = Signal()
        m.d.comb += ready.eq(~rel & Mux(pkt.in_packet, ~pending | self.mem.ready, ~pending))
        take = self.i.valid & ready
        hdr = self.i.payload
        m.d.comb += [
            self.mem.we.eq(pending), self.mem.addr.eq(wr_addr), self.mem.wdata.eq(wr_data),
            self.i.ready.eq(ready),
            self.lock.req.eq(rel), self.lock.op.eq(LockOp.RELEASE), self.lock.id.eq(lock_id),
            self.lock.val.eq(1),
            self.busy.eq(pkt.in_packet | pending | rel),
        ]
        with m.If(take & pkt.in_packet):
            m.d.sync += [pending.eq(1), wr_addr.eq(nxt), wr_data.eq(self.i.payload),
                         nxt.eq(nxt + 1), last.eq(pkt.left == 1)]
        with m.Elif(done):
            m.d.sync += pending.eq(0)
        with m.If(done & last):
            m.d.sync += rel.eq(1)
        with m.If(take & ~pkt.in_packet):
            m.d.sync += [nxt.eq(hdr[LEN_BITS:LEN_BITS + aw]),
                         lock_id.eq(hdr[LEN_BITS + aw:LEN_BITS + aw + lb])]
            with m.If(hdr[:LEN_BITS] == 0):
                m.d.sync += rel.eq(1)
        with m.If(rel & self.lock.gnt):
            m.d.sync += rel.eq(0)
        with m.If(take):
            pkt.step(self.i.payload)
        return m
