"""A stand-in for :class:`tilewright.hw.tile.ComputeTile` with exactly its ports.

It lets the generator, the Verilator harness and the job runner be tested without the real
tile. Its "ISA" is a three-instruction subset of the tile's encoding:

* ``HALT`` (opcode 0x01): stop, ``done`` = 1.
* ``NOP`` (opcode 0x02): nothing.
* ``COPY`` (opcode 0x7E, not a real tile opcode): data memory word ``imm`` <- word ``b``.
* ``SPIN`` (opcode 0x7D, not a real tile opcode): wait ``imm`` cycles (for speed and timeout
  tests).

Every other opcode stops with ``error`` = 1, ``error_code`` = ILLEGAL_OPCODE and ``error_pc``
the address of the word; running past the end of program memory gives PC_OVERFLOW. Each
instruction costs FETCH + DECODE (2 cycles), COPY one more.
"""

from __future__ import annotations

from amaranth import Module, Signal
from amaranth.lib import memory, wiring

from tilewright.hw.config import TileConfig
from tilewright.hw.isa import ErrorCode, Instr, Opcode
from tilewright.hw.tile import tile_ports

__all__ = ["COPY_OPCODE", "SPIN_OPCODE", "StandInTile", "copy_word", "spin_word"]

COPY_OPCODE = 0x7E
SPIN_OPCODE = 0x7D


def copy_word(src: int, dst: int) -> int:
    """The stand-in's COPY instruction: data memory word ``dst`` <- word ``src``."""
    return Instr(COPY_OPCODE, 0, src, dst).encode()


def spin_word(n: int) -> int:
    """The stand-in's SPIN instruction: wait ``n`` cycles (0 <= n < 2**32)."""
    return Instr(SPIN_OPCODE, 0, 0, n).encode()


class StandInTile(wiring.Component):
    """Stand-in compute tile (see the module docstring).

    Parameters
    ----------
    tile : TileConfig
        The tile whose port widths and memory sizes to mimic.
    """

    def __init__(self, tile: TileConfig) -> None:
        if not isinstance(tile, TileConfig):
            raise TypeError(f"tile must be a TileConfig, not {tile!r}")
        self._tile = tile
        super().__init__(self.members(tile))

    @classmethod
    def members(cls, tile: TileConfig) -> dict[str, object]:
        """The signature members (the tile's port contract)."""
        return tile_ports(tile)

    def elaborate(self, platform: object) -> Module:
        t = self._tile
        m = Module()
        m.submodules.pmem = pmem = memory.Memory(shape=64, depth=t.pmem_words, init=[])
        m.submodules.dmem = dmem = memory.Memory(shape=t.word_bits, depth=t.dmem_words,
                                                 init=[])
        pm_w = pmem.write_port()
        pm_r = pmem.read_port()
        dm_w = dmem.write_port()
        dm_r = dmem.read_port()
        dr_r = dmem.read_port()

        pc = Signal(t.pc_bits)
        word = Signal(64)
        dst = Signal(t.addr_bits)
        spin = Signal(32)

        m.d.comb += [
            pm_w.addr.eq(self.pm_addr), pm_w.data.eq(self.pm_wdata),
            pm_w.en.eq(self.pm_we & ~self.busy),
            pm_r.addr.eq(pc),
            dm_r.addr.eq(self.dm_addr),
            dm_w.addr.eq(self.dm_addr), dm_w.data.eq(self.dm_wdata),
            dm_w.en.eq(self.dm_we & ~self.busy),
            self.dm_rdata.eq(dm_r.data),
            self.dm_ready.eq(1),
            dr_r.addr.eq(self.dr_addr), self.dr_rdata.eq(dr_r.data), self.dr_ready.eq(1),
            word.eq(pm_r.data),
        ]
        with m.If(self.busy):
            m.d.sync += self.cycles.eq(self.cycles + 1)

        def stop(code: ErrorCode | None) -> None:
            m.d.sync += [self.busy.eq(0), self.done.eq(1)]
            if code is not None:
                m.d.sync += [self.error.eq(1), self.error_code.eq(code),
                             self.error_pc.eq(pc)]
            m.next = "IDLE"

        with m.FSM():
            with m.State("IDLE"), m.If(self.start):
                m.d.sync += [pc.eq(0), self.busy.eq(1), self.done.eq(0),
                             self.error.eq(0), self.error_code.eq(0),
                             self.error_pc.eq(0), self.cycles.eq(0)]
                m.next = "FETCH"
            with m.State("FETCH"):
                m.next = "DECODE"
            with m.State("DECODE"):
                opcode = word[0:8]
                with m.If(opcode == Opcode.HALT):
                    stop(None)
                with m.Elif((opcode == Opcode.NOP) | (opcode == COPY_OPCODE)
                            | (opcode == SPIN_OPCODE)):
                    with m.If(pc == t.pmem_words - 1):
                        stop(ErrorCode.PC_OVERFLOW)
                    with m.Else():
                        m.d.sync += pc.eq(pc + 1)
                        m.next = "FETCH"
                        with m.If(opcode == COPY_OPCODE):
                            m.d.comb += dm_r.addr.eq(word[16:32])
                            m.d.sync += dst.eq(word[32:64])
                            m.next = "COPY"
                        with m.If(opcode == SPIN_OPCODE):
                            m.d.sync += spin.eq(word[32:64])
                            m.next = "SPIN"
                with m.Else():
                    stop(ErrorCode.ILLEGAL_OPCODE)
            with m.State("COPY"):
                m.d.comb += [dm_w.addr.eq(dst), dm_w.data.eq(dm_r.data), dm_w.en.eq(1)]
                m.next = "FETCH"
            with m.State("SPIN"):
                m.d.sync += spin.eq(spin - 1)
                with m.If(spin == 0):
                    m.next = "FETCH"
        return m
