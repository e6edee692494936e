"""Run a QAT model through the project's integer reference: int8 accuracy, measured.

:class:`Int8Network` walks the ``torch.fx`` graph of a model from
:func:`tilewright.sw.prune.qat.prepare_qat` and evaluates it the way the tile does, on int8
tensors with int32 accumulation: every layer is quantised by :mod:`tilewright.sw.quantize`
(:func:`~tilewright.sw.quantize.quantize_conv`, :func:`~tilewright.sw.quantize.quantize_add`,
:func:`~tilewright.sw.quantize.quantize_avgpool`) with the scales the QAT observers hold, and
requantised by :func:`tilewright.sw.reference.requantize_t` (int32 multiplier and shift,
round half away from zero). The only float left is the quantisation of the network input.
Batches are evaluated together (``F.conv2d`` on float64 holds int8 x int8 sums exactly).

Supported nodes: the input, :class:`~tilewright.sw.prune.qat.FakeQuantAct`, QAT Conv2d /
Linear (+ ReLU), residual addition (+ ReLU), max pooling, average pooling (including
adaptive pooling to 1x1), flatten / view / reshape, identity and dropout. Anything else is an
:class:`Int8Error` naming the node.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from tilewright.sw.quantize import (
    QuantConv,
    quantize_add,
    quantize_avgpool,
    quantize_conv,
)
from tilewright.sw.reference import requantize_t

from .qat import FakeQuantAct, QATConv2d, QATLinear, round_half_away

__all__ = ["Int8Error", "Int8Network", "QTensor", "evaluate_int8"]


class Int8Error(ValueError):
    """The model has a node the integer path does not support (the message names it)."""


@dataclass
class QTensor:
    """int8 values (held as int64) and their scale: real value = ``values * scale``."""

    values: torch.Tensor
    scale: float


@dataclass
class _Pending:
    """An accumulator waiting for its output scale (from the next FakeQuantAct)."""

    finish: Callable[[float, bool], torch.Tensor]
    relu: bool = False


def _requant(acc: torch.Tensor, bias: Any, mult: Any, shift: int, relu: bool) -> torch.Tensor:
    """:func:`requantize_t` on batch-first accumulators ``(N, C, ...)``."""
    return requantize_t(acc.transpose(0, 1), bias, mult, shift, relu).transpose(0, 1) \
        .to(torch.int64)


def _single(v: Any, what: str) -> int:
    if isinstance(v, (tuple, list)):
        if len(set(v)) != 1:
            raise Int8Error(f"{what}: unequal values {v!r} are not supported")
        v = v[0]
    return int(v)


class Int8Network:
    """A QAT graph evaluated with the integer reference.

    Parameters
    ----------
    model : torch.fx.GraphModule
        From :func:`~tilewright.sw.prune.qat.prepare_qat`, calibrated (masks squashed or
        still parametrized: the weights read are the masked ones).
    masks : dict, optional
        ``{layer: block mask}`` to record in the :class:`QuantConv` of each layer (square
        blocks only; the weights are zero there either way).
    block : int, optional
        The block size of ``masks``.
    """

    def __init__(self, model: fx.GraphModule, masks: Mapping[str, torch.Tensor] | None = None,
                 block: int | None = None) -> None:
        if not isinstance(model, fx.GraphModule):
            raise Int8Error(f"expected the torch.fx.GraphModule of prepare_qat(), not "
                            f"{type(model).__name__}")
        self.model = model
        self.modules = dict(model.named_modules())
        self.masks = dict(masks or {})
        self.block = block
        self.layers: dict[str, QuantConv] = {}
        self._check()

    def _check(self) -> None:
        for n in self.model.graph.nodes:
            self._kind(n)

    def _kind(self, n: fx.Node) -> str:
        if n.op in ("placeholder", "output"):
            return n.op
        if n.op == "call_module":
            m = self.modules[str(n.target)]
            for cls, k in ((FakeQuantAct, "quant"), (QATConv2d, "conv"), (QATLinear, "linear"),
                           (nn.ReLU, "relu"), (nn.MaxPool2d, "maxpool"),
                           (nn.AdaptiveAvgPool2d, "adaptive_avgpool"), (nn.AvgPool2d, "avgpool"),
                           (nn.Flatten, "flatten"), (nn.Identity, "identity"),
                           (nn.Dropout, "identity")):
                if isinstance(m, cls):
                    return k
            raise Int8Error(f"node {n.name}: module {n.target} ({type(m).__name__}) has no "
                            f"integer equivalent here; supported: QAT Conv2d/Linear, ReLU, "
                            f"MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Identity, "
                            f"Dropout, residual add")
        if n.op == "call_function":
            t = n.target
            if t in (F.relu, torch.relu):
                return "relu"
            if t in (operator.add, torch.add, operator.iadd):
                return "add"
            if t is torch.flatten:
                return "flatten"
            if t is F.adaptive_avg_pool2d:
                return "adaptive_avgpool"
        if n.op == "call_method" and n.target in ("relu", "relu_"):
            return "relu"
        if n.op == "call_method" and n.target in ("add", "add_"):
            return "add"
        if n.op == "call_method" and n.target in ("flatten", "view", "reshape"):
            return "flatten"
        raise Int8Error(f"node {n.name} ({n.op} {getattr(n.target, '__name__', n.target)}) has "
                        f"no integer equivalent here; supported: the input, QAT Conv2d/Linear, "
                        f"ReLU, max/avg pooling, flatten/view/reshape, residual add")

    # layers -------------------------------------------------------------------------------
    def _quant_layer(self, name: str, m: nn.Module, s_in: float, s_out: float,
                     relu: bool) -> QuantConv:
        q = self.layers.get(name)
        if q is not None and q.s_in == s_in and q.s_out == s_out and q.relu == relu:
            return q
        mask = self.masks.get(name)
        if mask is not None and self.block is not None:
            q = quantize_conv(m, s_in, s_out, relu, mask=np.asarray(mask.cpu().numpy()),
                              block=self.block)
        else:
            q = quantize_conv(m, s_in, s_out, relu)
        self.layers[name] = q
        return q

    def _conv(self, name: str, m: nn.Module, x: QTensor) -> _Pending:
        def finish(s_out: float, relu: bool) -> torch.Tensor:
            q = self._quant_layer(name, m, x.scale, s_out, relu)
            w = torch.from_numpy(q.weight.astype(np.float64))
            xv = x.values.to(torch.float64)
            if q.is_linear:
                acc = xv @ w[:, :, 0, 0].T
            else:
                acc = F.conv2d(xv, w, stride=q.stride, padding=q.padding)
            return _requant(acc.round().to(torch.int64), torch.from_numpy(q.bias),
                            torch.from_numpy(q.mult), q.shift, relu)
        return _Pending(finish)

    # evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, x: torch.Tensor) -> QTensor:
        """int8 output (and its scale) of a float input batch ``(N, C, H, W)``."""
        env: dict[str, Any] = {}

        def arg(a: Any) -> Any:
            return env[a.name] if isinstance(a, fx.Node) else a

        out: Any = None
        for n in self.model.graph.nodes:
            k = self._kind(n)
            if k == "placeholder":
                xf = x.detach().cpu().to(torch.float64)

                def finish_in(s: float, relu: bool, xf: torch.Tensor = xf) -> torch.Tensor:
                    q = round_half_away(xf / s).clamp(0 if relu else -128, 127)
                    return q.to(torch.int64)
                env[n.name] = _Pending(finish_in)
                continue
            if k == "output":
                out = arg(n.args[0])
                break
            a0 = arg(n.args[0]) if n.args else None
            m = self.modules.get(str(n.target)) if n.op == "call_module" else None
            if k == "quant":
                if not isinstance(a0, _Pending):
                    raise Int8Error(f"node {n.name}: quantises a value that is already int8 "
                                    f"(input {n.args[0]}); a scale change needs a layer")
                s = m.scale  # type: ignore[union-attr]
                env[n.name] = QTensor(a0.finish(s, a0.relu), s)
            elif k in ("conv", "linear"):
                env[n.name] = self._conv(str(n.target), m, self._q(a0, n))  # type: ignore[arg-type]
            elif k == "relu":
                if isinstance(a0, _Pending):
                    env[n.name] = _Pending(a0.finish, True)
                else:
                    q = self._q(a0, n)
                    env[n.name] = QTensor(q.values.clamp_min(0), q.scale)
            elif k == "add":
                a, b = self._q(a0, n), self._q(arg(n.args[1]), n)

                def finish_add(s: float, relu: bool, a: QTensor = a,
                               b: QTensor = b) -> torch.Tensor:
                    qa = quantize_add(a.scale, b.scale, s, relu)
                    acc = qa.mul_a * a.values + qa.mul_b * b.values
                    return _requant(acc, 0, qa.mult, qa.shift, relu)
                env[n.name] = _Pending(finish_add)
            elif k == "maxpool":
                env[n.name] = self._maxpool(n, m, self._q(a0, n))  # type: ignore[arg-type]
            elif k in ("avgpool", "adaptive_avgpool"):
                env[n.name] = self._avgpool(n, k, m, self._q(a0, n))
            elif k == "flatten":
                q = self._q(a0, n)
                if n.op == "call_method" and n.target in ("view", "reshape"):
                    shape = [arg(s) for s in n.args[1:]]
                    v = q.values.reshape(*shape)
                else:
                    start = (m.start_dim if m is not None
                             else int(n.args[1] if len(n.args) > 1
                                      else n.kwargs.get("start_dim", 0)))
                    v = torch.flatten(q.values, start)
                env[n.name] = QTensor(v, q.scale)
            elif k == "identity":
                env[n.name] = a0
        if not isinstance(out, QTensor):
            raise Int8Error("the model's output is not an int8 tensor (it must end in a "
                            "FakeQuantAct, as prepare_qat arranges)")
        return out

    def _q(self, v: Any, n: fx.Node) -> QTensor:
        if isinstance(v, QTensor):
            return v
        raise Int8Error(f"node {n.name}: its input is not an int8 tensor (a layer output "
                        f"without a FakeQuantAct after it, or a constant)")

    def _maxpool(self, n: fx.Node, m: nn.MaxPool2d, x: QTensor) -> QTensor:
        if m.ceil_mode or _single(m.dilation, f"node {n.name} dilation") != 1:
            raise Int8Error(f"node {n.name}: max pooling with ceil_mode or dilation is not "
                            f"supported")
        k = m.kernel_size
        st = m.stride if m.stride is not None else k
        p = m.padding if isinstance(m.padding, tuple) else (m.padding, m.padding)
        xp = F.pad(x.values.to(torch.float64), (p[1], p[1], p[0], p[0]), value=-128.0)
        return QTensor(F.max_pool2d(xp, k, st).to(torch.int64), x.scale)

    def _avgpool(self, n: fx.Node, k: str, m: nn.Module | None, x: QTensor) -> _Pending:
        h, w = x.values.shape[-2:]
        if k == "adaptive_avgpool":
            size = m.output_size if m is not None else n.args[1]
            if size not in (1, (1, 1), [1, 1]):
                raise Int8Error(f"node {n.name}: adaptive average pooling to {size} is not "
                                f"supported (only to 1x1)")
            kernel, stride, pad = (int(h), int(w)), (int(h), int(w)), (0, 0)
        else:
            assert isinstance(m, nn.AvgPool2d)
            if m.ceil_mode or not m.count_include_pad or m.divisor_override is not None:
                raise Int8Error(f"node {n.name}: average pooling needs ceil_mode=False, "
                                f"count_include_pad=True and no divisor_override")

            def two(v: Any) -> tuple[int, int]:
                return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))
            kernel = two(m.kernel_size)
            stride = two(m.stride if m.stride is not None else m.kernel_size)
            pad = two(m.padding)

        def finish(s: float, relu: bool) -> torch.Tensor:
            qp = quantize_avgpool(kernel, x.scale, s)
            xp = F.pad(x.values.to(torch.float64), (pad[1], pad[1], pad[0], pad[0]))
            acc = F.avg_pool2d(xp, kernel, stride, divisor_override=1).round().to(torch.int64)
            return _requant(acc, 0, qp.mult, qp.shift, relu)
        return _Pending(finish)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Top-1 class of every image of a batch (from the int8 logits)."""
        return self.run(x).values.reshape(x.shape[0], -1).argmax(1)


def evaluate_int8(net: Int8Network, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[float, int]:
    """Top-1 accuracy of the integer model over ``batches``.

    Returns
    -------
    (float, int)
        Accuracy and number of images.
    """
    correct = total = 0
    for x, y in batches:
        correct += int((net.predict(x) == y.cpu()).sum())
        total += int(y.numel())
    return (correct / total if total else 0.0), total
