"""Assembler and disassembler for the tile ISA (:mod:`tilewright.hw.isa`)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

from tilewright.hw.isa import (
    ENGINE_OPS,
    INDEX_PER_WORD,
    MAX_LOCK_VALUE,
    N_LOCKS,
    Flag,
    Instr,
    Opcode,
    Param,
    decode_index_word,
    encode_index_word,
    index_words,
)

__all__ = ["Program", "disassemble"]


def _flags(relu: bool, fence: bool) -> int:
    return (Flag.RELU.value if relu else 0) | (Flag.FENCE.value if fence else 0)


@functools.lru_cache(maxsize=1 << 16)
def _encoded(opcode: int, a: int, b: int, imm: int) -> int:
    """The word of an instruction, cached: a network's programs repeat a few thousand distinct
    words hundreds of thousands of times."""
    return Instr(opcode, a, b, imm).encode()


class Program:
    """Builds a tile program (a list of 64-bit words).

    Examples
    --------
    >>> p = Program()
    >>> p.setp(Param.HO, 2).conv([0, 3], relu=True).halt()  # doctest: +ELLIPSIS
    <...Program...>
    """

    def __init__(self) -> None:
        self.words: list[int] = []

    def __len__(self) -> int:
        return len(self.words)

    def _emit(self, ins: Instr) -> Program:
        self.words.append(_encoded(ins.opcode, ins.a, ins.b, ins.imm))
        return self

    def setp(self, param: Param, value: int) -> Program:
        if not isinstance(param, Param):
            raise TypeError(f"param must be a Param, not {param!r}")
        return self._emit(Instr(Opcode.SETP.value, param.value, 0, int(value)))

    def setps(self, **values: int) -> Program:
        """Several SETPs by parameter name: ``setps(HO=4, WO=8)``."""
        for name, v in values.items():
            try:
                p = Param[name]
            except KeyError:
                raise ValueError(f"unknown parameter {name!r}; known: "
                                 f"{[q.name for q in Param]}") from None
            self.setp(p, v)
        return self

    def conv(self, indices: Sequence[int], *, relu: bool = False, fence: bool = False,
             hold: bool = False, acc: bool = False) -> Program:
        """One block row (or, with ``hold``/``acc``, a piece of one): ``indices`` are the input
        channel groups of its non-zero blocks. ``hold`` keeps the sums for the next op instead
        of writing them back; ``acc`` starts from the sums the previous (``hold``) op kept."""
        idx = [int(i) for i in indices]
        if len(idx) >= 1 << 16:
            raise ValueError(f"a block row holds at most 65535 blocks, not {len(idx)}")
        flags = (_flags(relu, fence) | (Flag.HOLD.value if hold else 0)
                 | (Flag.ACC.value if acc else 0))
        self._emit(Instr(Opcode.CONV.value, flags, len(idx)))
        for k in range(0, len(idx), INDEX_PER_WORD):
            self.words.append(encode_index_word(idx[k:k + INDEX_PER_WORD]))
        return self

    def _cg_op(self, op: Opcode, cg: int, relu: bool, fence: bool) -> Program:
        if not 0 <= cg < 1 << 16:
            raise ValueError(f"channel group must be 0..65535, not {cg!r}")
        return self._emit(Instr(op.value, _flags(relu, fence), cg))

    def maxpool(self, cg: int, *, relu: bool = False, fence: bool = False) -> Program:
        return self._cg_op(Opcode.MAXPOOL, cg, relu, fence)

    def avgpool(self, cg: int, *, relu: bool = False, fence: bool = False) -> Program:
        return self._cg_op(Opcode.AVGPOOL, cg, relu, fence)

    def add(self, cg: int, *, relu: bool = False, fence: bool = False) -> Program:
        return self._cg_op(Opcode.ADD, cg, relu, fence)

    def nop(self, *, fence: bool = False) -> Program:
        """NOP; with ``fence`` it waits until every earlier writeback has reached memory."""
        return self._emit(Instr(Opcode.NOP.value, _flags(False, fence)))

    def acquire(self, lock: int, value: int = 1) -> Program:
        """ACQ: wait until ``lock >= value``, then subtract ``value``."""
        return self._lock(Opcode.ACQ, lock, value)

    def release(self, lock: int, value: int = 1) -> Program:
        """REL: add ``value`` to ``lock``."""
        return self._lock(Opcode.REL, lock, value)

    def _lock(self, op: Opcode, lock: int, value: int) -> Program:
        if not 0 <= lock < N_LOCKS:
            raise ValueError(f"lock must be 0..{N_LOCKS - 1}, not {lock!r}")
        if not 1 <= value <= MAX_LOCK_VALUE:
            raise ValueError(f"lock value must be 1..{MAX_LOCK_VALUE}, not {value!r}")
        return self._emit(Instr(op.value, lock, 0, value))

    def loop(self, count: int) -> Program:
        """Start a hardware loop: the words up to the matching :meth:`endloop` run ``count``
        times."""
        if not 1 <= count < 1 << 16:
            raise ValueError(f"loop count must be 1..65535, not {count!r}")
        return self._emit(Instr(Opcode.LOOP.value, 0, count))

    def endloop(self) -> Program:
        return self._emit(Instr(Opcode.ENDLOOP.value))

    def halt(self) -> Program:
        return self._emit(Instr(Opcode.HALT.value))

    def raw(self, word: int) -> Program:
        """Append an arbitrary 64-bit word (for tests of illegal programs)."""
        self.words.append(int(word) & ((1 << 64) - 1))
        return self


def disassemble(words: Iterable[int]) -> list[str]:
    """One line per word: ``addr: hex  mnemonic operands``."""
    out: list[str] = []
    ws = list(words)
    pc = 0
    while pc < len(ws):
        ins = Instr.decode(ws[pc])
        op = ins.op
        text: str
        nidx = 0
        if op is None:
            text = f".word 0x{ws[pc]:016x}  ; illegal opcode 0x{ins.opcode:02x}"
        elif op is Opcode.SETP:
            try:
                name = Param(ins.a).name
            except ValueError:
                name = f"?{ins.a}"
            text = f"setp {name}, {ins.imm}"
        elif op in (Opcode.ACQ, Opcode.REL):
            text = f"{op.name.lower()} lock={ins.a}, {ins.imm}"
        elif op is Opcode.LOOP:
            text = f"loop {ins.b}"
        elif op is Opcode.NOP and ins.a:
            text = "nop .fence"
        elif op in ENGINE_OPS:
            fl = [f.name.lower() for f in Flag if ins.a & f.value]
            arg = f"nnz={ins.b}" if op is Opcode.CONV else f"cg={ins.b}"
            text = f"{op.name.lower()} {arg}" + ("".join(f" .{f}" for f in fl))
            if op is Opcode.CONV:
                nidx = index_words(ins.b)
        else:
            text = op.name.lower()
        out.append(f"{pc:5d}: {ws[pc]:016x}  {text}")
        for k in range(nidx):
            a = pc + 1 + k
            if a >= len(ws):
                break
            ents = decode_index_word(ws[a])
            n = min(INDEX_PER_WORD, ins.b - k * INDEX_PER_WORD)
            out.append(f"{a:5d}: {ws[a]:016x}    .index {', '.join(map(str, ents[:n]))}")
        pc += 1 + nidx
    return out
