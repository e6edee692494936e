"""The compiler front-end: a PyTorch model as a typed graph of the overlay's layer kinds.

:func:`import_model` traces a model with :mod:`torch.fx` (``symbolic_trace`` semantics, with
stack traces recorded), propagates shapes (:class:`torch.fx.passes.shape_prop.ShapeProp`) and
lowers the fx graph to a :class:`NetGraph`: a topologically ordered list of :class:`Node`
objects of the kinds in :data:`KINDS`, every activation in ``(C, H, W)`` form, batch norm
folded, ReLU fused, dropout and identities removed. The whole fx graph is checked before any
weight is touched; every problem found is reported together in one :class:`UnsupportedError`
that names the fx node, its target, its module path and its source line.

Lowering rules (``docs/frontend.md`` has the full list):

* ``Conv2d`` (groups 1, dilation 1, zero padding) -> ``conv``; ``Linear`` -> ``linear``;
  a ``BatchNorm2d`` (running statistics) is folded into the convolution it follows, which
  must have no other user.
* A ReLU is fused (``relu=True``) into the conv, linear or add producing its input when it
  is that node's only user; any other ReLU is an error.
* ``MaxPool2d``/``F.max_pool2d`` -> ``maxpool``; ``AvgPool2d``/``F.avg_pool2d``
  (``count_include_pad``) -> ``avgpool``; adaptive average pooling to 1x1 or
  ``mean(dim=(2, 3))`` -> ``global_avgpool``; adaptive average pooling to the input size ->
  removed; to an exact divisor of the input size -> ``avgpool``; anything else is folded
  into the ``Linear`` it feeds through a flatten (the pooling is linear, so the product is
  one linear layer over the unpooled features), or is an error.
* ``flatten``/``view``/``reshape``/``squeeze`` to ``(N, -1)`` -> ``flatten``; the same ops
  leaving the shape unchanged, ``Identity``, ``Dropout`` (and ``F.dropout`` with
  ``training=False``) and ``contiguous`` -> removed.
* ``torch.cat`` on the channel dimension -> ``concat``; ``+``/``torch.add``/``Tensor.add``
  of two tensors of one shape -> ``add``.
* :class:`~tilewright.sw.prune.qat.FakeQuantAct` observers of a QAT model are removed and
  recorded in :attr:`NetGraph.observers` (their scales quantise the graph, see
  :func:`tilewright.sw.ptq.quantize_graph_from_checkpoint`).

Vectors (the outputs of ``linear`` and ``flatten``, and of a global pooling whose output
torch reshaped to ``(N, C)``) have shape ``(C, 1, 1)``: a linear layer is a 1x1 convolution
on a 1x1 image, and a flatten is C-order (torch) order of the ``(C, H, W)`` input.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import math
import operator
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from tilewright.sw.prune.qat import FakeQuantAct, QATConv2d, QATLinear

__all__ = [
    "KINDS",
    "ConvNode",
    "GraphError",
    "NetGraph",
    "Node",
    "PoolNode",
    "Problem",
    "UnsupportedError",
    "import_model",
]

#: The layer kinds of a :class:`NetGraph`.
KINDS: tuple[str, ...] = ("conv", "linear", "maxpool", "avgpool", "global_avgpool", "add",
                          "concat", "flatten")

_TORCH_DIR = torch.__file__.rsplit("/", 1)[0] + "/"


# Errors ---------------------------------------------------------------------------------------

class GraphError(ValueError):
    """The model cannot be imported (bad input shape, untraceable model, shape failure)."""


@dataclass(frozen=True)
class Problem:
    """One unsupported fx node.

    Attributes
    ----------
    node : str
        The fx node's name.
    target : str
        What it calls: ``call_module Conv2d_1a.conv (Conv2d)``, ``call_function torch.cat``...
    module : str or None
        The module path it belongs to (its own for a module call, else the innermost module
        whose ``forward`` made the call; ``None`` at the top level).
    source : str or None
        ``file:line: code`` of the call in the model's source, from ``node.stack_trace``.
    reason : str
        What is wrong and what is accepted.
    """

    node: str
    target: str
    module: str | None
    source: str | None
    reason: str

    def __str__(self) -> str:
        where = f" in module {self.module!r}" if self.module else ""
        src = f" at {self.source}" if self.source else ""
        return f"node {self.node!r} ({self.target}){where}{src}: {self.reason}"


class UnsupportedError(GraphError):
    """The model uses ops, modules or shapes the front-end does not support.

    Attributes
    ----------
    problems : list of Problem
        Every problem found in the graph (the message lists them all).
    """

    def __init__(self, model: str, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{model}: {len(self.problems)} unsupported node"
                         f"{'s' if len(self.problems) != 1 else ''}:\n{lines}")


# Graph ----------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Node:
    """One layer of a :class:`NetGraph`.

    Attributes
    ----------
    name : str
        Unique name: the module path for a module called once (``layer1.0.conv1``), else the
        fx node name (``add_3``, ``cat_1``).
    kind : str
        One of :data:`KINDS`.
    inputs : tuple of str
        Names of the input nodes (or of the graph input, :attr:`NetGraph.input_name`), in
        operand order.
    shape : (int, int, int)
        Output ``(C, H, W)`` of one image; ``(C, 1, 1)`` for vectors.
    relu : bool
        A ReLU is fused (conv, linear and add only).
    fx_name : str
        The fx node this node was made from.
    module : str or None
        Module path (see :class:`Problem`).
    source : str or None
        ``file:line: code`` of the call.
    fused : tuple of str
        What was folded into this node (batch norm, ReLU, an adaptive pooling), named like
        nodes (module path or fx node name).
    """

    name: str
    kind: str
    inputs: tuple[str, ...]
    shape: tuple[int, int, int]
    relu: bool = False
    fx_name: str = ""
    module: str | None = None
    source: str | None = None
    fused: tuple[str, ...] = ()


@dataclass(kw_only=True)
class ConvNode(Node):
    """A ``conv`` or ``linear`` node with its float parameters (batch norm folded).

    Attributes
    ----------
    weight : torch.Tensor
        ``(Cout, Cin, KH, KW)`` for a conv, ``(Cout, Cin)`` for a linear layer (the model's
        dtype; a folded batch norm is computed in float64 and rounded once).
    bias : torch.Tensor
        ``(Cout,)`` (zeros when the layer has none).
    stride, padding : (int, int)
        ``(1, 1)`` and ``(0, 0)`` for a linear layer.
    groups : int
        Always 1 (anything else is unsupported).
    """

    weight: torch.Tensor = field(repr=False)
    bias: torch.Tensor = field(repr=False)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1

    @property
    def kernel(self) -> tuple[int, int]:
        """``(KH, KW)``; ``(1, 1)`` for a linear layer."""
        if self.weight.dim() == 2:
            return (1, 1)
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    def to_module(self, dtype: torch.dtype = torch.float64) -> nn.Conv2d | nn.Linear:
        """The layer as a float ``nn.Conv2d``/``nn.Linear`` (for
        :func:`tilewright.sw.quantize.quantize_conv`)."""
        cout, cin = int(self.weight.shape[0]), int(self.weight.shape[1])
        m: nn.Conv2d | nn.Linear
        if self.kind == "linear":
            m = nn.Linear(cin, cout, dtype=dtype, device="meta")
        else:
            m = nn.Conv2d(cin, cout, self.kernel, self.stride, self.padding, dtype=dtype,
                          device="meta")
        m.weight = nn.Parameter(self.weight.detach().to(dtype), requires_grad=False)
        m.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=False)
        return m


@dataclass(kw_only=True)
class PoolNode(Node):
    """A ``maxpool``, ``avgpool`` or ``global_avgpool`` node.

    Attributes
    ----------
    kernel, stride, padding : (int, int)
        Window geometry; a global pooling has ``kernel = stride = (H, W)`` of its input.
        Average pooling counts the zero padding (``count_include_pad``); max pooling pads
        with minus infinity.
    """

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)


@dataclass
class NetGraph:
    """An imported network: layers in topological order.

    Attributes
    ----------
    input_name : str
        Name of the graph input (the fx placeholder).
    input_shape : (int, int, int, int)
        ``(N, C, H, W)`` the model was imported at (shapes hold for this ``H, W`` only).
    nodes : list of Node
        Topologically ordered.
    output : str
        Name of the node whose output is the model's output.
    output_shape : tuple of int
        The torch shape of the model's output at ``input_shape`` (with the batch dimension).
    model : str
        The model's class name.
    observers : dict
        ``{node or input name: (FakeQuantAct module path, ...)}`` for a QAT model: the
        observers that quantised that tensor (empty for a float model).
    """

    input_name: str
    input_shape: tuple[int, int, int, int]
    nodes: list[Node]
    output: str
    output_shape: tuple[int, ...]
    model: str = ""
    observers: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_name = {n.name: n for n in self.nodes}

    def __getitem__(self, name: str) -> Node:
        return self._by_name[name]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def shape_of(self, name: str) -> tuple[int, int, int]:
        """``(C, H, W)`` of a node or of the input."""
        if name == self.input_name:
            return tuple(self.input_shape[1:])  # type: ignore[return-value]
        return self._by_name[name].shape

    def users(self, name: str) -> list[str]:
        """Names of the nodes that read ``name`` (in graph order)."""
        return [n.name for n in self.nodes if name in n.inputs]

    def kinds(self) -> dict[str, int]:
        """``{kind: count}`` in :data:`KINDS` order (kinds absent from the graph omitted)."""
        c = Counter(n.kind for n in self.nodes)
        return {k: c[k] for k in KINDS if c[k]}

    def summary(self) -> str:
        """One line: node count, kinds, fused ReLUs, input and output shapes."""
        kinds = ", ".join(f"{k} {v}" for k, v in self.kinds().items())
        relus = sum(n.relu for n in self.nodes)
        return (f"{self.model}: {len(self.nodes)} nodes ({kinds}; {relus} fused ReLU), input "
                f"{tuple(self.input_shape)}, output {tuple(self.output_shape)}")

    @torch.no_grad()
    def run(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Float execution of the graph (the folded layers, as the quantiser sees them).

        Parameters
        ----------
        x : torch.Tensor
            ``(N, C, H, W)`` with the imported ``(C, H, W)``.
        dtype : torch.dtype, optional
            Compute in this dtype (default: the dtype of ``x``, float32 for integers).

        Returns
        -------
        dict
            ``{name: (N, C, H, W) tensor}`` for the input and every node (vectors as
            ``(N, C, 1, 1)``).
        """
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(self.input_shape[1:]):
            chw = ", ".join(map(str, self.input_shape[1:]))
            raise ValueError(f"{self.model}: input must be (N, {chw}), not {tuple(x.shape)}")
        dt = dtype or (x.dtype if x.dtype.is_floating_point else torch.float32)
        env: dict[str, torch.Tensor] = {self.input_name: x.to(dt)}
        for n in self.nodes:
            env[n.name] = _run_float_node(n, [env[i] for i in n.inputs], dt)
        return env

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The model's output (its torch shape) computed by :meth:`run`."""
        y = self.run(x, dtype)[self.output]
        return y.reshape(x.shape[0], *self.output_shape[1:])


def _run_float_node(n: Node, xs: list[torch.Tensor], dt: torch.dtype) -> torch.Tensor:
    x = xs[0]
    if isinstance(n, ConvNode):
        w, b = n.weight.to(dt), n.bias.to(dt)
        if n.kind == "linear":
            y = F.linear(x.reshape(x.shape[0], -1), w, b)[:, :, None, None]
        else:
            y = F.conv2d(x, w, b, n.stride, n.padding)
    elif n.kind == "maxpool":
        assert isinstance(n, PoolNode)
        y = F.max_pool2d(x, n.kernel, n.stride, n.padding)
    elif n.kind in ("avgpool", "global_avgpool"):
        assert isinstance(n, PoolNode)
        y = F.avg_pool2d(x, n.kernel, n.stride, n.padding, count_include_pad=True)
    elif n.kind == "add":
        y = xs[0] + xs[1]
    elif n.kind == "concat":
        y = torch.cat(xs, 1)
    elif n.kind == "flatten":
        y = x.reshape(x.shape[0], -1, 1, 1)
    else:  # pragma: no cover - kinds are closed
        raise AssertionError(n.kind)
    return torch.relu(y) if n.relu else y


# Tracing --------------------------------------------------------------------------------------

def _plain(m: nn.Module, base: type[nn.Module]) -> bool:
    """``m`` is a ``base`` whose ``forward`` is ``base.forward`` (not a rewritten subclass)."""
    return isinstance(m, base) and type(m).forward is base.forward  # type: ignore[comparison-overlap]


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.FeatureAlphaDropout)


def _module_role(m: nn.Module) -> str | None:
    """The role of a module we know, or None."""
    if isinstance(m, FakeQuantAct):
        return "observer"
    if isinstance(m, QATConv2d) or _plain(m, nn.Conv2d):
        return "conv"
    if isinstance(m, QATLinear) or _plain(m, nn.Linear):
        return "linear"
    table: tuple[tuple[type[nn.Module], str], ...] = (
        (nn.BatchNorm2d, "bn"), (nn.ReLU, "relu"), (nn.MaxPool2d, "maxpool"),
        (nn.AvgPool2d, "avgpool"), (nn.AdaptiveAvgPool2d, "adaptive"),
        (nn.Flatten, "reshape"), (nn.Identity, "alias"))
    for cls, role in table:
        if _plain(m, cls):
            return role
    if any(_plain(m, d) for d in _DROPOUTS):
        return "alias"
    return None


class _Tracer(fx.Tracer):
    """``symbolic_trace`` with stack traces, and the known modules (QAT forms too) as leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _module_role(m) is not None or super().is_leaf_module(m, module_qualified_name)


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in [^\n]*\n'
                    r'[ \t]*(?P<code>[^\n]*)')


def _source(n: fx.Node) -> str | None:
    """``file:line: code`` of the innermost frame of ``n``'s stack trace outside torch."""
    st = n.stack_trace or n.meta.get("stack_trace")
    if not st:
        return None
    best = None
    for m in _FRAME.finditer(st):
        if not m["file"].startswith(_TORCH_DIR):
            best = f"{m['file']}:{m['line']}: {m['code'].strip()}"
    return best


def _module_of(n: fx.Node) -> str | None:
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return str(path) or None
    return None


def _target_name(n: fx.Node, modules: dict[str, nn.Module]) -> str:
    if n.op == "call_module":
        m = modules.get(str(n.target))
        return f"call_module {n.target} ({type(m).__name__})"
    if n.op == "call_function":
        try:
            name = fx.node._get_qualified_name(n.target)  # type: ignore[arg-type]
        except Exception:  # some builtins have no qualified name
            name = getattr(n.target, "__name__", repr(n.target))
        return f"call_function {name}"
    return f"{n.op} {n.target}"


# Argument helpers ----------------------------------------------------------------------------

def _arg(n: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return int(v[0]), int(v[0])
        if len(v) == 2:
            return int(v[0]), int(v[1])
        raise ValueError(f"expected one or two values, not {v!r}")
    return int(v), int(v)


def _meta_shape(n: Any) -> tuple[int, ...] | None:
    if not isinstance(n, fx.Node):
        return None
    tm = n.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        return None
    return tuple(int(s) for s in tm.shape)


def _chw(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 4:
        return shape[1], shape[2], shape[3]
    return shape[1], 1, 1


@dataclass
class _Role:
    """What an fx node lowers to (pass 1)."""

    role: str
    params: dict[str, Any] = field(default_factory=dict)


_RELU_FUNCS: tuple[Any, ...] = (F.relu, torch.relu, torch.relu_, F.relu_)
_ADD_FUNCS: tuple[Any, ...] = (operator.add, operator.iadd, torch.add)
_CAT_FUNCS: tuple[Any, ...] = (torch.cat, torch.concat, torch.concatenate)
_RESHAPE_FUNCS: tuple[Any, ...] = (torch.flatten, torch.reshape, torch.squeeze)
_DROPOUT_FUNCS: tuple[Any, ...] = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                                   F.alpha_dropout, F.feature_alpha_dropout)
_SHAPE_FUNCS: tuple[Any, ...] = (operator.getitem, operator.mul, operator.floordiv,
                                 operator.add, operator.sub, builtins.getattr, builtins.len)

#: Roles of the nodes that vanish into their input.
_TRANSPARENT = ("alias", "observer")


class _Lowering:
    """The two checking passes and the building pass of :func:`import_model`."""

    def __init__(self, gm: fx.GraphModule, batch: int, model: str) -> None:
        self.gm = gm
        self.batch = batch
        self.model = model
        self.modules = dict(gm.named_modules())
        self.problems: list[Problem] = []
        self.nodes = list(gm.graph.nodes)
        self.live = self._live()
        self.roles: dict[fx.Node, _Role] = {}

    # helpers -------------------------------------------------------------------------------
    def problem(self, n: fx.Node, reason: str) -> None:
        self.problems.append(Problem(n.name, _target_name(n, self.modules), _module_of(n),
                                     _source(n), reason))

    def _live(self) -> set[fx.Node]:
        out = [n for n in self.nodes if n.op == "output"]
        live: set[fx.Node] = set()
        stack = list(out)
        while stack:
            n = stack.pop()
            if n in live:
                continue
            live.add(n)
            stack.extend(n.all_input_nodes)
        return live

    def _is_shape_value(self, a: Any) -> bool:
        """A constant or a non-tensor value computed from shapes."""
        if isinstance(a, fx.Node):
            r = self.roles.get(a)
            return r is not None and r.role == "shape"
        if isinstance(a, (list, tuple)):
            return all(self._is_shape_value(e) for e in a)
        return isinstance(a, (int, float, bool, str, type(None), torch.dtype, torch.Size))

    def _tensor_arg(self, n: fx.Node, a: Any, what: str) -> fx.Node | None:
        if isinstance(a, fx.Node) and _meta_shape(a) is not None:
            return a
        self.problem(n, f"{what} must be a tensor computed by the network, not {a!r}")
        return None

    # pass 1: every live node on its own ------------------------------------------------------
    def classify(self) -> None:
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        for n in placeholders[1:]:
            self.problem(n, "the model has more than one input; one (N, C, H, W) tensor is "
                            "accepted")
        for n in self.nodes:
            if n not in self.live:
                continue
            role = self._classify(n)
            if role is None:
                continue
            self.roles[n] = role
            if role.role not in ("shape", "output"):
                self._check_shape(n)

    def _check_shape(self, n: fx.Node) -> None:
        s = _meta_shape(n)
        if s is None:
            self.problem(n, "does not produce one tensor")
        elif len(s) not in (2, 4) or s[0] != self.batch:
            self.problem(n, f"produces a tensor of shape {s}; accepted: (N, C, H, W) or "
                            f"(N, C) with the batch N={self.batch} first")

    def _classify(self, n: fx.Node) -> _Role | None:
        if n.op == "placeholder":
            return _Role("input")
        if n.op == "output":
            return _Role("output")
        if n.op == "get_attr":
            self.problem(n, "a parameter or buffer used outside a module is not supported")
            return None
        if n.op == "call_module":
            return self._classify_module(n)
        if n.op == "call_function":
            return self._classify_function(n)
        if n.op == "call_method":
            return self._classify_method(n)
        self.problem(n, f"fx op {n.op!r} is not supported")  # pragma: no cover
        return None

    def _classify_module(self, n: fx.Node) -> _Role | None:
        m = self.modules[str(n.target)]
        role = _module_role(m)
        if role is None:
            self.problem(n, f"module type {type(m).__name__} is not supported; accepted: "
                            f"Conv2d, Linear, BatchNorm2d, ReLU, MaxPool2d, AvgPool2d, "
                            f"AdaptiveAvgPool2d, Flatten, Identity, Dropout")
            return None
        if len(n.args) != 1 or n.kwargs:
            self.problem(n, "a module call must take exactly one tensor")
            return None
        if self._tensor_arg(n, n.args[0], "the input") is None:
            return None
        if role == "conv":
            return self._conv(n, m)  # type: ignore[arg-type]
        if role == "linear":
            if len(_meta_shape(n.args[0]) or ()) != 2:  # type: ignore[arg-type]
                self.problem(n, f"Linear on a tensor of shape {_meta_shape(n.args[0])}; "  # type: ignore[arg-type]
                                f"flatten to (N, C) first")
                return None
            return _Role("linear")
        if role == "bn":
            assert isinstance(m, nn.BatchNorm2d)
            if m.running_mean is None or m.running_var is None:
                self.problem(n, "batch norm without running statistics "
                                "(track_running_stats=False) cannot be folded")
                return None
            return _Role("bn")
        if role == "maxpool":
            assert isinstance(m, nn.MaxPool2d)
            return self._pool(n, "maxpool", m.kernel_size, m.stride, m.padding,
                              dilation=m.dilation, ceil_mode=m.ceil_mode,
                              return_indices=m.return_indices)
        if role == "avgpool":
            assert isinstance(m, nn.AvgPool2d)
            return self._pool(n, "avgpool", m.kernel_size, m.stride, m.padding,
                              ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad,
                              divisor_override=m.divisor_override)
        if role == "adaptive":
            return self._adaptive(n)
        if role == "reshape":
            return self._reshape(n)
        return _Role(role)

    def _conv(self, n: fx.Node, m: nn.Conv2d) -> _Role | None:
        bad = []
        if m.groups != 1:
            bad.append(f"groups={m.groups} (grouped/depthwise convolution; accepted: 1)")
        if tuple(m.dilation) != (1, 1):
            bad.append(f"dilation={tuple(m.dilation)} (accepted: 1)")
        if m.padding_mode != "zeros":
            bad.append(f"padding_mode={m.padding_mode!r} (accepted: 'zeros')")
        k = (int(m.kernel_size[0]), int(m.kernel_size[1]))
        pad: tuple[int, int] = (0, 0)
        if m.padding == "same":
            if k[0] % 2 == 0 or k[1] % 2 == 0:
                bad.append(f"padding='same' with the even kernel {k} pads unequally")
            pad = (k[0] // 2, k[1] // 2)
        elif m.padding != "valid":
            pad = _pair(m.padding)
        if len(_meta_shape(n.args[0]) or ()) != 4:  # type: ignore[arg-type]
            bad.append(f"input of shape {_meta_shape(n.args[0])} is not (N, C, H, W)")  # type: ignore[arg-type]
        if bad:
            self.problem(n, "unsupported Conv2d: " + "; ".join(bad))
            return None
        return _Role("conv", {"padding": pad, "stride": _pair(m.stride)})

    def _pool(self, n: fx.Node, kind: str, kernel: Any, stride: Any, padding: Any,
              dilation: Any = 1, ceil_mode: bool = False, return_indices: bool = False,
              count_include_pad: bool = True, divisor_override: Any = None) -> _Role | None:
        shp, out = _meta_shape(n.args[0]), _meta_shape(n)  # type: ignore[arg-type]
        if shp is None or out is None or len(shp) != 4:
            self.problem(n, f"pooling of a tensor of shape {shp}; accepted: (N, C, H, W)")
            return None
        try:
            k, p = _pair(kernel), _pair(padding)
            s = k if stride is None or stride == [] or stride == () else _pair(stride)
            d = _pair(dilation)
        except (TypeError, ValueError) as e:
            self.problem(n, f"pooling geometry not understood ({e})")
            return None
        bad = []
        if d != (1, 1):
            bad.append(f"dilation={d} (accepted: 1)")
        if return_indices:
            bad.append("return_indices=True")
        if divisor_override is not None:
            bad.append(f"divisor_override={divisor_override}")
        if not count_include_pad and p != (0, 0):
            bad.append("count_include_pad=False with padding (the tile counts the padding)")
        floor = ((shp[2] + 2 * p[0] - k[0]) // s[0] + 1, (shp[3] + 2 * p[1] - k[1]) // s[1] + 1)
        if ceil_mode and floor != out[2:]:
            bad.append(f"ceil_mode=True adds a partial window ({out[2:]} instead of {floor})")
        if bad:
            self.problem(n, f"unsupported {kind}: " + "; ".join(bad))
            return None
        return _Role(kind, {"kernel": k, "stride": s, "padding": p})

    def _adaptive(self, n: fx.Node) -> _Role | None:
        shp, out = _meta_shape(n.args[0]), _meta_shape(n)  # type: ignore[arg-type]
        if shp is None or out is None or len(shp) != 4:
            self.problem(n, f"adaptive pooling of a tensor of shape {shp}; accepted: "
                            f"(N, C, H, W)")
            return None
        (h, w), (oh, ow) = shp[2:], out[2:]
        if (oh, ow) == (h, w):
            return _Role("alias")
        if (oh, ow) == (1, 1):
            return _Role("global_avgpool", {"kernel": (h, w), "stride": (h, w),
                                            "padding": (0, 0)})
        if h % oh == 0 and w % ow == 0:
            k = (h // oh, w // ow)
            return _Role("avgpool", {"kernel": k, "stride": k, "padding": (0, 0)})
        return _Role("adaptive_fold", {"in": (h, w), "out": (oh, ow)})

    def _reshape(self, n: fx.Node) -> _Role | None:
        shp, out = _meta_shape(n.args[0]), _meta_shape(n)  # type: ignore[arg-type]
        if shp is None or out is None:
            self.problem(n, "reshape of a value that is not a tensor")
            return None
        if out == shp:
            return _Role("alias")
        if len(out) == 2 and out[0] == shp[0] and out[1] == math.prod(shp[1:]):
            return _Role("flatten")
        self.problem(n, f"reshape from {shp} to {out}; accepted: flatten to (N, -1) "
                        f"(batch first) or no change")
        return None

    def _global_mean(self, n: fx.Node, dims: Any, keepdim: Any) -> _Role | None:
        shp = _meta_shape(n.args[0])  # type: ignore[arg-type]
        if shp is None or len(shp) != 4:
            self.problem(n, f"mean of a tensor of shape {shp}; accepted: mean over the "
                            f"spatial dimensions (2, 3) of (N, C, H, W)")
            return None
        d = dims if isinstance(dims, (list, tuple)) else [dims]
        try:
            norm = sorted(int(i) % 4 for i in d)
        except (TypeError, ValueError):
            norm = []
        if norm != [2, 3]:
            self.problem(n, f"mean over dim={dims!r}; accepted: dim=(2, 3) (global average "
                            f"pooling)")
            return None
        return _Role("global_avgpool", {"kernel": shp[2:], "stride": shp[2:],
                                        "padding": (0, 0), "keepdim": bool(keepdim)})

    def _binary_add(self, n: fx.Node, alpha: Any) -> _Role | None:
        if alpha not in (None, 1):
            self.problem(n, f"add with alpha={alpha!r}; accepted: alpha=1")
            return None
        if len(n.args) != 2:
            self.problem(n, "add must take two tensors")
            return None
        a = self._tensor_arg(n, n.args[0], "the first operand of add")
        b = self._tensor_arg(n, n.args[1], "the second operand of add")
        if a is None or b is None:
            return None
        sa, sb, so = _meta_shape(a), _meta_shape(b), _meta_shape(n)
        if not sa == sb == so:
            self.problem(n, f"add of shapes {sa} and {sb} (broadcasting is not supported; "
                            f"both operands must have the output shape {so})")
            return None
        return _Role("add")

    def _concat(self, n: fx.Node) -> _Role | None:
        ts = _arg(n, 0, "tensors")
        dim = _arg(n, 1, "dim", 0)
        if not isinstance(ts, (list, tuple)) or not ts:
            self.problem(n, f"concatenation of {ts!r}; accepted: a list of tensors")
            return None
        ok = all(self._tensor_arg(n, t, "every concatenated value") is not None for t in ts)
        if not ok:
            return None
        rank = len(_meta_shape(ts[0]) or ())
        if not isinstance(dim, int) or dim % max(rank, 1) != 1:
            self.problem(n, f"concatenation on dim={dim!r} of rank-{rank} tensors; accepted: "
                            f"the channel dimension (dim=1)")
            return None
        return _Role("concat")

    def _classify_function(self, n: fx.Node) -> _Role | None:
        t = n.target
        if t in _SHAPE_FUNCS and self._shape_args(n):
            return _Role("shape")
        if t in _RELU_FUNCS:
            return self._unary(n, "relu")
        if t in _ADD_FUNCS:
            return self._binary_add(n, n.kwargs.get("alpha"))
        if t in _CAT_FUNCS:
            return self._concat(n)
        if t in _RESHAPE_FUNCS:
            return self._unary(n, "reshape")
        if t in _DROPOUT_FUNCS:
            if _arg(n, 2, "training", True):
                self.problem(n, "dropout with training=True is active in inference; pass "
                                "training=self.training (or use nn.Dropout)")
                return None
            return self._unary(n, "alias")
        if t is F.max_pool2d:
            if self._tensor_arg(n, n.args[0] if n.args else None, "the input") is None:
                return None
            return self._pool(n, "maxpool", _arg(n, 1, "kernel_size"), _arg(n, 2, "stride"),
                              _arg(n, 3, "padding", 0), _arg(n, 4, "dilation", 1),
                              bool(_arg(n, 5, "ceil_mode", False)),
                              bool(_arg(n, 6, "return_indices", False)))
        if t is F.avg_pool2d:
            if self._tensor_arg(n, n.args[0] if n.args else None, "the input") is None:
                return None
            return self._pool(n, "avgpool", _arg(n, 1, "kernel_size"), _arg(n, 2, "stride"),
                              _arg(n, 3, "padding", 0), 1,
                              bool(_arg(n, 4, "ceil_mode", False)), False,
                              bool(_arg(n, 5, "count_include_pad", True)),
                              _arg(n, 6, "divisor_override"))
        if t is F.adaptive_avg_pool2d:
            if self._tensor_arg(n, n.args[0] if n.args else None, "the input") is None:
                return None
            return self._adaptive(n)
        if t is torch.mean:
            if self._tensor_arg(n, n.args[0] if n.args else None, "the input") is None:
                return None
            return self._global_mean(n, _arg(n, 1, "dim"), _arg(n, 2, "keepdim", False))
        name = _target_name(n, self.modules).split(" ", 1)[1]
        self.problem(n, f"function {name} is not supported; accepted: relu, add, cat, "
                        f"flatten/reshape, max/avg/adaptive_avg pooling, mean over (2, 3), "
                        f"dropout (training=False)")
        return None

    def _shape_args(self, n: fx.Node) -> bool:
        """All node arguments are shape values (a shape computation, not a tensor op)."""
        if n.target is builtins.getattr:
            a = n.args[0]
            return (isinstance(a, fx.Node) and len(n.args) > 1
                    and n.args[1] in ("shape", "ndim")) or self._is_shape_value(a)
        return self._is_shape_value(list(n.args)) and self._is_shape_value(list(n.kwargs.values()))

    def _unary(self, n: fx.Node, role: str) -> _Role | None:
        if not n.args or self._tensor_arg(n, n.args[0], "the input") is None:
            return None
        if role == "reshape":
            return self._reshape(n)
        return _Role(role)

    def _classify_method(self, n: fx.Node) -> _Role | None:
        t = str(n.target)
        if t in ("size", "dim"):
            return _Role("shape")
        if t in ("relu", "relu_"):
            return self._unary(n, "relu")
        if t in ("add", "add_"):
            return self._binary_add(n, n.kwargs.get("alpha"))
        if t in ("flatten", "view", "reshape", "squeeze"):
            return self._unary(n, "reshape")
        if t == "contiguous":
            return self._unary(n, "alias")
        if t == "mean":
            if self._tensor_arg(n, n.args[0], "the input") is None:
                return None
            return self._global_mean(n, _arg(n, 1, "dim"), _arg(n, 2, "keepdim", False))
        self.problem(n, f"tensor method {t!r} is not supported; accepted: relu, add, "
                        f"flatten/view/reshape/squeeze, contiguous, mean over (2, 3)")
        return None

    # pass 2: fusion and folding (needs the users) -------------------------------------------
    def resolve(self, n: fx.Node) -> fx.Node:
        while n in self.rep:
            n = self.rep[n]
        return n

    def eff_users(self, n: fx.Node) -> set[fx.Node]:
        """Consumers of ``n``'s value: through removed and already fused nodes, no shapes."""
        out: set[fx.Node] = set()
        for u in n.users:
            if u not in self.live:
                continue
            r = self.roles.get(u)
            if r is not None and r.role == "shape":
                continue
            if (r is not None and r.role in _TRANSPARENT) or u in self.fused_nodes:
                out |= self.eff_users(u)
            else:
                out.add(u)
        return out

    def fuse(self) -> None:
        self.rep: dict[fx.Node, fx.Node] = {}
        self.fused_nodes: set[fx.Node] = set()
        self.bn_of: dict[fx.Node, fx.Node] = {}
        self.relu_of: dict[fx.Node, list[fx.Node]] = {}
        self.pool_fold: dict[fx.Node, fx.Node] = {}       # linear -> folded adaptive pool
        self.observed: dict[fx.Node, list[str]] = {}
        self.out_node: fx.Node | None = None
        for n in self.nodes:
            r = self.roles.get(n)
            if r is None:
                continue
            if r.role in _TRANSPARENT:
                self.rep[n] = self.resolve(n.args[0])  # type: ignore[arg-type]
                if r.role == "observer":
                    self._observer(n)
            elif r.role == "bn":
                self._fuse_bn(n)
            elif r.role == "relu":
                self._fuse_relu(n)
            elif r.role == "adaptive_fold":
                self._fold_adaptive(n, r)
            elif r.role == "output":
                self._output(n)

    def _observer(self, n: fx.Node) -> None:
        """Record a QAT observer on the tensor it quantises (not on a folded-away pooling)."""
        a: fx.Node = n.args[0]  # type: ignore[assignment]
        while a in self.rep:
            if a in self.pool_fold.values():
                return
            a = self.rep[a]
        self.observed.setdefault(a, []).append(str(n.target))

    def _fuse_bn(self, n: fx.Node) -> None:
        p = self.resolve(n.args[0])  # type: ignore[arg-type]
        pr = self.roles.get(p)
        if pr is None or pr.role != "conv":
            what = pr.role if pr is not None else "unsupported"
            self.problem(n, f"BatchNorm2d follows {p.name} ({what}), not a Conv2d; batch "
                            f"norm is only supported right after a convolution")
        elif p in self.bn_of or p in self.relu_of:
            self.problem(n, f"BatchNorm2d after {p.name}, which already has a batch norm or "
                            f"a ReLU folded in")
        elif self.eff_users(p) != {n}:
            others = sorted(u.name for u in self.eff_users(p) - {n})
            self.problem(n, f"the convolution {p.name} it follows has other users "
                            f"({', '.join(others)}), so the batch norm cannot be folded")
        else:
            self.bn_of[p] = n
            self.rep[n] = p
            self.fused_nodes.add(n)

    def _fuse_relu(self, n: fx.Node) -> None:
        p = self.resolve(n.args[0])  # type: ignore[arg-type]
        pr = self.roles.get(p)
        role = pr.role if pr is not None else "unsupported"
        if role not in ("conv", "linear", "add"):
            self.problem(n, f"a standalone ReLU (its input {p.name}: {role}); a ReLU is only "
                            f"supported fused into the conv, linear or add it follows")
        elif self.eff_users(p) != {n}:
            others = sorted(u.name for u in self.eff_users(p) - {n})
            self.problem(n, f"a standalone ReLU: its input {p.name} ({role}) has other users "
                            f"({', '.join(others)}), so the ReLU cannot be fused into it")
        else:
            self.relu_of.setdefault(p, []).append(n)
            self.rep[n] = p
            self.fused_nodes.add(n)

    def _fold_adaptive(self, n: fx.Node, r: _Role) -> None:
        (h, w), (oh, ow) = r.params["in"], r.params["out"]
        why = (f"adaptive average pooling from {h}x{w} to {oh}x{ow} is neither the identity, "
               f"a global pooling nor an exact integer pooling")
        users = self.eff_users(n)
        fl = next(iter(users)) if len(users) == 1 else None
        if fl is None or self.roles.get(fl, _Role("?")).role != "flatten":
            self.problem(n, why + ", and it does not feed a flatten + Linear (which could "
                                  "absorb it)")
            return
        lus = self.eff_users(fl)
        lin = next(iter(lus)) if len(lus) == 1 else None
        if lin is None or self.roles.get(lin, _Role("?")).role != "linear":
            self.problem(n, why + ", and the flatten it feeds does not feed one Linear only "
                                  "(which could absorb it)")
            return
        self.pool_fold[lin] = n
        self.rep[n] = self.resolve(n.args[0])  # type: ignore[arg-type]
        self.fused_nodes.add(n)

    def _output(self, n: fx.Node) -> None:
        a = n.args[0]
        if not isinstance(a, fx.Node) or _meta_shape(a) is None:
            self.problem(n, f"the model returns {type(a).__name__}; accepted: one tensor")
            return
        self.out_node = a
        src = self.resolve(a)
        if self.roles.get(src, _Role("?")).role == "input":
            self.problem(n, "the model returns its input")

    # pass 3: nodes -----------------------------------------------------------------------
    def names(self) -> dict[fx.Node, str]:
        calls = Counter(str(n.target) for n in self.roles if n.op == "call_module")
        out: dict[fx.Node, str] = {}
        taken: set[str] = set()
        for n in self.roles:
            nm = n.name
            if n.op == "call_module" and calls[str(n.target)] == 1:
                nm = str(n.target)
            if nm in taken:
                nm = n.name
            taken.add(nm)
            out[n] = nm
        return out

    def build(self) -> tuple[list[Node], dict[str, tuple[str, ...]], str]:
        names = self.names()
        kept: list[Node] = []
        input_name = ""
        for n in self.nodes:
            r = self.roles.get(n)
            if r is None or n in self.rep or r.role in ("shape", "output"):
                continue
            if r.role == "input":
                input_name = names[n]
                continue
            kept.append(self._node(n, r, names))
        observers = {names[k]: tuple(v) for k, v in self.observed.items() if k not in self.rep}
        return kept, observers, input_name

    def _node(self, n: fx.Node, r: _Role, names: dict[fx.Node, str]) -> Node:
        role = r.role
        if role == "concat":
            tensor_args = list(_arg(n, 0, "tensors"))
        elif role == "add":
            tensor_args = [n.args[0], n.args[1]]
        else:
            tensor_args = [n.args[0]]
        ins = tuple(names[self.resolve(a)] for a in tensor_args)
        fused = [names[f] for f in (self.bn_of.get(n), self.pool_fold.get(n)) if f is not None]
        fused += [names[f] for f in self.relu_of.get(n, [])]
        common: dict[str, Any] = {
            "name": names[n], "inputs": ins, "relu": n in self.relu_of, "fx_name": n.name,
            "module": _module_of(n), "source": _source(n), "fused": tuple(fused)}
        shape = _chw(_meta_shape(n))  # type: ignore[arg-type]
        if role == "flatten":
            src = self.resolve(tensor_args[0])  # type: ignore[arg-type]
            shape = (math.prod(_chw(_meta_shape(src))), 1, 1)  # type: ignore[arg-type]
            return Node(kind="flatten", shape=shape, **common)
        if role in ("conv", "linear"):
            return self._conv_node(n, r, shape, common)
        if role in ("maxpool", "avgpool", "global_avgpool"):
            return PoolNode(kind=role, shape=shape, kernel=tuple(r.params["kernel"]),
                            stride=tuple(r.params["stride"]),
                            padding=tuple(r.params["padding"]), **common)
        return Node(kind=role, shape=shape, **common)

    def _conv_node(self, n: fx.Node, r: _Role, shape: tuple[int, int, int],
                   common: dict[str, Any]) -> ConvNode:
        m = self.modules[str(n.target)]
        assert isinstance(m, (nn.Conv2d, nn.Linear))
        dtype = m.weight.dtype
        w = m.weight.detach()
        b = m.bias.detach() if m.bias is not None else torch.zeros(w.shape[0], dtype=dtype)
        bn, pool = self.bn_of.get(n), self.pool_fold.get(n)
        if bn is None and pool is None:
            w, b = w.clone(), b.clone()
        else:                                   # fold in float64, round once
            w, b = w.to(torch.float64), b.to(torch.float64)
            if bn is not None:
                w, b = _fold_bn(w, b, self.modules[str(bn.target)])  # type: ignore[arg-type]
            if pool is not None:
                w = _fold_adaptive_pool(w, self.roles[pool].params["in"],
                                        self.roles[pool].params["out"])
            w, b = w.to(dtype), b.to(dtype)
        if r.role == "linear":
            return ConvNode(kind="linear", shape=shape, weight=w, bias=b, **common)
        return ConvNode(kind="conv", shape=shape, weight=w, bias=b, stride=r.params["stride"],
                        padding=r.params["padding"], **common)


def _fold_bn(w: torch.Tensor, b: torch.Tensor, bn: nn.BatchNorm2d
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch norm (running statistics) folded into a convolution, in float64."""
    assert bn.running_mean is not None and bn.running_var is not None
    mean = bn.running_mean.detach().to(torch.float64)
    var = bn.running_var.detach().to(torch.float64)
    gamma = (bn.weight.detach().to(torch.float64) if bn.weight is not None
             else torch.ones_like(mean))
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return w * scale.view(-1, 1, 1, 1), (b - mean) * scale + beta


def _fold_adaptive_pool(w: torch.Tensor, size_in: tuple[int, int],
                        size_out: tuple[int, int]) -> torch.Tensor:
    """``Linear(flatten(adaptive_avg_pool2d(x)))`` as one linear layer over ``flatten(x)``."""
    (h, wd), (oh, ow) = size_in, size_out
    eye = torch.eye(h * wd, dtype=torch.float64).reshape(1, h * wd, h, wd)
    pm = F.adaptive_avg_pool2d(eye, (oh, ow)).reshape(h * wd, oh * ow)   # [in, out]
    cout = w.shape[0]
    c = w.shape[1] // (oh * ow)
    wf = torch.einsum("ocq,pq->ocp", w.reshape(cout, c, oh * ow), pm)
    return wf.reshape(cout, c * h * wd)


# Entry point ----------------------------------------------------------------------------------

def _check_input_shape(shape: Any) -> tuple[int, int, int, int]:
    if (not isinstance(shape, (tuple, list)) or len(shape) != 4
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise GraphError(f"input_shape must be four positive ints (N, C, H, W), not {shape!r}")
    return (int(shape[0]), int(shape[1]), int(shape[2]), int(shape[3]))


def import_model(model: nn.Module, input_shape: tuple[int, int, int, int]) -> NetGraph:
    """Import a PyTorch model as a :class:`NetGraph` (see the module docstring for the rules).

    Parameters
    ----------
    model : torch.nn.Module
        Symbolically traceable by :mod:`torch.fx` (a ``GraphModule`` is retraced). It is
        evaluated in eval mode (and put back in its previous mode afterwards); its weights
        are copied, not shared.
    input_shape : (int, int, int, int)
        ``(N, C, H, W)`` of the input; every shape of the graph holds for this size.

    Returns
    -------
    NetGraph

    Raises
    ------
    UnsupportedError
        Listing every unsupported op, module or shape, each naming its fx node, target,
        module path and source line. Raised before any weight is read.
    GraphError
        If ``input_shape`` is malformed, the model cannot be traced, or running it on
        ``input_shape`` fails (the message names the node).
    """
    shape = _check_input_shape(input_shape)
    if not isinstance(model, nn.Module):
        raise GraphError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    name = type(model).__name__
    was_training = model.training
    model.eval()
    try:
        return _import(model, shape, name)
    finally:
        model.train(was_training)


def _import(model: nn.Module, shape: tuple[int, int, int, int], name: str) -> NetGraph:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # TraceError, TypeError, NotImplementedError... from user code
        raise GraphError(f"{name}: torch.fx cannot trace the model symbolically "
                         f"({type(e).__name__}: {e})") from e
    gm = fx.GraphModule(tracer.root, graph, name)
    ref = next(iter(gm.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.dtype.is_floating_point else torch.float32
    try:
        # ShapeProp prints the traceback of a failure itself: keep it for the message only
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(torch.zeros(shape, dtype=dtype))
    except Exception as e:
        cause = e.__cause__ or e
        m = re.search(r"node=%(\w+)", str(e))
        at = f" at node {m[1]!r}" if m else ""
        raise GraphError(f"{name}: running the model on an input of shape {shape} "
                         f"failed{at}: {type(cause).__name__}: {cause}") from e
    low = _Lowering(gm, shape[0], name)
    low.classify()
    low.fuse()
    if low.problems:
        order = {n.name: i for i, n in enumerate(low.nodes)}
        raise UnsupportedError(name, sorted(low.problems, key=lambda p: order.get(p.node, -1)))
    nodes, observers, input_name = low.build()
    out = low.resolve(low.out_node)
    names = low.names()
    return NetGraph(input_name=input_name, input_shape=shape, nodes=nodes, output=names[out],
                    output_shape=_meta_shape(low.out_node) or (), model=name,
                    observers=observers)

