"""Golden model: semantics against a direct formula, cycle-model properties, hazards."""

from pathlib import Path

import numpy as np
import pytest

from tilewright.hw.config import load_config
from tilewright.hw.isa import ErrorCode, Instr, Opcode, Param
from tilewright.sim.golden import HazardError, TileModel
from tilewright.sim.randprog import OP_KINDS, illegal_programs, loop_lock_case, random_case
from tilewright.sw.asm import Program
from tilewright.sw.numerics import requantize

REPO = Path(__file__).resolve().parents[1]
REF = load_config(REPO / "overlay_configs" / "aie2-1x1.yaml").tile
TINY = load_config(REPO / "overlay_configs" / "tiny-1x1.yaml").tile


def _conv_setup(tile, rng, ho, wo, k, s, cin_g, idx_rows):
    b = tile.block
    mem = np.zeros(tile.dmem_bytes, np.uint8)
    hi, wi = (ho - 1) * s + k, (wo - 1) * s + k
    x = rng.integers(-128, 128, (cin_g, hi, wi, b)).astype(np.int8)
    in_base, w_base, out_base = 512, 2048, 6000
    mem[in_base * b:(in_base + x.size // b) * b] = x.view(np.uint8).ravel()
    ws, wptr = [], w_base
    for idx in idx_rows:
        w = rng.integers(-128, 128, (len(idx), k, k, b, b)).astype(np.int8)
        mem[wptr * b:wptr * b + w.size] = w.view(np.uint8).ravel()
        wptr += w.size // b
        ws.append(w)
    bias = rng.integers(-1000, 1000, (len(idx_rows), b)).astype("<i4")
    mult = rng.integers(1 << 20, 1 << 22, (len(idx_rows), b)).astype("<i4")
    for r in range(len(idx_rows)):
        mem[r * 8 * b:r * 8 * b + 4 * b] = bias[r].view(np.uint8)
        mem[r * 8 * b + 4 * b:(r + 1) * 8 * b] = mult[r].view(np.uint8)
    p = Program().setps(IN_BASE=in_base, IN_ROW=wi, IN_CG=hi * wi, OUT_BASE=out_base,
                        OUT_ROW=wo, OUT_CG=ho * wo, HO=ho, WO=wo, KH=k, KW=k, STRIDE=s,
                        W_PTR=w_base, Q_PTR=0, SHIFT=30)
    for idx in idx_rows:
        p.conv(idx, relu=False)
    p.halt()
    return mem, p.words, x, ws, bias, mult, out_base


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conv_matches_direct_formula(seed):
    rng = np.random.default_rng(seed)
    tile = REF
    ho, wo, k, s, cin_g = 3, 5, 3, int(rng.choice([1, 2])), 3
    rows = [[0, 2], [], [1]]
    mem, prog, x, ws, bias, mult, out_base = _conv_setup(tile, rng, ho, wo, k, s, cin_g, rows)
    res = TileModel(tile).run(prog, mem)
    assert res.ok, res.error
    b = tile.block
    out = res.dmem.view(np.int8).reshape(-1, b)
    for r, idx in enumerate(rows):
        acc = np.zeros((ho, wo, b), np.int64)
        for j, cg in enumerate(idx):
            for kh in range(k):
                for kw in range(k):
                    a = x[cg, kh:kh + (ho - 1) * s + 1:s, kw:kw + (wo - 1) * s + 1:s]
                    acc += a.astype(np.int64) @ ws[r][j, kh, kw].astype(np.int64).T
        want = requantize(acc, bias[r], mult[r], 30, False)
        got = out[out_base + r * ho * wo:out_base + (r + 1) * ho * wo].reshape(ho, wo, b)
        assert np.array_equal(got, want), f"seed {seed} block row {r}"


def test_cycles_fall_with_nonzero_blocks():
    rng = np.random.default_rng(3)
    dense = _conv_setup(REF, rng, 8, 16, 3, 1, 8, [list(range(8))] * 2)
    sparse = _conv_setup(REF, rng, 8, 16, 3, 1, 8, [[0, 5]] * 2)
    cd = TileModel(REF).run(dense[1], dense[0]).cycles
    cs = TileModel(REF).run(sparse[1], sparse[0]).cycles
    assert 3.5 < cd / cs < 4.0, (cd, cs)


def test_mac_cycles_are_counted():
    rng = np.random.default_rng(4)
    mem, prog, *_ = _conv_setup(REF, rng, 2, 8, 3, 1, 4, [[0, 1, 2, 3]])
    res = TileModel(REF).run(prog, mem)
    assert res.mac_cycles == 4 * 9 * 2 * 2          # blocks x taps x groups(2 rows x 2)
    assert res.cycles > res.mac_cycles


def test_missing_fence_is_a_hazard():
    # op 2 reads channel group 1 = words 200.., which op 1 writes; op 1's writeback of 8 groups
    # is still running when op 2 starts issuing.
    mem = np.zeros(TINY.dmem_bytes, np.uint8)
    base = Program().setps(IN_BASE=100, IN_CG=100, OUT_BASE=200, OUT_CG=100, HO=1, WO=16)
    with pytest.raises(HazardError, match="set FENCE"):
        TileModel(TINY).run(base.words
                            + Program().maxpool(0).maxpool(1).halt().words, mem)
    res = TileModel(TINY).run(base.words + Program().maxpool(0).maxpool(1, fence=True)
                              .halt().words, mem)
    assert res.ok


def test_in_place_op_is_a_hazard():
    mem = np.zeros(TINY.dmem_bytes, np.uint8)
    p = Program().setps(IN_BASE=100, OUT_BASE=100, HO=1, WO=2, Q_PTR=0).maxpool(0).halt()
    with pytest.raises(HazardError, match="in-place"):
        TileModel(TINY).run(p.words, mem)


def test_errors_report_code_and_pc():
    mem = np.zeros(TINY.dmem_bytes, np.uint8)
    res = TileModel(TINY).run(Program().nop().nop().raw(0x55).words, mem)
    assert (res.error, res.error_pc, res.cycles) == (ErrorCode.ILLEGAL_OPCODE, 2, 6)


@pytest.mark.parametrize("op", OP_KINDS)
@pytest.mark.parametrize("tile", [REF, TINY], ids=["aie2", "tiny"])
def test_random_programs_run_clean(op, tile):
    for seed in range(5):
        c = random_case(tile, seed, op, 0.5)
        res = TileModel(tile).run(c.program, c.dmem)
        assert res.ok, f"{c.name}: {res.error}"


@pytest.mark.parametrize("op", OP_KINDS)
@pytest.mark.parametrize("tile", [REF, TINY], ids=["aie2", "tiny"])
def test_timing_only_counts_the_same_cycles(op, tile):
    """The estimator's timing-only runs (no op computed, no block index decoded) time every
    op exactly like a full run."""
    for seed in range(5):
        for sparsity in (0.0, 0.5, 0.9):
            c = random_case(tile, seed, op, sparsity)
            full = TileModel(tile).run(c.program, c.dmem)
            fast = TileModel(tile, timing_only=True).run(c.program, c.dmem)
            assert full.ok and fast.ok, f"{c.name} (seed {seed}, sparsity {sparsity})"
            assert (fast.cycles, fast.instructions, fast.mac_cycles) == \
                (full.cycles, full.instructions, full.mac_cycles), f"{c.name} seed {seed}"
            assert [(o.pc, o.issue_start, o.issue_end) for o in fast.ops] == \
                [(o.pc, o.issue_start, o.issue_end) for o in full.ops], f"{c.name} seed {seed}"


@pytest.mark.parametrize("tile", [REF, TINY], ids=["aie2", "tiny"])
def test_timing_only_stops_like_a_full_run(tile):
    """Timing-only runs stop with the same error, pc and cycle as full runs on every
    illegal program (a SETP out of range at the end of program memory is a PC_OVERFLOW), and
    run hardware loops and lock waits the same."""
    nop, bad = (Instr(Opcode.NOP.value).encode(),
                Instr(Opcode.SETP.value, Param.STRIDE.value, 0, 3).encode())
    cases = [*illegal_programs(), ("bad SETP at the end", [nop] * (tile.pmem_words - 1) + [bad],
                                   ErrorCode.PC_OVERFLOW, tile.pmem_words - 1)]
    mem = np.zeros(tile.dmem_bytes, np.uint8)
    for name, words, err, pc in cases:
        full = TileModel(tile).run(words, mem)
        fast = TileModel(tile, timing_only=True).run(words, mem)
        assert (full.error, full.error_pc) == (err, pc), name
        assert (fast.error, fast.error_pc, fast.cycles, fast.instructions) == \
            (full.error, full.error_pc, full.cycles, full.instructions), name
    words, mem, locks = loop_lock_case(tile)
    full = TileModel(tile).run(words, mem, locks=locks)
    fast = TileModel(tile, timing_only=True).run(words, mem, locks=locks)
    assert full.ok and (fast.cycles, fast.instructions, fast.locks) == \
        (full.cycles, full.instructions, full.locks)


@pytest.mark.parametrize("seed", [0, 1])
def test_hold_acc_pieces_equal_the_whole_row(seed):
    """A block row of 4 blocks as CONV .hold [0,1] + CONV .acc .hold [2] + CONV .acc [3]
    (Q_PTR set back so the last piece reads the row's record) writes exactly what the
    single CONV writes; misuse is refused."""
    rng = np.random.default_rng(seed)
    mem, prog, *_, out_base = _conv_setup(REF, rng, 2, 5, 3, 1, 4, [[0, 1, 2, 3]])
    whole = TileModel(REF).run(prog, mem)
    head = prog[:-3]                                   # drop CONV, its index word, HALT
    split = (Program().conv([0, 1], hold=True).nop().conv([2], hold=True, acc=True)
             .setp(Param.Q_PTR, 0).conv([3], acc=True).halt().words)
    parts = TileModel(REF).run(head + split, mem)
    assert whole.ok and parts.ok
    b = REF.block
    sl = slice(out_base * b, (out_base + 10) * b)
    assert np.array_equal(whole.dmem[sl], parts.dmem[sl]), f"seed {seed}"
    assert np.any(whole.dmem[sl] != 0)
    with pytest.raises(HazardError, match="ACC without"):
        TileModel(REF).run(head + Program().conv([3], acc=True).halt().words, mem)
    with pytest.raises(HazardError, match="HOLD/ACC"):
        bad_pool = Instr(Opcode.MAXPOOL.value, 0x04, 0).encode()
        TileModel(REF).run([*head, bad_pool, *Program().halt().words], mem)
