"""Layer cases taken from ResNet50, InceptionV3 and VGG16, compiled for one tile.

Each case is a real layer shape of one of the three networks (channel counts reduced where
the tile regressions need them small) with random int8 data and block-sparse weights; it
carries its tile jobs and the PyTorch integer reference of every job's output window, so the
same cases drive the golden-model tests and the Verilator regression.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tilewright.hw.config import TileConfig
from tilewright.sw.quantize import fixed_point, quantize_add, quantize_avgpool, random_block_mask
from tilewright.sw.tile_compiler import (
    AddLayer,
    ConvLayer,
    PoolLayer,
    TileJob,
    Window,
    compile_layer,
    compile_layer_tiled,
    reference_output,
)

__all__ = ["CONV_CASES", "SPARSITIES", "LayerCase", "make_conv", "network_cases", "rand_i8"]

SPARSITIES = (0.0, 0.5, 0.9, 1.0)

#: name: (cin, cout, kernel, stride, padding, relu, H, W)
CONV_CASES = {
    "resnet50-bottleneck-1x1": (32, 16, (1, 1), 1, (0, 0), True, 7, 7),
    "resnet50-bottleneck-3x3s2": (16, 24, (3, 3), 2, (1, 1), True, 9, 9),
    "inceptionv3-1x7": (16, 20, (1, 7), 1, (0, 3), True, 8, 8),
    "inceptionv3-7x1": (20, 16, (7, 1), 1, (3, 0), False, 8, 8),
    "vgg16-3x3": (32, 32, (3, 3), 1, (1, 1), True, 12, 12),
    "resnet50-downsample-1x1s2": (16, 32, (1, 1), 2, (0, 0), False, 8, 8),
    "inceptionv3-5x5": (16, 16, (5, 5), 1, (2, 2), True, 7, 7),
    "inceptionv3-1x3": (24, 16, (1, 3), 1, (0, 1), True, 6, 6),
    "inceptionv3-3x1": (24, 16, (3, 1), 1, (1, 0), True, 6, 6),
}


def rand_i8(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(-128, 128, shape, dtype=np.int8)


def make_conv(rng: np.random.Generator, cin: int, cout: int, kernel: tuple[int, int],
              stride: int, padding: tuple[int, int], relu: bool, sparsity: float, block: int,
              name: str = "conv") -> ConvLayer:
    """A random integer conv whose outputs spread over the int8 range (few saturate), with
    exactly ``round(sparsity * blocks)`` zero ``block x block`` blocks."""
    kh, kw = kernel
    w = rand_i8(rng, (cout, cin, kh, kw))
    mask = random_block_mask(-(-cout // block), -(-cin // block), sparsity, rng)
    keep = np.kron(mask, np.ones((block, block), dtype=bool))[:cout, :cin]
    w = np.where(keep[:, :, None, None], w, 0).astype(np.int8)
    std = 74.0 * 74.0 * np.sqrt(cin * kh * kw)          # of a sum of uniform int8 products
    m = 40.0 / std * rng.uniform(0.5, 1.5, cout)
    mult, shift = fixed_point(m)
    bias = rng.integers(-int(std), int(std) + 1, cout)
    return ConvLayer(w, bias, mult, shift, stride, padding, relu, name=name)


@dataclass
class LayerCase:
    """One layer: its tile jobs and the reference output window of each job."""

    name: str
    jobs: list[TileJob]
    expected: list[np.ndarray]


def _case(name: str, layer, x: np.ndarray, tile: TileConfig,
          x_b: np.ndarray | None = None, windows: list[Window] | None = None) -> LayerCase:
    want = reference_output(layer, x, x_b)
    if windows is None:
        jobs = compile_layer_tiled(layer, x, tile, x_b=x_b)
    else:
        jobs = [compile_layer(layer, x, tile, x_b=x_b, window=w) for w in windows]
    b = tile.block
    exp = [want[j.window.g0 * b:j.window.g0 * b + j.outputs.channels,
                j.window.r0:j.window.r1, j.window.c0:j.window.c1] for j in jobs]
    return LayerCase(name, jobs, exp)


def network_cases(tile: TileConfig, seed: int = 0,
                  sparsities: tuple[float, ...] = SPARSITIES) -> list[LayerCase]:
    """Every layer kind the tile runs in the three networks, at each block sparsity."""
    rng = np.random.default_rng(seed)
    b = tile.block
    cases: list[LayerCase] = []
    for s in sparsities:
        stem = make_conv(rng, 3, 16, (7, 7), 2, (3, 3), True, s, b, "resnet50-stem-7x7s2")
        x = rand_i8(rng, (3, 224, 224))
        g = 16 // b
        cases.append(_case(f"{stem.name}@{s:g}", stem, x, tile,
                           windows=[Window(0, 2, 0, 9, 0, g),
                                    Window(110, 112, 101, 112, g - 1, g)]))
        for name, (cin, cout, k, st, pad, relu, h, w) in CONV_CASES.items():
            layer = make_conv(rng, cin, cout, k, st, pad, relu, s, b, name)
            cases.append(_case(f"{name}@{s:g}", layer, rand_i8(rng, (cin, h, w)), tile))
        fc = make_conv(rng, 256, 20, (1, 1), 1, (0, 0), False, s, b)
        fc = ConvLayer(fc.weight[:, :, 0, 0], fc.bias, fc.mult, fc.shift, name="resnet50-fc")
        cases.append(_case(f"resnet50-fc@{s:g}", fc, rand_i8(rng, (256,)), tile))
    x = rand_i8(rng, (16, 11, 11))
    cases.append(_case("resnet50-maxpool-3x3s2", PoolLayer("max", 3, 2, 1, name="maxpool"),
                       x, tile))
    qp = quantize_avgpool(3, 0.05, 0.04)
    cases.append(_case("inceptionv3-avgpool-3x3", PoolLayer("avg", 3, 1, 1, qp.mult, qp.shift),
                       rand_i8(rng, (12, 6, 6)), tile))
    qp = quantize_avgpool(7, 0.05, 0.01)
    cases.append(_case("resnet50-global-avgpool", PoolLayer("avg", 7, 1, 0, qp.mult, qp.shift),
                       rand_i8(rng, (16, 7, 7)), tile))
    # an Inception concat: two branches written side by side into one output region
    x = rand_i8(rng, (16, 6, 6))
    br = [make_conv(rng, 16, 8, (1, 1), 1, (0, 0), True, 0.5, b, f"inceptionv3-branch{i}")
          for i in range(2)]
    want = np.concatenate([reference_output(layer, x) for layer in br])
    jobs = [compile_layer(layer, x, tile, out_cg_offset=i * (8 // b), out_planes=16 // b)
            for i, layer in enumerate(br)]
    cases.append(LayerCase("inceptionv3-concat", jobs,
                           [want[i * 8:(i + 1) * 8] for i in range(2)]))
    qa = quantize_add(0.03, 0.05, 0.06, True)
    cases.append(_case("resnet50-residual-add", AddLayer.from_quant(qa, "add"),
                       rand_i8(rng, (20, 6, 7)), tile, x_b=rand_i8(rng, (20, 6, 7))))
    return cases
