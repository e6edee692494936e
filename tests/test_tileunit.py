# amaranth: UnusedElaboratable=no
"""The tile unit (compute tile + lock unit + DMA channels + arbiter) in Amaranth's simulator:
a height-streamed 1x1 conv whose input rows arrive on an S2MM stream and whose output rows
leave on an MM2S stream while the core computes, synchronised by ping/pong locks."""

from pathlib import Path

import numpy as np
import pytest
from amaranth.sim import Simulator

from tilewright.hw.bd import BD_INDEX_BITS, BufferDescriptor, LockAction
from tilewright.hw.config import load_config
from tilewright.hw.tileunit import N_S2MM, TileUnit
from tilewright.sim.pysim import load_program, load_words, words_of
from tilewright.sw.asm import Program
from tilewright.sw.numerics import requantize

REPO = Path(__file__).resolve().parents[1]
TINY = load_config(REPO / "overlay_configs" / "tiny-1x1.yaml").tile

# word addresses and locks of the ping/pong plan
Q, W = 0, 16
WIDTH = 16
IN = (64, 128)
OUT = (192, 224)
IN_FULL, IN_EMPTY, OUT_FULL, OUT_EMPTY = (0, 1), (2, 3), (4, 5), (6, 7)


def _program(rows: int, shift: int) -> list[int]:
    p = Program().setps(IN_ROW=WIDTH, IN_CG=WIDTH, OUT_ROW=WIDTH, OUT_CG=WIDTH, HO=1, WO=WIDTH,
                        SHIFT=shift)
    p.loop(rows // 2)
    for k in (0, 1):
        p.acquire(IN_FULL[k]).acquire(OUT_EMPTY[k])
        p.setps(IN_BASE=IN[k], OUT_BASE=OUT[k], W_PTR=W, Q_PTR=Q)
        p.conv([0, 1], relu=True)
        p.nop(fence=True).release(IN_EMPTY[k]).release(OUT_FULL[k])
    return p.endloop().halt().words


def _bds() -> dict[int, list[tuple[int, BufferDescriptor]]]:
    """Per channel: (index, BD). S2MM 1 fills the input buffers, MM2S 0 drains outputs."""
    s2mm = [(k, BufferDescriptor(IN[k], (2 * WIDTH,), (1,), next_bd=1 if k == 0 else None,
                                 acquire=LockAction(IN_EMPTY[k], 1),
                                 release=LockAction(IN_FULL[k], 1))) for k in (0, 1)]
    mm2s = [(k, BufferDescriptor(OUT[k], (WIDTH,), (1,), next_bd=1 if k == 0 else None,
                                 acquire=LockAction(OUT_FULL[k], 1),
                                 release=LockAction(OUT_EMPTY[k], 1))) for k in (0, 1)]
    return {1: s2mm, N_S2MM: mm2s}


@pytest.mark.parametrize("seed, rate", [(3, 0.7), (4, 0.1)])
def test_ping_pong_conv_stream(seed, rate):
    """``rate``: probability per cycle that the input stream offers a word and that the output
    stream takes one (0.1: the core outruns both and must wait on its locks)."""
    rng = np.random.default_rng(seed)
    b, rows = TINY.block, 6
    x = rng.integers(-128, 128, (rows, 2, WIDTH, b), dtype=np.int8)   # row, cg, x, channel
    w = rng.integers(-128, 128, (2, b, b), dtype=np.int8)         # block, out ch, in ch
    bias = rng.integers(-2000, 2000, b).astype("<i4")
    mult = rng.integers(1 << 14, 1 << 18, b).astype("<i4")
    shift = 24
    acc = np.einsum("rgxk,gok->rxo", x.astype(np.int64), w.astype(np.int64))
    want = requantize(acc, bias, mult, shift, True)                # (rows, x, out)

    dut = TileUnit(TINY)
    host = {Q: np.concatenate([bias.view(np.uint8), mult.view(np.uint8)]),
            W: w.view(np.uint8).ravel()}
    words_in = words_of(x.view(np.uint8), b)
    got: list[int] = []
    prog = _program(rows, shift)

    async def bench(ctx):
        for i in (IN_EMPTY + OUT_EMPTY):
            ctx.set(dut.lock_wr_en, 1)
            ctx.set(dut.lock_wr_id, i)
            ctx.set(dut.lock_wr_value, 1)
            await ctx.tick()
        ctx.set(dut.lock_wr_en, 0)
        await load_program(ctx, dut, prog)
        for base, blob in host.items():
            await load_words(ctx, dut, {base + k: v for k, v in enumerate(words_of(blob, b))})
        for ch, bds in _bds().items():
            for idx, bd in bds:
                ctx.set(dut.bd_we, 1)
                ctx.set(dut.bd_ch, ch)
                ctx.set(dut.bd_addr, idx)
                ctx.set(dut.bd_wdata.as_value(), bd.encode())
                await ctx.tick()
        ctx.set(dut.bd_we, 0)
        for ch in (1, N_S2MM):
            for _ in range(rows // 2):
                ctx.set(dut.task.valid, 1)
                ctx.set(dut.task.payload, ch << BD_INDEX_BITS)
                await ctx.tick()
        ctx.set(dut.task.valid, 0)
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        pending = list(words_in)
        for _ in range(20_000):
            ctx.set(dut.s2mm[1].valid, bool(pending) and rng.random() < rate)
            ctx.set(dut.s2mm[1].payload, pending[0] if pending else 0)
            ctx.set(dut.mm2s[0].ready, rng.random() < rate)
            # transfers happen at this cycle's edge: decide from the settled values
            if ctx.get(dut.s2mm[1].valid) and ctx.get(dut.s2mm[1].ready):
                pending.pop(0)
            if ctx.get(dut.mm2s[0].ready) and ctx.get(dut.mm2s[0].valid):
                got.append(ctx.get(dut.mm2s[0].payload))
            await ctx.tick()
            if ctx.get(dut.done) and len(got) == rows * WIDTH:
                break
        assert not ctx.get(dut.error), f"seed {seed}: tile error {ctx.get(dut.error_code)}"
        assert not ctx.get(dut.dma_error), f"seed {seed}: DMA error"

    sim = Simulator(dut)
    sim.add_clock(1e-9)
    sim.add_testbench(bench)
    sim.run()
    assert len(got) == rows * WIDTH, f"seed {seed}: {len(got)} output words, not {rows * WIDTH}"
    out = np.frombuffer(b"".join(v.to_bytes(b, "little") for v in got), np.int8)
    assert np.array_equal(out.reshape(rows, WIDTH, b), want), f"seed {seed}"
