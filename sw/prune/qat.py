"""Quantisation-aware fine-tuning to the project's int8 numerics.

:func:`prepare_qat` turns a float model (masks already squashed) into a
``torch.fx.GraphModule`` that computes what the tile computes, in float:

* batch norm folded into the preceding convolution (``torch.fx.experimental.optimization.fuse``);
* every ``Conv2d`` / ``Linear`` replaced by :class:`QATConv2d` / :class:`QATLinear`, whose
  weights are fake-quantised per output channel exactly as
  :func:`tilewright.sw.quantize.quantize_conv` quantises them (scale ``max|w_c| / 127``,
  round half away from zero, clamp to +-127);
* a :class:`FakeQuantAct` (per-tensor scale ``max|x| / 127``, as
  :func:`tilewright.sw.quantize.act_scale`; round half away from zero, clamp to -128..127)
  wherever the tile writes an int8 tensor: the network input, after every convolution or
  FC layer (after its ReLU when one follows), after every residual addition (and its ReLU),
  after average pooling and concatenation. Max pooling, flattening and a ReLU of an int8
  tensor keep the scale and need none.

Gradients pass the rounding straight through (and stop where a value is clipped). The
activation observers follow an exponential moving average of each batch's ``max|x|`` while
training and are frozen in ``eval()`` mode; :func:`calibrate` sets them first from the
maximum over calibration batches. :func:`quant_params` lists every scale for the checkpoint,
and :mod:`tilewright.sw.prune.int8` runs the model through the integer reference.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

__all__ = [
    "FakeQuantAct",
    "QATConv2d",
    "QATLinear",
    "calibrate",
    "fake_quant_bias",
    "fake_quant_weight",
    "prepare_qat",
    "quant_params",
    "round_half_away",
    "weight_scales",
]


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero (the project's rounding)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` in the forward pass, the gradient of ``x`` in the backward pass."""
    return x + (q - x).detach()


def weight_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel weight scales ``max|w_c| / 127`` (detached).

    An all-zero channel (a pruned block row) takes the layer's largest scale, as
    :func:`tilewright.sw.quantize.quantize_conv` does (it matters for the bias only).
    """
    wmax = w.detach().abs().reshape(w.shape[0], -1).amax(1)
    top = wmax.max()
    wmax = torch.where(wmax > 0, wmax, top if top > 0 else torch.ones_like(top))
    return wmax / 127.0


def fake_quant_weight(w: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel symmetric int8 fake quantisation of a weight (scale max|w_c|/127)."""
    s = weight_scales(w) if s is None else s
    sv = s.view(-1, *([1] * (w.dim() - 1)))
    return _ste(w, round_half_away(w / sv).clamp(-127, 127) * sv)


def fake_quant_bias(b: torch.Tensor, s_in: float, s_w: torch.Tensor) -> torch.Tensor:
    """The bias as the tile holds it: int32 in accumulator units ``s_in * s_w[c]``."""
    acc = s_in * s_w
    return _ste(b, round_half_away(b / acc).clamp(-(2**31), 2**31 - 1) * acc)


class FakeQuantAct(nn.Module):
    """Per-tensor symmetric int8 fake quantisation with a ``max|x|`` observer.

    Parameters
    ----------
    momentum : float
        Weight of a new batch in the moving average of ``max|x|`` while training.

    Attributes
    ----------
    max_abs : torch.Tensor
        The observed range (a buffer, saved with the model); the scale is ``max_abs / 127``.
    calibrating : bool
        When True, ``max_abs`` takes the running maximum and no quantisation is applied.
    """

    def __init__(self, momentum: float = 0.01) -> None:
        super().__init__()
        self.momentum = float(momentum)
        self.register_buffer("max_abs", torch.tensor(0.0))
        self.register_buffer("observed", torch.tensor(False))
        self.calibrating = False

    @property
    def scale(self) -> float:
        """``max_abs / 127`` (``1/127`` before anything was observed), as
        :func:`tilewright.sw.quantize.act_scale`."""
        m = float(self.max_abs)
        return m / 127.0 if m > 0 else 1.0 / 127.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating or (self.training and not bool(self.observed)):
            with torch.no_grad():
                m = x.detach().abs().max().to(self.max_abs.dtype)
                self.max_abs.copy_(torch.maximum(self.max_abs, m) if bool(self.observed) else m)
                self.observed.fill_(True)
            if self.calibrating:
                return x
        elif self.training:
            with torch.no_grad():
                m = x.detach().abs().max().to(self.max_abs.dtype)
                self.max_abs.lerp_(m, self.momentum)
        s = self.scale
        lo, hi = -128.0 * s, 127.0 * s
        xc = x.clamp(lo, hi)
        return _ste(xc, round_half_away(xc / s).clamp(-128, 127) * s)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, momentum={self.momentum}"


class QATConv2d(nn.Conv2d):
    """A ``Conv2d`` whose weight is fake-quantised per output channel in ``forward``."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d) -> QATConv2d:
        """Copy a float convolution (weights, bias, geometry)."""
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(conv.weight)
            if conv.bias is not None:
                q.bias.copy_(conv.bias)
        return q

    input_quant: FakeQuantAct | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = _quant_wb(self, self.weight, self.bias)
        return self._conv_forward(x, w, b)


class QATLinear(nn.Linear):
    """A ``Linear`` whose weight is fake-quantised per output channel in ``forward``."""

    @classmethod
    def from_float(cls, lin: nn.Linear) -> QATLinear:
        q = cls(lin.in_features, lin.out_features, lin.bias is not None,
                device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(lin.weight)
            if lin.bias is not None:
                q.bias.copy_(lin.bias)
        return q

    input_quant: FakeQuantAct | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = _quant_wb(self, self.weight, self.bias)
        return F.linear(x, w, b)


def _quant_wb(m: QATConv2d | QATLinear, w: torch.Tensor, b: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    s_w = weight_scales(w)
    wq = fake_quant_weight(w, s_w)
    aq = m.__dict__.get("input_quant")
    if b is not None and aq is not None and bool(aq.observed) and not aq.calibrating:
        b = fake_quant_bias(b, aq.scale, s_w.to(b.dtype))
    return wq, b


# Graph rewriting ------------------------------------------------------------------------------

_RELU_FUNCS = (F.relu, torch.relu, torch.nn.functional.relu)
_ADD_FUNCS = (operator.add, torch.add, operator.iadd)
_CAT_FUNCS = (torch.cat, torch.concat)


def _is_relu(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if n.op == "call_module":
        return isinstance(modules[str(n.target)], nn.ReLU)
    if n.op == "call_function":
        return n.target in _RELU_FUNCS
    return n.op == "call_method" and n.target in ("relu", "relu_")


def _is_producer(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Nodes whose int8 output needs a new scale."""
    if n.op == "placeholder":
        return True
    if n.op == "call_module":
        return isinstance(modules[str(n.target)], (nn.Conv2d, nn.Linear, nn.AvgPool2d,
                                                    nn.AdaptiveAvgPool2d))
    if n.op == "call_function":
        return n.target in _ADD_FUNCS or n.target in _CAT_FUNCS or n.target in (
            F.avg_pool2d, F.adaptive_avg_pool2d)
    return n.op == "call_method" and n.target in ("add", "add_")


def prepare_qat(model: nn.Module, momentum: float = 0.01) -> fx.GraphModule:
    """The QAT form of a float model (a new module; ``model`` is left as it is).

    Parameters
    ----------
    model : torch.nn.Module
        Symbolically traceable, without parametrizations (squash masks first).
    momentum : float
        Of the activation observers.

    Returns
    -------
    torch.fx.GraphModule
        Batch norm folded, QAT layers, :class:`FakeQuantAct` nodes named ``aq_<node>``;
        conv and FC layers keep their names, so masks still apply by name.
    """
    was_training = model.training
    model.eval()
    try:
        gm = fuse(model)
    finally:
        model.train(was_training)
    modules = dict(gm.named_modules())
    for name, m in list(modules.items()):
        if type(m) is nn.Conv2d:
            _set_module(gm, name, QATConv2d.from_float(m))
        elif type(m) is nn.Linear:
            _set_module(gm, name, QATLinear.from_float(m))
    modules = dict(gm.named_modules())
    graph = gm.graph
    for n in list(graph.nodes):
        if not _is_producer(n, modules):
            continue
        at = n
        users = list(n.users)
        if len(users) == 1 and _is_relu(users[0], modules):
            at = users[0]
        qname = "aq_" + at.name
        gm.add_submodule(qname, FakeQuantAct(momentum))
        with graph.inserting_after(at):
            q = graph.call_module(qname, (at,))
        at.replace_all_uses_with(q, delete_user_cb=lambda u, q=q: u is not q)
    graph.lint()
    gm.recompile()
    modules = dict(gm.named_modules())
    for n in graph.nodes:
        if n.op == "call_module" and isinstance(modules[str(n.target)], (QATConv2d, QATLinear)):
            src = _int8_source(n.args[0], modules)
            # a plain attribute, not a submodule: the FakeQuantAct is registered once, at its
            # own name
            modules[str(n.target)].__dict__["input_quant"] = src
    gm.train(was_training)
    return gm


def _int8_source(n: Any, modules: dict[str, nn.Module]) -> FakeQuantAct | None:
    """The FakeQuantAct whose scale a layer input carries (through scale-keeping nodes)."""
    keep_mods = (nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout, nn.ReLU)
    while isinstance(n, fx.Node):
        if n.op == "call_module":
            m = modules[str(n.target)]
            if isinstance(m, FakeQuantAct):
                return m
            if not isinstance(m, keep_mods):
                return None
        elif n.op == "call_function":
            if n.target not in (torch.flatten, F.max_pool2d) and n.target not in _RELU_FUNCS:
                return None
        elif n.op == "call_method":
            if n.target not in ("flatten", "view", "reshape", "relu", "relu_"):
                return None
        else:
            return None
        n = n.args[0]
    return None


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def act_quants(model: nn.Module) -> dict[str, FakeQuantAct]:
    """``{name: FakeQuantAct}`` of a QAT model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantAct)}


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor | tuple[Any, ...]],
              device: torch.device | str = "cpu") -> int:
    """Set every activation range to the maximum ``|x|`` over ``batches`` (float forward).

    Returns
    -------
    int
        The number of batches seen.
    """
    aqs = act_quants(model)
    was = model.training
    model.eval()
    for q in aqs.values():
        q.calibrating = True
        q.observed.fill_(False)
    n = 0
    try:
        for b in batches:
            x = b[0] if isinstance(b, (tuple, list)) else b
            model(x.to(device))
            n += 1
    finally:
        for q in aqs.values():
            q.calibrating = False
        model.train(was)
    return n


def quant_params(model: fx.GraphModule) -> dict[str, Any]:
    """Every scale of a QAT model, as a checkpoint stores them.

    Returns
    -------
    dict
        ``{"activations": {aq_name: scale}, "weights": {layer: per-channel scales (list)},
        "numerics": description}``.
    """
    acts = {n: q.scale for n, q in act_quants(model).items()}
    weights: dict[str, list[float]] = {}
    for n, m in model.named_modules():
        if isinstance(m, (QATConv2d, QATLinear)):
            weights[n] = weight_scales(m.weight.detach().to(torch.float64)).tolist()
    return {"activations": acts, "weights": weights,
            "numerics": "symmetric int8, zero point 0; weights per output channel "
                        "max|w|/127 (clamp +-127), activations per tensor max|x|/127 "
                        "(clamp -128..127), round half away from zero; batch norm folded"}
