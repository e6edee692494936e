# amaranth: UnusedElaboratable=no
"""The overlay: array compiler + overlay model against the PyTorch integer reference, and the
generated array RTL (tw_overlay + DDR model in Verilator) against both."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from tilewright.hw.config import ConfigError, config_from_dict, load_config
from tilewright.hw.generate import generate_overlay
from tilewright.hw.overlay import route_fields
from tilewright.sim.layercases import make_conv, rand_i8
from tilewright.sim.overlay_model import _MAX_ITERATIONS, OverlayModel
from tilewright.sw import array_compiler
from tilewright.sw.array_compiler import (
    LOCK_WEMPTY,
    RAMP_DOWN,
    RAMP_GROWTH,
    _chunks,
    compile_conv_array,
    compile_eltwise_array,
)
from tilewright.sw.asm import Program
from tilewright.sw.quantize import fixed_point
from tilewright.sw.tile_compiler import AddLayer, PoolLayer, reference_output

REPO = Path(__file__).resolve().parents[1]


def _cfg(name: str):
    return load_config(REPO / "overlay_configs" / f"{name}.yaml")


# name, cin, cout, kernel, stride, padding, size, relu
LAYERS = [
    ("3x3", 16, 16, (3, 3), 1, (1, 1), 8, True),
    ("3x3s2", 10, 18, (3, 3), 2, (1, 1), 9, True),
    ("1x1", 32, 16, (1, 1), 1, (0, 0), 6, False),
    ("1x7", 8, 12, (1, 7), 1, (0, 3), 7, True),
    ("7x1", 8, 12, (7, 1), 1, (3, 0), 7, True),
    ("5x5", 8, 8, (5, 5), 1, (2, 2), 6, True),
    ("stem7x7s2", 3, 16, (7, 7), 2, (3, 3), 16, True),
    ("1x1s2", 24, 16, (1, 1), 2, (0, 0), 13, False),
]


def _layer(case, sparsity: float, block: int, seed: int):
    name, cin, cout, k, s, p, size, relu = case
    rng = np.random.default_rng(seed)
    layer = make_conv(rng, cin, cout, k, s, p, relu, sparsity, block, name=name)
    return layer, rand_i8(rng, (cin, size, size))


def _linear(cin: int, cout: int, sparsity: float, block: int, seed: int):
    rng = np.random.default_rng(seed)
    conv = make_conv(rng, cin, cout, (1, 1), 1, (0, 0), False, sparsity, block, name="fc")
    layer = dataclasses.replace(conv, weight=conv.weight[:, :, 0, 0], is_linear=True)
    return layer, rand_i8(rng, (cin,))


@pytest.mark.parametrize("cfg_name", ["tiny-2x2", "tiny-2x3", "aie2-2x2"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
@pytest.mark.parametrize("case", LAYERS, ids=[c[0] for c in LAYERS])
def test_model_bit_exact(cfg_name, sparsity, case):
    cfg = _cfg(cfg_name)
    seed = 7 + LAYERS.index(case)
    layer, x = _layer(case, sparsity, cfg.tile.block, seed)
    al = compile_conv_array(layer, x, cfg)
    res = OverlayModel(cfg).run_layer(al)
    want = reference_output(layer, x)
    assert np.array_equal(res.output, want), f"{case[0]} on {cfg_name}, seed {seed}"
    b = cfg.tile.block
    # every input word is read at least once, every output written exactly once
    assert res.wr_words == al.out_region[1], f"seed {seed}"
    assert (res.rd_words + res.wr_words) * b >= al.ddr_bytes_min - al.nnz_blocks * 2, \
        f"seed {seed}: fewer bytes than the lower bound"
    assert res.cycles > 0


@pytest.mark.parametrize("cfg_name", ["tiny-2x2", "aie2-2x2"])
def test_strided_1x1_reads_only_the_pixels_it_uses(cfg_name):
    # a 1x1/2 convolution reads every second row and column (the BDs' strides): the input
    # words read are the used pixels', so all reads stay under the layer's lower bound (the
    # whole input is four times the used part: reading it all would exceed it)
    cfg = _cfg(cfg_name)
    case = next(c for c in LAYERS if c[0] == "1x1s2")
    layer, x = _layer(case, 0.0, cfg.tile.block, 3)
    al = compile_conv_array(layer, x, cfg)
    res = OverlayModel(cfg).run_layer(al)
    b = cfg.tile.block
    assert np.array_equal(res.output, reference_output(layer, x))
    assert al.in_region[1] * b > al.ddr_bytes_min      # reading the whole input would not fit
    assert res.rd_words * b <= al.ddr_bytes_min


def _eltwise_cases(seed: int) -> list:
    """(name, layer, x, x_b): max pool 3x3/2 with padding (halo -128), average pool 3x3/1
    with padding, a global average pool and a residual add with ReLU."""
    rng = np.random.default_rng(seed)

    def x(c: int, h: int) -> np.ndarray:
        return rng.integers(-128, 128, (c, h, h), dtype=np.int8)

    m9, s9 = fixed_point(np.full(20, 1 / 9))
    m49, s49 = fixed_point(np.full(12, 1 / 49))
    return [("max3x3s2", PoolLayer("max", 3, 2, 1), x(20, 13), None),
            ("avg3x3", PoolLayer("avg", 3, 1, 1, mult=m9, shift=s9), x(20, 9), None),
            ("gap7x7", PoolLayer("avg", 7, 1, 0, mult=m49, shift=s49), x(12, 7), None),
            ("add", AddLayer(3000, -2000, 1 << 14, 22, True), x(20, 9), x(20, 9))]


@pytest.mark.parametrize("cfg_name", ["tiny-2x2", "tiny-2x3", "aie2-2x2"])
def test_model_pools_and_add(cfg_name):
    cfg = _cfg(cfg_name)
    for name, layer, x, xb in _eltwise_cases(17):
        al = compile_eltwise_array(layer, x, cfg, x_b=xb)
        res = OverlayModel(cfg).run_layer(al)
        assert np.array_equal(res.output, reference_output(layer, x, xb)), \
            f"{name} on {cfg_name}, seed 17"
        # padding never crosses DDR: every input word is read once (halos twice at most)
        assert res.rd_words < 2 * sum(al.in_region[1:]) * (2 if xb is not None else 1)


def test_model_linear_and_sparse_traffic():
    cfg = _cfg("tiny-2x2")
    reads = {}
    for sp in (0.0, 0.5):
        layer, x = _linear(64, 24, sp, cfg.tile.block, seed=3)
        al = compile_conv_array(layer, x, cfg)
        res = OverlayModel(cfg).run_layer(al)
        want = reference_output(layer, x)
        assert np.array_equal(res.output.reshape(-1), want.reshape(-1)), f"sparsity {sp}"
        reads[sp] = res.rd_words
    # zero blocks never cross DDR: half the weights, fewer reads
    assert reads[0.5] < 0.75 * reads[0.0], reads


def test_model_multi_job_layer():
    """A layer larger than the tiles' memories is split into several overlay runs."""
    cfg = _cfg("tiny-2x2")
    layer, x = _layer(("big", 48, 40, (3, 3), 1, (1, 1), 20, True), 0.0, cfg.tile.block, 11)
    al = compile_conv_array(layer, x, cfg)
    assert len(al.jobs) > 1
    res = OverlayModel(cfg).run_layer(al)
    assert np.array_equal(res.output, reference_output(layer, x)), "seed 11"


BIG = ("big", 48, 40, (3, 3), 1, (1, 1), 20, True)     # two runs over output rows on tiny-2x2


FUSED = [("1x1", 32, 24, (1, 1), 1, (0, 0), 6, False),
         ("3x3s2", 16, 20, (3, 3), 2, (1, 1), 9, True),
         ("big", 48, 40, (3, 3), 1, (1, 1), 20, False)]


@pytest.mark.parametrize("cfg_name", ["tiny-2x2", "tiny-2x3", "aie2-2x2"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_model_fused_residual_add(cfg_name, sparsity):
    """A residual add in the convolution's epilogue equals the conv then the add, with
    either operand order, across several runs too; the conv's output never crosses DDR."""
    cfg = _cfg(cfg_name)
    b = cfg.tile.block
    for i, case in enumerate(FUSED):
        seed = 40 + i
        layer, x = _layer(case, sparsity, b, seed)
        y = reference_output(layer, x)
        rng = np.random.default_rng(seed + 100)
        xr = rand_i8(rng, y.shape)
        add = AddLayer(3000 - 500 * i, -2000 + 900 * i, (1 << 14) + 77 * i, 22, i != 1)
        for operand in (0, 1):
            # the runs as _build_job builds them (streamed runs: test_streamed_runs)
            al = compile_conv_array(layer, x, cfg, fuse=array_compiler.FusedAdd(add, operand),
                                    x_res=xr, stream=False)
            res = OverlayModel(cfg).run_layer(al)
            want = (reference_output(add, y, xr) if operand == 0
                    else reference_output(add, xr, y))
            assert np.array_equal(res.output, want), \
                f"{case[0]} on {cfg_name}, sparsity {sparsity}, operand {operand}, seed {seed}"
            # outputs written once; the residual read once (its pad words are not reads)
            assert res.wr_words == al.out_region[1], f"seed {seed}"
            pl = compile_conv_array(layer, x, cfg, stream=False)
            extra = res.rd_words - OverlayModel(cfg).run_layer(pl).rd_words
            assert extra >= al.out_region[1], f"seed {seed}: residual reads {extra}"
            if len(pl.jobs) == len(al.jobs):     # the same runs: the residual and headers
                assert extra <= 1.1 * al.out_region[1] + 64 * len(al.jobs), \
                    f"seed {seed}: residual reads {extra}, its size {al.out_region[1]}"
        if case[0] == "big" and cfg_name == "tiny-2x2":
            assert len(al.jobs) > 1


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_model_fast_timing_equals_the_reference_loop(sparsity):
    """The estimator's timing-only tile runs (:meth:`TileModel._run_timing`, datamover
    channels that write no data, the port-sharing shortcut) time whole jobs -- lock waits,
    HOLD/ACC pieces, a fused add's epilogue, several runs -- exactly like the full runs."""
    from tilewright.sim.golden import TileModel

    cfg = _cfg("tiny-2x2")
    b = cfg.tile.block
    add = AddLayer(3000, -2000, 1 << 14, 22, True)
    for i, case in enumerate([BIG, *FUSED[:2], LAYERS[0], LAYERS[6]]):
        seed = 70 + i
        layer, x = _layer(case, sparsity, b, seed)
        fuse = array_compiler.FusedAdd(add, i % 2) if case in FUSED else None
        xr = rand_i8(np.random.default_rng(seed), reference_output(layer, x).shape)
        al = compile_conv_array(layer, x, cfg, fuse=fuse, x_res=xr if fuse else None)
        results = []
        for fast, timing_only in ((True, True), (False, True), (False, False)):
            m = OverlayModel(cfg)
            m._timing_model.fast_timing = fast
            m.tile_model = TileModel(cfg.tile, timing_only=timing_only)
            r = m.run_layer(al)
            results.append([(j.cycles, j.rd_words, j.wr_words, j.tile_cycles, j.iterations)
                            for j in r.jobs])
        assert results[0] == results[1] == results[2], f"{case[0]}, seed {seed}"


def test_balance_contiguous():
    nnz = np.array([5, 1, 1, 1, 1, 5, 2, 2, 0, 3])
    cols = array_compiler._balance_contiguous(nnz, 3, 1)
    assert [g for c in cols for g in c] == list(range(10))
    assert all(c == list(range(c[0], c[-1] + 1)) for c in cols if c)
    loads = [sum(int(nnz[g]) + 1 for g in c) for c in cols]
    assert max(loads) == 11, loads            # the least possible: ceil(31 / 3)
    assert array_compiler._balance_contiguous(np.zeros(2, int), 4) == [[0], [1], [], []]


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_model_memtile_replays_weights(sparsity):
    """Runs that stream a column the same weights: the first captures them into the column's
    memtile, the others replay them from there. Every replayed word is a DDR read saved (less
    one token a group), the output stays exact and the runs are no slower."""
    cfg = _cfg("tiny-2x2")
    layer, x = _layer(BIG, sparsity, cfg.tile.block, 12)
    plain = compile_conv_array(layer, x, cfg, memtile=False)
    al = compile_conv_array(layer, x, cfg)
    assert len(al.jobs) == 2
    assert al.jobs[0].memtile_use == {0: "capture", 1: "capture"}
    assert al.jobs[1].memtile_use == {0: "replay", 1: "replay"}
    model = OverlayModel(cfg)
    want = reference_output(layer, x)
    res, ref = model.run_layer(al), model.run_layer(plain)
    assert np.array_equal(res.output, want) and np.array_equal(ref.output, want), "seed 12"
    cap, rep = res.jobs
    tokens = rep.mt_wr_words                      # a replaying job writes only its tokens
    assert 0 < tokens <= 4 * cfg.memtile.bds_per_channel
    assert rep.mt_rd_words == cap.mt_wr_words > 0
    assert ref.rd_words - res.rd_words == rep.mt_rd_words - tokens
    assert res.cycles <= ref.cycles * 1.01, (res.cycles, ref.cycles)


def test_memtile_plan_needs_room_and_repeats():
    """No memtile use for a single run, nor for weights larger than the memtile."""
    cfg = _cfg("tiny-2x2")
    layer, x = _layer(LAYERS[0], 0.0, cfg.tile.block, 13)
    assert all(not j.memtile_use and not j.memtile_bds
               for j in compile_conv_array(layer, x, cfg).jobs)
    small = dataclasses.replace(cfg, memtile=dataclasses.replace(cfg.memtile, bytes=4096))
    layer, x = _layer(BIG, 0.0, cfg.tile.block, 13)
    al = compile_conv_array(layer, x, small)
    assert len(al.jobs) == 2 and all(not j.memtile_use for j in al.jobs)
    res = OverlayModel(small).run_layer(al)
    assert np.array_equal(res.output, reference_output(layer, x)), "seed 13"


def test_model_memtile_capture_without_bds_deadlocks():
    """Packets for a memtile S2MM channel without BDs stall their read channel: the model
    says so rather than dropping them."""
    from tilewright.sim.golden import DeadlockError

    cfg = _cfg("tiny-2x2")
    layer, x = _layer(BIG, 0.0, cfg.tile.block, 14)
    al = compile_conv_array(layer, x, cfg)
    del al.jobs[0].memtile_bds[0][1]
    with pytest.raises(DeadlockError, match="column 0 read channel 1 sends packets to the "
                                            "memtile"):
        OverlayModel(cfg).run_layer(al)


def test_model_balances_columns():
    """Procrustes-style dealing: every column gets about the same number of non-zero blocks."""
    cfg = _cfg("aie2-4x4")
    rng = np.random.default_rng(5)
    layer = make_conv(rng, 64, 128, (1, 1), 1, (0, 0), True, 0.5, 8)
    x = rand_i8(rng, (64, 4, 4))
    al = compile_conv_array(layer, x, cfg)
    from tilewright.sw.quantize import block_mask
    nnz = block_mask(layer.weight, 8).sum(axis=1)
    loads = [int(sum(nnz[g] for g in rows)) for rows in al.jobs[0].col_rows]
    assert max(loads) - min(loads) <= max(nnz), f"seed 5: column loads {loads}"


def test_model_columns_run_densest_block_row_first():
    """A column's first block row needs its whole activation slice: the densest goes first."""
    cfg = _cfg("aie2-4x4")
    rng = np.random.default_rng(6)
    layer = make_conv(rng, 64, 256, (3, 3), 1, (1, 1), True, 0.5, 8)
    x = rand_i8(rng, (64, 8, 8))
    al = compile_conv_array(layer, x, cfg)
    from tilewright.sw.quantize import block_mask
    nnz = block_mask(layer.weight, 8).sum(axis=1)
    for c, rows in enumerate(al.jobs[0].col_rows):
        got = [int(nnz[g]) for g in rows]
        assert got == sorted(got, reverse=True), f"seed 6: column {c} runs {got}"
    res = OverlayModel(cfg).run_layer(al)
    assert np.array_equal(res.output, reference_output(layer, x)), "seed 6"


def test_model_last_outputs_leave_on_both_write_channels():
    """The four tiles of a column finish their last block row together; tile rows start their
    outputs on alternate MM2S channels, so those last packets drain through both of the
    column's DDR write channels: at most half the tiles' packets a channel after the cores
    stop (through one channel it took 423 cycles here, twice as long)."""
    cfg = _cfg("aie2-4x4")
    rng = np.random.default_rng(7)
    layer = make_conv(rng, 64, 128, (3, 3), 1, (1, 1), True, 0.0, 8)
    x = rand_i8(rng, (64, 14, 14))
    al = compile_conv_array(layer, x, cfg)
    res = OverlayModel(cfg).run_layer(al)
    assert np.array_equal(res.output, reference_output(layer, x)), "seed 7"
    job = res.jobs[-1]
    assert len(set(job.tile_cycles.values())) == 1      # every core stops at the same cycle
    # a tile's last block row: 7x7 pixels, a header per output row, 2 cycles a word
    packet_words = 7 * 7 + 7
    step = cfg.tile.word_bytes // cfg.ddr.bytes_per_cycle
    drain = job.cycles - max(job.tile_cycles.values())
    assert drain <= cfg.array.rows // 2 * packet_words * step, f"seed 7: drain {drain}"


def test_unrunnable_layer_names_capacity():
    cfg = _cfg("tiny-2x2")
    rng = np.random.default_rng(2)
    layer = make_conv(rng, 2048, 8, (3, 3), 1, (1, 1), False, 0.0, 4)
    x = rand_i8(rng, (2048, 3, 3))           # the input slice alone is larger than a tile
    with pytest.raises(ValueError, match="does not fit tiny-2x2's tiles"):
        compile_conv_array(layer, x, cfg)


@pytest.mark.parametrize("cfg_name, sparsity", [("tiny-2x2", 0.0), ("tiny-2x2", 0.5),
                                                ("aie2-2x2", 0.5)])
def test_model_block_rows_in_pieces(cfg_name, sparsity):
    """Block rows larger than a weight buffer (a 3x3 conv over 1024 channels on 3x3 pixels
    on the tiny tile; VGG16's classifier.0 shape scaled down on aie2) are cut into pieces
    (CONV .hold/.acc across chunks): bit-exact with the reference."""
    from tilewright.sw.tile_compiler import ConvLayer

    cfg = _cfg(cfg_name)
    b = cfg.tile.block
    rng = np.random.default_rng(3)
    if cfg_name.startswith("tiny"):
        layer = make_conv(rng, 1024, 8, (3, 3), 1, (1, 1), False, sparsity, b)
        x = rand_i8(rng, (1024, 3, 3))
    else:                                    # 512x7x7 -> 64 as the 7x7 conv of a linear
        layer = make_conv(rng, 512, 64, (7, 7), 1, (0, 0), True, sparsity, b)
        x = rand_i8(rng, (512, 7, 7))
    assert isinstance(layer, ConvLayer)
    al = compile_conv_array(layer, x, cfg)
    pieces = [p for job in al.jobs for col in job.chunks for chk in col for p in chk.pieces]
    assert any(j0 > 0 for _, j0, _ in pieces), "no block row was cut"
    res = OverlayModel(cfg).run_layer(al)
    want = reference_output(layer, x)
    assert np.array_equal(res.output.reshape(want.shape), want), f"seed 3 S={sparsity}"


def test_config_rows_bounded_by_header_bits():
    raw = {"name": "t", "array": {"rows": 8, "cols": 1},
           "tile": {"pixels": 2, "block": 4, "dmem_bytes": 16384, "pmem_words": 1024,
                    "acc_depth": 8}}
    with pytest.raises(ConfigError, match=r"8x1 array needs packet headers of 35 bits"):
        config_from_dict(raw)
    # 18 + 2 x rows + cols header bits: the column mask counts too
    raw["array"] = {"rows": 6, "cols": 2}
    assert route_fields(config_from_dict(raw)).bits == 32
    raw["array"] = {"rows": 6, "cols": 3}
    with pytest.raises(ConfigError, match=r"6x3 array needs packet headers of 33 bits"):
        config_from_dict(raw)


def test_generate_overlay(tmp_path):
    cfg = _cfg("tiny-2x3")
    man = generate_overlay(cfg, tmp_path)
    names = {m["name"]: m for m in man["modules"]}
    assert names["tw_tileunit"]["instances"] == 6 and names["tw_shim"]["instances"] == 3
    assert names["tw_memtile"]["instances"] == 3
    # S2MM per read channel; MM2S: 2 weight (column bus) + 2 activation channels
    assert man["memtile"]["s2mm"] == 2 and man["memtile"]["mm2s"] == 4
    assert man["units"]["memtile"] == [9, 11]
    top = (tmp_path / "tw_overlay.v").read_text()
    # each distinct module generated once, instantiated by name
    assert top.count("tw_tileunit ") == 6 and "module tw_tileunit" not in top
    assert top.count("tw_memtile ") == 3 and "module tw_memtile" not in top
    assert json.loads((tmp_path / "overlay_manifest.json").read_text()) == man


# ---- RTL ---------------------------------------------------------------------------------------

@pytest.mark.verilator
def test_overlay_rtl_bit_exact():
    """Several layers (one of them split into two runs, one in row bands, a stem as given
    and as space-to-depth; max, average and global pools; a residual add) on the tiny 2x2
    array, one simulator process: RTL output == PyTorch integer
    reference, DDR traffic == the model's."""
    from tilewright.sim.overlay_sim import OverlayJob, run_overlay_jobs

    cfg = _cfg("tiny-2x2")
    b = cfg.tile.block
    cases = [_layer(LAYERS[0], 0.0, b, 21), _layer(LAYERS[1], 0.5, b, 22),
             _layer(LAYERS[3], 0.5, b, 23), _linear(48, 20, 0.5, b, 24),
             _layer(("big", 48, 40, (3, 3), 1, (1, 1), 20, True), 0.5, b, 25),
             _layer(LAYERS[6], 0.0, b, 28),           # one input group: row parts
             _layer(LAYERS[6], 0.5, b, 29)]           # the stem as space-to-depth
    rng = np.random.default_rng(27)          # block rows in pieces (CONV .hold/.acc)
    cases.append((make_conv(rng, 1024, 8, (3, 3), 1, (1, 1), False, 0.5, b),
                  rand_i8(rng, (1024, 3, 3))))
    compiled = [(layer, x, None, compile_conv_array(layer, x, cfg, repack=k != 5,
                                                    stream=k != 4))
                for k, (layer, x) in enumerate(cases)]
    assert compiled[5][3].s2d is None and compiled[6][3].s2d is not None
    assert len(compiled[4][3].jobs) > 1
    # tiles computing in row bands (more pixel groups than an accumulator buffer)
    assert any(tp.bands > 1 for job in compiled[0][3].jobs for tp in job.tiles)
    # ... band-major (each band's outputs leave once it is done), with one header per band
    # (full-width rectangles) and with one per row (narrower ones)
    bm = {tp.rows[3] - tp.rows[2] == al.out_shape[2]
          for _, _, _, al in compiled for job in al.jobs for tp in job.tiles
          if tp.band_major}
    assert bm == {True, False}
    assert any(j0 > 0 for job in compiled[-1][3].jobs for col in job.chunks for chk in col
               for _, j0, _ in chk.pieces)
    compiled += [(layer, x, xb, compile_eltwise_array(layer, x, cfg, x_b=xb))
                 for _, layer, x, xb in _eltwise_cases(26)]
    jobs, owners = [], []
    for k, (_, _, _, al) in enumerate(compiled):
        lo, n = al.out_region
        for j in al.jobs:
            jobs.append(OverlayJob(al.ddr, j.records(cfg), (lo, lo + n)))
            owners.append(k)
    run = run_overlay_jobs(cfg, jobs)
    model = OverlayModel(cfg)
    for k, (layer, x, xb, al) in enumerate(compiled):
        mine = [r for r, o in zip(run, owners, strict=True) if o == k]
        got = al.read_output(al.merge_outputs([r.ddr_out for r in mine]))
        want = reference_output(layer, x, xb)
        assert np.array_equal(got.reshape(want.shape), want), f"case {k} ({layer.name})"
        res = model.run_layer(al)
        assert sum(r.rd_words for r in mine) == res.rd_words, f"case {k}"
        assert sum(r.wr_words for r in mine) == res.wr_words, f"case {k}"
        # the model's timing is an estimate (docs/architecture.md): on layers whose run is not
        # dominated by fixed start-up costs it stays within 10 % of the RTL
        rtl = sum(r.cycles for r in mine)
        if rtl > 1000:
            assert abs(rtl - res.cycles) <= 0.1 * rtl, \
                f"case {k}: RTL {rtl} cycles, model {res.cycles}"


def test_hier_blocks_rule(monkeypatch):
    """Which overlay modules are Verilated as hierarchical blocks, and the override."""
    from tilewright.sim.overlay_sim import HIER_MIN_TILES, overlay_hier_blocks
    from tilewright.sim.verilator import RtlBuildError, mark_hier_block

    monkeypatch.delenv("TILEWRIGHT_VERILATOR_HIER", raising=False)
    assert overlay_hier_blocks(_cfg("aie2-2x2")) == ()
    assert overlay_hier_blocks(_cfg("aie2-4x4")) == ("tw_tileunit",)
    assert _cfg("aie2-3x3").array.rows * _cfg("aie2-3x3").array.cols >= HIER_MIN_TILES
    monkeypatch.setenv("TILEWRIGHT_VERILATOR_HIER", "memtile,tileunit,memtile")
    assert overlay_hier_blocks(_cfg("tiny-2x2")) == ("tw_memtile", "tw_tileunit")
    monkeypatch.setenv("TILEWRIGHT_VERILATOR_HIER", "none")
    assert overlay_hier_blocks(_cfg("aie2-4x4")) == ()
    monkeypatch.setenv("TILEWRIGHT_VERILATOR_HIER", "tiles")
    with pytest.raises(ValueError, match=r"TILEWRIGHT_VERILATOR_HIER.*'tiles'"):
        overlay_hier_blocks(_cfg("aie2-4x4"))
    text = "module \\a.b (x);\nendmodule\nmodule a(x,\n  y);\n  input x;\nendmodule\n"
    marked = mark_hier_block(text, "a")
    assert marked.count("/*verilator hier_block*/") == 1
    assert marked.index("hier_block") > marked.index("module a(") > marked.index("\\a.b")
    assert marked.index("hier_block") < marked.index("input x")
    with pytest.raises(RtlBuildError, match="'b'"):
        mark_hier_block(text, "b")


@pytest.mark.verilator
def test_overlay_rtl_hierarchical(monkeypatch):
    """The tile unit and memtile Verilated as hierarchical blocks (what arrays of 9 tiles or
    more use, forced here on tiny-2x2) run a conv and a pool exactly as the flat build does:
    the same outputs, cycles and DDR words."""
    from tilewright.sim.overlay_sim import OverlayJob, build_overlay, run_overlay_jobs

    cfg = _cfg("tiny-2x2")
    b = cfg.tile.block
    layer, x = _layer(LAYERS[1], 0.5, b, 31)
    al = compile_conv_array(layer, x, cfg)
    _, pool, xp, xb = _eltwise_cases(32)[0]
    ap = compile_eltwise_array(pool, xp, cfg, x_b=xb)
    jobs = [OverlayJob(a.ddr, j.records(cfg), (a.out_region[0], sum(a.out_region)))
            for a in (al, ap) for j in a.jobs]
    runs = {}
    for hier in ("none", "tileunit,memtile"):
        monkeypatch.setenv("TILEWRIGHT_VERILATOR_HIER", hier)
        bdir = build_overlay(cfg)
        marked = "/*verilator hier_block*/" in (bdir / "tw_tileunit.v").read_text()
        assert marked == (hier != "none")
        runs[hier] = (json.loads((bdir / "build.json").read_text()).get("hier_blocks", []),
                      run_overlay_jobs(cfg, jobs))
    assert runs["none"][0] == [] and runs["tileunit,memtile"][0] == ["tw_tileunit",
                                                                     "tw_memtile"]
    flat, hier = runs["none"][1], runs["tileunit,memtile"][1]
    for r0, r1 in zip(flat, hier, strict=True):
        assert (r0.cycles, r0.rd_words, r0.wr_words) == (r1.cycles, r1.rd_words, r1.wr_words)
        assert np.array_equal(r0.ddr_out, r1.ddr_out)
    got = al.read_output(al.merge_outputs([r.ddr_out for r in hier[:len(al.jobs)]]))
    want = reference_output(layer, x)
    assert np.array_equal(got.reshape(want.shape), want)


def _chain_addrs(bds) -> list[int]:
    """The addresses a BD chain (from BD 0) reads, in stream order (padding left out)."""
    from tilewright.sim.dm_model import bd_addresses

    out: list[int] = []
    i = 0
    while i is not None:
        a, ok = bd_addresses(bds[i])
        out += [int(v) for v in a[ok]]
        i = bds[i].next_bd
    return out


def _via_memtile(cfg, al_a, al_b):
    """Two compiled eltwise layers, B reading A's output, rewired to keep that tensor on chip:
    A's tile output packets get the header's memtile bit and the memtile address where B's
    input lies (B's DDR layout, the same in every column's memtile: column c's outputs are
    the channel groups column c of B reads); B's shim read chains move to the memtile
    activation channels of their columns, the words they read besides that tensor (packet
    headers) written by the configuration."""
    from tilewright.hw.overlay import array_memtile, memtile_act_channels

    rf = route_fields(cfg)
    mcfg = array_memtile(cfg)
    assert memtile_act_channels(cfg) == 2
    (oa, n_out), (ib, n_in) = al_a.out_region, al_b.in_region
    assert n_out == n_in
    for job in al_a.jobs:
        for tp in job.tiles:
            for ch, bds in tp.bds.items():
                if ch < 3 or not bds:
                    continue
                addrs, pos = _chain_addrs(bds), 0
                while pos < len(addrs):
                    hdr = tp.dm[addrs[pos]]
                    n, d = hdr & 0xFFFF, hdr >> 16
                    assert oa <= d and d + n <= oa + n_out
                    tp.dm[addrs[pos]] = n | ((d - oa + ib) << 16) | (1 << rf.mw)
                    pos += 1 + n
    for job in al_b.jobs:
        for c, per in job.shim_bds.items():
            dm = job.memtile_dm.setdefault(c, {})
            for ch, bds in per.items():
                job.memtile_bds.setdefault(c, {})[mcfg.s2mm + 2 + ch] = bds
                for a in _chain_addrs(bds):
                    if not ib <= a < ib + n_in:
                        dm[a] = int(al_b.ddr[a])
        job.shim_bds = {}


def _memtile_chain_case(seed: int):
    """Max pool 3x3/2 then average pool 3x3 (padding both), compiled for tiny-2x2, rewired
    through the memtiles (:func:`_via_memtile`): (cfg, A, B, the reference of B)."""
    cfg = _cfg("tiny-2x2")
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (20, 13, 13), dtype=np.int8)
    mp = PoolLayer("max", 3, 2, 1)
    y = reference_output(mp, x)
    m9, s9 = fixed_point(np.full(20, 1 / 9))
    ap = PoolLayer("avg", 3, 1, 1, mult=m9, shift=s9)
    al_a, al_b = compile_eltwise_array(mp, x, cfg), compile_eltwise_array(ap, y, cfg)
    _via_memtile(cfg, al_a, al_b)
    return cfg, al_a, al_b, reference_output(ap, y)


def test_model_activations_through_memtile():
    """A layer's outputs written into the memtiles and the next layer's input read from there
    (the activation channels into the row buses), on the overlay model: bit-exact, no DDR
    traffic for the tensor in between."""
    cfg, al_a, al_b, want = _memtile_chain_case(41)
    model = OverlayModel(cfg)
    mts = model.new_memtiles()
    ra = model.run_layer(al_a, mts)
    rb = model.run_layer(al_b, mts)
    assert ra.wr_words == 0 and rb.rd_words == 0
    assert np.array_equal(rb.output, want)
    # B alone reads zeros from the memtiles
    bad = OverlayModel(cfg).run_layer(al_b, OverlayModel(cfg).new_memtiles())
    assert not np.array_equal(bad.output, want)


@pytest.mark.verilator
def test_overlay_rtl_activations_through_memtile():
    """The same two layers on the tiny-2x2 RTL, one simulator process: A's outputs go into the
    memtiles (the output header's memtile bit: no DDR writes), B's input comes from there
    (the memtile activation channels, their headers written by the configuration: no DDR
    reads); B's output equals the PyTorch integer reference, cycles within 10 % of the
    model's."""
    from tilewright.sim.overlay_sim import OverlayJob, run_overlay_jobs

    cfg, al_a, al_b, want = _memtile_chain_case(42)
    jobs = [OverlayJob(al.ddr, j.records(cfg), (al.out_region[0], sum(al.out_region)))
            for al in (al_a, al_b) for j in al.jobs]
    run = run_overlay_jobs(cfg, jobs)
    na = len(al_a.jobs)
    assert sum(r.wr_words for r in run[:na]) == 0
    assert sum(r.rd_words for r in run[na:]) == 0
    got = al_b.read_output(al_b.merge_outputs([r.ddr_out for r in run[na:]]))
    assert np.array_equal(got.reshape(want.shape), want)
    model = OverlayModel(cfg)
    mts = model.new_memtiles()
    res = [model.run_layer(al_a, mts), model.run_layer(al_b, mts)]
    for k, mine in enumerate((run[:na], run[na:])):
        rtl = sum(r.cycles for r in mine)
        assert abs(rtl - res[k].cycles) <= 0.1 * rtl, \
            f"layer {'AB'[k]}: RTL {rtl} cycles, model {res[k].cycles}"
        assert sum(r.rd_words for r in mine) == res[k].rd_words


# layers that take several runs as _build_job builds them, fewer streamed (cfg, case, fused)
STREAMED = [("tiny-2x2", ("1x1", 64, 32, (1, 1), 1, (0, 0), 24, True), False),
            ("tiny-2x2", ("3x3", 32, 8, (3, 3), 1, (1, 1), 32, True), False),
            ("tiny-2x2", ("3x3s2", 24, 16, (3, 3), 2, (1, 1), 40, True), False),
            ("tiny-2x2", ("1x1", 64, 32, (1, 1), 1, (0, 0), 24, True), True),
            ("tiny-2x3", ("1x1s2", 48, 32, (1, 1), 2, (0, 0), 40, False), True)]


def _streamed(k: int, sparsity: float = 0.5):
    """STREAMED case ``k``: (its layer, input, residual add or None, residual, the streamed
    compile, the compile in runs, the reference output)."""
    cfg_name, case, fused = STREAMED[k]
    cfg = _cfg(cfg_name)
    layer, x = _layer(case, sparsity, cfg.tile.block, 60 + k)
    y = reference_output(layer, x)
    kw, add, xr = {}, None, None
    if fused:
        add = AddLayer(2500 - 300 * k, 700 * k - 1500, (1 << 14) + 31 * k, 22, k % 2 == 0)
        xr = rand_i8(np.random.default_rng(160 + k), y.shape)
        kw = {"fuse": array_compiler.FusedAdd(add, k % 2), "x_res": xr}
        y = reference_output(add, y, xr) if k % 2 == 0 else reference_output(add, xr, y)
    al = compile_conv_array(layer, x, cfg, **kw)
    runs = compile_conv_array(layer, x, cfg, stream=False, **kw)
    return cfg, al, runs, y


@pytest.mark.parametrize("k", range(len(STREAMED)))
def test_streamed_runs(k):
    """A layer that needs several runs streams its input through the tiles in fewer runs
    (1x1, 3x3, 3x3/2, 1x1/2 with a fused residual add): bit-exact on the overlay model,
    the input read once where the kernel is no taller than its stride, and faster than the
    runs it replaces."""
    cfg, al, runs, want = _streamed(k)
    assert all(j.stream for j in al.jobs) and len(al.jobs) < len(runs.jobs), STREAMED[k]
    res = OverlayModel(cfg).run_layer(al)
    assert np.array_equal(res.output, want), f"case {k}: {STREAMED[k]}"
    assert res.wr_words == al.out_region[1]
    base = OverlayModel(cfg).run_layer(runs)
    assert np.array_equal(base.output, want)
    assert res.cycles < base.cycles, f"case {k}: {res.cycles} >= {base.cycles} in runs"
    kh = al.kernel[0]
    if kh <= al.stride:
        # the input (and residual) once, the weights and headers once per run
        w_words = sum(int(v.size) for v in al.ddr) // len(al.jobs)
        assert res.rd_words <= al.in_region[1] // al.stride ** 2 + (
            al.out_region[1] if STREAMED[k][2] else 0) + len(al.jobs) * w_words
    # the slot locks matter: with every core's wait for the second slot's first half taken
    # out, the model stops (a lock the job leaves unbalanced, a deadlock, a hazard) or the
    # output is wrong
    acq = Program().acquire(array_compiler.LOCK_WFULL[1][0]).words[0]
    nop = Program().nop().words[0]
    broken = copy.deepcopy(al)
    for job in broken.jobs:
        for tp in job.tiles:
            tp.program = [nop if w == acq else w for w in tp.program]
    try:
        bad = OverlayModel(cfg).run_layer(broken)
    except RuntimeError:
        return
    assert not np.array_equal(bad.output, want), f"case {k}: the slot locks changed nothing"


@pytest.mark.verilator
def test_overlay_rtl_streamed():
    """The streamed runs of STREAMED on the RTL (one simulator process per array): the output
    equals the PyTorch integer reference, DDR traffic the model's, cycles within 10 % (the
    model leaves out per-block BD and lock cycles: on these small layers the RTL took 0.999 to
    1.079 times the model's cycles, on aie2-4x4's bench layers 1.000 to 1.031)."""
    from tilewright.sim.overlay_sim import OverlayJob, run_overlay_jobs

    by_cfg: dict[str, list] = {}
    for k in range(len(STREAMED)):
        by_cfg.setdefault(STREAMED[k][0], []).append((k, *_streamed(k)))
    for cases in by_cfg.values():
        cfg = cases[0][1]
        jobs, owners = [], []
        for k, _, al, _, _ in cases:
            lo, n = al.out_region
            for j in al.jobs:
                jobs.append(OverlayJob(al.ddr, j.records(cfg), (lo, lo + n)))
                owners.append(k)
        run = run_overlay_jobs(cfg, jobs)
        for k, _, al, _, want in cases:
            mine = [r for r, o in zip(run, owners, strict=True) if o == k]
            got = al.read_output(al.merge_outputs([r.ddr_out for r in mine]))
            assert np.array_equal(got, want), f"case {k}: {STREAMED[k]}"
            res = OverlayModel(cfg).run_layer(al)
            assert sum(r.rd_words for r in mine) == res.rd_words, f"case {k}"
            assert sum(r.wr_words for r in mine) == res.wr_words, f"case {k}"
            rtl = sum(r.cycles for r in mine)
            assert abs(rtl - res.cycles) <= 0.1 * rtl, \
                f"case {k}: RTL {rtl} cycles, model {res.cycles}"


@pytest.mark.verilator
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_overlay_rtl_memtile_replay(sparsity):
    """The memtile in the generated array: a two-run layer whose second run replays the
    weights the first captured. RTL output == reference, DDR reads == the model's and fewer
    than without the memtile, cycles within 2 % of the model."""
    from tilewright.sim.overlay_sim import OverlayJob, run_overlay_jobs

    cfg = _cfg("tiny-2x2")
    layer, x = _layer(BIG, sparsity, cfg.tile.block, 15)
    want = reference_output(layer, x)
    reads = {}
    for mt in (False, True):
        al = compile_conv_array(layer, x, cfg, memtile=mt)
        assert any(j.memtile_use for j in al.jobs) == mt
        lo, n = al.out_region
        run = run_overlay_jobs(cfg, [OverlayJob(al.ddr, j.records(cfg), (lo, lo + n))
                                     for j in al.jobs])
        got = al.read_output(al.merge_outputs([r.ddr_out for r in run]))
        assert np.array_equal(got.reshape(want.shape), want), f"memtile {mt}, seed 15"
        res = OverlayModel(cfg).run_layer(al)
        reads[mt] = sum(r.rd_words for r in run)
        assert reads[mt] == res.rd_words
        rtl = sum(r.cycles for r in run)
        assert abs(rtl - res.cycles) <= 0.02 * rtl, (mt, rtl, res.cycles)
    assert reads[True] < 0.8 * reads[False], reads


@pytest.mark.verilator
def test_overlay_watchdog_reports_memtile_wait():
    """A replaying memtile channel whose tokens find no S2MM BD: the read channel stalls, and
    the watchdog's report names the memtile channel waiting for its lock."""
    from tilewright.sim.overlay_sim import OverlayJob, run_overlay_jobs
    from tilewright.sim.verilator import RtlSimError

    cfg = _cfg("tiny-2x2")
    layer, x = _layer(BIG, 0.0, cfg.tile.block, 16)
    al = compile_conv_array(layer, x, cfg)
    job = al.jobs[1]
    assert job.memtile_use[0] == "replay"
    del job.memtile_bds[0][0]                     # no BD takes column 0 bus 0's tokens
    lo, n = al.out_region
    with pytest.raises(RtlSimError, match=r"stalled.*memtile\(0\) MM2S channel 0 is busy"):
        run_overlay_jobs(cfg, [OverlayJob(al.ddr, j.records(cfg), (lo, lo + n),
                                          watchdog_cycles=2000) for j in al.jobs])


@pytest.mark.verilator
def test_overlay_watchdog_reports_lock_wait():
    """A tile whose weight buffer is never marked empty: the run must end with a report of
    who waits on which lock, not hang."""
    from tilewright.sim.overlay_sim import OverlayJob, run_overlay_jobs
    from tilewright.sim.verilator import RtlSimError

    cfg = _cfg("tiny-2x2")
    layer, x = _layer(LAYERS[0], 0.0, cfg.tile.block, 31)
    al = compile_conv_array(layer, x, cfg)
    job = al.jobs[0]
    job.tiles[0].locks = {LOCK_WEMPTY[1][0]: 1, LOCK_WEMPTY[1][1]: 1}   # buffer 0 never free
    lo, n = al.out_region
    with pytest.raises(RtlSimError, match=r"stalled.*tile\(0,0\) s2mm1 waits on lock "
                                          rf"{LOCK_WEMPTY[0][0]}") as e:
        run_overlay_jobs(cfg, [OverlayJob(al.ddr, job.records(cfg), (lo, lo + n),
                                          watchdog_cycles=2000)])
    assert "core waits on lock" in str(e.value)


def test_stem_slice_is_cut_by_rows_over_both_channels():
    """A slice of one input channel group (a stem's three channels) comes in row parts on
    both read channels of a column, each part's rows landing where the tile reads them (the
    stem as given: its space-to-depth rewrite has three channel groups)."""
    from tilewright.sim.overlay_model import _task_words

    cfg = _cfg("tiny-2x2")
    layer, x = _layer(LAYERS[6], 0.0, cfg.tile.block, 29)
    al = compile_conv_array(layer, x, cfg, repack=False)
    assert al.s2d is None
    rf = route_fields(cfg)
    for job in al.jobs:
        for c, per in job.shim_bds.items():
            rows = {}
            for ch, bds in per.items():
                words, _ = _task_words(al.ddr, bds)
                stream = np.concatenate(words)
                pos, n_act = 0, 0
                while pos < len(stream):
                    hdr = int(stream[pos])
                    n_act += any(hdr >> (rf.row + r) & 1 for r in range(cfg.array.rows))
                    pos += 1 + (hdr & 0xFFFF)
                rows[ch] = n_act
            assert all(n > 1 for n in rows.values()), (c, rows)
    res = OverlayModel(cfg).run_layer(al)
    assert np.array_equal(res.output.reshape(-1), reference_output(layer, x).reshape(-1))


@pytest.mark.parametrize("cin,k,p,size", [(3, 7, 3, 16), (3, 3, 0, 15), (3, 3, 1, 14),
                                          (2, 5, 2, 11), (1, 2, 0, 9)])
def test_space_to_depth_rewrite_is_the_same_convolution(cin, k, p, size):
    rng = np.random.default_rng(100 + cin * k + p)
    layer = make_conv(rng, cin, 8, (k, k), 2, (p, p), True, 0.0, 8, name="s2d")
    x = rand_i8(rng, (cin, size, size))
    t = array_compiler.SpaceToDepth.of(layer, x.shape, 8)
    assert t is not None
    assert t.input(x).shape == t.shape
    got = reference_output(t.layer(layer), t.input(x))
    assert np.array_equal(got, reference_output(layer, x)), (cin, k, p, size)
    # a 3x3/2 conv on 64 channels would take more block-taps rewritten: left as it is
    big = make_conv(rng, 64, 8, (3, 3), 2, (1, 1), True, 0.0, 8, name="big")
    assert array_compiler.SpaceToDepth.of(big, (64, 14, 14), 8) is None


def test_stem_runs_as_space_to_depth():
    """The 7x7/2 stem on aie2-2x2 compiled as its 4x4/1 rewrite: bit for bit the same
    output, fewer cycles and fewer DDR reads than compiled as given; the MACs and blocks are
    the layer's, the lower bound takes the rewrite's smaller weights."""
    cfg = _cfg("aie2-2x2")
    layer, x = _layer(("stem", 3, 16, (7, 7), 2, (3, 3), 32, True), 0.0, cfg.tile.block, 31)
    plain = compile_conv_array(layer, x, cfg, repack=False)
    s2d = compile_conv_array(layer, x, cfg)
    assert plain.s2d is None and s2d.s2d is not None
    assert (s2d.macs, s2d.nnz_blocks, s2d.in_shape) == \
        (plain.macs, plain.nnz_blocks, plain.in_shape)
    assert s2d.ddr_bytes_min < plain.ddr_bytes_min     # its weights take fewer bytes
    want = reference_output(layer, x)
    ra, rb = OverlayModel(cfg).run_layer(plain), OverlayModel(cfg).run_layer(s2d)
    assert np.array_equal(ra.output, want) and np.array_equal(rb.output, want)
    assert rb.rd_words < ra.rd_words
    assert rb.cycles < ra.cycles, (rb.cycles, ra.cycles)


def test_model_single_weight_buffer(monkeypatch):
    """A block row larger than half the free tile memory, on tiles with more pixel groups than
    one accumulator chunk (so no HOLD/ACC pieces), streams through one weight buffer (no
    ping/pong) instead of failing; and the run splitter prefers runs that need no single
    buffer where they take fewer cycles."""
    cfg = _cfg("tiny-2x2")
    rng = np.random.default_rng(13)
    layer = make_conv(rng, 128, 96, (3, 3), 1, (1, 1), False, 0.0, cfg.tile.block)
    x = rand_i8(rng, (128, 8, 8))
    want = reference_output(layer, x)
    split = compile_conv_array(layer, x, cfg)
    ping_pong = [t.regions["wbuf0"][0] != t.regions["wbuf1"][0]
                 for job in split.jobs for t in job.tiles if t.regions]
    assert ping_pong and all(ping_pong)
    fast = OverlayModel(cfg).run_layer(split)
    assert np.array_equal(fast.output.reshape(-1), want.reshape(-1)), "seed 13"
    # without the splitter's charge for lost overlap: one run through one buffer
    monkeypatch.setattr(array_compiler, "_overlap_loss_words", lambda *a: 0)
    al = compile_conv_array(layer, x, cfg)
    assert len(al.jobs) < len(split.jobs)
    assert max(len(col) for col in al.jobs[0].chunks) >= 12
    assert all(j0 == 0 for job in al.jobs for col in job.chunks for chk in col
               for _, j0, _ in chk.pieces)
    tiles = [t for t in al.jobs[0].tiles if t.regions]
    assert tiles and all(t.regions["wbuf0"][0] == t.regions["wbuf1"][0] for t in tiles)
    res = OverlayModel(cfg).run_layer(al)
    assert np.array_equal(res.output.reshape(-1), want.reshape(-1)), "seed 13"
    # the timing reached its fixed point (each single-buffered chunk takes an iteration)
    assert all(j.iterations < _MAX_ITERATIONS for j in res.jobs), \
        [j.iterations for j in res.jobs]
    assert fast.cycles < res.cycles, (fast.cycles, res.cycles)


@pytest.mark.parametrize("cfg_name, cin, cout, size", [("aie2-1x1", 256, 64, 4),
                                                       ("tiny-1x1", 256, 16, 2)])
def test_model_timing_lower_bounds(cfg_name, cin, cout, size):
    """On a one-tile array every packet goes to the one tile, so its run cannot end before
    the busiest DDR read channel has read its last word, nor before the tile's memory port
    (one word per cycle) has taken every payload word; a row bus merges the channels packet
    by packet, so the activations take a word every DDR interval. (The model's estimate once
    broke the first bound by 30 % on the aie2 case and the second by 35 % on the tiny one;
    the RTL takes 4144 and 1747 cycles.)"""
    from tilewright.sim.overlay_model import _Channel, _task_words

    cfg = _cfg(cfg_name)
    rng = np.random.default_rng(1)
    layer = make_conv(rng, cin, cout, (1, 1), 1, (0, 0), True, 0.0, cfg.tile.block)
    x = rand_i8(rng, (cin, size, size))
    al = compile_conv_array(layer, x, cfg)
    res = OverlayModel(cfg).run_layer(al)
    step = max(1, cfg.tile.word_bytes // cfg.ddr.bytes_per_cycle)
    lat, rf = cfg.ddr.latency, route_fields(cfg)
    for job, jr in zip(al.jobs, res.jobs, strict=True):
        words, payload, row = [], 0, 0
        for per in job.shim_bds.values():
            for bds in per.values():
                if not bds:
                    continue
                chan = _Channel(*_task_words(np.asarray(al.ddr, np.uint64), bds))
                words.append(sum(1 + len(pk.words) for pk in chan.packets))
                payload += sum(len(pk.words) for pk in chan.packets)
                row += sum(1 + len(pk.words) for pk in chan.packets if pk.header >> rf.row & 1)
        cycles = jr.tile_cycles[(0, 0)]
        assert cycles >= lat + step * max(words), (cycles, words)
        assert cycles >= lat + payload, (cycles, payload)
        assert cycles >= lat + step * row, (cycles, row)


@pytest.mark.parametrize("seed", range(6))
def test_chunks_ramp_up_and_down(seed):
    """With pieces allowed, chunks cover every block of every row once, in order, within the
    cap; the first holds at most the ramp's words, each next at most RAMP_GROWTH times the
    previous one (and a block), each at most RAMP_DOWN of what is left (or the ramp)."""
    rng = np.random.default_rng(seed)
    rows = list(range(int(rng.integers(1, 10))))
    nnz = [int(v) for v in rng.integers(0, 40, len(rows))]
    blk, b, qrec, cap, ramp = 72, 8, 1, int(rng.integers(300, 3000)), 256
    out = _chunks(rows, nnz, blk, cap, b, qrec, 64, False, ramp, True)
    assert out is not None, f"seed {seed}"
    seen = {g: 0 for g in rows}
    for i, chk in enumerate(out):
        assert chk.words <= cap, f"seed {seed}"
        assert chk.w_words == sum(j1 - j0 for _, j0, j1 in chk.pieces) * blk
        left = sum(c.words for c in out[i:])
        floor = blk + b
        limit = max(min(cap, ramp if i == 0 else int(out[i - 1].words * RAMP_GROWTH),
                        max(ramp, int(left * RAMP_DOWN))), floor)
        assert chk.words <= limit, f"seed {seed}: chunk {i} {chk.words} > {limit}"
        for g, j0, j1 in chk.pieces:
            assert j0 == seen[g] and j1 >= j0, f"seed {seed}"
            seen[g] = j1
    assert seen == dict(zip(rows, nnz, strict=True)), f"seed {seed}"
    done = [g for chk in out for g in chk.rows]
    assert done == rows, f"seed {seed}"


def test_model_shim_fifo_reads_ahead():
    """The shim read channels' FIFOs (ddr.read_fifo_words) let a channel read DDR while its
    packet waits for a row bus another channel holds: the same layer, the same outputs and
    DDR traffic, fewer cycles than with 4-word FIFOs."""
    cfg = _cfg("aie2-2x2")
    rng = np.random.default_rng(3)
    layer = make_conv(rng, 128, 64, (3, 3), 1, (1, 1), True, 0.5, cfg.tile.block)
    x = rand_i8(rng, (128, 14, 14))
    al = compile_conv_array(layer, x, cfg)
    small = dataclasses.replace(cfg, ddr=dataclasses.replace(cfg.ddr, read_fifo_words=4))
    big = OverlayModel(cfg).run_layer(al)
    tiny = OverlayModel(small).run_layer(al)
    want = reference_output(layer, x)
    assert np.array_equal(big.output.reshape(want.shape), want)
    assert np.array_equal(tiny.output, big.output)
    assert (tiny.rd_words, tiny.wr_words) == (big.rd_words, big.wr_words)
    assert big.cycles < tiny.cycles, (big.cycles, tiny.cycles)


def test_model_rejects_more_bds_than_a_channel_holds():
    """The model checks every channel's BDs against its table (tile, shim, memtile), as the
    RTL would latch an error: a schedule must fit the configured BD tables."""
    cfg = _cfg("tiny-2x2")
    layer, x = _layer(LAYERS[0], 0.0, cfg.tile.block, 41)
    al = compile_conv_array(layer, x, cfg)
    job = al.jobs[0]
    tp = next(t for t in job.tiles if t.bds.get(array_compiler.CH_W[0]))
    bds = tp.bds[array_compiler.CH_W[0]]
    tp.bds[array_compiler.CH_W[0]] = bds + [bds[-1]] * (cfg.tile.bds_per_channel + 1 - len(bds))
    with pytest.raises(ValueError, match=r"tile \(\d,\d\) channel 1 has 17 BDs, its BD table 16"):
        OverlayModel(cfg).run_layer(al)
