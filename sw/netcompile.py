"""The network compiler: a PyTorch model to int8, block-sparse programs for an overlay.

``tilewright compile`` and ``tilewright verify`` (docs/compiler.md). The stages:

1. **Import** (:func:`tilewright.sw.graph.import_model`): torch.fx, batch norm folded, ReLU
   fused; every unsupported node reported before any work.
2. **Prune** (:func:`block_prune`, ``--sparsity S``): exactly ``round(S * blocks)`` of every
   layer's ``block x block`` weight blocks (all taps of a channel pair, the overlay's block)
   with the smallest L2 norm are zeroed, in every conv and linear layer but the first conv
   (kept dense, as in the weight-block-sparsity paper). A trainer checkpoint brings its own
   masks and scales instead.
3. **Quantise** (:mod:`tilewright.sw.ptq`): int8 per-channel weights, per-tensor activations
   from seeded calibration images, or the checkpoint's QAT scales.
4. **Plan DDR** (:func:`plan_memory`): every activation tensor in channel-group planes
   ``[G][H][W]``; a concat's inputs are written straight into their slices of its buffer and a
   flatten is its input (no copies); tensors whose lifetimes do not overlap share space.
5. **Compile every layer** (:mod:`tilewright.sw.array_compiler`) at its planned addresses:
   per-tile programs, tile and shim buffer descriptors, lock values, packet headers and the
   weight streams, appended to one DDR image. A linear layer after the flatten of a
   ``C x H x W`` tensor is compiled as the ``H x W`` convolution it is (same sums).
6. **Estimate** (:func:`estimate_layer`): the overlay model's timing (tiles' programs on the
   golden model in timing-only mode, datamovers, locks, DDR channels) gives each layer's
   cycles and exact DDR words; its MAC-issue cycles, DDR channel occupancy and the rest
   (synchronisation: start-up, pipeline bubbles, waits) are reported apart.

:func:`verify_network` runs the compiled layers in order on one DDR image on the overlay
model (data and timing) and compares every layer's output region with the integer PyTorch
oracle (:meth:`tilewright.sw.ptq.QuantNet.run_int`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tilewright.hw.config import OverlayConfig
from tilewright.hw.isa import Opcode, Param, index_words
from tilewright.hw.tileunit import N_S2MM
from tilewright.sw.array_compiler import (
    ArrayLayer,
    FusedAdd,
    Placement,
    SpaceToDepth,
    _planes,
    add_prefetch,
    compile_conv_array,
    compile_eltwise_array,
    memtile_end,
    read_planes,
)
from tilewright.sw.graph import ConvNode, NetGraph, Node, PoolNode, import_model
from tilewright.sw.ptq import QuantNet, quantize_graph, quantize_graph_from_checkpoint
from tilewright.sw.quantize import QuantConv, block_mask
from tilewright.sw.tile_compiler import AddLayer, ConvLayer, PoolLayer
from tilewright.sw.vision import load_torchvision

__all__ = [
    "NETWORKS",
    "PAPER_MS",
    "CompiledLayer",
    "CompiledNetwork",
    "MemoryPlan",
    "block_prune",
    "compile_network",
    "estimate_layer",
    "load_model",
    "plan_memory",
    "verify_network",
]

#: The networks ``tilewright compile`` knows by name, with their input size.
NETWORKS = {"resnet50": 224, "inception_v3": 299, "vgg16": 224}

#: Paper A's estimated end-to-end times in ms (int8, batch 1), ``(dense, 50 % block
#: sparse)`` per configuration (../shared/DESIGN.md section 1; None: their compiler failed).
PAPER_MS: dict[str, dict[str, tuple[float | None, float | None]]] = {
    "aie2-2x2": {"resnet50": (24.92, 15.83), "inception_v3": (42.84, 24.41),
                 "vgg16": (44.76, 26.09)},
    "aie2-3x3": {"resnet50": (12.70, 8.661), "inception_v3": (23.87, 14.22),
                 "vgg16": (25.33, 10.02)},
    "aie2-4x4": {"resnet50": (10.77, 7.065), "inception_v3": (17.41, 10.13),
                 "vgg16": (13.71, 8.852)},
    "aie2-6x6": {"resnet50": (5.713, 4.490), "inception_v3": (10.64, 6.440),
                 "vgg16": (None, 5.770)},
    "aie2-7x7": {"resnet50": (4.206, 3.212), "inception_v3": (8.728, None),
                 "vgg16": (7.455, 5.289)},
    "aie2-8x8": {"resnet50": (6.377, 4.602), "inception_v3": (9.093, 5.666),
                 "vgg16": (9.203, 6.502)},
}


class CompileError(ValueError):
    """A network (or one of its layers) cannot be compiled for the overlay."""


# Models ------------------------------------------------------------------------------------

def load_model(spec: str, seed: int = 0,
               input_shape: tuple[int, int, int] | None = None
               ) -> tuple[nn.Module, tuple[int, int, int, int], str]:
    """The model named by ``spec`` in eval mode, its input shape ``(1, C, H, W)`` and a name.

    ``spec`` is ``resnet50``, ``inception_v3`` or ``vgg16`` (torchvision, initialised from
    ``seed``: pretrained weights cannot be downloaded here) or ``module:factory`` (an
    importable callable returning an ``nn.Module``; its input shape is ``input_shape``, else
    the module's ``input_shape`` attribute, else ``(3, 224, 224)``).
    """
    if spec in NETWORKS:
        torchvision = load_torchvision()
        torch.manual_seed(seed)
        kw: dict[str, Any] = ({"aux_logits": False, "init_weights": True}
                              if spec == "inception_v3" else {})
        net = getattr(torchvision.models, spec)(weights=None, **kw).eval()
        size = NETWORKS[spec]
        shape = input_shape or (3, size, size)
        return net, (1, *shape), spec
    if ":" not in spec:
        raise CompileError(f"model must be one of {', '.join(NETWORKS)} or module:factory, "
                           f"not {spec!r}")
    mod_name, _, attr = spec.partition(":")
    load_torchvision()  # so that the module may import torchvision on a CPU-only torch
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise CompileError(f"cannot import {spec!r}: {e}") from None
    torch.manual_seed(seed)
    net = factory()
    if not isinstance(net, nn.Module):
        raise CompileError(f"{spec} returned a {type(net).__name__}, not an nn.Module")
    shape = input_shape or tuple(getattr(net, "input_shape", (3, 224, 224)))[-3:]
    return net.eval(), (1, *shape), attr


# Pruning -----------------------------------------------------------------------------------

def _flatten_source(graph: NetGraph, n: Node) -> tuple[int, int, int] | None:
    """For a linear node reading a flatten of a ``C x H x W`` tensor with ``H*W > 1``: that
    shape (the layer then runs as an ``H x W`` convolution); else None."""
    if n.kind != "linear" or n.inputs[0] == graph.input_name:
        return None
    src = graph[n.inputs[0]]
    if src.kind != "flatten":
        return None
    c, h, w = graph.shape_of(src.inputs[0])
    return (c, h, w) if h * w > 1 else None


def _conv_view(graph: NetGraph, n: ConvNode) -> torch.Tensor:
    """The node's weight as ``(Cout, Cin, KH, KW)`` the way the overlay runs it."""
    w = n.weight
    src = _flatten_source(graph, n)
    if src is not None:
        return w.reshape(w.shape[0], *src)
    return w if w.dim() == 4 else w[:, :, None, None]


def block_prune(graph: NetGraph, sparsity: float, block: int = 8,
                dense_first: bool = True) -> dict[str, float]:
    """Zero exactly ``round(sparsity * blocks)`` weight blocks of every conv and linear node
    (in place), those with the smallest L2 norm (ties: the first in row-major order).

    A block is ``block`` output x ``block`` input channels over all kernel taps (a linear
    layer after a flatten of ``C x H x W`` counts its blocks as the ``H x W`` convolution it
    runs as). With ``dense_first`` the first conv keeps all its blocks.

    Returns ``{node: achieved block sparsity}``.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), not {sparsity!r}")
    out: dict[str, float] = {}
    first = next((n.name for n in graph if n.kind == "conv"), None)
    for n in graph:
        if not isinstance(n, ConvNode):
            continue
        w4 = _conv_view(graph, n).detach().to(torch.float64)
        cout, cin = w4.shape[:2]
        go, gi = -(-cout // block), -(-cin // block)
        pad = torch.zeros(go * block, gi * block, *w4.shape[2:], dtype=torch.float64)
        pad[:cout, :cin] = w4
        score = pad.reshape(go, block, gi, block, -1).pow(2).sum(dim=(1, 3, 4))
        k = 0 if (dense_first and n.name == first) else int(np.floor(sparsity * go * gi + 0.5))
        keep = torch.ones(go * gi, dtype=torch.bool)
        if k:
            order = np.argsort(score.reshape(-1).numpy(), kind="stable")
            keep[torch.from_numpy(order[:k].copy())] = False
        m = keep.reshape(go, gi).repeat_interleave(block, 0).repeat_interleave(block, 1)
        m = m[:cout, :cin].reshape(cout, cin, *([1] * (w4.dim() - 2)))
        pruned = (w4 * m).to(n.weight.dtype).reshape(n.weight.shape)
        n.weight = pruned
        out[n.name] = k / (go * gi)
    return out


# Memory plan -------------------------------------------------------------------------------

@dataclass
class MemoryPlan:
    """DDR addresses (words) of every activation tensor.

    Attributes
    ----------
    base : dict
        ``{tensor: first word}`` for the graph input and every node (a concat input lies
        inside its concat's buffer, a flatten at its input).
    words : dict
        ``{tensor: words}`` (channel groups x H x W).
    arena_words : int
        Words of the activation area (tensors whose lifetimes do not overlap share it).
    unshared_words : int
        What the same tensors would take without sharing.
    """

    base: dict[str, int]
    words: dict[str, int]
    arena_words: int
    unshared_words: int


def _align(a: int, n: int) -> int:
    return -(-a // n) * n


def plan_memory(graph: NetGraph, block: int,
                fused: dict[str, str] | None = None) -> MemoryPlan:
    """Place every activation tensor of ``graph`` in DDR (see :class:`MemoryPlan`).

    Concat inputs are placed at their channel-group offsets in the concat's buffer (each
    input's channel count must be a multiple of ``block``), a flatten aliases its input; the
    remaining buffers are allocated first-fit in graph order and freed after their last
    reader (the network's output is never freed). ``fused`` (``{add: conv}``, see
    :func:`find_fusions`): the conv's output never exists in DDR; the add's buffer is allocated
    when the conv runs (it writes it) and the conv's name aliases it.
    """
    names = [graph.input_name] + [n.name for n in graph]
    pos = {graph.input_name: -1} | {n.name: i for i, n in enumerate(graph.nodes)}
    words = {}
    for t in names:
        c, h, w = graph.shape_of(t)
        words[t] = -(-c // block) * h * w
    parent: dict[str, tuple[str, int]] = {}            # tensor -> (container, word offset)
    for add, conv in (fused or {}).items():
        parent[conv] = (add, 0)
    for n in graph:
        if n.kind == "concat":
            off = 0
            for i, t in enumerate(n.inputs):
                c = graph.shape_of(t)[0]
                if c % block and i + 1 < len(n.inputs):
                    raise CompileError(f"{n.name}: input {t} has {c} channels, not a multiple "
                                       f"of {block}; the concat cannot be laid out without a "
                                       f"copy")
                if t in parent:
                    raise CompileError(f"{t} feeds two concats ({parent[t][0]} and {n.name}); "
                                       f"that needs a copy, which the compiler does not make")
                parent[t] = (n.name, off)
                off += words[t]
        elif n.kind == "flatten":
            c, h, w = graph.shape_of(n.inputs[0])
            users = graph.users(n.name)
            if h * w > 1 and not all(graph[u].kind == "linear" for u in users):
                raise CompileError(f"{n.name}: a flatten of {c}x{h}x{w} feeds "
                                   f"{', '.join(users)}; only linear layers can read it")
            parent[n.name] = (n.inputs[0], 0)

    def root(t: str) -> tuple[str, int]:
        off = 0
        while t in parent:
            t, o = parent[t]
            off += o
        return t, off

    start: dict[str, int] = {}
    end: dict[str, int] = {}
    for t in names:
        r, _ = root(t)
        start[r] = min(start.get(r, pos[t]), pos[t])
        last = max([pos[u] for u in graph.users(t)], default=pos[t])
        if t == graph.output:
            last = len(graph.nodes)
        end[r] = max(end.get(r, last), last)
    roots = sorted(start, key=lambda r: (start[r], pos[r]))
    free: list[tuple[int, int]] = []                   # (base, words), sorted by base
    top = 0
    live: list[tuple[int, str]] = []
    rbase: dict[str, int] = {}
    for r in roots:
        for e, lr in sorted(live):
            if e < start[r]:
                free.append((rbase[lr], _align(words[lr], 8)))
        live = [(e, lr) for e, lr in live if e >= start[r]]
        free = _coalesce(free)
        need = _align(words[r], 8)
        for i, (b, n) in enumerate(free):
            if n >= need:
                rbase[r] = b
                free[i:i + 1] = [(b + need, n - need)] if n > need else []
                break
        else:
            if free and free[-1][0] + free[-1][1] == top:      # grow the last hole
                b, n = free.pop()
                rbase[r] = b
                top = b + need
            else:
                rbase[r] = top
                top += need
        live.append((end[r], r))
    base = {}
    for t in names:
        r, off = root(t)
        base[t] = rbase[r] + off
    unshared = sum(_align(words[r], 8) for r in roots)
    return MemoryPlan(base, words, top, unshared)


def _coalesce(free: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for b, n in sorted(free):
        if n <= 0:
            continue
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((b, n))
    return out


def find_fusions(graph: NetGraph) -> dict[str, str]:
    """The residual adds the compiler computes in a convolution's epilogue: ``{add: conv}``.

    An add is fused with the input produced last (so the other operand, the residual, exists
    when the conv runs) if that input is a convolution read by nothing but the add and the
    two operands differ: ResNet's ``conv3 + identity``, and ``downsample + conv3`` where the
    shortcut conv comes last."""
    pos = {n.name: i for i, n in enumerate(graph.nodes)}
    out: dict[str, str] = {}
    for n in graph:
        if n.kind != "add" or len(n.inputs) != 2 or n.inputs[0] == n.inputs[1]:
            continue
        last = max(n.inputs, key=lambda t: pos.get(t, -1))
        if last not in pos or graph[last].kind != "conv" or graph.users(last) != [n.name]:
            continue
        if last == graph.output or graph.shape_of(last) != n.shape:
            continue
        out[n.name] = last
    return out


# Compiled network --------------------------------------------------------------------------

@dataclass
class CompiledLayer:
    """One node of the network as compiled.

    ``array`` is None for concat and flatten (layout only). Cycle fields are filled by
    :func:`estimate_layer`: ``cycles`` the overlay model's estimate over all runs,
    ``compute`` the busiest tile's instruction-issue cycles (MACs and control, no waits),
    ``ddr`` the busiest DDR channel's cycles (words at the channel's rate, plus the latency
    of every task), ``sync`` what is left (``cycles - max(compute, ddr)``: start-up,
    pipeline bubbles, lock waits).
    """

    name: str
    kind: str
    inputs: tuple[str, ...]
    shape: tuple[int, int, int]
    array: ArrayLayer | None
    macs: int = 0
    blocks: int = 0
    nnz_blocks: int = 0
    cycles: int = 0
    compute: int = 0
    ddr: int = 0
    sync: int = 0
    ddr_bytes: int = 0
    ddr_bytes_lower_bound: int = 0
    #: a conv with a residual add in its epilogue: the add's name; the add: the conv's
    fused: str | None = None

    @property
    def tensor(self) -> str:
        """The tensor this layer's runs write (a fused conv writes its add's output)."""
        return self.fused if self.fused is not None and self.kind == "conv" else self.name

    @property
    def nnz_macs(self) -> int:
        """The MACs of the non-zero blocks (what the tiles compute)."""
        return self.macs * self.nnz_blocks // self.blocks if self.blocks else self.macs

    @property
    def runs(self) -> int:
        return len(self.array.jobs) if self.array is not None else 0

    @property
    def prefetched(self) -> bool:
        """Its weights come from the memtiles, brought by the layer before."""
        return self.array is not None and bool(self.array.jobs) and bool(
            self.array.jobs[0].prefetch)

    def row(self, cfg: OverlayConfig) -> dict[str, Any]:
        peak = cfg.array.rows * cfg.array.cols * cfg.tile.macs_per_cycle
        util = self.nnz_macs / (self.cycles * peak) if self.cycles and self.kind in (
            "conv", "linear") else None
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape),
                "runs": self.runs, "macs": self.macs, "nnz_macs": self.nnz_macs,
                "blocks": self.blocks,
                "nnz_blocks": self.nnz_blocks, "cycles": self.cycles,
                "compute_cycles": self.compute, "ddr_cycles": self.ddr,
                "sync_cycles": self.sync, "mac_utilization": util,
                "ddr_bytes": self.ddr_bytes, "ddr_bytes_lower_bound": self.ddr_bytes_lower_bound,
                "ddr_ratio": (self.ddr_bytes / self.ddr_bytes_lower_bound
                              if self.ddr_bytes_lower_bound else None),
                "fused": self.fused, "prefetched": self.prefetched}


@dataclass
class CompiledNetwork:
    """A network compiled for an overlay (see :func:`compile_network`)."""

    model: str
    cfg: OverlayConfig
    qnet: QuantNet
    sparsity: float | None
    plan: MemoryPlan
    layers: list[CompiledLayer]
    ddr_words: int
    compile_s: float = 0.0
    estimate_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def cycles(self) -> int:
        return sum(cl.cycles for cl in self.layers)

    @property
    def time_ms(self) -> float:
        return self.cycles / (self.cfg.clock_mhz * 1e3)

    @property
    def macs(self) -> int:
        """Dense MACs of the conv and linear layers."""
        return sum(cl.macs for cl in self.layers if cl.kind in ("conv", "linear"))

    @property
    def nnz_macs(self) -> int:
        """MACs of their non-zero blocks."""
        return sum(cl.nnz_macs for cl in self.layers if cl.kind in ("conv", "linear"))

    def paper_ms(self) -> float | None:
        """Paper A's estimate for this network, configuration and sparsity (0 or 0.5)."""
        fig = PAPER_MS.get(self.cfg.name, {}).get(self.model)
        if fig is None or self.sparsity not in (0.0, 0.5):
            return None
        return fig[0] if self.sparsity == 0.0 else fig[1]

    def image(self, xq: np.ndarray | None = None) -> np.ndarray:
        """The DDR image: every layer's headers and weight streams, and the int8 network input
        ``xq`` ``(C, H, W)`` at its place if given; the other activations zero."""
        ddr = np.zeros(self.ddr_words, dtype=np.uint64)
        for cl in self.layers:
            if cl.array is not None and cl.array.ddr.size:
                a = cl.array.ddr_base
                ddr[a:a + cl.array.ddr.size] = cl.array.ddr
        if xq is not None:
            xq = np.asarray(xq)
            inp = self.qnet.graph.input_name
            for cl in self.layers:      # the conv reading the input as its rewrite, if any
                if cl.array is not None and cl.array.s2d is not None and inp in cl.inputs:
                    xq = cl.array.s2d.input(xq)
            words = _planes(xq, self.cfg.tile.block)
            a = self.plan.base[inp]
            ddr[a:a + words.size] = words
        return ddr

    def summary(self) -> dict[str, Any]:
        peak = self.cfg.array.rows * self.cfg.array.cols * self.cfg.tile.macs_per_cycle
        lb = sum(cl.ddr_bytes_lower_bound for cl in self.layers)
        ddr = sum(cl.ddr_bytes for cl in self.layers)
        return {
            "model": self.model, "config": self.cfg.name, "sparsity": self.sparsity,
            "input_shape": list(self.qnet.graph.input_shape),
            "cycles": self.cycles, "time_ms": self.time_ms,
            "paper_ms": self.paper_ms(),
            "macs": self.macs, "nnz_macs": self.nnz_macs,
            "mac_utilization": self.nnz_macs / (self.cycles * peak) if self.cycles else None,
            "compute_cycles": sum(cl.compute for cl in self.layers),
            "ddr_cycles": sum(cl.ddr for cl in self.layers),
            "sync_cycles": sum(cl.sync for cl in self.layers),
            "ddr_bytes": ddr, "ddr_bytes_lower_bound": lb,
            "ddr_ratio": ddr / lb if lb else None,
            "weight_bytes": sum(self._weight_bytes(cl) for cl in self.layers),
            "ddr_image_bytes": self.ddr_words * self.cfg.tile.word_bytes,
            "activation_bytes": self.plan.arena_words * self.cfg.tile.word_bytes,
            "activation_bytes_unshared": self.plan.unshared_words * self.cfg.tile.word_bytes,
            "runs": sum(cl.runs for cl in self.layers),
            "compile_s": round(self.compile_s, 2), "estimate_s": round(self.estimate_s, 2),
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
            "layers": [cl.row(self.cfg) for cl in self.layers],
        }

    def _weight_bytes(self, cl: CompiledLayer) -> int:
        if cl.array is None or cl.kind not in ("conv", "linear"):
            return 0
        kh, kw = cl.array.kernel
        b = self.cfg.tile.block
        return cl.nnz_blocks * kh * kw * b * b

    def table(self) -> str:
        """The per-layer table ``tilewright compile`` prints."""
        hdr = (f"{'layer':34s} {'kind':7s} {'out':>14s} {'runs':>4s} {'cycles':>9s} "
               f"{'compute':>9s} {'ddr':>9s} {'sync':>8s} {'util':>5s} {'DDR KB':>8s} "
               f"{'LB KB':>8s} {'ratio':>5s}")
        lines = [hdr, "-" * len(hdr)]
        for cl in self.layers:
            if cl.kind == "add" and cl.fused:
                lines.append(f"{cl.name[:34]:34s} {cl.kind:7s} {'':>14s}    - in the "
                             f"epilogue of {cl.fused}")
                continue
            r = cl.row(self.cfg)
            util = f"{r['mac_utilization']:.2f}" if r["mac_utilization"] is not None else ""
            ratio = f"{r['ddr_ratio']:.2f}" if r["ddr_ratio"] is not None else ""
            shape = "x".join(str(v) for v in cl.shape)
            lines.append(f"{cl.name[:34]:34s} {cl.kind:7s} {shape:>14s} {cl.runs:4d} "
                         f"{cl.cycles:9d} {cl.compute:9d} {cl.ddr:9d} {cl.sync:8d} {util:>5s} "
                         f"{cl.ddr_bytes / 1024:8.1f} {cl.ddr_bytes_lower_bound / 1024:8.1f} "
                         f"{ratio:>5s}{' P' if cl.prefetched else ''}")
        s = self.summary()
        lines.append("-" * len(hdr))
        paper = (f"; paper A's estimate {s['paper_ms']:.2f} ms" if s["paper_ms"] is not None
                 else "")
        lines.append(f"{self.model} on {self.cfg.name} at sparsity {self.sparsity}: "
                     f"{s['cycles']:,} cycles = {s['time_ms']:.3f} ms at "
                     f"{self.cfg.clock_mhz} MHz{paper}")
        lines.append(f"MAC utilisation {s['mac_utilization']:.3f}; compute {s['compute_cycles']:,}"
                     f" / DDR {s['ddr_cycles']:,} / sync {s['sync_cycles']:,} cycles (summed "
                     f"over layers); DDR {s['ddr_bytes'] / 1e6:.2f} MB = "
                     f"{s['ddr_ratio']:.3f} x the per-layer lower bound "
                     f"{s['ddr_bytes_lower_bound'] / 1e6:.2f} MB; {s['runs']} overlay runs; "
                     f"compiled in {s['compile_s']:.1f} s")
        n_pre = sum(cl.prefetched for cl in self.layers)
        if n_pre:
            lines.append(f"P: {n_pre} layers whose weights the layer before prefetched into "
                         f"the memtiles")
        return "\n".join(lines)

    def write(self, out: str | Path) -> Path:
        """Write the manifest, the DDR image and every run's configuration records."""
        from tilewright.sim.overlay_sim import cfg_data_bits, record_lines

        bits = cfg_data_bits(self.cfg)
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        wb = self.cfg.tile.word_bytes
        img = self.image().astype("<u8").view(np.uint8).reshape(-1, 8)[:, :wb]
        np.ascontiguousarray(img).tofile(d / "ddr.bin")      # little-endian words
        layers = []
        for i, cl in enumerate(self.layers):
            entry: dict[str, Any] = {"name": cl.name, "kind": cl.kind,
                                     "inputs": list(cl.inputs), "shape": list(cl.shape),
                                     "output_word": self.plan.base[cl.name],
                                     "input_words": [self.plan.base[t] for t in cl.inputs],
                                     "runs": []}
            if cl.array is not None:
                entry["streams"] = [cl.array.ddr_base, int(cl.array.ddr.size)]
                for j, job in enumerate(cl.array.jobs):
                    f = Path("runs") / f"{i:03d}_{_safe(cl.name)}_{j}.cfg.hex"
                    (d / f).parent.mkdir(exist_ok=True)
                    (d / f).write_text("\n".join(record_lines(job.records(self.cfg), bits))
                                       + "\n")
                    entry["runs"].append(str(f))
            layers.append(entry | {"estimate": cl.row(self.cfg)})
        manifest = {
            "tilewright": "network", "summary": {k: v for k, v in self.summary().items()
                                                 if k != "layers"},
            "ddr_image": {"file": "ddr.bin", "words": self.ddr_words,
                          "word_bytes": self.cfg.tile.word_bytes,
                          "input_word": self.plan.base[self.qnet.graph.input_name],
                          "output_word": self.plan.base[self.qnet.graph.output]},
            "scales": self.qnet.scales,
            "tensors": {t: {"word": self.plan.base[t], "words": self.plan.words[t],
                            "shape": list(self.qnet.graph.shape_of(t))}
                        for t in self.plan.base},
            "layers": layers,
        }
        (d / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        return d


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


def _layer_of(graph: NetGraph, qnet: QuantNet, n: Node, b: int) -> ConvLayer | PoolLayer | \
        AddLayer:
    q = qnet.layers[n.name]
    if n.kind in ("conv", "linear"):
        assert isinstance(q, QuantConv)
        layer = ConvLayer.from_quant(q, name=n.name)
        src = _flatten_source(graph, n)
        if src is not None:
            layer = ConvLayer(weight=np.ascontiguousarray(q.weight.reshape(q.weight.shape[0],
                                                                           *src)),
                              bias=q.bias, mult=q.mult, shift=q.shift, stride=1, padding=0,
                              relu=q.relu, name=n.name)
        return layer
    if n.kind == "add":
        return AddLayer.from_quant(q, name=n.name)               # type: ignore[arg-type]
    assert isinstance(n, PoolNode)
    _, h, w = graph.shape_of(n.inputs[0])
    if n.kernel == (h, w) and n.padding == (0, 0):
        # a global pooling: one window, the stride does not matter (the tile takes 1 or 2)
        return PoolLayer.from_quant(q, 1, 0, name=n.name)        # type: ignore[arg-type]
    return PoolLayer.from_quant(q, n.stride, n.padding, name=n.name)  # type: ignore[arg-type]


def _input_shape(graph: NetGraph, n: Node) -> tuple[int, int, int]:
    t = n.inputs[0]
    if n.kind == "linear":
        src = _flatten_source(graph, n)
        if src is not None:
            return src
        c, h, w = graph.shape_of(t)
        return (c * h * w, 1, 1)
    return graph.shape_of(t)


def compile_network(spec: str, cfg: OverlayConfig, *, sparsity: float | None = 0.0,
                    checkpoint: str | Path | None = None, seed: int = 0, calib: int = 2,
                    input_shape: tuple[int, int, int] | None = None, estimate: bool = True,
                    progress: Callable[[str], None] | None = None,
                    bar: bool = False, fuse: bool = True,
                    workers: int | None = None, prefetch: bool = True) -> CompiledNetwork:
    """Compile model ``spec`` (see :func:`load_model`) for ``cfg``.

    Parameters
    ----------
    sparsity : float
        Block sparsity given to every layer but the first conv (:func:`block_prune`);
        ignored with ``checkpoint``.
    checkpoint : path, optional
        A trainer checkpoint (its masks and QAT scales; ``spec`` is then its architecture).
    seed : int
        Seeds the model's initialisation and the calibration images.
    calib : int
        Calibration images (seeded standard normal).
    estimate : bool
        Fill the cycle and DDR estimates (:func:`estimate_layer`).
    fuse : bool
        Compute residual adds in the epilogue of the conv that feeds them
        (:func:`find_fusions`): the conv's output never crosses DDR and the add needs no run.
    workers : int, optional
        Processes that estimate layers side by side (default: one per CPU; 1: in this one).
    prefetch : bool
        Let a layer's last run bring the next conv's weight streams into the memtiles
        (:func:`~tilewright.sw.array_compiler.add_prefetch`) where they fit and its DDR
        channels have the time (:func:`_prefetch_fits`).
    """
    t0 = time.time()
    timings: dict[str, float] = {}
    b = cfg.tile.block
    if checkpoint is not None:
        qnet = quantize_graph_from_checkpoint(
            checkpoint, (1, *input_shape) if input_shape is not None else None)
        graph = qnet.graph
        name = Path(checkpoint).stem
        sparsity = None
    else:
        net, shape, name = load_model(spec, seed, input_shape)
        graph = import_model(net, shape)
        timings["import"] = time.time() - t0
        t1 = time.time()
        block_prune(graph, float(sparsity or 0.0), b)
        gen = torch.Generator().manual_seed(seed + 1)
        images = [torch.randn(shape, generator=gen) for _ in range(max(1, calib))]
        qnet = quantize_graph(graph, images)
        timings["prune_quantize"] = time.time() - t1
    t1 = time.time()
    fused = find_fusions(graph) if fuse else {}
    add_of = {conv: add for add, conv in fused.items()}
    plan = plan_memory(graph, b, fused)
    top = _align(plan.arena_words, 8)
    layers: list[CompiledLayer] = []
    nodes = list(graph)
    est = _Estimator(cfg, workers, bar) if estimate else None
    held: CompiledLayer | None = None        # the last layer run, held back from the estimator
    it: Iterable[Node] = nodes
    if bar:
        from tqdm import tqdm

        it = tqdm(nodes, desc="compile", unit="layer", leave=False)
    try:
        for n in it:
            cl = CompiledLayer(n.name, n.kind, tuple(n.inputs), n.shape, None)
            if n.name in fused:
                cl.fused = fused[n.name]                 # computed by that conv's runs
            elif n.kind in ("conv", "linear", "maxpool", "avgpool", "global_avgpool", "add"):
                layer = _layer_of(graph, qnet, n, b)
                shp = _input_shape(graph, n)
                ins = list(n.inputs)
                if n.name in add_of:                 # the residual is the add's other operand
                    an = graph[add_of[n.name]]
                    operand = list(an.inputs).index(n.name)
                    ins.append(an.inputs[1 - operand])
                # a fused conv's name aliases its add's buffer (plan_memory)
                place = Placement(tuple(plan.base[t] for t in ins), plan.base[n.name], top)
                x = np.zeros(shp, np.int8)
                try:
                    if n.name in add_of:
                        alayer = _layer_of(graph, qnet, an, b)
                        assert isinstance(layer, ConvLayer) and isinstance(alayer, AddLayer)
                        arr = _compile_conv(layer, x, cfg, held, prefetch, place=place,
                                            fuse=FusedAdd(alayer, operand),
                                            x_res=np.zeros(an.shape, np.int8))
                        cl.fused = an.name
                    elif isinstance(layer, ConvLayer):
                        # the host writes the network input: in the space-to-depth layout
                        # if the conv that alone reads it runs rewritten (CompiledNetwork.image)
                        s2d = SpaceToDepth.of(layer, shp, b)
                        repack = (s2d is not None and ins[0] == graph.input_name
                                  and -(-s2d.shape[0] // b) * s2d.shape[1] * s2d.shape[2]
                                  <= plan.words[ins[0]]
                                  and sum(graph.input_name in m.inputs for m in nodes) == 1)
                        arr = _compile_conv(layer, x, cfg, held, prefetch, place=place,
                                            repack=repack)
                    else:
                        arr = compile_eltwise_array(layer, x, cfg, place=place,
                                                    x_b=x if n.kind == "add" else None)
                except ValueError as e:
                    raise CompileError(f"{name}: {n.name} ({n.kind}): {e}") from None
                top = _align(arr.ddr_base + arr.ddr.size, 8)
                cl.array = arr
                cl.macs = arr.macs
                cl.ddr_bytes_lower_bound = arr.ddr_bytes_min
                if isinstance(layer, ConvLayer):
                    m = block_mask(layer.weight, b)
                    cl.blocks, cl.nnz_blocks = int(m.size), int(m.sum())
                if est is not None and held is not None:
                    est.submit(held)
                held = cl
            layers.append(cl)
            if progress is not None and cl.array is not None and not bar:
                progress(f"compiled {n.name} ({n.kind}, {cl.runs} runs)")
    except BaseException:
        if est is not None and est.pool is not None:
            est.pool.shutdown(cancel_futures=True)
        raise
    if est is not None and held is not None:
        est.submit(held)
    timings["compile_layers"] = time.time() - t1
    cn = CompiledNetwork(name, cfg, qnet, sparsity, plan, layers, top)
    if est is not None:
        t1 = time.time()
        est.finish()
        # the estimate ran beside the compiler: what it took beyond the layers' compile
        cn.estimate_s = timings["estimate"] = time.time() - t1
    cn.timings = timings
    cn.compile_s = time.time() - t0
    return cn


# Estimation --------------------------------------------------------------------------------

def _issue_cycles(program: list[int], cfg: OverlayConfig) -> int:
    """Cycles a tile program issues when it never waits: FETCH + DECODE per instruction, the
    requantisation-record read and ``steps x groups`` per op (no lock waits, no writeback
    fences)."""
    from tilewright.sim.golden import decoded, op_steps, reset_params

    t = cfg.tile
    p = reset_params()
    n = 0
    pc = 0
    while pc < len(program):
        ins, _, op, prm = decoded(int(program[pc]))
        n += 2
        if op is Opcode.HALT:
            break
        if prm is not None:
            p[prm] = ins.imm
        elif op in (Opcode.CONV, Opcode.MAXPOOL, Opcode.AVGPOOL, Opcode.ADD):
            nnz = ins.b if op is Opcode.CONV else 0
            steps = op_steps(op, nnz, p[Param.KH], p[Param.KW])
            groups = p[Param.HO] * -(-p[Param.WO] // t.pixels)
            n += 1 + (steps * groups if steps else 1)
            pc += index_words(ins.b) if op is Opcode.CONV else 0
        pc += 1
    return n


def _read_cycles(bds: list, cfg: OverlayConfig) -> int:
    """Cycles a shim read channel takes for its BD chain ``bds`` at the DDR's pace: words at
    the channel's rate plus padding words at one a cycle plus the task latency."""
    if not bds:
        return 0
    step = cfg.ddr_interval
    cyc = cfg.ddr.latency
    i: int | None = 0
    while i is not None:
        real, total = int(np.prod(bds[i].sizes)), int(np.prod(bds[i].extents))
        cyc += real * step + total - real
        i = bds[i].next_bd
    return cyc


#: Fraction of its DDR read channels' idle time (the cores' issue cycles less the channel's
#: reads) that a layer's last run may spend prefetching the next layer's weights.
PREFETCH_SHARE = 0.8


def _compile_conv(layer: ConvLayer, x: np.ndarray, cfg: OverlayConfig,
                  prev: CompiledLayer | None, prefetch: bool, **kw: Any) -> ArrayLayer:
    """:func:`compile_conv_array` with, where ``prefetch`` and the layer run before (``prev``)
    has the time, its weights prefetched by that layer's last run (which it changes)."""
    if not prefetch or prev is None or prev.array is None or not prev.array.jobs:
        return compile_conv_array(layer, x, cfg, **kw)
    spare = _spare(prev.array.jobs[-1], cfg)
    if _prefetch_worth(spare, layer, cfg):
        end = memtile_end(prev.array.jobs[-1], cfg)
        at = {c: end.get(c, 0) for c in range(cfg.array.cols)}
        arr = compile_conv_array(layer, x, cfg, prefetch_at=at, **kw)
        if not arr.jobs[0].prefetch:
            return arr
        if _prefetch_fits(spare, arr.jobs[0], cfg) and \
                add_prefetch(prev.array.jobs[-1], arr.jobs[0], cfg):
            prev.array.extra_reads = _prefetch_words(arr)
            return arr
    return compile_conv_array(layer, x, cfg, **kw)


def _prefetch_worth(spare: dict[tuple[int, int], float], layer: ConvLayer,
                    cfg: OverlayConfig) -> bool:
    """Whether ``layer``'s weights, spread evenly over the columns' read channels, may fit
    the time (``spare``, :func:`_spare`) the layer before leaves its channels in its last
    run (a quick test before compiling ``layer`` for a prefetch)."""
    b = cfg.tile.block
    mask = block_mask(layer.weight, b)
    kh, kw = layer.kernel
    words = (int(mask.sum()) * kh * kw * b + mask.shape[0] * cfg.tile.qrec_words) / (
        2 * cfg.array.cols)
    step = cfg.ddr_interval
    return words * step <= PREFETCH_SHARE * min(spare.values(), default=0)


def _spare(job, cfg: OverlayConfig) -> dict[tuple[int, int], float]:
    """Per column read channel of ``job``, the cycles its cores issue after the channel has
    sent its last packet: beyond its reads, and after the column's last weight chunk can
    enter its buffer (the channel sends its packets in order, and the cores free the buffer
    the last chunk fills only once they have used the chunk two before it; their work taken
    to go with the chunks' words)."""
    issue = max(_issue_cycles(tp.program, cfg) for tp in job.tiles)
    out = {}
    for c in range(cfg.array.cols):
        words = [k.words for k in job.chunks[c]] if c < len(job.chunks) else []
        tail = issue * sum(words[-2:]) / sum(words) if len(words) > 2 else issue
        for ch in range(min(2, cfg.ddr.read_channels)):
            out[(c, ch)] = min(tail, issue - _read_cycles(job.shim_bds.get(c, {}).get(ch, []),
                                                          cfg))
    return out


def _prefetch_fits(spare: dict[tuple[int, int], float], nxt, cfg: OverlayConfig) -> bool:
    """Whether read channels with ``spare`` idle cycles have the time to bring ``nxt``'s
    prefetched streams (:data:`PREFETCH_SHARE` of it)."""
    step = cfg.ddr_interval
    return all(sum(1 + n for _, _, n in pieces) * step <= PREFETCH_SHARE * spare[key]
               for key, (_, pieces) in nxt.prefetch.items())


def _prefetch_words(arr: ArrayLayer) -> tuple[tuple[int, np.ndarray], ...]:
    """The words of ``arr``'s prefetched streams and their wrapper headers, for the layer
    whose last run reads them (:attr:`ArrayLayer.extra_reads`)."""
    out = []
    for _, pieces in arr.jobs[0].prefetch.values():
        for hdr, src, n in pieces:
            out.append((hdr, arr.ddr[hdr - arr.ddr_base:hdr - arr.ddr_base + 1]))
            out.append((src, arr.ddr[src - arr.ddr_base:src - arr.ddr_base + n]))
    return tuple(out)


def _ddr_cycles(arr: ArrayLayer, cfg: OverlayConfig) -> int:
    """Per run, the busiest DDR channel (reads: :func:`_read_cycles`; writes: every tile's
    output words and headers on the column's write channel), summed over runs."""
    step = cfg.ddr_interval
    total = 0
    for job in arr.jobs:
        worst = 0
        for per in job.shim_bds.values():
            for bds in per.values():
                worst = max(worst, _read_cycles(bds, cfg))
        wr: dict[tuple[int, int], int] = {}
        for tp in job.tiles:
            for ch, bds in tp.bds.items():
                if ch < N_S2MM:
                    continue
                k = (tp.c, (ch - N_S2MM) % cfg.ddr.write_channels)
                wr[k] = wr.get(k, 0) + sum(int(np.prod(bd.sizes)) for bd in bds) * step
        total += max([worst, *wr.values()])
    return total


_ESTIMATE_FIELDS = ("cycles", "ddr_bytes", "compute", "ddr", "sync")


def _estimate_fields(cl: CompiledLayer, cfg: OverlayConfig) -> tuple[int, ...]:
    estimate_layer(cl, cfg)
    return tuple(getattr(cl, f) for f in _ESTIMATE_FIELDS)


class _Estimator:
    """Estimates layers while the compiler goes on: :meth:`submit` hands a compiled layer to
    a pool of ``workers`` processes (default: one per CPU; 1: estimated at :meth:`finish`, in
    this process), :meth:`finish` waits and fills the layers in place (the same figures as
    :func:`estimate_layer` one by one)."""

    def __init__(self, cfg: OverlayConfig, workers: int | None, bar: bool) -> None:
        import os

        self.cfg, self.bar = cfg, bar
        self.n = workers or os.cpu_count() or 1
        self.pool: Any = None
        self.futs: dict[Any, CompiledLayer] = {}
        self.todo: list[CompiledLayer] = []

    def submit(self, cl: CompiledLayer) -> None:
        if self.n <= 1:
            self.todo.append(cl)
            return
        if self.pool is None:
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.n)
        self.futs[self.pool.submit(_estimate_fields, cl, self.cfg)] = cl

    def finish(self) -> None:
        from concurrent.futures import as_completed

        it: Iterable[Any]
        if self.pool is None:
            it = (estimate_layer(cl, self.cfg) for cl in self.todo)
            total = len(self.todo)
        else:
            it = as_completed(self.futs)
            total = len(self.futs)
        if self.bar:
            from tqdm import tqdm

            it = tqdm(it, total=total, desc="estimate", unit="layer", leave=False)
        try:
            for f in it:
                if self.pool is not None:
                    for name, v in zip(_ESTIMATE_FIELDS, f.result(), strict=True):
                        setattr(self.futs[f], name, v)
        finally:
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)


def estimate_layer(cl: CompiledLayer, cfg: OverlayConfig) -> CompiledLayer:
    """Fill ``cl``'s cycle and DDR estimates from the overlay model's timing (in place)."""
    from tilewright.sim.golden import TileModel
    from tilewright.sim.overlay_model import OverlayModel

    arr = cl.array
    assert arr is not None
    model = OverlayModel(cfg)
    model.tile_model = TileModel(cfg.tile, timing_only=True)
    top = arr.ddr_base + arr.ddr.size
    for a, n in (*arr.operand_regions, arr.out_region):
        top = max(top, a + n)
    for a, words in arr.extra_reads:
        top = max(top, a + words.size)
    img = np.zeros(top, np.uint64)
    img[arr.ddr_base:arr.ddr_base + arr.ddr.size] = arr.ddr
    for a, words in arr.extra_reads:
        img[a:a + words.size] = words
    res = model.run_layer(dataclasses.replace(arr, ddr=img, ddr_base=0))
    cl.cycles = int(res.cycles)
    cl.ddr_bytes = (res.rd_words + res.wr_words) * cfg.tile.word_bytes
    cl.compute = sum(max(_issue_cycles(tp.program, cfg) for tp in job.tiles)
                     for job in arr.jobs)
    cl.ddr = _ddr_cycles(arr, cfg)
    cl.sync = max(0, cl.cycles - max(cl.compute, cl.ddr))
    return cl


# Verification ------------------------------------------------------------------------------

@dataclass
class LayerCheck:
    name: str
    kind: str
    ok: bool
    mismatches: int
    cycles: int
    error: str = ""          # the overlay model stopped on this layer (a deadlock, a bad BD)


def verify_network(cn: CompiledNetwork, x: torch.Tensor | None = None, *, seed: int = 0,
                   progress: Callable[[LayerCheck], None] | None = None,
                   bar: bool = False) -> tuple[list[LayerCheck], dict[str, torch.Tensor]]:
    """Run every compiled layer in order on one DDR image on the overlay model and compare
    each layer's output region (a concat's whole buffer too) with the integer oracle.
    A layer on which the model stops (a deadlock, a bad descriptor) fails with the error in
    :attr:`LayerCheck.error`, and the layers after it are not run.

    ``x`` is the float input ``(1, C, H, W)`` (default: seeded standard normal). Returns the
    checks and the oracle's tensors.
    """
    from tilewright.sim.overlay_model import OverlayModel

    graph = cn.qnet.graph
    if x is None:
        x = torch.randn(graph.input_shape, generator=torch.Generator().manual_seed(seed + 7))
    env = cn.qnet.run_int(x)
    b = cn.cfg.tile.block
    ddr = cn.image(env[graph.input_name][0].numpy())
    model = OverlayModel(cn.cfg)
    memtiles = model.new_memtiles()       # one set for the network: prefetches cross layers
    checks: list[LayerCheck] = []
    it: Iterable[CompiledLayer] = cn.layers
    if bar:
        from tqdm import tqdm

        it = tqdm(cn.layers, desc="verify", unit="layer", leave=False)
    for cl in it:
        if cl.kind == "flatten" or (cl.kind == "add" and cl.fused):
            continue                # a fused add is checked with its conv
        cycles = 0
        kind = f"{cl.kind}+add" if cl.tensor != cl.name else cl.kind
        if cl.array is not None:
            try:
                res = model.run_layer(dataclasses.replace(cl.array, ddr=ddr, ddr_base=0),
                                      memtiles)
            except (RuntimeError, ValueError) as e:
                # the layers after it would run on what it did not write: the check ends here
                chk = LayerCheck(cl.name, kind, False, -1, 0, f"{type(e).__name__}: {e}")
                checks.append(chk)
                if progress is not None:
                    progress(chk)
                break
            ddr = res.ddr
            cycles = int(res.cycles)
        a = cn.plan.base[cl.tensor]
        got = read_planes(ddr[a:a + cn.plan.words[cl.tensor]], cl.shape, b)
        want = env[cl.tensor][0].numpy().reshape(cl.shape)
        bad = int((got != want).sum())
        chk = LayerCheck(cl.name, kind, bad == 0, bad, cycles)
        checks.append(chk)
        if progress is not None:
            progress(chk)
    return checks, env
