"""Benchmarks: long co-simulations that print figures (``tilewright bench ...``).

``bench_tile`` runs ResNet50's first-stage 3x3 64->64 convolution (torchvision
``layer1.0.conv2``, 56x56) on one tile in Verilator, dense and block-sparse, on the largest
output window that fits the tile's data memory, and checks every run bit for bit against the
PyTorch integer reference and cycle for cycle against the golden model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from tilewright.hw.config import OverlayConfig
from tilewright.sim.golden import TileModel
from tilewright.sw.quantize import act_scale, quantize_act, quantize_conv, random_block_mask
from tilewright.sw.tile_compiler import (
    ConvLayer,
    TileJob,
    Window,
    compile_layer,
    largest_window,
    plan_tiles,
    reference_output,
)

__all__ = ["bench_tile", "resnet50_conv"]

LAYER = "layer1.0.conv2"
#: Simulated cycles the speed figure is measured over (at least).
SPEED_CYCLES = 200_000


def resnet50_conv(seed: int = 0) -> tuple[torch.nn.Conv2d, torch.Tensor]:
    """torchvision ResNet50's ``layer1.0.conv2`` (seeded initialisation; pretrained weights
    cannot be downloaded here) and a post-ReLU input activation of its shape (64, 56, 56)."""
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.resnet50(weights=None).eval()
    conv = net.get_submodule(LAYER)
    x = torch.relu(torch.randn(64, 56, 56, generator=torch.Generator().manual_seed(seed + 1)))
    return conv, x


def _say(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def bench_tile(cfg: OverlayConfig, *, sparsities: Sequence[float] = (0.0, 0.5, 0.75),
               seed: int = 0, rtl: bool = True,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the tile benchmark and return its figures.

    Parameters
    ----------
    cfg : OverlayConfig
    sparsities : sequence of float
        Block sparsities to run; 0 must be among them (the dense baseline).
    seed : int
        Seeds the weights, the input and the block masks.
    rtl : bool
        Run on the Verilator RTL (otherwise the golden model only; ``bit_exact`` then
        compares the golden model with the reference).
    progress : callable, optional
        Receives one line per stage.
    """
    if 0.0 not in sparsities:
        raise ValueError(f"sparsities must include 0 (the dense baseline), not {sparsities!r}")
    t0 = time.time()
    tile = cfg.tile
    conv, xf = resnet50_conv(seed)
    with torch.no_grad():
        yf = torch.relu(conv(xf[None]))[0]
    s_in, s_out = act_scale(xf), act_scale(yf)
    xq = quantize_act(xf, s_in)
    b = tile.block
    rng = np.random.default_rng(seed)
    gout, gin = -(-conv.out_channels // b), -(-conv.in_channels // b)

    dense = ConvLayer.from_quant(quantize_conv(conv, s_in, s_out, relu=True),
                                 name=f"{LAYER}@0")
    rows = largest_window(dense, tile, tuple(xq.shape))
    if rows > 0:
        win = Window(0, rows, 0, int(xq.shape[2]), 0, gout)
        what = f"{rows} rows x 56 cols x {conv.out_channels} channels"
    else:
        # a small tile cannot hold all 64 output channels' weights: take the first window
        # of the compiler's own tiling plan instead
        win = plan_tiles(dense, tuple(xq.shape), tile)[0]
        what = f"{win.rows} rows x {win.cols} cols x {win.groups * b} channels"
    _say(progress, f"{LAYER}: 3x3 64->64 on 56x56; window {what} (the largest that fits "
                   f"{tile.dmem_bytes // 1024} KiB)")
    layers: dict[float, ConvLayer] = {0.0: dense}
    for s in sparsities:
        if s > 0:
            # exact sparsity both inside the window's block rows and in the whole layer
            mask = np.ones((gout, gin), dtype=bool)
            inside = slice(win.g0, win.g1)
            mask[inside] = random_block_mask(win.groups, gin, s, rng)
            rest = np.ones(gout, dtype=bool)
            rest[inside] = False
            if rest.any():
                mask[rest] = random_block_mask(int(rest.sum()), gin, s, rng)
            q = quantize_conv(conv, s_in, s_out, relu=True, mask=mask)
            layers[s] = ConvLayer.from_quant(q, name=f"{LAYER}@{s:g}")
    jobs: dict[float, TileJob] = {s: compile_layer(layers[s], xq, tile, window=win)
                                  for s in sparsities}
    refs = {s: reference_output(layers[s], xq)[win.g0 * b:win.g1 * b, win.r0:win.r1,
                                                 win.c0:win.c1] for s in sparsities}
    golden = {s: TileModel(tile).run(jobs[s].program, jobs[s].dmem) for s in sparsities}
    for s in sparsities:
        if not golden[s].ok:
            raise RuntimeError(f"golden model stopped with {golden[s].error.name} at "
                               f"sparsity {s}")
    result: dict[str, Any] = {"config": cfg.name, "layer": f"resnet50.{LAYER}",
                              "window": {"rows": win.rows, "cols": win.cols,
                                         "out_channels": win.groups * b},
                              "macs_per_cycle": tile.macs_per_cycle}
    bit_exact = all(np.array_equal(jobs[s].read_output(golden[s].dmem), refs[s])
                    for s in sparsities)
    cycles = {s: golden[s].cycles for s in sparsities}
    if rtl:
        from tilewright.sim.verilator import build_tile, run_tile_jobs

        _say(progress, f"building the {cfg.name} tile in Verilator (cached by configuration "
                       f"hash)...")
        t_build = time.time()
        build_dir = build_tile(cfg)
        cached = time.time() - t_build < 5
        record = json.loads((build_dir / "build.json").read_text())
        # the dense program runs again until >= SPEED_CYCLES cycles are simulated, so that the
        # speed figure does not hang on a run of a few milliseconds
        extra = -(-SPEED_CYCLES // cycles[0.0])
        _say(progress, f"running {len(sparsities)} programs in Verilator (+{extra} repeats of "
                       f"the dense one for the speed figure)...")
        run = run_tile_jobs(cfg, [(jobs[s].program, jobs[s].dmem) for s in sparsities]
                            + [(jobs[0.0].program, jobs[0.0].dmem)] * extra)
        bit_exact = bit_exact and all(np.array_equal(r.dmem, run[0].dmem)
                                      for r in run[len(sparsities):])
        rtl_cycles = {s: r.cycles for s, r in zip(sparsities, run, strict=False)}
        rtl_exact = all(np.array_equal(jobs[s].read_output(r.dmem), refs[s]) and not r.error
                        for s, r in zip(sparsities, run, strict=False))
        bit_exact = bit_exact and rtl_exact
        result["cycle_model_exact"] = rtl_cycles == cycles
        result["golden_cycles"] = {f"{s:g}": c for s, c in cycles.items()}
        cycles = rtl_cycles
        result["sim_cycles_per_s"] = round(run.cycles_per_s)
        result["verilator_build_s"] = round(record["verilator_build_s"], 1)
        result["generate_s"] = round(record["generate_s"], 1)
        result["verilator_build_cached"] = cached
    dense = cycles[0.0]
    result["cycles"] = {f"{s:g}": c for s, c in cycles.items()}
    result["nnz_blocks"] = {f"{s:g}": jobs[s].nnz_blocks for s in sparsities}
    result["mac_utilization"] = round(jobs[0.0].macs / (dense * tile.macs_per_cycle), 4)
    for s in sparsities:
        if s > 0:
            key = f"speedup_{round(s * 100)}"
            result[key] = round(dense / cycles[s], 3)
            result[f"{key}_target"] = round(0.95 / (1 - s), 3)
    result["bit_exact"] = bool(bit_exact)
    result["wall_s"] = round(time.time() - t0, 1)
    return result
