"""Small networks with every op kind of the three large ones, for the network compiler's
tests and for trying ``tilewright compile`` / ``verify`` in seconds
(``--model tilewright.sw.testnets:tiny_resnet``).

* :func:`tiny_resnet` (3x32x32): a stem conv with batch norm and ReLU, a 3x3/2 max pool, an
  Inception-style block (1x1, 1x3, 3x1 and 3x3 branches and a 3x3/1 average pool branch,
  concatenated), a residual add, a downsampling residual block (a 3x3/2 conv and a 1x1/2
  shortcut conv added), a residual block (a 3x3 conv added to its input; both blocks' adds
  fused into a conv's epilogue by the compiler), a global average pool, flatten and a linear
  classifier.
* :func:`tiny_vgg` (3x16x16): convs and max pools, then a flatten of a 32x4x4 tensor into two
  linear layers (the first runs as a 4x4 convolution over the unflattened tensor).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["tiny_resnet", "tiny_vgg"]


def _cbr(cin: int, cout: int, k: int | tuple[int, int], s: int = 1,
         p: int | tuple[int, int] = 0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, p, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class TinyResNet(nn.Module):
    input_shape = (3, 32, 32)

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr(3, 32, 3, 1, 1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.b1 = _cbr(32, 8, 1)
        self.b2 = nn.Sequential(_cbr(32, 8, (1, 3), 1, (0, 1)), _cbr(8, 8, (3, 1), 1, (1, 0)))
        self.b3 = _cbr(32, 8, 3, 1, 1)
        self.b4 = nn.Sequential(nn.AvgPool2d(3, 1, 1), _cbr(32, 8, 1))
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64))
        self.short = nn.Sequential(nn.Conv2d(32, 64, 1, 2, bias=False), nn.BatchNorm2d(64))
        self.res = nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        y = torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)
        x = torch.relu(x + y)
        x = torch.relu(self.down(x) + self.short(x))
        x = torch.relu(self.res(x) + x)
        x = self.gap(x)
        return self.fc(torch.flatten(x, 1))


class TinyVGG(nn.Module):
    input_shape = (3, 16, 16)

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2))
        self.classifier = nn.Sequential(nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
                                        nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def tiny_resnet() -> nn.Module:
    """A :class:`TinyResNet` (seed with ``torch.manual_seed`` first)."""
    return TinyResNet()


def tiny_vgg() -> nn.Module:
    """A :class:`TinyVGG`."""
    return TinyVGG()
