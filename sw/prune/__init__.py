"""Pruning and sparse training to hardware-friendly patterns (block, N:M, unstructured).

The public names below are loaded lazily (PEP 562), so that importing
``tilewright.sw.prune.options`` for the command-line parser does not load PyTorch. See
``docs/pruning.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BlockPattern": "patterns",
    "NMPattern": "patterns",
    "UnstructuredPattern": "patterns",
    "parse_pattern": "patterns",
    "PatternSparsifier": "sparsifier",
    "GroupMask": "sparsifier",
    "MaskError": "sparsifier",
    "format_report": "sparsifier",
    "IterativeSL": "schedule",
    "CubicSL": "schedule",
    "DropbackSparsifier": "dropback",
    "sensitivity_scan": "sensitivity",
    "choose_sparsities": "sensitivity",
    "prepare_qat": "qat",
    "calibrate": "qat",
    "Int8Network": "int8",
    "evaluate_int8": "int8",
    "CheckpointError": "checkpoint",
    "load_checkpoint": "checkpoint",
    "build_model": "models",
    "open_data": "data",
    "Job": "trainer",
    "RunOptions": "trainer",
    "run_job": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
