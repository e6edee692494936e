"""Pruned-model checkpoints: what the trainer writes and the compiler reads.

A checkpoint is a ``torch.save``d dict (loadable with ``torch.load(weights_only=True)``):

``format``
    ``"tilewright-pruned/1"``.
``arch``
    ``{"name", "kwargs", "input_shape"}`` (:func:`~tilewright.sw.prune.models.build_model`).
``state_dict``
    The model's weights with the masks applied: every weight of a pruned group is exactly 0.
    When QAT ran (``quant["form"] == "qat"``) these are the weights of the QAT form
    (:func:`~tilewright.sw.prune.qat.prepare_qat`: batch norm folded into the convolutions,
    observers' ranges included); otherwise of the float model.
``masks``
    ``{layer: bool mask}``, True = kept. Blocks: ``(ceil(Cout/b_out), ceil(Cin/b_in))``
    (the layout of :func:`tilewright.sw.quantize.block_mask`); N:M and unstructured: the
    weight's shape.
``pattern``
    ``{"kind": "block", "block": [b_out, b_in]}``, ``{"kind": "nm", "n", "m"}`` or
    ``{"kind": "unstructured"}``; plus ``score`` and ``ranking``.
``sparsity``
    ``{layer: fraction of zero groups}``.
``dense_layers`` / ``padded_layers``
    ``{layer: reason}``: conv/FC layers left dense and pruned layers padded logically.
``quant``
    ``None``, or the int8 parameters: ``form`` (``"qat"`` or ``"ptq"``), ``activations``
    (``{observer: scale}``), ``weights`` (``{layer: per-channel scales}``), ``layers``
    (``{layer: {"s_in", "s_out", "relu"}}``), ``numerics``.
``data``, ``metrics``, ``history``, ``job``
    Where the weights came from and what they scored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import build_model
from .patterns import pattern_from_dict
from .sparsifier import MaskError, check_mask

__all__ = [
    "FORMAT",
    "REQUIRED_KEYS",
    "CheckpointError",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "validate_checkpoint",
]

FORMAT = "tilewright-pruned/1"
REQUIRED_KEYS = ("arch", "state_dict", "masks", "pattern", "sparsity")


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not fit its model or pattern (names the layer)."""


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, p)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict (``weights_only``) and check it has the required keys.

    Raises
    ------
    CheckpointError
        If the file is missing, not a torch checkpoint, or lacks a required key.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises many kinds for a corrupt file
        raise CheckpointError(f"{p}: not a readable torch checkpoint ({e})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{p}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{p}: missing {', '.join(missing)} (a pruned checkpoint has "
                              f"{', '.join(REQUIRED_KEYS)})")
    return ckpt


def validate_checkpoint(ckpt: dict[str, Any], model: nn.Module, where: str = "checkpoint"
                        ) -> None:
    """Check masks, pattern, sparsities and zeros of ``ckpt`` against ``model``.

    Parameters
    ----------
    ckpt : dict
    model : torch.nn.Module
        A model of the checkpoint's architecture (and form).
    where : str
        Named in the messages (the file).

    Raises
    ------
    CheckpointError
        Naming the layer: a mask for a layer the model lacks (or that is not Conv2d/Linear),
        a mask of the wrong shape or dtype for the pattern, an N:M mask that breaks N:M,
        non-zero weights in pruned groups, or sparsities that disagree with the masks.
    """
    try:
        pattern = pattern_from_dict(ckpt["pattern"])
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    masks, sd = ckpt["masks"], ckpt["state_dict"]
    if not isinstance(masks, dict) or not isinstance(sd, dict):
        raise CheckpointError(f"{where}: 'masks' and 'state_dict' must be dicts")
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        m = modules.get(name)
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            what = "no such layer" if m is None else f"a {type(m).__name__}"
            raise CheckpointError(f"{where}: layer {name}: has a mask but the model "
                                  f"({ckpt['arch'].get('name')}) has {what}; masks apply to "
                                  f"Conv2d/Linear layers")
        w = sd.get(f"{name}.weight")
        if w is None:
            raise CheckpointError(f"{where}: layer {name}: has a mask but state_dict has no "
                                  f"{name}.weight")
        if tuple(w.shape) != tuple(m.weight.shape):
            raise CheckpointError(f"{where}: layer {name}: weight {tuple(w.shape)} in the "
                                  f"checkpoint, {tuple(m.weight.shape)} in the model")
        try:
            check_mask(name, pattern, mask, w.shape)
        except MaskError as e:
            raise CheckpointError(f"{where}: {e}") from None
        keep = pattern.expand(mask, w.shape)
        bad = int(((w != 0) & ~keep).sum())
        if bad:
            raise CheckpointError(f"{where}: layer {name}: {bad} weights are non-zero inside "
                                  f"pruned groups of the {pattern} mask (masks not applied)")
    sp = ckpt["sparsity"]
    if not isinstance(sp, dict) or set(sp) != set(masks):
        extra = sorted(set(sp) ^ set(masks)) if isinstance(sp, dict) else []
        raise CheckpointError(f"{where}: 'sparsity' must have one entry per mask"
                              + (f"; layer {extra[0]} differs" if extra else ""))
    for name, s in sp.items():
        m = masks[name]
        got = 1.0 - float(m.sum()) / m.numel()
        if abs(float(s) - got) > 1e-9:
            raise CheckpointError(f"{where}: layer {name}: sparsity says {float(s):.6f}, the "
                                  f"mask has {got:.6f}")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint, validated, weights loaded.

    Returns
    -------
    (torch.nn.Module, dict)
        The model (the QAT form when ``quant["form"] == "qat"``) in eval mode, and the dict.

    Raises
    ------
    CheckpointError
        As :func:`read_checkpoint` and :func:`validate_checkpoint`, or when the weights do
        not fit the architecture (missing, unexpected or mis-shaped keys are named).
    """
    ckpt = read_checkpoint(path)
    try:
        model = build_model(ckpt["arch"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: arch {ckpt['arch']!r}: {e}") from None
    quant = ckpt.get("quant") or {}
    if quant.get("form") == "qat":
        from .qat import prepare_qat

        model = prepare_qat(model)
    validate_checkpoint(ckpt, model, str(path))
    try:
        res = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {ckpt['arch'].get('name')}: "
                              f"{e}") from None
    if res.missing_keys or res.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not fit {ckpt['arch'].get('name')}: "
                              f"missing {res.missing_keys[:5]}, unexpected "
                              f"{res.unexpected_keys[:5]}")
    return model.to(device).eval(), ckpt
