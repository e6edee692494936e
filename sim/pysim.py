"""Run tile programs in Amaranth's Python simulator (small configurations, short programs).

Used by the fast tests; long runs belong in Verilator (:mod:`tilewright.sim.verilator`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from amaranth.hdl import Array, Elaboratable, Module, Mux, Signal
from amaranth.sim import Simulator

from tilewright.hw.config import TileConfig
from tilewright.hw.isa import N_LOCKS
from tilewright.hw.tile import ComputeTile

__all__ = ["PysimResult", "TileWithLocks", "load_program", "load_words", "run_pysim", "words_of"]


@dataclass
class PysimResult:
    dmem: np.ndarray
    cycles: int
    error: bool
    error_code: int
    error_pc: int
    locks: list[int]


class TileWithLocks(Elaboratable):
    """A tile and the single-tile lock unit: ``N_LOCKS`` 6-bit semaphores granting in the
    cycle of the request (ACQ when the value suffices, REL always, saturating at 63)."""

    def __init__(self, tile: TileConfig) -> None:
        self.tile = ComputeTile(tile)
        self.values = Array(Signal(6, name=f"lock{i}") for i in range(N_LOCKS))

    def elaborate(self, platform):
        m = Module()
        m.submodules.tile = t = self.tile
        v = self.values[t.lk_id]
        ok = t.lk_op | (v >= t.lk_val)
        m.d.comb += t.lk_gnt.eq(t.lk_req & ok)
        total = Signal(7)
        m.d.comb += total.eq(v + t.lk_val)
        with m.If(t.lk_req & ok):
            with m.If(t.lk_op):
                m.d.sync += v.eq(Mux(total > 63, 63, total))
            with m.Else():
                m.d.sync += v.eq(v - t.lk_val)
        return m


def words_of(image: np.ndarray, block: int) -> list[int]:
    """A byte image as little-endian words of ``block`` bytes."""
    w = np.asarray(image, dtype=np.uint8).reshape(-1, block)
    return [int.from_bytes(v.tobytes(), "little") for v in w]


async def load_program(ctx, dut, words: list[int]) -> None:
    """Write ``words`` to program memory through ``pm_*`` (one per cycle)."""
    for a, w in enumerate(words):
        ctx.set(dut.pm_we, 1)
        ctx.set(dut.pm_addr, a)
        ctx.set(dut.pm_wdata, w)
        await ctx.tick()
    ctx.set(dut.pm_we, 0)


async def load_words(ctx, dut, words: dict[int, int]) -> None:
    """Write data memory words ``{address: value}`` through ``dm_*``, skipping zeros (memory
    starts zeroed), waiting for ``dm_ready``."""
    for a, w in words.items():
        if w:
            ctx.set(dut.dm_we, 1)
            ctx.set(dut.dm_addr, a)
            ctx.set(dut.dm_wdata, w)
            while not ctx.get(dut.dm_ready):
                await ctx.tick()
            await ctx.tick()
    ctx.set(dut.dm_we, 0)


def run_pysim(tile: TileConfig, program: list[int], dmem: np.ndarray, *,
              locks: list[int] | None = None, max_cycles: int = 200_000) -> PysimResult:
    """Load ``program`` and ``dmem`` through the tile's ports, run to ``done``, read back.

    ``locks`` are the initial lock values (default 0), as for the golden model."""
    top = TileWithLocks(tile)
    dut = top.tile
    wvals = words_of(dmem, tile.block)
    out: dict = {}

    async def bench(ctx):
        for i, v in enumerate(locks or []):
            ctx.set(top.values[i], v)
        await load_program(ctx, dut, program)
        await load_words(ctx, dut, dict(enumerate(wvals)))
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        n = 0
        while not ctx.get(dut.done):
            await ctx.tick()
            n += 1
            if n > max_cycles:
                raise TimeoutError(f"tile did not finish within {max_cycles} cycles")
        for _ in range(tile.acc_depth * 4 + 8):   # let in-flight writebacks (after errors) end
            await ctx.tick()
        res = []
        for a in range(tile.dmem_words):
            ctx.set(dut.dm_re, 1)
            ctx.set(dut.dm_addr, a)
            await ctx.tick()
            res.append(ctx.get(dut.dm_rdata))
        ctx.set(dut.dm_re, 0)
        await ctx.tick()
        out["words"] = res
        out["cycles"] = ctx.get(dut.cycles)
        out["error"] = ctx.get(dut.error)
        out["error_code"] = ctx.get(dut.error_code)
        out["error_pc"] = ctx.get(dut.error_pc)
        out["locks"] = [ctx.get(top.values[i]) for i in range(N_LOCKS)]

    sim = Simulator(top)
    sim.add_clock(1e-9)
    sim.add_testbench(bench)
    sim.run()
    mem = np.frombuffer(b"".join(int(w).to_bytes(tile.block, "little") for w in out["words"]),
                        dtype=np.uint8).copy()
    ec = out["error_code"]
    return PysimResult(mem, int(out["cycles"]), bool(out["error"]),
                       int(getattr(ec, "value", ec)), int(out["error_pc"]), out["locks"])
