"""The single-tile layer compiler: memory layouts, programs, and bit-exact runs.

Layout tests read the memory image and the program back against ``docs/architecture.md``.
End-to-end tests run every job through the golden model
(:class:`tilewright.sim.golden.TileModel`) and compare with the PyTorch integer reference,
on the reference tile and the small test tile, at block sparsity 0, 0.5, 0.9 and 1.0.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tilewright.hw.config import TileConfig, load_config
from tilewright.hw.isa import ErrorCode, Instr, Opcode, Param, decode_index_word, index_words
from tilewright.sim.golden import TileModel
from tilewright.sim.layercases import CONV_CASES, SPARSITIES, make_conv, rand_i8
from tilewright.sw.quantize import (
    act_scale,
    block_mask,
    quantize_act,
    quantize_add,
    quantize_avgpool,
    quantize_conv,
    random_block_mask,
)
from tilewright.sw.tile_compiler import (
    AddLayer,
    ConvLayer,
    PoolLayer,
    TileJob,
    Window,
    assemble,
    compile_layer,
    compile_layer_tiled,
    footprint,
    largest_window,
    plan_tiles,
    reference_output,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {name: load_config(ROOT / "overlay_configs" / f"{name}.yaml").tile
           for name in ("aie2-1x1", "tiny-1x1")}


# Helpers ----------------------------------------------------------------------------------

def run_golden(jobs: list[TileJob], tile: TileConfig, what: str) -> list[np.ndarray]:
    model = TileModel(tile)
    finals = []
    for job in jobs:
        res = model.run(job.program, job.dmem)
        assert res.error is ErrorCode.NONE, (f"{what}: job {job.name} stopped with "
                                             f"{res.error} at pc {res.error_pc}")
        finals.append(res.dmem)
    return finals


def assert_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}"
    bad = np.argwhere(got != want)
    assert bad.size == 0, (f"{what}: {len(bad)} mismatches; first at (c, y, x) = "
                           f"{tuple(bad[0])}: tile {got[tuple(bad[0])]} != reference "
                           f"{want[tuple(bad[0])]}")


def check_layer(layer, x: np.ndarray, tile: TileConfig, what: str,
                x_b: np.ndarray | None = None) -> list[TileJob]:
    jobs = compile_layer_tiled(layer, x, tile, x_b=x_b)
    got = assemble(jobs, run_golden(jobs, tile, what))
    assert_equal(got, reference_output(layer, x, x_b), what)
    return jobs


@dataclass
class Decoded:
    params: dict[Param, int]
    ops: list[tuple[Opcode, int, list[int]]]      # (opcode, flags, indices or [cg])


def decode(program: list[int]) -> Decoded:
    """SETP values and engine ops of a straight-line program ending in HALT."""
    params: dict[Param, int] = {}
    ops: list[tuple[Opcode, int, list[int]]] = []
    pc = 0
    while True:
        ins = Instr.decode(program[pc])
        if ins.op is Opcode.HALT:
            assert pc == len(program) - 1, "HALT is not the last word"
            return Decoded(params, ops)
        if ins.op is Opcode.SETP:
            params[Param(ins.a)] = ins.imm
            pc += 1
        elif ins.op is Opcode.CONV:
            idx: list[int] = []
            for k in range(index_words(ins.b)):
                idx += decode_index_word(program[pc + 1 + k])
            ops.append((Opcode.CONV, ins.a, idx[:ins.b]))
            pc += 1 + index_words(ins.b)
        else:
            assert ins.op is not None
            ops.append((ins.op, ins.a, [ins.b]))
            pc += 1


# Layout tests (no simulator) --------------------------------------------------------------

@pytest.mark.parametrize("cfg", sorted(CONFIGS))
def test_conv_layout(cfg: str) -> None:
    seed = 11
    tile = CONFIGS[cfg]
    b = tile.block
    rng = np.random.default_rng(seed)
    cin, cout = 3 * b - 1, 2 * b + 3
    layer = make_conv(rng, cin, cout, (3, 2), 1, (1, 1), True, 0.5, b)
    x = rand_i8(rng, (cin, 5, 6))
    job = compile_layer(layer, x, tile)
    d = decode(job.program)
    p = d.params
    words = job.dmem.view(np.int8).reshape(-1, b)
    assert job.dmem.dtype == np.uint8 and job.dmem.shape == (tile.dmem_bytes,)
    assert p[Param.W_PTR] % b == 0 and p[Param.Q_PTR] % tile.qrec_words == 0
    assert (p[Param.KH], p[Param.KW], p[Param.STRIDE]) == (3, 2, 1)
    assert (p[Param.HO], p[Param.WO]) == (5, 7)
    assert len(d.ops) == -(-cout // b) and all(op is Opcode.CONV for op, _, _ in d.ops)
    assert all(flags == 1 for _, flags, _ in d.ops), "RELU flag missing"
    # input planes: the groups some block reads, in ascending order, padded with zeros
    wp = np.zeros((-(-cout // b) * b, -(-cin // b) * b, 3, 2), dtype=np.int8)
    wp[:cout, :cin] = layer.weight
    mask = np.abs(wp).reshape(-(-cout // b), b, -(-cin // b), b, 6).sum(axis=(1, 3, 4)) > 0
    used = np.flatnonzero(mask.any(axis=0))
    xp = np.zeros((len(used) * b, 7, 8), dtype=np.int8)
    xpad = np.zeros((-(-cin // b) * b, 7, 8), dtype=np.int8)
    xpad[:cin, 1:6, 1:7] = x
    for k, g in enumerate(used):
        xp[k * b:(k + 1) * b] = xpad[g * b:(g + 1) * b]
    assert p[Param.IN_ROW] == 8 and p[Param.IN_CG] == 7 * 8
    for k in range(len(used)):
        for y in range(7):
            for xx in range(8):
                wd = words[p[Param.IN_BASE] + k * p[Param.IN_CG] + y * p[Param.IN_ROW] + xx]
                assert np.array_equal(wd, xp[k * b:(k + 1) * b, y, xx]), (
                    f"seed {seed} {cfg}: input word (plane {k}, y {y}, x {xx})")
    # weight lines and requantisation records, walked like the hardware auto-advance does
    wptr, qptr = p[Param.W_PTR], p[Param.Q_PTR]
    for r, (_, _, idx) in enumerate(d.ops):
        assert [int(used[i]) for i in idx] == np.flatnonzero(mask[r]).tolist()
        for j, plane in enumerate(idx):
            g = int(used[plane])
            for kh in range(3):
                for kw in range(2):
                    line = wptr + (j * 6 + kh * 2 + kw) * b
                    want = wp[r * b:(r + 1) * b, g * b:(g + 1) * b, kh, kw]
                    assert np.array_equal(words[line:line + b], want), (
                        f"seed {seed} {cfg}: weight line row {r} block {j} tap {(kh, kw)}")
        rec = job.dmem[qptr * b:(qptr + tile.qrec_words) * b]
        bias = rec[:4 * b].view("<i4")
        mult = rec[4 * b:8 * b].view("<i4")
        n = min(b, cout - r * b)
        assert bias[:n].tolist() == layer.bias[r * b:r * b + n].tolist()
        assert mult[:n].tolist() == layer.mult[r * b:r * b + n].tolist()
        assert not bias[n:].any() and not mult[n:].any()
        wptr += len(idx) * 6 * b
        qptr += tile.qrec_words
    assert wptr == p[Param.W_PTR] + job.nnz_blocks * 6 * b
    # output description matches the program, regions are disjoint and inside memory
    o = job.outputs
    assert (o.base, o.cg_stride, o.row_stride) == (p[Param.OUT_BASE], p[Param.OUT_CG],
                                                   p[Param.OUT_ROW])
    spans = sorted((s, s + n) for s, n in job.regions.values() if n)
    assert all(a[1] <= c[0] for a, c in itertools.pairwise(spans))
    assert spans[-1][1] <= tile.dmem_words


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
def test_maxpool_layout_pads_with_minus_128(cfg: str) -> None:
    tile = CONFIGS[cfg]
    b = tile.block
    rng = np.random.default_rng(5)
    x = rand_i8(rng, (b + 1, 4, 4))
    job = compile_layer(PoolLayer("max", 3, 2, 1), x, tile)
    p = decode(job.program).params
    words = job.dmem.view(np.int8).reshape(-1, b)
    plane0 = words[p[Param.IN_BASE]:p[Param.IN_BASE] + p[Param.IN_CG]].reshape(5, 5, b)
    assert p[Param.IN_ROW] == 5                          # (Wo-1)*S + K = 1*2 + 3
    assert (plane0[0] == -128).all() and (plane0[:, 0] == -128).all()
    assert np.array_equal(plane0[1:5, 1:5].transpose(2, 0, 1), x[:b])
    plane1 = words[p[Param.IN_BASE] + p[Param.IN_CG]:][:25].reshape(5, 5, b)
    assert (plane1[1:, 1:, 1:] == 0).all(), "channel padding must be zero"
    rec = job.dmem[p[Param.Q_PTR] * b:(p[Param.Q_PTR] + 8) * b]
    assert rec[:4 * b].view("<i4").tolist() == [0] * b
    assert rec[4 * b:].view("<i4").tolist() == [1] * b
    assert p[Param.SHIFT] == 0


def test_read_output_and_channel_offset() -> None:
    tile = CONFIGS["tiny-1x1"]
    b = tile.block
    rng = np.random.default_rng(2)
    x = rand_i8(rng, (2 * b, 3, 5))
    job = compile_layer(PoolLayer("max", 1, 1, 0), x, tile, out_cg_offset=3, out_planes=6)
    o = job.outputs
    assert (o.cg_offset, o.planes, o.groups, o.channels) == (3, 6, 2, 2 * b)
    assert job.params["OUT_BASE"] == o.base + 3 * o.cg_stride
    assert job.regions["out"][1] == 6 * 3 * 5
    final = job.dmem.copy()
    words = final.view(np.int8).reshape(-1, b)
    for g in range(2):
        for y in range(3):
            for xx in range(5):
                words[o.base + (3 + g) * o.cg_stride + y * o.row_stride + xx] = \
                    x[g * b:(g + 1) * b, y, xx]
    assert np.array_equal(job.read_output(final), x)
    res = TileModel(tile).run(job.program, job.dmem)
    assert res.error is ErrorCode.NONE
    assert np.array_equal(job.read_output(res.dmem), x)


def test_largest_window_resnet50_layer1() -> None:
    tile = CONFIGS["aie2-1x1"]
    layer = ConvLayer(np.ones((64, 64, 3, 3), dtype=np.int8), np.zeros(64, dtype=np.int32),
                      np.ones(64, dtype=np.int32), 0, 1, 1, True)
    assert largest_window(layer, tile, (64, 56, 56)) == 2
    fp = footprint(layer, (64, 56, 56), tile, Window(0, 2, 0, 56, 0, 8))
    assert fp == {"q": 512, "w": 36864, "in": 4 * 58 * 64, "out": 2 * 56 * 64,
                  "total": 59392, "program_words": 39, "dmem_bytes": 65536}
    with pytest.raises(ValueError, match="needs 66688 bytes of data memory"):
        compile_layer(layer, np.zeros((64, 56, 56), dtype=np.int8), tile,
                      window=Window(0, 3, 0, 56, 0, 8))


def test_errors_name_the_layer() -> None:
    tile = CONFIGS["tiny-1x1"]
    w = np.ones((4, 8192), dtype=np.int8)                # one block row: 32 KB of weights
    fc = ConvLayer(w, np.zeros(4, dtype=np.int32), np.ones(4, dtype=np.int32), 0, name="fc1")
    with pytest.raises(ValueError, match=r"layer 'fc1': even one output pixel .* needs"):
        plan_tiles(fc, (8192,), tile)
    with pytest.raises(ValueError, match="layer 'c': stride must be 1, 2"):
        ConvLayer(np.ones((4, 4, 1, 1), dtype=np.int8), 0, 1, 0, stride=3, name="c")
    with pytest.raises(ValueError, match="layer 'c': input has 5 channels but the weights"):
        compile_layer(ConvLayer(np.ones((4, 4, 1, 1), dtype=np.int8), 0, 1, 0, name="c"),
                      np.zeros((5, 2, 2), dtype=np.int8), tile)
    with pytest.raises(ValueError, match=r"window .* is not a non-empty part of the output"):
        compile_layer(PoolLayer("max", 2, 2), np.zeros((4, 4, 4), dtype=np.int8), tile,
                      window=Window(0, 3, 0, 2, 0, 1))
    with pytest.raises(ValueError, match="a max pool requantises with mult 1"):
        PoolLayer("max", 2, 2, mult=3)
    with pytest.raises(ValueError, match="an ADD needs the second operand x_b"):
        compile_layer(AddLayer(1, 1, 1, 0), np.zeros((4, 2, 2), dtype=np.int8), tile)
    with pytest.raises(TypeError, match="input x must be int8"):
        compile_layer(PoolLayer("max", 2, 2), np.zeros((4, 2, 2)), tile)


# End to end through the golden model ------------------------------------------------------

@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_bit_exact(cfg: str, sparsity: float, case: str) -> None:
    tile = CONFIGS[cfg]
    seed = 100 + sorted(CONV_CASES).index(case)
    rng = np.random.default_rng(seed)
    cin, cout, k, s, pad, relu, h, w = CONV_CASES[case]
    layer = make_conv(rng, cin, cout, k, s, pad, relu, sparsity, tile.block, case)
    x = rand_i8(rng, (cin, h, w))
    check_layer(layer, x, tile, f"{case} on {cfg} at sparsity {sparsity}, seed {seed}")


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_resnet50_stem_windows(cfg: str, sparsity: float) -> None:
    """The 7x7/2 stem on a 224x224 image (Cin 3 padded to a block): corner and inner windows."""
    tile = CONFIGS[cfg]
    seed = 200
    rng = np.random.default_rng(seed)
    layer = make_conv(rng, 3, 16, (7, 7), 2, (3, 3), True, sparsity, tile.block, "stem")
    x = rand_i8(rng, (3, 224, 224))
    want = reference_output(layer, x)
    assert want.shape == (16, 112, 112)
    groups = 16 // tile.block
    for win in (Window(0, 2, 0, 9, 0, groups), Window(50, 52, 60, 66, 1, 2),
                Window(110, 112, 101, 112, groups - 1, groups)):
        job = compile_layer(layer, x, tile, window=win)
        (final,) = run_golden([job], tile, f"stem {win} on {cfg}")
        what = f"stem window {win} on {cfg} at sparsity {sparsity}, seed {seed}"
        assert_equal(job.read_output(final),
                     want[win.g0 * tile.block:win.g1 * tile.block, win.r0:win.r1,
                          win.c0:win.c1], what)


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_fc_bit_exact(cfg: str, sparsity: float) -> None:
    tile = CONFIGS[cfg]
    seed = 300
    rng = np.random.default_rng(seed)
    conv = make_conv(rng, 256, 20, (1, 1), 1, (0, 0), False, sparsity, tile.block)
    layer = ConvLayer(conv.weight[:, :, 0, 0], conv.bias, conv.mult, conv.shift, name="fc")
    assert layer.is_linear
    x = rand_i8(rng, (256,))
    jobs = check_layer(layer, x, tile, f"fc 256->20 on {cfg} at sparsity {sparsity}, "
                                       f"seed {seed}")
    assert sum(j.nnz_blocks for j in jobs) == int(block_mask(layer.weight, tile.block).sum())


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
def test_quantised_float_conv_bit_exact(cfg: str) -> None:
    """A torch Conv2d through quantize_conv, with a block mask, then the tile."""
    tile = CONFIGS[cfg]
    seed = 400
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    conv = nn.Conv2d(24, 16, 3, 1, 1)
    xf = torch.from_numpy(rng.standard_normal((24, 10, 10))).float()
    yf = conv(xf[None])[0].detach()
    b = tile.block
    mask = random_block_mask(16 // b, 24 // b, 0.5, rng)
    q = quantize_conv(conv, act_scale(xf), act_scale(torch.relu(yf)), True, mask, b)
    check_layer(ConvLayer.from_quant(q, "qconv"), quantize_act(xf, q.s_in).numpy(), tile,
                f"quantised conv on {cfg}, seed {seed}")


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
def test_pools_bit_exact(cfg: str) -> None:
    tile = CONFIGS[cfg]
    seed = 500
    rng = np.random.default_rng(seed)
    x = rand_i8(rng, (16, 11, 11))
    x[3] = -90                                            # max over padding must not win
    check_layer(PoolLayer("max", 3, 2, 1, name="maxpool"), x, tile,
                f"maxpool 3x3/2 pad 1 on {cfg}, seed {seed}")
    qp = quantize_avgpool(3, 0.05, 0.04)
    x = rand_i8(rng, (12, 6, 6))
    check_layer(PoolLayer("avg", 3, 1, 1, qp.mult, qp.shift, "avgpool"), x, tile,
                f"avgpool 3x3/1 pad 1 on {cfg}, seed {seed}")
    qp = quantize_avgpool(7, 0.05, 0.01)
    x = rand_i8(rng, (16, 7, 7))
    mult = rng.integers(qp.mult // 2, qp.mult, 16)         # per-channel multipliers
    check_layer(PoolLayer("avg", 7, 1, 0, mult, qp.shift, "gap"), x, tile,
                f"global avgpool 7x7 on {cfg}, seed {seed}")


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("relu", [True, False])
def test_residual_add_bit_exact(cfg: str, relu: bool) -> None:
    tile = CONFIGS[cfg]
    seed = 600
    rng = np.random.default_rng(seed)
    qa = quantize_add(0.03, 0.05, 0.06, relu)
    a, b = rand_i8(rng, (20, 6, 7)), rand_i8(rng, (20, 6, 7))
    jobs = check_layer(AddLayer.from_quant(qa, "add"), a, tile,
                       f"residual add relu={relu} on {cfg}, seed {seed}", x_b=b)
    p = decode(jobs[0].program).params
    assert (p[Param.MUL_A], p[Param.MUL_B]) == (qa.mul_a, qa.mul_b)
    # per-channel bias and multiplier, negative operand multiplier
    layer = AddLayer(-5, 9, rng.integers(1 << 8, 1 << 10, 20), 8, relu,
                     rng.integers(-500, 500, 20), "add2")
    check_layer(layer, a, tile, f"add with bias on {cfg}, seed {seed}", x_b=b)


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
def test_tiled_layer_bit_exact(cfg: str) -> None:
    """A layer bigger than the tile is split into jobs and reassembled."""
    tile = CONFIGS[cfg]
    seed = 700
    rng = np.random.default_rng(seed)
    cin = 64 if cfg == "tiny-1x1" else 128
    layer = make_conv(rng, cin, 64, (3, 3), 1, (1, 1), True, 0.0, tile.block, "big")
    x = rand_i8(rng, (cin, 14, 14))
    jobs = check_layer(layer, x, tile, f"tiled 3x3 {cin}->64 on {cfg}, seed {seed}")
    assert len(jobs) > 1
    assert all(footprint(layer, x.shape, tile, j.window)["total"] <= tile.dmem_bytes
               for j in jobs)
    # windows of the whole output, explicit channel-group and column windows
    want = reference_output(layer, x)
    b = tile.block
    win = Window(3, 6, 2, 13, 2, 4)
    job = compile_layer(layer, x, tile, window=win)
    (final,) = run_golden([job], tile, f"window {win}")
    assert_equal(job.read_output(final), want[2 * b:4 * b, 3:6, 2:13],
                 f"window {win} on {cfg}, seed {seed}")


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
def test_concat_offset_bit_exact(cfg: str) -> None:
    """Two branches written at channel-group offsets of one output region (Inception)."""
    tile = CONFIGS[cfg]
    seed = 800
    rng = np.random.default_rng(seed)
    b = tile.block
    x = rand_i8(rng, (8, 6, 6))
    br1 = make_conv(rng, 8, 2 * b, (1, 1), 1, (0, 0), True, 0.0, b, "branch1")
    br2 = make_conv(rng, 8, b, (3, 3), 1, (1, 1), True, 0.0, b, "branch2")
    for layer, off in ((br1, 0), (br2, 2)):
        job = compile_layer(layer, x, tile, out_cg_offset=off, out_planes=3)
        (final,) = run_golden([job], tile, f"{layer.name} at offset {off}")
        assert_equal(job.read_output(final), reference_output(layer, x),
                     f"{layer.name} at group offset {off} on {cfg}, seed {seed}")
        o = job.outputs
        words = final.view(np.int8).reshape(-1, b)
        plane = words[o.base + off * o.cg_stride:][:o.cg_stride]
        assert np.array_equal(plane.reshape(6, 6, b).transpose(2, 0, 1),
                              reference_output(layer, x)[:b])


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
def test_wide_layer_splits_columns(cfg: str) -> None:
    """Not one full output row fits: the planner cuts rows x columns windows."""
    tile = CONFIGS[cfg]
    seed = 900
    rng = np.random.default_rng(seed)
    cin, width = (32, 200) if cfg == "tiny-1x1" else (64, 400)
    layer = make_conv(rng, cin, 32, (3, 3), 1, (1, 1), False, 0.0, tile.block, "wide")
    x = rand_i8(rng, (cin, 5, width))
    assert largest_window(layer, tile, x.shape) == 0
    wins = plan_tiles(layer, x.shape, tile)
    assert any(w.cols < width for w in wins)
    groups = -(-32 // tile.block)
    assert sum(w.rows * w.cols * w.groups for w in wins) == 5 * width * groups, \
        "windows overlap"
    check_layer(layer, x, tile, f"wide 3x3 {cin}->32 x {width} on {cfg}, seed {seed}")
