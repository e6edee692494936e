"""Post-training int8 quantisation of a :class:`~tilewright.sw.graph.NetGraph`, and its oracle.

:func:`quantize_graph` calibrates a graph (float execution of its folded layers over the
calibration batches), chooses every activation scale, and quantises every node with
:mod:`tilewright.sw.quantize` (:func:`~tilewright.sw.quantize.quantize_conv`,
:func:`~tilewright.sw.quantize.quantize_avgpool`, :func:`~tilewright.sw.quantize.quantize_maxpool`,
:func:`~tilewright.sw.quantize.quantize_add`): symmetric int8 with zero point 0, weights per
output channel, int32 biases in accumulator units, one int32 multiplier per output channel
and one shift per layer, rounding half away from zero.

Scales
------
Every tensor has one scale; tensors that must share a scale form a *scale group*:

* max pooling and flatten keep their input's scale (their output joins the input's group);
* every input of a concat takes the concat's scale (so each producer writes its int8 output
  straight into its slice of the concat buffer, no requantising copy); nested concats and
  a tensor feeding several concats merge their groups.

A group's scale is :func:`~tilewright.sw.quantize.act_scale` of the largest ``|x|`` any of
its members reached over the calibration data (``max|x| / 127``), so no member saturates.
The graph input is quantised with its own group's scale. A fused ReLU clamps at 0 in the
requantisation; the scale is that of the (non-negative) output.

:func:`quantize_graph_from_checkpoint` takes the scales from a trainer checkpoint instead of
calibrating (the observers of :func:`tilewright.sw.prune.qat.prepare_qat`).

:meth:`QuantNet.run_int` is the integer oracle: the input quantised with the input scale,
then every node evaluated with :mod:`tilewright.sw.reference` only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tilewright.sw.graph import ConvNode, NetGraph, Node, PoolNode, import_model
from tilewright.sw.numerics import INT32_MAX, INT32_MIN
from tilewright.sw.quantize import (
    QuantAdd,
    QuantConv,
    QuantPool,
    act_scale,
    dequantize_act,
    quantize_act,
    quantize_add,
    quantize_avgpool,
    quantize_conv,
    quantize_maxpool,
)
from tilewright.sw.reference import add_int, avgpool_int, conv2d_int, linear_int, maxpool_int

__all__ = [
    "QuantError",
    "QuantNet",
    "calibrate_graph",
    "quantize_graph",
    "quantize_graph_from_checkpoint",
    "scale_groups",
]

QuantLayer = QuantConv | QuantPool | QuantAdd | None


class QuantError(ValueError):
    """The graph cannot be quantised as asked (no calibration data, missing scales...)."""


# Scale groups ---------------------------------------------------------------------------------

def scale_groups(graph: NetGraph) -> dict[str, str]:
    """Which tensors must share one scale.

    Parameters
    ----------
    graph : NetGraph

    Returns
    -------
    dict
        ``{name: group}`` for the input and every node: ``group`` is the name of the first
        member of the group in graph order (the input counts as first).
    """
    parent: dict[str, str] = {graph.input_name: graph.input_name}
    order = {graph.input_name: -1}
    for i, n in enumerate(graph.nodes):
        parent[n.name] = n.name
        order[n.name] = i

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            first, second = (ra, rb) if order[ra] < order[rb] else (rb, ra)
            parent[second] = first

    for n in graph.nodes:
        if n.kind in ("maxpool", "flatten", "concat"):
            for i in n.inputs:
                union(n.name, i)
    return {name: find(name) for name in parent}


# The quantised network ------------------------------------------------------------------------

@dataclass
class QuantNet:
    """An int8 network: a :class:`NetGraph` with the integer parameters of every node.

    Attributes
    ----------
    graph : NetGraph
    scales : dict
        ``{name: scale}`` of the input and of every node's output (shared within a scale
        group, see :func:`scale_groups`).
    layers : dict
        ``{node name: parameters}``: :class:`~tilewright.sw.quantize.QuantConv` for conv and
        linear nodes, :class:`~tilewright.sw.quantize.QuantPool` for pooling,
        :class:`~tilewright.sw.quantize.QuantAdd` for add, ``None`` for concat and flatten
        (no arithmetic).
    groups : dict
        ``{name: group}`` from :func:`scale_groups`.
    diagnostics : list of str
        Numerical warnings found while quantising (int32 biases that saturated, output
        channels whose multiplier rounded to 0): the integer network still runs, but those
        channels do not follow the float model.
    """

    graph: NetGraph
    scales: dict[str, float]
    layers: dict[str, QuantLayer]
    groups: dict[str, str] = field(default_factory=dict)
    diagnostics: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._w: dict[str, torch.Tensor] = {}
        for name, q in self.layers.items():
            if isinstance(q, QuantConv):
                w = torch.from_numpy(np.ascontiguousarray(q.weight))
                self._w[name] = w[:, :, 0, 0].contiguous() if q.is_linear else w

    @property
    def input_scale(self) -> float:
        """The scale the float input is quantised with."""
        return self.scales[self.graph.input_name]

    @property
    def output_scale(self) -> float:
        """The scale of the output node."""
        return self.scales[self.graph.output]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The float input ``(N, C, H, W)`` as int8 (round half away from zero, saturated)."""
        want = tuple(self.graph.input_shape[1:])
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"{self.graph.model}: input must be (N, {want[0]}, {want[1]}, "
                             f"{want[2]}), not {tuple(x.shape)}")
        return quantize_act(x, self.input_scale)

    @torch.no_grad()
    def run_int(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The integer oracle: every node's int8 output.

        The input is quantised with :attr:`input_scale`; every node is then evaluated one
        image at a time with :mod:`tilewright.sw.reference` (``conv2d_int``, ``linear_int``,
        ``maxpool_int``, ``avgpool_int``, ``add_int``); concat and flatten only move data.

        Parameters
        ----------
        x : torch.Tensor
            Float ``(N, C, H, W)``.

        Returns
        -------
        dict
            ``{name: int8 (N, C, H, W) tensor}`` for the input (quantised) and every node;
            vectors (linear, flatten) are ``(N, C, 1, 1)``.
        """
        xq = self.quantize_input(x)
        env: dict[str, torch.Tensor] = {self.graph.input_name: xq}
        for n in self.graph.nodes:
            env[n.name] = self._run_node(n, [env[i] for i in n.inputs])
        return env

    def _run_node(self, n: Node, xs: list[torch.Tensor]) -> torch.Tensor:
        q = self.layers.get(n.name)
        x = xs[0]
        if n.kind == "conv":
            assert isinstance(q, QuantConv)
            w = self._w[n.name]
            return torch.stack([conv2d_int(xi, w, q.bias, q.mult, q.shift, q.stride, q.padding,
                                           q.relu) for xi in x])
        if n.kind == "linear":
            assert isinstance(q, QuantConv)
            w = self._w[n.name]
            return torch.stack([linear_int(xi.reshape(-1), w, q.bias, q.mult, q.shift, q.relu)
                                for xi in x])[:, :, None, None]
        if n.kind == "maxpool":
            assert isinstance(n, PoolNode)
            return torch.stack([maxpool_int(xi, n.kernel, n.stride, n.padding) for xi in x])
        if n.kind in ("avgpool", "global_avgpool"):
            assert isinstance(n, PoolNode) and isinstance(q, QuantPool)
            return torch.stack([avgpool_int(xi, n.kernel, n.stride, n.padding, q.mult, q.shift)
                                for xi in x])
        if n.kind == "add":
            assert isinstance(q, QuantAdd)
            return torch.stack([add_int(a, b, q.mul_a, q.mul_b, 0, q.mult, q.shift, q.relu)
                                for a, b in zip(xs[0], xs[1], strict=True)])
        if n.kind == "concat":
            return torch.cat(xs, 1)
        if n.kind == "flatten":
            return x.reshape(x.shape[0], -1, 1, 1)
        raise AssertionError(n.kind)  # pragma: no cover - kinds are closed

    def dequantize(self, name: str, q: torch.Tensor) -> torch.Tensor:
        """An int8 tensor of node ``name`` back to float32 (``q * scale``)."""
        return dequantize_act(q, self.scales[name]).to(torch.float32)

    def run_float(self, x: torch.Tensor) -> torch.Tensor:
        """The dequantised model output, in the model's output shape (float32).

        Parameters
        ----------
        x : torch.Tensor
            Float ``(N, C, H, W)``.

        Returns
        -------
        torch.Tensor
            ``run_int(x)[output] * output_scale``, reshaped like the float model's output.
        """
        y = self.run_int(x)[self.graph.output]
        return self.dequantize(self.graph.output, y).reshape(x.shape[0],
                                                             *self.graph.output_shape[1:])


# Calibration and quantisation -----------------------------------------------------------------

def _batches(calib: Iterable[Any]) -> Iterable[torch.Tensor]:
    for b in calib:
        yield b[0] if isinstance(b, (tuple, list)) else b


@torch.no_grad()
def calibrate_graph(graph: NetGraph, calib: Iterable[torch.Tensor]) -> dict[str, float]:
    """The largest ``|x|`` of the input and of every node over the calibration batches.

    Parameters
    ----------
    graph : NetGraph
    calib : iterable of torch.Tensor
        Float batches ``(N, C, H, W)`` (a ``(x, label)`` tuple is taken as ``x``).

    Returns
    -------
    dict
        ``{name: max|x|}`` (float32 forward of the folded graph).

    Raises
    ------
    QuantError
        If ``calib`` yields no batch.
    """
    top: dict[str, float] = {}
    for x in _batches(calib):
        for name, t in graph.run(x.detach().to(torch.float32)).items():
            m = float(t.abs().max()) if t.numel() else 0.0
            top[name] = max(top.get(name, 0.0), m)
    if not top:
        raise QuantError(f"{graph.model}: the calibration data yielded no batch")
    return top


def _group_scales(graph: NetGraph, groups: dict[str, str], values: Mapping[str, float],
                  are_scales: bool = False) -> dict[str, float]:
    """One scale per group from the largest of its members' ``values``.

    ``values`` are ``max|x|`` ranges (the scale is their
    :func:`~tilewright.sw.quantize.act_scale`), or scales already when ``are_scales``.
    """
    top: dict[str, float] = {}
    for name, g in groups.items():
        if name in values:
            top[g] = max(top.get(g, 0.0), float(values[name]))
    missing = sorted({g for g in groups.values() if g not in top})
    if missing:
        raise QuantError(f"{graph.model}: no range for the scale group(s) of "
                         f"{', '.join(missing)}")
    scale = {g: m if are_scales else act_scale(np.array([m], dtype=np.float64))
             for g, m in top.items()}
    return {name: scale[g] for name, g in groups.items()}


def _quantize_layers(graph: NetGraph, scales: Mapping[str, float],
                     masks: Mapping[str, Any] | None, block: int | None
                     ) -> dict[str, QuantLayer]:
    layers: dict[str, QuantLayer] = {}
    masks = masks or {}
    for n in graph.nodes:
        s_out = scales[n.name]
        s_in = [scales[i] for i in n.inputs]
        if isinstance(n, ConvNode):
            mask = masks.get(n.name, masks.get(n.module)) if n.module else masks.get(n.name)
            if mask is not None:
                m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
                layers[n.name] = quantize_conv(n.to_module(), s_in[0], s_out, n.relu,
                                               mask=m.astype(bool), block=block)
            else:
                layers[n.name] = quantize_conv(n.to_module(), s_in[0], s_out, n.relu)
        elif n.kind == "maxpool":
            assert isinstance(n, PoolNode)
            layers[n.name] = quantize_maxpool(n.kernel)
        elif n.kind in ("avgpool", "global_avgpool"):
            assert isinstance(n, PoolNode)
            layers[n.name] = quantize_avgpool(n.kernel, s_in[0], s_out)
        elif n.kind == "add":
            layers[n.name] = quantize_add(s_in[0], s_in[1], s_out, n.relu)
        else:
            layers[n.name] = None
    return layers


def _diagnose(layers: Mapping[str, QuantLayer]) -> list[str]:
    """Channels the integer parameters cannot represent faithfully."""
    out: list[str] = []
    for name, q in layers.items():
        if isinstance(q, QuantConv):
            sat = int(np.sum((q.bias == INT32_MIN) | (q.bias == INT32_MAX)))
            if sat:
                out.append(f"{name}: {sat} of {q.cout} int32 biases saturated (the bias is "
                           f"over 2**31 accumulator units: the input scale is tiny next to "
                           f"the bias)")
            zero = int(np.sum(q.mult == 0))
            if zero:
                out.append(f"{name}: {zero} of {q.cout} output multipliers rounded to 0 "
                           f"(those channels always output 0)")
        elif isinstance(q, (QuantPool, QuantAdd)) and q.mult == 0:
            out.append(f"{name}: the output multiplier rounded to 0 (it always outputs 0)")
    return out


def quantize_graph(graph: NetGraph, calib: Iterable[torch.Tensor],
                   masks: Mapping[str, Any] | None = None,
                   block: int | None = None) -> QuantNet:
    """Post-training int8 quantisation of a graph with calibrated activation scales.

    Parameters
    ----------
    graph : NetGraph
        From :func:`tilewright.sw.graph.import_model`.
    calib : iterable of torch.Tensor
        Float calibration batches ``(N, C, H, W)`` at the imported ``(C, H, W)``.
    masks : mapping, optional
        ``{node name or module path: block mask}`` recorded in the layers' ``QuantConv``
        (weights of pruned blocks are zeroed before the weight scales are taken).
    block : int, optional
        Block size of ``masks`` (inferred when omitted).

    Returns
    -------
    QuantNet

    Raises
    ------
    QuantError
        If ``calib`` is empty.
    """
    groups = scale_groups(graph)
    scales = _group_scales(graph, groups, calibrate_graph(graph, calib))
    layers = _quantize_layers(graph, scales, masks, block)
    return QuantNet(graph, scales, layers, groups, _diagnose(layers))


def quantize_graph_from_checkpoint(path: str | Path,
                                   input_shape: tuple[int, int, int, int] | None = None
                                   ) -> QuantNet:
    """Quantise the network of a trainer checkpoint with the scales the checkpoint holds.

    The checkpoint (:mod:`tilewright.sw.prune.checkpoint`) must carry ``quant`` parameters:
    ``form == "qat"`` (the weights are the QAT form's, batch norm already folded) or
    ``"ptq"`` (float weights; :func:`~tilewright.sw.prune.qat.prepare_qat` rebuilds the
    observers the scales were recorded for). The model is rebuilt from its architecture
    record (the trainer's ``fmnist-resnet``, torchvision networks, or a
    ``module:factory``), its observers are mapped to graph tensors by
    :func:`~tilewright.sw.graph.import_model`, and each scale group takes the largest
    observer scale among its members. Weight scales are recomputed by ``quantize_conv`` and
    checked against the stored ones; square block masks are recorded in the layers.

    Parameters
    ----------
    path : str or pathlib.Path
        The checkpoint file.
    input_shape : (int, int, int, int), optional
        ``(N, C, H, W)``; default ``(1, *arch["input_shape"])``.

    Returns
    -------
    QuantNet

    Raises
    ------
    QuantError
        If the checkpoint has no quantisation parameters, a scale group has no observer, or
        a stored weight scale disagrees with the weights.
    tilewright.sw.prune.checkpoint.CheckpointError
        If the checkpoint cannot be loaded.
    """
    from tilewright.sw.prune.checkpoint import load_checkpoint
    from tilewright.sw.prune.qat import act_quants, prepare_qat

    model, ck = load_checkpoint(path)
    quant = ck.get("quant") or {}
    form = quant.get("form")
    acts = quant.get("activations")
    if form not in ("qat", "ptq") or not isinstance(acts, dict):
        raise QuantError(f"{path}: the checkpoint holds no int8 scales (quant form "
                         f"{form!r}); quantise its model with quantize_graph and calibration "
                         f"data instead")
    if form == "ptq":
        model = prepare_qat(model).eval()
    missing = sorted(set(act_quants(model)) - set(acts))
    if missing:
        raise QuantError(f"{path}: no stored scale for the observer(s) {', '.join(missing[:5])}")
    shape = input_shape or (1, *(int(s) for s in ck["arch"]["input_shape"]))
    graph = import_model(model, shape)  # type: ignore[arg-type]
    groups = scale_groups(graph)
    observed = {name: max(float(acts[o]) for o in obs)
                for name, obs in graph.observers.items()}
    try:
        scales = _group_scales(graph, groups, observed, are_scales=True)
    except QuantError as e:
        raise QuantError(f"{path}: {e} (the checkpoint's model has no observer there)") from None
    pattern = ck.get("pattern") or {}
    block = None
    if pattern.get("kind") == "block" and len(set(pattern.get("block", []))) == 1:
        block = int(pattern["block"][0])
    masks = ck.get("masks") if block is not None else None
    layers = _quantize_layers(graph, scales, masks, block)
    _check_weight_scales(path, graph, layers, quant.get("weights") or {})
    return QuantNet(graph, scales, layers, groups, _diagnose(layers))


def _check_weight_scales(path: str | Path, graph: NetGraph, layers: Mapping[str, QuantLayer],
                         stored: Mapping[str, Any]) -> None:
    for n in graph.nodes:
        q = layers.get(n.name)
        if not isinstance(q, QuantConv) or q.s_w is None:
            continue
        want = stored.get(n.module) if n.module else None
        if want is None:
            continue
        want_a = np.asarray(want, dtype=np.float64)
        live = np.abs(q.weight.astype(np.int32)).reshape(q.cout, -1).max(axis=1) > 0
        if want_a.shape != q.s_w.shape or not np.allclose(q.s_w[live], want_a[live],
                                                          rtol=1e-9, atol=0):
            raise QuantError(f"{path}: layer {n.module}: the weight scales stored in the "
                             f"checkpoint differ from those of its weights")
