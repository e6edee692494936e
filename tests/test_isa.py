"""ISA: encode/decode round trip over every instruction, static checks, generated docs."""

from pathlib import Path

import numpy as np
import pytest

from tilewright.hw import isa
from tilewright.hw.config import TileConfig
from tilewright.hw.isa import ErrorCode, Flag, Instr, Opcode, Param, check_static
from tilewright.sw.asm import Program, disassemble

REPO = Path(__file__).resolve().parents[1]


def test_every_opcode_round_trips():
    rng = np.random.default_rng(0)
    for op in Opcode:
        for _ in range(50):
            ins = Instr(op.value, int(rng.integers(0, 256)), int(rng.integers(0, 1 << 16)),
                        int(rng.integers(-(1 << 31), 1 << 31)))
            assert Instr.decode(ins.encode()) == ins, ins


def test_every_param_round_trips_through_setp():
    tile = TileConfig()
    for p in Param:
        r = isa.param_range(p, tile)
        for v in {r.lo, r.hi - (r.hi % r.align), r.lo + r.align}:
            w = Program().setp(p, v).words[0]
            ins = Instr.decode(w)
            assert (ins.op, Param(ins.a), ins.imm) == (Opcode.SETP, p, v)
            assert check_static(ins) is ErrorCode.NONE


def test_index_words_round_trip():
    idx = [0, 1, 7, 65535, 300]
    p = Program().conv(idx, relu=True, fence=True)
    assert len(p.words) == 1 + isa.index_words(len(idx)) == 3
    got = isa.decode_index_word(p.words[1]) + isa.decode_index_word(p.words[2])
    assert got[:len(idx)] == idx
    ins = Instr.decode(p.words[0])
    assert ins.a == Flag.RELU.value | Flag.FENCE.value and ins.b == len(idx)


def test_static_checks():
    assert check_static(Instr(0)) is ErrorCode.ILLEGAL_OPCODE
    assert check_static(Instr(0x7F)) is ErrorCode.ILLEGAL_OPCODE
    assert check_static(Instr(Opcode.HALT.value, b=1)) is ErrorCode.MALFORMED
    assert check_static(Instr(Opcode.SETP.value, 200)) is ErrorCode.BAD_PARAM
    assert check_static(Instr(Opcode.SETP.value, 1, 1)) is ErrorCode.MALFORMED
    assert check_static(Instr(Opcode.CONV.value, 0x10)) is ErrorCode.MALFORMED
    assert check_static(Instr(Opcode.CONV.value, 0x0C)) is ErrorCode.NONE      # HOLD|ACC
    assert check_static(Instr(Opcode.ADD.value, 0x03, 5)) is ErrorCode.NONE


def test_encode_rejects_out_of_range_fields():
    with pytest.raises(ValueError, match=r"field b must be 0\.\.65535, not 70000"):
        Instr(Opcode.CONV.value, 0, 70000).encode()
    with pytest.raises(ValueError, match="unknown parameter 'FOO'"):
        Program().setps(FOO=1)


def test_disassembler_names_everything():
    p = Program().setps(HO=3, W_PTR=16).conv([1, 2, 3, 4, 5]).maxpool(2, relu=True)
    text = "\n".join(disassemble(p.raw(0x7F).halt().words))
    for s in ("setp HO, 3", "setp W_PTR, 16", "conv nnz=5", ".index 1, 2, 3, 4", ".index 5",
              "maxpool cg=2 .relu", "illegal opcode 0x7f", "halt"):
        assert s in text, (s, text)


def test_docs_table_is_generated_from_the_isa():
    doc = (REPO / "docs" / "isa.md").read_text()
    body = doc.split("<!-- BEGIN GENERATED -->\n")[1].split("<!-- END GENERATED -->")[0]
    assert body == isa.encoding_table(), "docs/isa.md is stale: run python -m tilewright.hw.isa"
