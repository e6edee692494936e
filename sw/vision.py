"""``import torchvision`` that works beside the CPU build of PyTorch.

``.ci/setup`` installs PyTorch's CPU wheel (190 MB, on these machines' disk) rather than the
CUDA build that PyPI serves (5.5 GB of CUDA libraries in the venv, which ran a CI machine out of
disk). PyPI's torchvision wheels are linked against the CUDA build, so beside the CPU build their
C++ extension does not load. torchvision tolerates that for every operator but two:
``torchvision/_meta_registrations.py`` registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` without checking that the extension loaded, and ``import torchvision``
raises ``RuntimeError: operator torchvision::nms does not exist``.

tilewright uses only torchvision's model definitions and transforms, which are pure Python. When
(and only when) the import fails that way, :func:`load_torchvision` defines the schemas of those
two operators, with no kernels (calling them raises), and imports torchvision again. With a
torchvision whose extension loads, it is a plain import.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# The library object owns the definitions: it must live as long as the process.
_LIBRARY: torch.library.Library | None = None


def _define_missing_schemas() -> None:
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            _LIBRARY.define(schema)


def load_torchvision() -> ModuleType:
    """The ``torchvision`` module; afterwards a plain ``import torchvision`` works too."""
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        # A failed import leaves torchvision's half-initialised modules behind: drop them.
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _define_missing_schemas()
        import torchvision
    return torchvision
