"""Seeded random tile programs for the RTL regressions.

Every program is valid (the golden model runs it without hazards) and exercises one op kind
over random shapes, strides, kernel sizes, block-sparsity patterns, requantisation records,
flags and chunk splits; its data memory is random where the program reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tilewright.hw.config import TileConfig
from tilewright.hw.isa import ErrorCode, Instr, Opcode, Param
from tilewright.sw.asm import Program

__all__ = ["OP_KINDS", "RandomCase", "random_case"]

OP_KINDS = ("conv", "maxpool", "avgpool", "add")


@dataclass
class RandomCase:
    name: str
    program: list[int]
    dmem: np.ndarray
    op: str
    sparsity: float
    seed: int


def _qrecords(rng: np.random.Generator, n: int, b: int, op: str) -> np.ndarray:
    """``n`` requantisation records (8 words each) as bytes."""
    out = np.zeros((n, 8 * b), dtype=np.uint8)
    for r in range(n):
        if op == "maxpool" and rng.random() < 0.5:
            bias = np.zeros(b, np.int64)
            mult = np.ones(b, np.int64)
        else:
            bias = rng.integers(-3000, 3000, b)
            mult = rng.integers(1 << 14, 1 << 24, b) * rng.choice([-1, 1, 1, 1], b)
        out[r, :4 * b] = np.asarray(bias, "<i4").view(np.uint8)
        out[r, 4 * b:] = np.asarray(mult, "<i4").view(np.uint8)
    return out


def random_case(tile: TileConfig, seed: int, op: str, sparsity: float = 0.5,
                split: float = 0.4) -> RandomCase:
    """A random program of ``op`` ops (one to three output channel groups).

    The shapes are small enough for the tile yet cover chunk splits (more groups than
    ``acc_depth``), stride 2, non-square kernels and partial last pixel groups.
    """
    if op not in OP_KINDS:
        raise ValueError(f"op must be one of {OP_KINDS}, not {op!r}")
    rng = np.random.default_rng(seed)
    b, nw = tile.block, tile.dmem_words
    mem = np.zeros(tile.dmem_bytes, dtype=np.uint8)
    budget = nw // 4                       # words per region (input, weights, output)
    for _ in range(200):
        s = int(rng.choice([1, 2])) if op != "add" else 1
        if op == "add":
            kh = kw = 1
        else:
            kh, kw = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
            if rng.random() < 0.2:
                kh, kw = (1, 7) if rng.random() < 0.5 else (7, 1)
        ho = int(rng.integers(1, 6))
        wo = int(rng.integers(1, 3 * tile.pixels + 3))
        hi, wi = (ho - 1) * s + kh, (wo - 1) * s + kw
        row = wi + int(rng.integers(0, 3))
        cin_g = int(rng.integers(1, 4))
        cout_g = int(rng.integers(1, 4))
        plane = hi * row + int(rng.integers(0, 4))
        in_words = cin_g * plane
        out_row = wo + int(rng.integers(0, 3))
        out_plane = ho * out_row
        w_words = cin_g * kh * kw * b * cout_g if op == "conv" else 0
        if (in_words * (2 if op == "add" else 1) <= budget and w_words <= budget
                and out_plane * cout_g <= budget):
            break
    else:  # pragma: no cover - the loop always finds a shape for shipped configs
        raise RuntimeError("no random shape fits the tile")
    if op != "conv":
        cout_g = min(cout_g, cin_g)

    q_base = 0
    q_words = 8 * cout_g * (3 if op == "conv" else 1)     # a block row may take 3 ops
    w_base = -(-q_words // b) * b
    in_base = w_base + budget
    b_base = in_base + in_words
    out_base = nw - budget
    # random inputs (a second operand for ADD)
    span = (b_base + (in_words if op == "add" else 0) - in_base) * b
    mem[in_base * b:in_base * b + span] = rng.integers(0, 256, span, dtype=np.uint8)
    n_rec = q_words // 8
    mem[q_base * b:(q_base + q_words) * b] = _qrecords(rng, n_rec, b, op).ravel()

    p = Program().setps(IN_BASE=in_base, IN_ROW=row, IN_CG=plane, OUT_BASE=out_base,
                        OUT_ROW=out_row, OUT_CG=out_plane, HO=ho, WO=wo, KH=kh, KW=kw,
                        STRIDE=s, W_PTR=w_base, Q_PTR=q_base,
                        SHIFT=int(rng.integers(16, 31)))
    if op == "add":
        p.setps(B_BASE=b_base, MUL_A=int(rng.integers(-20000, 20000)),
                MUL_B=int(rng.integers(-20000, 20000)))
    wptr = w_base
    for _ in range(cout_g):
        relu = bool(rng.random() < 0.5)
        fence = bool(rng.random() < 0.2)
        if op == "conv":
            keep = rng.random(cin_g) >= sparsity
            if sparsity == 0.0:
                keep[:] = True
            idx = [int(c) for c in np.nonzero(keep)[0]]
            n = len(idx) * kh * kw * b * b
            mem[wptr * b:wptr * b + n] = rng.integers(0, 256, n, dtype=np.uint8)
            wptr += len(idx) * kh * kw * b
            groups = ho * -(-wo // tile.pixels)
            if len(idx) >= 2 and groups <= tile.acc_depth and rng.random() < split:
                # the row in 2-3 pieces: HOLD ... ACC (the sums stay in the accumulators)
                n = int(rng.integers(2, min(3, len(idx)) + 1))
                cuts = sorted(rng.choice(np.arange(1, len(idx)), n - 1, replace=False))
                pieces = np.split(np.array(idx), cuts)
                for k, piece in enumerate(pieces):
                    last = k == len(pieces) - 1
                    p.conv(piece.tolist(), relu=relu and last, fence=fence and k == 0,
                           hold=not last, acc=k > 0)
            else:
                p.conv(idx, relu=relu, fence=fence)
        else:
            cg = int(rng.integers(0, cin_g))
            {"maxpool": p.maxpool, "avgpool": p.avgpool, "add": p.add}[op](
                cg, relu=relu, fence=fence)
    if rng.random() < 0.3:
        p.nop()
    p.halt()
    name = f"{op}-s{sparsity:g}-seed{seed}"
    return RandomCase(name, p.words, mem, op, sparsity, seed)




def illegal_programs() -> list[tuple[str, list[int], ErrorCode, int]]:
    """Malformed programs: (name, words, the error the tile must stop with, its pc)."""
    return [
        ("zero word", Program().nop().raw(0).words, ErrorCode.ILLEGAL_OPCODE, 1),
        ("undefined opcode", Program().raw(0x7F).words, ErrorCode.ILLEGAL_OPCODE, 0),
        ("unknown parameter", Program().raw(Instr(Opcode.SETP.value, 40, 0, 1).encode()).words,
         ErrorCode.BAD_PARAM, 0),
        ("stride 3", Program().setp(Param.STRIDE, 3).halt().words, ErrorCode.BAD_VALUE, 0),
        ("misaligned W_PTR", Program().nop().setp(Param.W_PTR, 3).halt().words,
         ErrorCode.BAD_VALUE, 1),
        ("negative HO", Program().setp(Param.HO, -1).halt().words, ErrorCode.BAD_VALUE, 0),
        ("junk in HALT", Program().raw(Instr(Opcode.HALT.value, 0, 1).encode()).words,
         ErrorCode.MALFORMED, 0),
        ("unknown flag", Program().raw(Instr(Opcode.CONV.value, 0x80).encode()).halt().words,
         ErrorCode.MALFORMED, 0),
        ("ENDLOOP without LOOP", Program().nop().raw(Instr(Opcode.ENDLOOP.value).encode())
         .halt().words, ErrorCode.LOOP_NESTING, 1),
        ("three nested loops", Program().loop(2).loop(2).loop(2).nop().endloop().endloop()
         .endloop().halt().words, ErrorCode.LOOP_NESTING, 2),
        ("lock id 64", Program().raw(Instr(Opcode.ACQ.value, 64, 0, 1).encode()).halt().words,
         ErrorCode.MALFORMED, 0),
        ("LOOP of 0", Program().raw(Instr(Opcode.LOOP.value).encode()).halt().words,
         ErrorCode.MALFORMED, 0),
        ("index words past the end",
         Program().nop().raw(Instr(Opcode.CONV.value, 0, 65535).encode()).words,
         ErrorCode.PC_OVERFLOW, 1),
    ]


def loop_lock_case(tile: TileConfig, seed: int = 22) -> tuple[list[int], np.ndarray, list[int]]:
    """A program of hardware loops (nested), lock releases and acquires and a fence NOP
    around identity max pools copying channel groups: (words, dmem, initial lock values)."""
    rng = np.random.default_rng(seed)
    b = tile.block
    mem = np.zeros(tile.dmem_bytes, np.uint8)
    mem[100 * b:140 * b] = rng.integers(0, 256, 40 * b, dtype=np.uint8)
    q = np.zeros(8 * b, np.uint8)
    q[4 * b:] = np.ones(b, "<i4").view(np.uint8)          # bias 0, multiplier 1, shift 0
    for r in range(8):
        mem[r * q.size:(r + 1) * q.size] = q
    p = Program().setps(IN_BASE=100, IN_CG=16, OUT_BASE=400, OUT_CG=16, HO=1, WO=16)
    p.loop(3).maxpool(0).setp(Param.IN_BASE, 116).endloop()
    p.loop(2).loop(3).release(5, 2).endloop().acquire(5, 3).endloop()
    p.nop(fence=True).acquire(7, 4).halt()
    locks = [0] * 64
    locks[7] = 9
    return p.words, mem, locks
