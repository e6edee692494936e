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
from tilewright.sw.vision import load_torchvision

__all__ = ["bench_tile", "resnet50_conv"]

LAYER = "layer1.0.conv2"
#: Simulated cycles the speed figure is measured over (at least).
SPEED_CYCLES = 200_000


def resnet50_conv(seed: int = 0) -> tuple[torch.nn.Conv2d, torch.Tensor]:
    """torchvision ResNet50's ``layer1.0.conv2`` (seeded initialisation; pretrained weights
    cannot be downloaded here) and a post-ReLU input activation of its shape (64, 56, 56)."""
    torchvision = load_torchvision()
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
        record, cached = _timed_build(lambda: build_tile(cfg))
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


# Whole layers on an array ---------------------------------------------------------------------

#: Pool modules the layer benchmark runs (on the array as pools, ``compile_eltwise_array``).
POOL_MODULES = (torch.nn.MaxPool2d, torch.nn.AvgPool2d, torch.nn.AdaptiveAvgPool2d)
#: torchvision model names and their input sizes.
MODELS = {"resnet50": 224, "inception_v3": 299, "vgg16": 224}
LAYER_SPEED_CYCLES = 100_000


def _torchvision_model(model: str, seed: int) -> torch.nn.Module:
    torchvision = load_torchvision()
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, not {model!r}")
    torch.manual_seed(seed)
    kw = {"aux_logits": False, "init_weights": True} if model == "inception_v3" else {}
    return getattr(torchvision.models, model)(weights=None, **kw).eval()


def _bn_after(net: torch.nn.Module, path: str) -> torch.nn.BatchNorm2d | None:
    """The BatchNorm that follows conv ``path`` in torchvision's naming (``convN`` -> ``bnN``,
    ``...conv`` -> ``...bn``, ``downsample.0`` -> ``downsample.1``)."""
    parent, _, leaf = path.rpartition(".")
    cands = []
    if leaf.startswith("conv"):
        cands.append(f"{parent}.bn{leaf[4:]}" if parent else f"bn{leaf[4:]}")
    if leaf.isdigit():
        cands.append(f"{parent}.{int(leaf) + 1}")
    for c in cands:
        try:
            m = net.get_submodule(c)
        except AttributeError:
            continue
        if isinstance(m, torch.nn.BatchNorm2d):
            return m
    return None


def network_layer(model: str, path: str, seed: int = 0
                  ) -> tuple[torch.nn.Module, torch.Tensor, bool]:
    """Layer ``path`` of torchvision ``model`` (seeded initialisation) with the following
    BatchNorm folded in, the float input it sees when the network runs on a seeded random
    image (batch 1), and whether a ReLU follows it in the network (then it is fused)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = _torchvision_model(model, seed)
    try:
        mod = net.get_submodule(path)
    except AttributeError:
        convs = [n for n, m in net.named_modules()
                 if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        raise ValueError(f"{model} has no layer {path!r}; its conv and linear layers: "
                         f"{', '.join(convs[:12])}, ... ({len(convs)} in all)") from None
    if not isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear, *POOL_MODULES)):
        raise ValueError(f"{model}.{path} is a {type(mod).__name__}; the layer benchmark runs "
                         f"Conv2d, Linear, MaxPool2d, AvgPool2d and AdaptiveAvgPool2d layers")
    seen: dict[str, torch.Tensor] = {}
    def grab(m: torch.nn.Module, i: tuple, o: torch.Tensor) -> None:
        seen.setdefault("x", i[0].detach())     # returns None: the output is left alone

    handle = mod.register_forward_hook(grab)
    size = MODELS[model]
    img = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        net(img)
    handle.remove()
    x = seen["x"][0]
    bn = _bn_after(net, path) if isinstance(mod, torch.nn.Conv2d) else None
    layer = fuse_conv_bn_eval(mod, bn) if bn is not None else mod
    relu = bn is not None or _relu_follows(net, path)
    return layer, x, relu


def _relu_follows(net: torch.nn.Module, path: str) -> bool:
    """Whether the module after ``path`` in its parent ``nn.Sequential`` is a ReLU (VGG's
    classifier)."""
    parent, _, leaf = path.rpartition(".")
    if not leaf.isdigit():
        return False
    seq = net.get_submodule(parent) if parent else net
    return (isinstance(seq, torch.nn.Sequential) and int(leaf) + 1 < len(seq)
            and isinstance(seq[int(leaf) + 1], torch.nn.ReLU))


def bench_layer(cfg: OverlayConfig, *, model: str = "resnet50", layer: str = "layer3.1.conv2",
                sparsity: float = 0.0, seed: int = 0, rtl: bool = True,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one layer of a torchvision network on ``cfg``'s array and return its figures.

    The layer (BatchNorm folded, ReLU fused when one follows) is quantised with scales from
    its float input and output, given exactly ``round(sparsity * blocks)`` zero 8x8 blocks,
    compiled with :func:`tilewright.sw.array_compiler.compile_conv_array`, run on the overlay
    model and (``rtl``) on the Verilator RTL, and compared with the PyTorch integer
    reference.
    """
    from tilewright.sim.overlay_model import OverlayModel
    from tilewright.sw.array_compiler import compile_conv_array

    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), not {sparsity!r}")
    t0 = time.time()
    t = cfg.tile
    b = t.block
    mod, xf, relu = network_layer(model, layer, seed)
    if isinstance(mod, POOL_MODULES):
        return _bench_pool(cfg, model, layer, mod, xf, seed=seed, rtl=rtl, progress=progress,
                           t0=t0)
    if isinstance(mod, torch.nn.Linear):
        xf = xf.reshape(-1)
    with torch.no_grad():
        yf = mod(xf[None])[0]
        if relu:
            yf = torch.relu(yf)
    s_in, s_out = act_scale(xf), act_scale(yf)
    xq = quantize_act(xf, s_in)
    cout = mod.out_features if isinstance(mod, torch.nn.Linear) else mod.out_channels
    cin = mod.in_features if isinstance(mod, torch.nn.Linear) else mod.in_channels
    rng = np.random.default_rng(seed)
    mask = random_block_mask(-(-cout // b), -(-cin // b), sparsity, rng)
    q = quantize_conv(mod, s_in, s_out, relu=relu, mask=mask)
    ql = ConvLayer.from_quant(q, name=f"{model}.{layer}")
    _say(progress, f"{model}.{layer}: {tuple(mod.weight.shape)} on input "
                   f"{tuple(xq.shape)}, sparsity {sparsity:g}; compiling for {cfg.name}")
    t1 = time.time()
    al = compile_conv_array(ql, xq.numpy(), cfg)
    compile_s = time.time() - t1
    want = reference_output(ql, xq)
    _say(progress, f"{len(al.jobs)} overlay run(s); running the overlay model...")
    res = OverlayModel(cfg).run_layer(al)
    model_exact = bool(np.array_equal(res.output.reshape(want.shape), np.asarray(want)))
    peak = t.macs_per_cycle * cfg.array.rows * cfg.array.cols
    out: dict[str, Any] = {
        "config": cfg.name, "model": model, "layer": layer, "sparsity": sparsity,
        "weight_shape": list(mod.weight.shape), "input_shape": list(xq.shape),
        "output_shape": list(al.out_shape), "runs": len(al.jobs),
        "nnz_blocks": al.nnz_blocks, "macs": al.macs, "peak_macs_per_cycle": peak,
        "model_cycles": res.cycles, "compile_s": round(compile_s, 2),
        "ddr_bytes_min": al.ddr_bytes_min,
        # loaded before each run through the configuration port, not from DDR: programs
        # (CONV block indices included), output packet headers and buffer descriptors
        "config_bytes": al.config_bytes(),
    }
    reps = max(1, -(-LAYER_SPEED_CYCLES // max(res.cycles, 1)))
    # MACs the engines issue: non-zero blocks, channel padding included
    out.update(_array_figures(cfg, al, res, want, model_exact, issued_macs=al.issued_macs,
                              rtl=rtl, repeats=reps, progress=progress, t0=t0))
    return out


def _pool_layer(mod: torch.nn.Module, xf: torch.Tensor, name: str) -> tuple:
    """The integer pool layer of ``mod`` on input ``xf`` (C, H, W) and its int8 input."""
    from tilewright.sw.quantize import quantize_avgpool, quantize_maxpool
    from tilewright.sw.tile_compiler import PoolLayer

    def pair(v: Any) -> tuple[int, int]:
        return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]

    with torch.no_grad():
        yf = mod(xf[None])[0]
    s_in = act_scale(xf)
    xq = quantize_act(xf, s_in)
    if isinstance(mod, torch.nn.AdaptiveAvgPool2d):
        if pair(mod.output_size) != (1, 1):
            raise ValueError(f"{name}: adaptive average pools to {mod.output_size} are not run "
                             f"here; to (1, 1) (a global pool) they are")
        kernel, stride, padding = (int(xf.shape[1]), int(xf.shape[2])), 1, (0, 0)
    else:
        kernel, stride, padding = pair(mod.kernel_size), pair(mod.stride)[0], \
            pair(mod.padding)
        if getattr(mod, "ceil_mode", False):
            raise ValueError(f"{name}: ceil_mode pools are not run here")
    if isinstance(mod, torch.nn.MaxPool2d):
        q = quantize_maxpool(kernel)
    else:
        q = quantize_avgpool(kernel, s_in, act_scale(yf))
    return PoolLayer.from_quant(q, stride, padding, name=name), xq


def _bench_pool(cfg: OverlayConfig, model: str, layer: str, mod: torch.nn.Module,
                xf: torch.Tensor, *, seed: int, rtl: bool,
                progress: Callable[[str], None] | None, t0: float) -> dict[str, Any]:
    """:func:`bench_layer` for a pool module (no weights, so no sparsity)."""
    from tilewright.sim.overlay_model import OverlayModel
    from tilewright.sw.array_compiler import compile_eltwise_array

    del seed
    t = cfg.tile
    pl, xq = _pool_layer(mod, xf, f"{model}.{layer}")
    _say(progress, f"{model}.{layer}: {pl.kind} pool {pl.kernel}/{pl.stride} on input "
                   f"{tuple(xq.shape)}; compiling for {cfg.name}")
    t1 = time.time()
    al = compile_eltwise_array(pl, xq.numpy(), cfg)
    compile_s = time.time() - t1
    want = np.asarray(reference_output(pl, xq))
    res = OverlayModel(cfg).run_layer(al)
    exact = bool(np.array_equal(res.output, want))
    peak = t.macs_per_cycle * cfg.array.rows * cfg.array.cols
    out: dict[str, Any] = {
        "config": cfg.name, "model": model, "layer": layer, "sparsity": 0.0,
        "kind": f"{pl.kind}pool", "kernel": list(pl.kernel), "input_shape": list(xq.shape),
        "output_shape": list(al.out_shape), "runs": len(al.jobs), "macs": al.macs,
        "peak_macs_per_cycle": peak, "model_cycles": res.cycles,
        "compile_s": round(compile_s, 2), "ddr_bytes_min": al.ddr_bytes_min,
        "config_bytes": al.config_bytes(),
    }
    out.update(_array_figures(cfg, al, res, want, exact, issued_macs=al.macs, rtl=rtl,
                              repeats=1, progress=progress, t0=t0))
    return out


def _timed_build(build: Callable[[], Any]) -> tuple[dict[str, Any], bool]:
    """Run a cached Verilator ``build``: (its ``build.json``, whether it was already
    cached)."""
    t0 = time.time()
    bdir = build()
    cached = time.time() - t0 < 5
    return json.loads((bdir / "build.json").read_text()), cached


def _array_figures(cfg: OverlayConfig, al: Any, res: Any, want: Any, model_exact: bool, *,
                   issued_macs: int, rtl: bool, repeats: int,
                   progress: Callable[[str], None] | None, t0: float) -> dict[str, Any]:
    """The figures of a compiled layer ``al`` whose overlay-model result is ``res``: on the
    RTL (``rtl``; the runs repeated ``repeats`` times to time the simulator, every repeat
    checked equal) or else on the model."""
    peak = cfg.tile.macs_per_cycle * cfg.array.rows * cfg.array.cols
    b = cfg.tile.block
    cycles, rd, wr, exact = res.cycles, res.rd_words, res.wr_words, model_exact
    out: dict[str, Any] = {}
    if rtl:
        from tilewright.sim.overlay_sim import OverlayJob, build_overlay, run_overlay_jobs

        _say(progress, f"building the {cfg.name} overlay in Verilator (cached by "
                       f"configuration hash)...")
        record, cached = _timed_build(lambda: build_overlay(cfg))
        lo, n = al.out_region
        jobs = [OverlayJob(al.ddr, j.records(cfg), (lo, lo + n)) for j in al.jobs]
        _say(progress, f"running {len(jobs)} run(s) x {repeats} in Verilator (repeats time "
                       f"the simulator over >= {LAYER_SPEED_CYCLES} cycles)...")
        run = run_overlay_jobs(cfg, jobs * repeats)
        first = run[:len(jobs)]
        got = al.read_output(al.merge_outputs([r.ddr_out for r in first]))
        exact = model_exact and bool(np.array_equal(got.reshape(want.shape), np.asarray(want)))
        # every repeat wrote what the first did (each run's own outputs: the repeats share
        # the DDR, where the other runs' outputs already are)
        own = [al.job_output_index(j) for j in al.jobs]
        exact = exact and all(
            np.array_equal(np.asarray(r.ddr_out)[own[i % len(jobs)]],
                           np.asarray(first[i % len(jobs)].ddr_out)[own[i % len(jobs)]])
            for i, r in enumerate(run))
        cycles = sum(r.cycles for r in first)
        rd, wr = sum(r.rd_words for r in first), sum(r.wr_words for r in first)
        out.update({"sim_cycles_per_s": round(run.cycles_per_s),
                    "verilator_build_s": round(record["verilator_build_s"], 1),
                    "generate_s": round(record["generate_s"], 1),
                    "verilator_build_cached": cached,
                    "model_vs_rtl_cycles": round(res.cycles / cycles, 3),
                    "ddr_words_match_model": rd == res.rd_words and wr == res.wr_words})
    out.update({
        "cycles": cycles,
        "time_us": round(cycles / cfg.clock_mhz, 2),
        # MACs the engines issue per peak cycle
        "mac_utilization": round(issued_macs / (cycles * peak), 4),
        # dense-equivalent MACs per peak cycle (above 1 when sparsity skips work)
        "effective_mac_utilization": round(al.macs / (cycles * peak), 4),
        "ddr_bytes": (rd + wr) * b,
        "ddr_ratio": round((rd + wr) * b / al.ddr_bytes_min, 3),
        "bit_exact": exact,
        "wall_s": round(time.time() - t0, 1),
    })
    return out
