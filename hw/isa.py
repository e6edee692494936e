"""The tile instruction set, defined once.

The Amaranth enums and layouts in this module are used by the RTL decoder
(:mod:`tilewright.hw.tile`), the assembler and disassembler (:mod:`tilewright.sw.asm`), the golden
model (:mod:`tilewright.sim.golden`) and the generated encoding table in ``docs/isa.md``.

Every instruction is one 64-bit word::

    [7:0]   opcode   Opcode
    [15:8]  a        SETP: parameter id (Param); ops and NOP: flags (Flag); ACQ/REL: lock id
    [31:16] b        CONV: number of non-zero blocks; MAXPOOL/AVGPOOL/ADD: channel group;
                     LOOP: iteration count
    [63:32] imm      SETP: signed 32-bit value; ACQ/REL: lock value; otherwise 0

A CONV word is followed by ``ceil(nnz / 4)`` index words, each holding four 16-bit input
channel-group indices (the block-column indices of the block row), little-end first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from amaranth.lib import data, enum

if TYPE_CHECKING:
    from .config import TileConfig

__all__ = [
    "ENGINE_OPS",
    "INDEX_LAYOUT",
    "INDEX_PER_WORD",
    "INSTR_LAYOUT",
    "OPS",
    "ErrorCode",
    "Flag",
    "Instr",
    "Opcode",
    "Param",
    "ParamRange",
    "index_words",
    "param_range",
]


class Opcode(enum.Enum, shape=8):
    """Instruction opcodes. 0 is never valid, so running into zeroed memory stops at once."""

    ILLEGAL = 0x00
    HALT = 0x01
    NOP = 0x02
    SETP = 0x03
    ACQ = 0x04
    REL = 0x05
    LOOP = 0x06
    ENDLOOP = 0x07
    CONV = 0x10
    MAXPOOL = 0x11
    AVGPOOL = 0x12
    ADD = 0x13


class Param(enum.Enum, shape=8):
    """Parameter registers written by SETP (word addresses and strides are in memory words)."""

    IN_BASE = 0
    IN_ROW = 1
    IN_CG = 2
    B_BASE = 3
    OUT_BASE = 4
    OUT_ROW = 5
    OUT_CG = 6
    HO = 7
    WO = 8
    KH = 9
    KW = 10
    STRIDE = 11
    W_PTR = 12
    Q_PTR = 13
    SHIFT = 14
    MUL_A = 15
    MUL_B = 16


class Flag(enum.Enum, shape=8):
    """Flag bits of the ``a`` field of an op (values are bit masks)."""

    RELU = 0x01
    FENCE = 0x02
    #: Keep the accumulators for the next op: no writeback, ``OUT_BASE`` not advanced.
    HOLD = 0x04
    #: Start from the accumulators a HOLD op left instead of zero (a block row split over
    #: several ops, e.g. across weight buffers: an input-channel split without int32 traffic).
    ACC = 0x08


FLAG_MASK = 0x0F


class ErrorCode(enum.Enum, shape=8):
    """Why a tile stopped with ``error`` set (readable on the ``error_code`` port)."""

    NONE = 0
    ILLEGAL_OPCODE = 1
    BAD_PARAM = 2
    BAD_VALUE = 3
    PC_OVERFLOW = 4
    MALFORMED = 5
    LOOP_NESTING = 6


INSTR_LAYOUT = data.StructLayout({
    "opcode": Opcode,
    "a": 8,
    "b": 16,
    "imm": 32,
})

INDEX_PER_WORD = 4
#: Locks a tile addresses (ACQ/REL ``a`` field) and the largest value one instruction moves.
N_LOCKS = 64
MAX_LOCK_VALUE = 63
#: Nesting depth of LOOP ... ENDLOOP.
LOOP_DEPTH = 2
INDEX_LAYOUT = data.ArrayLayout(16, INDEX_PER_WORD)

#: Ops executed by the MAC engine (each produces one output channel group).
ENGINE_OPS = (Opcode.CONV, Opcode.MAXPOOL, Opcode.AVGPOOL, Opcode.ADD)
OPS = tuple(Opcode)


def index_words(nnz: int) -> int:
    """Number of index words following a CONV with ``nnz`` non-zero blocks."""
    return (nnz + INDEX_PER_WORD - 1) // INDEX_PER_WORD


@dataclass(frozen=True)
class ParamRange:
    """Accepted values of one parameter: ``lo <= v <= hi`` and ``v % align == 0``."""

    lo: int
    hi: int
    align: int = 1

    def accepts(self, v: int) -> bool:
        return self.lo <= v <= self.hi and v % self.align == 0

    def describe(self) -> str:
        s = f"{self.lo}..{self.hi}"
        return s + (f", a multiple of {self.align}" if self.align > 1 else "")


MAX_SPATIAL = 1023
MAX_KERNEL = 15
MAX_SHIFT = 62


def param_range(p: Param, tile: TileConfig) -> ParamRange:
    """The values a SETP of ``p`` accepts on a tile; any other value is a BAD_VALUE error."""
    words = tile.dmem_words - 1
    if p in (Param.IN_BASE, Param.IN_ROW, Param.IN_CG, Param.B_BASE, Param.OUT_BASE,
             Param.OUT_ROW, Param.OUT_CG):
        return ParamRange(0, words)
    if p in (Param.HO, Param.WO):
        return ParamRange(1, MAX_SPATIAL)
    if p in (Param.KH, Param.KW):
        return ParamRange(1, MAX_KERNEL)
    if p is Param.STRIDE:
        return ParamRange(1, 2)
    if p is Param.W_PTR:
        return ParamRange(0, words, tile.block)
    if p is Param.Q_PTR:
        return ParamRange(0, words, tile.qrec_words)
    if p is Param.SHIFT:
        return ParamRange(0, MAX_SHIFT)
    if p in (Param.MUL_A, Param.MUL_B):
        return ParamRange(-(1 << 15), (1 << 15) - 1)
    raise AssertionError(p)


@dataclass(frozen=True)
class Instr:
    """One decoded instruction word."""

    opcode: int
    a: int = 0
    b: int = 0
    imm: int = 0

    def encode(self) -> int:
        """The 64-bit word, laid out as :data:`INSTR_LAYOUT`."""
        for name, width, v in (("opcode", 8, self.opcode), ("a", 8, self.a),
                               ("b", 16, self.b)):
            if not 0 <= v < 1 << width:
                raise ValueError(f"instruction field {name} must be 0..{(1 << width) - 1}, "
                                 f"not {v!r}")
        if not -(1 << 31) <= self.imm < 1 << 32:
            raise ValueError(f"instruction field imm must fit 32 bits, not {self.imm!r}")
        return (_field_value("opcode", self.opcode) | _field_value("a", self.a)
                | _field_value("b", self.b) | _field_value("imm", self.imm & 0xFFFF_FFFF))

    @classmethod
    def decode(cls, word: int) -> Instr:
        if not 0 <= word < 1 << 64:
            raise ValueError(f"instruction word must be a 64-bit unsigned value, not {word!r}")
        imm = _field_get("imm", word)
        if imm >= 1 << 31:
            imm -= 1 << 32
        return cls(_field_get("opcode", word), _field_get("a", word), _field_get("b", word),
                   imm)

    @property
    def op(self) -> Opcode | None:
        try:
            return Opcode(self.opcode)
        except ValueError:
            return None


#: (offset, mask) of every instruction field, from :data:`INSTR_LAYOUT` (looked up once: the
#: assembler encodes hundreds of thousands of words per network).
_FIELDS = {name: (f.offset, (1 << f.width) - 1) for name, f in INSTR_LAYOUT}


def _field_value(name: str, v: int) -> int:
    off, mask = _FIELDS[name]
    return (v & mask) << off


def _field_get(name: str, word: int) -> int:
    off, mask = _FIELDS[name]
    return (word >> off) & mask


def encode_index_word(entries: list[int]) -> int:
    """Pack up to four 16-bit channel-group indices into one index word."""
    if len(entries) > INDEX_PER_WORD:
        raise ValueError(f"an index word holds at most {INDEX_PER_WORD} entries, "
                         f"not {len(entries)}")
    w = 0
    for i, e in enumerate(entries):
        if not 0 <= e < 1 << 16:
            raise ValueError(f"block index must be 0..65535, not {e!r}")
        w |= e << (16 * i)
    return w


def decode_index_word(word: int) -> list[int]:
    return [(word >> (16 * i)) & 0xFFFF for i in range(INDEX_PER_WORD)]


def check_static(ins: Instr) -> ErrorCode:
    """Errors an instruction word has on its own (without tile parameters).

    The RTL decoder implements exactly these rules; BAD_VALUE is checked by SETP against
    :func:`param_range`.
    """
    op = ins.op
    if op is None or op is Opcode.ILLEGAL:
        return ErrorCode.ILLEGAL_OPCODE
    if op in (Opcode.HALT, Opcode.ENDLOOP):
        return ErrorCode.MALFORMED if (ins.a or ins.b or ins.imm) else ErrorCode.NONE
    if op is Opcode.NOP:
        return (ErrorCode.MALFORMED if (ins.a & ~Flag.FENCE.value or ins.b or ins.imm)
                else ErrorCode.NONE)
    if op is Opcode.SETP:
        if ins.b:
            return ErrorCode.MALFORMED
        if ins.a not in {p.value for p in Param}:
            return ErrorCode.BAD_PARAM
        return ErrorCode.NONE
    if op in (Opcode.ACQ, Opcode.REL):
        bad = ins.b or ins.a >= N_LOCKS or not 1 <= ins.imm <= MAX_LOCK_VALUE
        return ErrorCode.MALFORMED if bad else ErrorCode.NONE
    if op is Opcode.LOOP:
        return ErrorCode.MALFORMED if (ins.a or ins.imm or ins.b == 0) else ErrorCode.NONE
    # engine ops
    if ins.imm or ins.a & ~FLAG_MASK:
        return ErrorCode.MALFORMED
    return ErrorCode.NONE


def encoding_table() -> str:
    """The Markdown encoding reference of ``docs/isa.md``, generated from this module."""
    lines = ["| bits | field | meaning |", "|---|---|---|"]
    for name, f in INSTR_LAYOUT:
        hi = f.offset + f.width - 1
        meaning = {
            "opcode": "Opcode",
            "a": "SETP: Param id; ops, NOP: Flag bits; ACQ/REL: lock id",
            "b": "CONV: non-zero blocks; MAXPOOL/AVGPOOL/ADD: channel group; LOOP: count; "
                 "else 0",
            "imm": "SETP: signed value; ACQ/REL: lock value; else 0",
        }[name]
        lines.append(f"| [{hi}:{f.offset}] | {name} | {meaning} |")
    lines += ["", "| opcode | value | format |", "|---|---|---|"]
    fmt = {
        Opcode.ILLEGAL: "never valid (zeroed memory stops the tile)",
        Opcode.HALT: "a=b=imm=0; waits for every writeback, then done",
        Opcode.NOP: "a=0 or FENCE (wait for every writeback), b=imm=0",
        Opcode.SETP: "a=Param, b=0, imm=value (checked against the parameter's range)",
        Opcode.ACQ: f"a=lock 0..{N_LOCKS - 1}, imm=v 1..{MAX_LOCK_VALUE}: wait until "
                    f"lock >= v, then lock -= v",
        Opcode.REL: f"a=lock 0..{N_LOCKS - 1}, imm=v 1..{MAX_LOCK_VALUE}: lock += v",
        Opcode.LOOP: f"b=count >= 1: run the words up to the matching ENDLOOP count times "
                     f"(nesting {LOOP_DEPTH})",
        Opcode.ENDLOOP: "a=b=imm=0",
        Opcode.CONV: "a=flags, b=nnz, then ceil(nnz/4) index words",
        Opcode.MAXPOOL: "a=flags, b=input channel group",
        Opcode.AVGPOOL: "a=flags, b=input channel group",
        Opcode.ADD: "a=flags, b=channel group of both operands",
    }
    for op in Opcode:
        lines.append(f"| {op.name} | 0x{op.value:02x} | {fmt[op]} |")
    lines += ["", "| param | id | accepted values (reference tile aie2-1x1) |", "|---|---|---|"]
    from .config import TileConfig

    ref = TileConfig()
    for p in Param:
        lines.append(f"| {p.name} | {p.value} | {param_range(p, ref).describe()} |")
    lines += ["", "| flag | mask |", "|---|---|"]
    lines += [f"| {f.name} | 0x{f.value:02x} |" for f in Flag]
    lines += ["", "| error code | value |", "|---|---|"]
    lines += [f"| {e.name} | {e.value} |" for e in ErrorCode]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(encoding_table(), end="")
