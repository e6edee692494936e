"""Networks the pruner builds by name, and the architecture record checkpoints keep.

An *architecture* is a dict ``{"name": str, "kwargs": dict}``; :func:`build_model` turns it
into a module with fresh weights, so a checkpoint needs only the dict and a ``state_dict``.
Names:

* ``fmnist-resnet`` -- :class:`SmallResNet`, a ResNet-style network for 28x28 grey images
  (three stages of basic residual blocks, 32/64/128 channels, a dense first convolution).
* ``resnet50``, ``inception_v3`` (``aux_logits=False``, ``init_weights=True``), ``vgg16`` and
  any other ``torchvision.models`` name -- untrained (``weights=None``; pretrained weights
  cannot be downloaded here).
* ``package.module:factory`` -- a user's own network: ``factory(**kwargs)`` must return an
  ``nn.Module``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..vision import load_torchvision

__all__ = ["ARCHS", "INPUT_SHAPES", "SmallResNet", "arch_record", "build_model", "fmnist_resnet"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (ResNet's basic block).

    Parameters
    ----------
    cin, cout : int
        Channels in and out.
    stride : int
        Stride of the first convolution; a 1x1 projection matches the shortcut when the shape
        changes.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = x if self.downsample is None else self.downsample(x)
        return self.relu2(y + s)


class SmallResNet(nn.Module):
    """A ResNet-style network for small images.

    A 3x3 stem convolution (stride ``stem_stride``), then one stage per entry of ``widths``
    with ``blocks[i]`` basic blocks (every stage after the first halves the resolution),
    global average pooling and a fully connected classifier. Channel counts are multiples of
    8 so every layer but the stem and the 10-way classifier divides 8x8 blocks.

    Parameters
    ----------
    num_classes : int
    in_channels : int
    widths : sequence of int
        Channels per stage.
    blocks : sequence of int
        Basic blocks per stage.
    stem_stride : int
        Stride of the stem (2 halves the work of every later layer).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 widths: tuple[int, ...] | list[int] = (32, 64, 128),
                 blocks: tuple[int, ...] | list[int] = (1, 1, 1), stem_stride: int = 2) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths {widths!r} and blocks {blocks!r} must be non-empty and of "
                             f"equal length")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, (c, n) in enumerate(zip(widths, blocks, strict=True)):
            layers = [BasicBlock(cin if j == 0 else c, c, 2 if (j == 0 and i > 0) else 1)
                      for j in range(n)]
            stages.append(nn.Sequential(*layers))
            cin = c
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)    # each block starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))


def fmnist_resnet(num_classes: int = 10, in_channels: int = 1,
                  widths: tuple[int, ...] | list[int] = (32, 64, 128),
                  blocks: tuple[int, ...] | list[int] = (1, 1, 1),
                  stem_stride: int = 2) -> SmallResNet:
    """The Fashion-MNIST network of the measured results (see ``docs/pruning.md``)."""
    return SmallResNet(num_classes, in_channels, tuple(widths), tuple(blocks), stem_stride)


def _torchvision(name: str, **defaults: Any) -> Callable[..., nn.Module]:
    def build(**kwargs: Any) -> nn.Module:
        torchvision = load_torchvision()

        kw = {**defaults, **kwargs}
        kw.setdefault("weights", None)
        return torchvision.models.get_model(name, **kw)
    return build


#: Architectures known by name (any other torchvision.models name also works).
ARCHS: dict[str, Callable[..., nn.Module]] = {
    "fmnist-resnet": fmnist_resnet,
    "resnet50": _torchvision("resnet50"),
    "inception_v3": _torchvision("inception_v3", aux_logits=False, init_weights=True),
    "vgg16": _torchvision("vgg16"),
}

#: Input shape ``(C, H, W)`` of the named architectures (others: 3x224x224).
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "fmnist-resnet": (1, 28, 28),
    "inception_v3": (3, 299, 299),
}


def arch_record(name: str, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The architecture dict a checkpoint stores: ``{"name", "kwargs", "input_shape"}``."""
    kw = dict(kwargs or {})
    shape = INPUT_SHAPES.get(name, (1, 28, 28) if ":" in name else (3, 224, 224))
    if name == "fmnist-resnet":
        shape = (int(kw.get("in_channels", 1)), 28, 28)
    return {"name": name, "kwargs": kw, "input_shape": list(shape)}


def build_model(arch: Mapping[str, Any] | str) -> nn.Module:
    """A fresh model from an architecture record (or a bare name).

    Raises
    ------
    ValueError
        If the name is neither known, nor a torchvision model, nor ``module:factory``.
    """
    if isinstance(arch, str):
        arch = arch_record(arch)
    name = arch.get("name")
    kwargs = dict(arch.get("kwargs") or {})
    if not isinstance(name, str):
        raise ValueError(f"arch must name a network, not {arch!r}")
    if name in ARCHS:
        return ARCHS[name](**kwargs)
    if ":" in name:
        mod, _, fn = name.partition(":")
        load_torchvision()  # so that the module may import torchvision on a CPU-only torch
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"arch {name!r}: cannot import {fn} from {mod} ({e})") from None
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"arch {name!r}: the factory returned a {type(model).__name__}, "
                             f"not an nn.Module")
        return model
    torchvision = load_torchvision()
    if name in torchvision.models.list_models():
        return _torchvision(name)(**kwargs)
    raise ValueError(f"arch {name!r} unknown; accepted: {', '.join(ARCHS)}, any "
                     f"torchvision.models name, or 'package.module:factory'")
