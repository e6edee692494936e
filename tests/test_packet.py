# amaranth: UnusedElaboratable=no
"""Packet-switched streams: the header helpers, the Python models, and the RTL in Amaranth's
simulator against the models (random packets, random input gaps, independent random
back-pressure per output), full-speed throughput, constructor checks and Verilog conversion.

Every random case is seeded and names its seed in the failure message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.lib.wiring import Out
from amaranth.sim import Simulator

from tilewright.hw import packet as hwp
from tilewright.hw.datamover import mem_write_signature
from tilewright.hw.locks import LockOp
from tilewright.hw.packet import (
    LEN_BITS,
    DdrWriter,
    PacketMerge,
    PacketSplit,
    StreamBroadcast,
    header,
    write_header,
)
from tilewright.sim import packet_model as pm

# Stimulus -------------------------------------------------------------------------------------

def _word(rng: np.random.Generator, bits: int) -> int:
    return int.from_bytes(rng.bytes((bits + 7) // 8), "little") & ((1 << bits) - 1)


def _length(rng: np.random.Generator) -> int:
    """Packet lengths with many 0s and 1s, some longer packets."""
    kind = rng.random()
    if kind < 0.2:
        return 0
    if kind < 0.4:
        return 1
    if kind < 0.85:
        return int(rng.integers(2, 7))
    return int(rng.integers(7, 25))


def _packets(rng: np.random.Generator, n: int, word_bits: int,
             route: Callable[[np.random.Generator], int]) -> list[int]:
    words: list[int] = []
    for _ in range(n):
        length = _length(rng)
        words.append(header(length, route(rng), word_bits=word_bits))
        words.extend(_word(rng, word_bits) for _ in range(length))
    return words


def _split_route(word_bits: int, n_out: int, sel_lo: int, *, empty: float = 0.15
                 ) -> Callable[[np.random.Generator], int]:
    """Random routes: junk outside the select field, masks with some empty and full ones."""
    shift, full = sel_lo - LEN_BITS, (1 << n_out) - 1

    def route(rng: np.random.Generator) -> int:
        kind = rng.random()
        mask = 0 if kind < empty else full if kind < empty + 0.15 else _word(rng, n_out)
        junk = _word(rng, word_bits - LEN_BITS) & ~(full << shift)
        return junk | (mask << shift)
    return route


def _any_route(word_bits: int) -> Callable[[np.random.Generator], int]:
    return lambda rng: _word(rng, word_bits - LEN_BITS)


# Simulation harness ---------------------------------------------------------------------------

class _Source:
    """Offers ``words`` on a stream; a raised valid is held, with its payload, until taken."""

    def __init__(self, port, words: Sequence[int], p_valid: float, rng: np.random.Generator,
                 word_bits: int) -> None:
        self.port, self.words, self.p_valid, self.rng = port, list(words), p_valid, rng
        self.word_bits = word_bits
        self.pos = 0
        self.valid = False
        self.took = False
        self.headers: set[int] = set()
        pos = 0
        while pos < len(self.words):
            self.headers.add(pos)
            pos += 1 + pm.packet_length(self.words[pos])

    @property
    def done(self) -> bool:
        return self.pos == len(self.words)

    def drive(self, ctx) -> None:
        if not self.valid and not self.done and self.rng.random() < self.p_valid:
            self.valid = True
        ctx.set(self.port.valid, self.valid)
        # junk on the payload while not valid
        ctx.set(self.port.payload,
                self.words[self.pos] if self.valid else _word(self.rng, self.word_bits))

    def sample(self, ctx) -> None:
        self.took = self.valid and bool(ctx.get(self.port.ready))
        if self.took:
            self.pos += 1
            self.valid = False


class _Sink:
    """Takes words with probability ``p_ready`` a cycle; checks the producer's rules: valid
    does not depend on ready, and an offered word is held until taken."""

    def __init__(self, port, p_ready: float, rng: np.random.Generator) -> None:
        self.port, self.p_ready, self.rng = port, p_ready, rng
        self.got: list[int] = []
        self.held: int | None = None
        self.last_cycle = -1

    def pre(self, ctx) -> None:
        self.valid_before = bool(ctx.get(self.port.valid))

    def drive(self, ctx) -> None:
        self.ready = bool(self.rng.random() < self.p_ready)
        ctx.set(self.port.ready, self.ready)

    def sample(self, ctx, cyc: int, what: str) -> None:
        valid = bool(ctx.get(self.port.valid))
        payload = ctx.get(self.port.payload)
        assert valid == self.valid_before, f"{what}, cycle {cyc}: valid depends on ready"
        if self.held is not None:
            assert valid and payload == self.held, \
                f"{what}, cycle {cyc}: word {self.held:#x} withdrawn before it was taken"
        self.held = None
        if valid and self.ready:
            self.got.append(payload)
            self.last_cycle = cyc
        elif valid:
            self.held = payload


@dataclass
class _Mem:
    """The memory side of a ``mem_write_signature`` port, ready with probability ``p_ready``."""

    port: object
    data: list[int]
    p_ready: float
    rng: np.random.Generator
    held: tuple[int, int] | None = None
    writes: int = 0
    last_cycle: int = -1

    def drive(self, ctx) -> None:
        self.ready = bool(self.rng.random() < self.p_ready)
        ctx.set(self.port.ready, self.ready)

    def sample(self, ctx, cyc: int, what: str) -> None:
        we = bool(ctx.get(self.port.we))
        req = (ctx.get(self.port.addr), ctx.get(self.port.wdata))
        if self.held is not None:
            assert we and req == self.held, \
                f"{what}, cycle {cyc}: write request {self.held} withdrawn before performed"
        self.held = None
        if we and self.ready:
            self.data[req[0]] = req[1]
            self.writes += 1
            self.last_cycle = cyc
        elif we:
            self.held = req


@dataclass
class _Run:
    cycles: int = 0
    sources: list[_Source] = field(default_factory=list)
    sinks: list[_Sink] = field(default_factory=list)


def _simulate(dut, sources: list[_Source], sinks: list[_Sink], what: str, *,
              finished: Callable[[object], bool], mem: _Mem | None = None,
              hook: Callable[[object, int], None] | None = None, max_cycles: int = 20_000,
              tail: int = 4) -> _Run:
    """Run until ``finished(ctx)`` holds after all sources are done, then ``tail`` cycles
    more (output words appearing then are extra words)."""
    run = _Run(sources=sources, sinks=sinks)

    async def bench(ctx):
        stop = None
        for cyc in range(max_cycles):
            for s in sources:
                s.drive(ctx)
            for k in sinks:
                k.pre(ctx)
            for k in sinks:
                k.drive(ctx)
            if mem is not None:
                mem.drive(ctx)
            if hook is not None:
                hook(ctx, cyc)
            for k in sinks:
                k.sample(ctx, cyc, what)
            if mem is not None:
                mem.sample(ctx, cyc, what)
            for s in sources:
                s.sample(ctx)
            await ctx.tick()
            if stop is None and all(s.done for s in sources) and finished(ctx):
                stop = cyc + tail
            if stop is not None and cyc >= stop:
                run.cycles = cyc + 1
                return
        raise AssertionError(f"{what}: not finished within {max_cycles} cycles")

    sim = Simulator(dut)
    sim.add_clock(1e-9)
    sim.add_testbench(bench)
    sim.run()
    return run


def _received(sinks: list[_Sink], want: int) -> Callable[[object], bool]:
    return lambda ctx: sum(len(k.got) for k in sinks) >= want


# Header helpers -------------------------------------------------------------------------------

def test_header_fields():
    assert LEN_BITS == pm.LEN_BITS == 16
    assert header(0, word_bits=32) == 0
    assert header(5, 0xABCD, word_bits=32) == 0xABCD_0005
    assert header(65535, (1 << 48) - 1, word_bits=64) == (1 << 64) - 1
    assert write_header(3, 0x1234, word_bits=32) == 0x1234_0003
    assert pm.packet_length(header(17, 9, word_bits=32)) == 17


@pytest.mark.parametrize("call, exc, msg", [
    (lambda: header(65536, word_bits=32), ValueError,
     "length must be an integer from 0 to 65535, not 65536"),
    (lambda: header(-1, word_bits=32), ValueError,
     "length must be an integer from 0 to 65535, not -1"),
    (lambda: header(1, 1 << 16, word_bits=32), ValueError,
     "route must be an integer from 0 to 65535, not 65536"),
    (lambda: header(1, 1 << 48, word_bits=64), ValueError,
     "route must be an integer from 0 to 281474976710655, not 281474976710656"),
    (lambda: header(1.0, word_bits=32), TypeError, "length must be an integer, not 1.0"),
    (lambda: header(1, word_bits=31), ValueError,
     "word_bits must be an integer from 32 to 4096, not 31"),
    (lambda: write_header(1, -1, word_bits=32), ValueError,
     "addr must be an integer from 0 to 65535, not -1"),
    (lambda: write_header(1, True, word_bits=32), TypeError, "addr must be an integer, not True"),
])
def test_header_validation(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


# The models -----------------------------------------------------------------------------------

def _h(length: int, route: int = 0) -> int:
    return header(length, route, word_bits=32)


def test_packets_cuts_a_stream():
    words = [_h(2), 7, 8, _h(0), _h(1), 9]
    assert pm.packets(words) == [(_h(2), 7, 8), (_h(0),), (_h(1), 9)]
    assert pm.packets([]) == []
    with pytest.raises(ValueError, match="the header at word 3 announces 2 payload words, "
                                         "1 follow"):
        pm.packets([_h(1), 5, _h(0), _h(2), 6])


def test_split_model_by_hand():
    a, b, c, d = _h(2, 0b101 << 2), _h(0, 0b010 << 2), _h(1, 0), _h(1, 0b111 << 2 | 0b11)
    words = [a, 1, 2, b, c, 3, d, 4]
    assert pm.split(words, 3, 18, False) == [[a, 1, 2, d, 4], [b, d, 4], [a, 1, 2, d, 4]]
    assert pm.split(words, 3, 18, True) == [[1, 2, 4], [4], [1, 2, 4]]
    assert pm.split(words, 2, 16, False) == [[d, 4], [d, 4]]   # route bits 16, 17
    with pytest.raises(ValueError, match="n_out must be a positive integer, not 0"):
        pm.split(words, 0, 16, False)


def test_broadcast_model():
    assert pm.broadcast([3, 1, 2], 2) == [[3, 1, 2], [3, 1, 2]]
    assert pm.broadcast([], 3) == [[], [], []]


def test_merge_round_robin_model():
    a = [_h(1, 1), 10, _h(0, 2), _h(2, 3), 11, 12]
    b = [_h(0, 4)]
    c = [_h(1, 5), 13, _h(0, 6)]
    assert pm.merge_round_robin([a, b, c]) == [
        _h(1, 1), 10, _h(0, 4), _h(1, 5), 13, _h(0, 2), _h(0, 6), _h(2, 3), 11, 12]
    assert pm.merge_round_robin([[], a]) == a


def test_check_merge_accepts_merges():
    a = [_h(1, 1), 10, _h(0, 2)]
    b = [_h(2, 3), 20, 21]
    pm.check_merge([a, b], a + b)
    pm.check_merge([a, b], b + a)
    pm.check_merge([a, b], a[:2] + b + a[2:])
    pm.check_merge([a, []], a)
    pm.check_merge([[], []], [])
    # equal packets on two inputs: only one of the two assignments works
    p, x, y = [_h(1), 5], [_h(0, 1)], [_h(0, 2)]
    pm.check_merge([p + x, p + y], p + y + p + x)
    pm.check_merge([p + x, p + y], p + p + x + y)


@pytest.mark.parametrize("out, msg", [
    ("missing", "the output holds 2 packets, the inputs 3"),
    ("extra", "the output holds 4 packets, the inputs 3"),
    ("order", r"output packet 0 \(from word 0, header 0x20000, 0 payload words\) is not the "
              "next packet of any input"),
    ("interleaved", r"output packet 0 \(from word 0, header 0x10002, 2 payload words\) is not"),
    ("truncated", "the merged output is not a packet stream: the stream ends inside a packet"),
    ("corrupt", "output packet 2 .* is not the next packet of any input"),
])
def test_check_merge_rejects(out, msg):
    a = [_h(1, 1), 10, _h(0, 2)]
    b = [_h(2, 3), 20, 21]
    # payload words that read as header-only packets: b's header inside a's packet still
    # cuts into whole packets
    c, d = [_h(2, 1), _h(0, 5), _h(0, 6)], [_h(0, 3)]
    inputs, bad = {
        "missing": ([a, b], a),
        "extra": ([a, b], [*a, *b, _h(0, 2)]),
        "order": ([a, b], [a[2], *a[:2], *b]),
        "interleaved": ([c, d], [c[0], c[1], d[0], c[2]]),
        "truncated": ([a, b], a + b[:2]),
        "corrupt": ([a, b], [*a, b[0], 20, 22]),
    }[out]
    with pytest.raises(AssertionError, match=msg):
        pm.check_merge(inputs, bad)


def test_ddr_write_model():
    mem = np.zeros(8, dtype=np.uint64)
    words = [write_header(3, 2, word_bits=32), 7, 8, 9, write_header(0, 5, word_bits=32),
             write_header(1, 3, word_bits=32), 1]
    out = pm.ddr_write(words, mem)
    assert out.tolist() == [0, 0, 7, 1, 9, 0, 0, 0] and not mem.any()
    # with addr_bits = 3: address 13 is 5, and the packet wraps from 7 to 0
    out = pm.ddr_write([write_header(4, 13, word_bits=32), 1, 2, 3, 4], mem, addr_bits=3)
    assert out.tolist() == [4, 0, 0, 0, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="address 8 is outside the memory of 8 words"):
        pm.ddr_write([write_header(2, 7, word_bits=32), 1, 2], mem)


# Constructors and conversion ------------------------------------------------------------------

@pytest.mark.parametrize("make, exc, msg", [
    (lambda: PacketSplit(32, 0), ValueError, "n_out must be an integer from 1 to 16, not 0"),
    (lambda: PacketSplit(32, 17), ValueError, "n_out must be an integer from 1 to 16, not 17"),
    (lambda: PacketSplit(32, 4, 15), ValueError,
     "sel_lo must be an integer from 16 to 28, not 15"),
    (lambda: PacketSplit(32, 4, 29), ValueError,
     "sel_lo must be an integer from 16 to 28, not 29"),
    (lambda: PacketSplit(32, 4, 16, 1), TypeError, "strip must be a bool, not 1"),
    (lambda: PacketSplit(16, 1), ValueError,
     "word_bits must be an integer from 32 to 4096, not 16"),
    (lambda: PacketSplit(32.0, 1), TypeError, "word_bits must be an integer, not 32.0"),
    (lambda: PacketMerge(32, 0), ValueError, "n_in must be an integer from 1 to 64, not 0"),
    (lambda: PacketMerge(32, 65), ValueError, "n_in must be an integer from 1 to 64, not 65"),
    (lambda: PacketMerge(32, True), TypeError, "n_in must be an integer, not True"),
    (lambda: StreamBroadcast(32, 0), ValueError,
     "n_out must be an integer from 1 to 64, not 0"),
    (lambda: StreamBroadcast("32", 2), TypeError, "word_bits must be an integer, not '32'"),
    (lambda: DdrWriter(32, 17), ValueError, "addr_bits must be an integer from 1 to 16, not 17"),
    (lambda: DdrWriter(64, 33), ValueError, "addr_bits must be an integer from 1 to 32, not 33"),
    (lambda: DdrWriter(32, 0), ValueError, "addr_bits must be an integer from 1 to 16, not 0"),
    (lambda: DdrWriter(4097, 8), ValueError,
     "word_bits must be an integer from 32 to 4096, not 4097"),
])
def test_constructor_validation(make, exc, msg):
    with pytest.raises(exc, match=msg):
        make()


def test_signatures():
    sp = PacketSplit(64, 3, 40, strip=True)
    assert (sp.word_bits, sp.n_out, sp.sel_lo, sp.strip) == (64, 3, 40, True)
    assert len(sp.o) == 3 and len(sp.i.payload) == 64
    assert len(PacketMerge(32, 5).i) == 5
    assert len(StreamBroadcast(32, 2).o) == 2
    dw = DdrWriter(32, 12)
    members = dw.signature.members
    assert members["mem"] == Out(mem_write_signature(12, 32))
    assert members["busy"] == Out(1) and members["words"] == Out(32)
    assert set(hwp.__all__) >= {"PacketSplit", "PacketMerge", "StreamBroadcast", "DdrWriter",
                                "header", "write_header", "LEN_BITS"}


@pytest.mark.parametrize("make", [
    lambda: PacketSplit(32, 4, 20),
    lambda: PacketSplit(64, 1, 63, strip=True),
    lambda: PacketMerge(32, 3),
    lambda: PacketMerge(64, 1),
    lambda: StreamBroadcast(32, 3),
    lambda: DdrWriter(64, 20),
], ids=["split", "split-strip", "merge", "merge-1", "broadcast", "ddr-writer"])
def test_converts_to_verilog(make):
    text = verilog.convert(make(), name="x")
    assert "module x" in text


# PacketSplit ----------------------------------------------------------------------------------

SPLIT_CASES = [
    # word_bits, n_out, sel_lo, strip
    (32, 4, 16, False),
    (32, 3, 21, True),
    (64, 5, 59, False),     # the select field ends at the top bit
    (64, 1, 40, True),
    (32, 2, 30, False),
]


def _run_split(word_bits: int, n_out: int, sel_lo: int, strip: bool, seed: int, *,
               n_packets: int, p_valid: float | None, p_ready: list[float] | None,
               empty: float = 0.15, one_of: bool = False) -> tuple[list[int], _Run, str]:
    rng = np.random.default_rng(seed)
    what = (f"PacketSplit({word_bits}, {n_out}, {sel_lo}, strip={strip}, one_of={one_of}), "
            f"seed {seed}")
    words = _packets(rng, n_packets, word_bits, _split_route(word_bits, 1 if one_of else n_out,
                                                              sel_lo, empty=empty))
    if p_valid is None:
        p_valid = float(rng.uniform(0.4, 1.0))
    if p_ready is None:   # independent per output, some outputs always ready
        p_ready = [1.0 if rng.random() < 0.2 else float(rng.uniform(0.2, 0.95))
                   for _ in range(n_out)]
    dut = PacketSplit(word_bits, n_out, sel_lo, strip, one_of=one_of)
    src = _Source(dut.i, words, p_valid, rng, word_bits)
    sinks = [_Sink(dut.o[j], p_ready[j], rng) for j in range(n_out)]
    want = pm.split(words, n_out, sel_lo, strip, one_of=one_of)
    run = _simulate(dut, [src], sinks, what,
                    finished=_received(sinks, sum(len(w) for w in want)))
    for j in range(n_out):
        assert sinks[j].got == want[j], \
            f"{what}: output {j} got {len(sinks[j].got)} words, model {len(want[j])}"
    return words, run, what


@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize("word_bits, n_out, sel_lo, strip", SPLIT_CASES)
def test_split_random(word_bits, n_out, sel_lo, strip, seed):
    words, _, what = _run_split(word_bits, n_out, sel_lo, strip, seed, n_packets=50,
                                p_valid=None, p_ready=None)
    hdrs = [p[0] for p in pm.packets(words)]
    masks = [(h >> sel_lo) & ((1 << n_out) - 1) for h in hdrs]
    assert 0 in masks and any(len(p) == 2 for p in pm.packets(words)), \
        f"{what}: the case must hold empty masks and 1-word packets"


@pytest.mark.parametrize("seed", [14, 15])
@pytest.mark.parametrize("word_bits, sel_lo, strip", [(32, 31, False), (64, 43, True)])
def test_split_one_of_random(word_bits, sel_lo, strip, seed):
    """A one_of split (the overlay's DDR-or-memtile choice of an output packet) against the
    model under random back-pressure; both outputs must get packets."""
    words, _, what = _run_split(word_bits, 2, sel_lo, strip, seed, n_packets=50,
                                p_valid=None, p_ready=None, one_of=True)
    bits = {(p[0] >> sel_lo) & 1 for p in pm.packets(words)}
    assert bits == {0, 1}, f"{what}: the case must send packets both ways"


def test_split_one_of_checks():
    assert pm.split([header(1, 1 << 3, word_bits=32), 7, header(0, 0, word_bits=32)], 2, 19,
                    False, one_of=True) == [[header(0, 0, word_bits=32)],
                                            [header(1, 1 << 3, word_bits=32), 7]]
    with pytest.raises(ValueError, match="2 outputs, not 3"):
        PacketSplit(32, 3, 20, one_of=True)
    with pytest.raises(ValueError, match="sel_lo"):
        PacketSplit(32, 2, 32, one_of=True)
    PacketSplit(32, 2, 31, one_of=True)    # the top bit selects


@pytest.mark.parametrize("strip", [False, True])
def test_split_full_speed(strip):
    """One input word per cycle: N words (headers, and packets to no output, included) take
    N + 1 cycles, the last output word leaving in cycle N."""
    rng = np.random.default_rng(21)
    n_out, sel_lo = 3, 18
    words = _packets(rng, 40, 32, _split_route(32, n_out, sel_lo, empty=0.2))
    words += [header(2, 0b111 << 2, word_bits=32), 5, 6]   # the last word goes everywhere
    dut = PacketSplit(32, n_out, sel_lo, strip)
    src = _Source(dut.i, words, 1.0, rng, 32)
    sinks = [_Sink(dut.o[j], 1.0, rng) for j in range(n_out)]
    want = pm.split(words, n_out, sel_lo, strip)
    _simulate(dut, [src], sinks, "seed 21", finished=_received(sinks, sum(map(len, want))))
    assert [k.got for k in sinks] == want, f"strip={strip}, seed 21"
    n = len(words)
    assert [k.last_cycle for k in sinks] == [n] * n_out, \
        f"strip={strip}, seed 21: {n} words, last output words in cycles " \
        f"{[k.last_cycle for k in sinks]}, want {n}"


def test_split_slow_output_does_not_repeat_words():
    """One output almost never ready, the others always: each takes each word once."""
    _run_split(32, 3, 16, False, 31, n_packets=15, p_valid=1.0, p_ready=[1.0, 0.1, 1.0],
               empty=0.0)


# StreamBroadcast ------------------------------------------------------------------------------

@pytest.mark.parametrize("word_bits, n_out, seed", [
    (32, 3, 41), (64, 1, 42), (32, 4, 43), (32, 2, 46),
])
def test_broadcast_random(word_bits, n_out, seed):
    rng = np.random.default_rng(seed)
    what = f"StreamBroadcast({word_bits}, {n_out}), seed {seed}"
    words = [_word(rng, word_bits) for _ in range(200)]
    dut = StreamBroadcast(word_bits, n_out)
    src = _Source(dut.i, words, float(rng.uniform(0.4, 1.0)), rng, word_bits)
    sinks = [_Sink(dut.o[j], float(rng.uniform(0.2, 1.0)), rng) for j in range(n_out)]
    _simulate(dut, [src], sinks, what, finished=_received(sinks, n_out * len(words)))
    assert [k.got for k in sinks] == pm.broadcast(words, n_out), what


def test_broadcast_full_speed():
    rng = np.random.default_rng(44)
    words = [_word(rng, 32) for _ in range(150)]
    dut = StreamBroadcast(32, 3)
    src = _Source(dut.i, words, 1.0, rng, 32)
    sinks = [_Sink(dut.o[j], 1.0, rng) for j in range(3)]
    _simulate(dut, [src], sinks, "seed 44", finished=_received(sinks, 3 * len(words)))
    assert [k.got for k in sinks] == pm.broadcast(words, 3), "seed 44"
    assert [k.last_cycle for k in sinks] == [len(words)] * 3, "seed 44: not 1 word per cycle"


def test_broadcast_outputs_take_in_different_cycles():
    """Output 0 is ready in even cycles, output 1 in odd ones: they never take a word in the
    same cycle, and each word still moves on within 2 cycles (per-output pending flags)."""
    rng = np.random.default_rng(45)
    words = [_word(rng, 32) for _ in range(60)]
    dut = StreamBroadcast(32, 2)
    src = _Source(dut.i, words, 1.0, rng, 32)
    sinks = [_Sink(dut.o[j], 1.0, rng) for j in range(2)]

    def alternate(ctx, cyc: int) -> None:
        # the sinks drew their ready already; override it (the sinks only read self.ready)
        for j, k in enumerate(sinks):
            k.ready = cyc % 2 == j
            ctx.set(k.port.ready, k.ready)

    _simulate(dut, [src], sinks, "seed 45", finished=_received(sinks, 2 * len(words)),
              hook=alternate, max_cycles=2 * len(words) + 20)
    assert [k.got for k in sinks] == pm.broadcast(words, 2), "seed 45"
    assert max(k.last_cycle for k in sinks) <= 2 * len(words) + 2, \
        f"seed 45: {len(words)} words took until cycle {max(k.last_cycle for k in sinks)}"


# PacketMerge ----------------------------------------------------------------------------------

def _merge_arbitration_check(sources: list[_Source], what: str) -> Callable[[object, int], None]:
    """Checks each cycle (before the cycle's transfers) that at most one input moves, that a
    packet's words come from one input, and that a header is taken from the first input after
    the last one served (cyclically) that offers one."""
    state = {"last": len(sources) - 1, "cur": None}
    n = len(sources)

    def after(cyc: int) -> None:
        moved = [k for k, s in enumerate(sources) if s.took]
        assert len(moved) <= 1, f"{what}, cycle {cyc}: inputs {moved} moved at once"
        if not moved:
            return
        k = moved[0]
        if state["cur"] is not None:
            assert k == state["cur"], \
                f"{what}, cycle {cyc}: input {k} moved inside a packet of input {state['cur']}"
        else:
            offering = [c for c in range(n) if state["offer"][c]]
            want = next(c % n for c in range(state["last"] + 1, state["last"] + 1 + n)
                        if c % n in offering)
            assert k == want, f"{what}, cycle {cyc}: header taken from input {k}; inputs " \
                f"{offering} offered, last served {state['last']}: want {want}"
            state["last"] = k
        s = sources[k]
        state["cur"] = None if s.done or s.pos in s.headers else k

    def hook(ctx, cyc: int) -> None:
        if cyc > 0:
            after(cyc - 1)
        state["offer"] = [s.valid for s in sources]
    return hook


@pytest.mark.parametrize("word_bits, n_in, seed", [
    (32, 3, 51), (64, 4, 52), (32, 1, 53), (32, 2, 54), (32, 3, 55), (32, 5, 56), (64, 2, 57),
])
def test_merge_random(word_bits, n_in, seed):
    rng = np.random.default_rng(seed)
    what = f"PacketMerge({word_bits}, {n_in}), seed {seed}"
    inputs = [_packets(rng, int(rng.integers(8, 20)), word_bits, _any_route(word_bits))
              for _ in range(n_in)]
    if n_in > 2:
        inputs[1] = inputs[1][:0]      # an input that never sends
    dut = PacketMerge(word_bits, n_in)
    sources = [_Source(dut.i[k], inputs[k], float(rng.uniform(0.2, 1.0)), rng, word_bits)
               for k in range(n_in)]
    sink = _Sink(dut.o, float(rng.uniform(0.3, 1.0)), rng)
    total = sum(map(len, inputs))
    _simulate(dut, sources, [sink], what, finished=_received([sink], total),
              hook=_merge_arbitration_check(sources, what))
    try:
        pm.check_merge(inputs, sink.got)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None


@pytest.mark.parametrize("n_in", [1, 3])
def test_merge_full_speed(n_in):
    """Every input always offers: packets leave round robin, one word per cycle, no bubble
    between packets (header-only packets included)."""
    rng = np.random.default_rng(60 + n_in)
    inputs = [_packets(rng, 15, 32, _any_route(32)) for _ in range(n_in)]
    dut = PacketMerge(32, n_in)
    sources = [_Source(dut.i[k], inputs[k], 1.0, rng, 32) for k in range(n_in)]
    sink = _Sink(dut.o, 1.0, rng)
    total = sum(map(len, inputs))
    what = f"PacketMerge(32, {n_in}), seed {60 + n_in}"
    _simulate(dut, sources, [sink], what, finished=_received([sink], total))
    assert sink.got == pm.merge_round_robin(inputs), what
    assert sink.last_cycle == total, \
        f"{what}: {total} words, the last left in cycle {sink.last_cycle}"


# DdrWriter ------------------------------------------------------------------------------------

def _run_ddr(word_bits: int, addr_bits: int, seed: int, *, n_packets: int, p_valid: float,
             p_mem: float) -> tuple[list[int], _Mem, str]:
    rng = np.random.default_rng(seed)
    what = f"DdrWriter({word_bits}, {addr_bits}), seed {seed}"
    words = _packets(rng, n_packets, word_bits, _any_route(word_bits))
    # and a packet that wraps around the top of the address space
    top = (1 << addr_bits) - 2 + (_word(rng, word_bits - LEN_BITS - addr_bits) << addr_bits)
    words += [write_header(4, top, word_bits=word_bits),
              *(_word(rng, word_bits) for _ in range(4))]
    words += _packets(rng, 3, word_bits, _any_route(word_bits))
    words += [write_header(1, 0, word_bits=word_bits), 99]
    init = [_word(rng, word_bits) for _ in range(1 << addr_bits)]
    dut = DdrWriter(word_bits, addr_bits)
    src = _Source(dut.i, words, p_valid, rng, word_bits)
    mem = _Mem(dut.mem, list(init), p_mem, rng)
    payload = [w for pkt in pm.packets(words) for w in pkt[1:]]
    # busy: the source is inside a packet, or fewer words were written than taken
    taken_payload = np.cumsum([0] + [0 if p in src.headers else 1 for p in range(len(words))])

    def hook(ctx, cyc: int) -> None:
        inside = not src.done and src.pos not in src.headers
        want = inside or mem.writes < taken_payload[src.pos]
        assert ctx.get(dut.busy) == want, f"{what}, cycle {cyc}: busy {not want}, want {want}"
        assert ctx.get(dut.words) == mem.writes, f"{what}, cycle {cyc}: words counter"
        if src.valid and src.pos in src.headers:
            assert ctx.get(dut.i.ready), f"{what}, cycle {cyc}: a header waited"

    _simulate(dut, [src], [], what, mem=mem, hook=hook,
              finished=lambda ctx: not ctx.get(dut.busy))
    want = pm.ddr_write(words, np.array(init, dtype=object), addr_bits=addr_bits)
    diff = [a for a in range(len(init)) if mem.data[a] != want[a]]
    assert not diff, f"{what}: {len(diff)} memory words differ, first at address {diff[0]}"
    assert mem.writes == len(payload), f"{what}: {mem.writes} writes, {len(payload)} words"
    return words, mem, what


@pytest.mark.parametrize("word_bits, addr_bits, seed", [
    (32, 8, 71), (64, 10, 72), (32, 1, 73), (32, 16, 75), (64, 6, 76),
])
def test_ddr_writer_random(word_bits, addr_bits, seed):
    rng = np.random.default_rng(seed)
    _run_ddr(word_bits, addr_bits, seed, n_packets=40, p_valid=float(rng.uniform(0.4, 1.0)),
             p_mem=float(rng.uniform(0.2, 0.9)))


def test_ddr_writer_full_speed():
    """N stream words (headers included) are written in N + 1 cycles: the last write is
    performed in cycle N."""
    words, mem, what = _run_ddr(32, 9, 74, n_packets=30, p_valid=1.0, p_mem=1.0)
    assert mem.last_cycle == len(words), \
        f"{what}: {len(words)} words, the last write in cycle {mem.last_cycle}"


# LockingWriter --------------------------------------------------------------------------------

@pytest.mark.parametrize("word_bits, addr_bits, seed", [(32, 12, 81), (64, 13, 82)])
def test_locking_writer_random(word_bits, addr_bits, seed):
    """Packets land at their header's address; each packet's lock is released once, after its
    last word is written (never before), under random gaps, memory and lock-grant delays."""
    rng = np.random.default_rng(seed)
    what = f"LockingWriter({word_bits}, {addr_bits}, 4), seed {seed}"
    dut = hwp.LockingWriter(word_bits, addr_bits, 4)
    pkts = []
    for _ in range(25):
        n = int(rng.choice([0, 1, 2, 7, 30]))
        addr = int(rng.integers(0, (1 << addr_bits) - n))
        lock = int(rng.integers(0, 16))
        pkts.append((addr, lock, [_word(rng, word_bits) for _ in range(n)]))
    stream = []
    for addr, lock, body in pkts:
        stream += [len(body) | addr << 16 | lock << (16 + addr_bits), *body]
    mem: dict[int, int] = {}
    releases: list[tuple[int, int]] = []          # (lock, writes done when released)
    state = {"writes": 0}

    async def bench(ctx):
        pos = 0
        for _ in range(20_000):
            offer = pos < len(stream) and rng.random() < 0.7
            ctx.set(dut.i.valid, offer)
            ctx.set(dut.i.payload, stream[pos] if pos < len(stream) else 0)
            ctx.set(dut.mem.ready, bool(rng.random() < 0.6))
            ctx.set(dut.lock.gnt, bool(rng.random() < 0.5))
            if offer and ctx.get(dut.i.ready):
                pos += 1
            if ctx.get(dut.mem.we) and ctx.get(dut.mem.ready):
                mem[ctx.get(dut.mem.addr)] = ctx.get(dut.mem.wdata)
                state["writes"] += 1
            if ctx.get(dut.lock.req) and ctx.get(dut.lock.gnt):
                assert ctx.get(dut.lock.op) == LockOp.RELEASE and ctx.get(dut.lock.val) == 1, \
                    what
                releases.append((ctx.get(dut.lock.id), state["writes"]))
            await ctx.tick()
            if pos == len(stream) and not ctx.get(dut.busy):
                break
        else:
            raise AssertionError(f"{what}: did not finish")

    sim = Simulator(dut)
    sim.add_clock(1e-9)
    sim.add_testbench(bench)
    sim.run()
    assert [r[0] for r in releases] == [lk for _, lk, _ in pkts], f"{what}: release order"
    done = 0
    want: dict[int, int] = {}
    for (addr, _, body), (_, writes) in zip(pkts, releases, strict=True):
        done += len(body)
        assert writes >= done, f"{what}: a lock was released before its packet landed"
        want.update({addr + k: w for k, w in enumerate(body)})
    assert mem == want, f"{what}: memory differs from the packets' payloads"


def test_locking_writer_header_too_wide():
    with pytest.raises(ValueError, match="cannot hold a 16-bit length"):
        hwp.LockingWriter(32, 13, 4)
