"""The ``tilewright train`` and ``tilewright prune`` subcommands (registered in ``sw/cli.py``).

``train`` trains a network from scratch (dense, Dropback sparse training, or cubic gradual
pruning during training); ``prune`` prunes a trained checkpoint (one-shot + fine-tune,
iterative, or gradual), or an untrained torchvision network by name, and can scan per-layer
sensitivity first. Both write the checkpoint of :mod:`tilewright.sw.prune.checkpoint`,
show progress bars, write ``OUTPUT.partial`` periodically and continue from it with
``--resume``. See ``docs/pruning.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from .data import DataError, open_data
from .int8 import Int8Error
from .models import arch_record
from .patterns import BlockPattern, NMPattern, UnstructuredPattern, parse_pattern
from .sensitivity import choose_sparsities, overall_sparsity, sensitivity_scan
from .sparsifier import MaskError, zero_groups
from .trainer import Interrupted, Job, RunOptions, run_job

__all__ = ["run_prune", "run_train"]

_ERRORS = (ValueError, CheckpointError, DataError, MaskError, Int8Error)


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


# Building the job -----------------------------------------------------------------------------

def _pattern(args: argparse.Namespace) -> BlockPattern | NMPattern | UnstructuredPattern:
    pat = parse_pattern(args.pattern) if args.pattern else None
    if args.overlay:
        from tilewright.sw.cli import load_config_arg

        b = load_config_arg(args.overlay).tile.block
        if pat is not None and pat != BlockPattern(b, b):
            raise ValueError(f"--pattern {args.pattern} contradicts --overlay {args.overlay} "
                             f"(tile.block = {b}: {b}x{b} blocks)")
        return BlockPattern(b, b)
    return pat if pat is not None else BlockPattern()


def _layer_sparsity(path: Path | None) -> dict[str, float] | None:
    if path is None:
        return None
    import yaml

    try:
        d = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read per-layer sparsities ({e})") from None
    if not isinstance(d, dict) or not all(isinstance(v, (int, float)) for v in d.values()):
        raise ValueError(f"{path}: must be a mapping {{layer: sparsity}}, e.g. "
                         f"'stages.1.0.conv1: 0.6'")
    return {str(k): float(v) for k, v in d.items()}


def _kwargs(text: str) -> dict[str, Any]:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--arch-kwargs must be a JSON object, not {text!r} ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"--arch-kwargs must be a JSON object, not {text!r}")
    return d


def _common(args: argparse.Namespace, command: str) -> dict[str, Any]:
    pattern = _pattern(args)
    sparsity = pattern.sparsity if isinstance(pattern, NMPattern) else args.sparsity
    return dict(
        command=command, method=args.method, output=str(args.output),
        pattern=pattern.as_dict(), sparsity=sparsity,
        layer_sparsity=_layer_sparsity(args.layer_sparsity), score=args.score,
        ranking=args.ranking, pad=args.pad, dense_first_conv=not args.prune_first_conv,
        keep_rows=args.keep_rows,
        epochs=args.epochs, prune_every=args.prune_every, gradual_start=args.gradual_start,
        gradual_end=args.gradual_end, qat_epochs=args.qat_epochs, qat_lr=args.qat_lr,
        int8_eval=not args.no_int8_eval, momentum=args.momentum,
        weight_decay=args.weight_decay, batch_size=args.batch_size,
        label_smoothing=args.label_smoothing, warmup_epochs=args.warmup_epochs,
        seed=args.seed, train_subset=args.train_subset, test_subset=args.test_subset,
        calib_batches=args.calib_batches, augment=not args.no_augment)


def _options(args: argparse.Namespace, time_steps: int = 1) -> RunOptions:
    return RunOptions(device=args.device, threads=args.threads,
                      checkpoint_every=args.checkpoint_every, resume=args.resume,
                      progress=not args.no_progress,
                      log=lambda m: print(m, flush=True), time_steps=time_steps)


def _summary(ckpt: dict[str, Any], out: Path) -> None:
    m = ckpt["metrics"]
    parts = [f"{k} {m[k]:.4f}" for k in ("top1_fp32", "top1_int8_fakequant", "top1_int8")
             if k in m]
    parts.append(f"training {m.get('train_seconds', 0.0):.0f} s")
    print(f"wrote {out}: " + ", ".join(parts))


# Commands -------------------------------------------------------------------------------------

def run_train(args: argparse.Namespace) -> int:
    """``tilewright train``."""
    if args.output is None:
        return _err("train needs -o/--output CKPT")
    try:
        data = args.data or "fashion-mnist"
        job = Job(arch=arch_record(args.arch, _kwargs(args.arch_kwargs)), data=data, lr=args.lr,
                  decay=args.decay, decay_every=args.decay_every, zero_below=args.zero_below,
                  **_common(args, "train"))
        ckpt = run_job(job, _options(args))
    except Interrupted as e:
        return _err(str(e))
    except _ERRORS as e:
        return _err(str(e))
    _summary(ckpt, args.output)
    return 0


def run_prune(args: argparse.Namespace) -> int:
    """``tilewright prune``."""
    if (args.source is None) == (args.arch is None):
        return _err("prune needs a source checkpoint or --arch NAME (exactly one)")
    try:
        if args.scan:
            return _scan(args)
        if args.output is None:
            return _err("prune needs -o/--output CKPT (or --scan)")
        data: str | None = args.data
        if data is None and args.source is not None:
            data = (read_checkpoint(args.source).get("data") or {}).get("spec")
        if data == "none":
            data = None
        arch = arch_record(args.arch, _kwargs(args.arch_kwargs)) if args.arch else None
        job = Job(arch=arch, source=str(args.source) if args.source else None, data=data,
                  lr=args.lr, ft_lr=args.lr, epochs_per_round=args.epochs_per_round,
                  round_fraction=args.round_fraction, **_common(args, "prune"))
        if data is None:
            job.epochs, job.int8_eval = 0.0, False
        t0 = time.perf_counter()
        ckpt = run_job(job, _options(args, args.time_steps))
        wall = time.perf_counter() - t0
    except Interrupted as e:
        return _err(str(e))
    except _ERRORS as e:
        return _err(str(e))
    _check_pattern(ckpt)
    steps = [e for e in ckpt["history"] if "step_seconds" in e]
    if steps:
        print("sparsifier.step(): " + ", ".join(f"{e['step_seconds']:.3f} s" for e in steps)
              + f" (mean of {args.time_steps} call(s) per round); run {wall:.1f} s")
    _summary(ckpt, args.output)
    return 0


def _check_pattern(ckpt: dict[str, Any]) -> None:
    """Print whether every pruned layer has exactly the asked sparsity and zeros."""
    from .patterns import pattern_from_dict

    pattern = pattern_from_dict(ckpt["pattern"])
    job = ckpt["job"]
    levels = job.get("layer_sparsity") or {}
    exact, off = 0, []
    for name, m in ckpt["masks"].items():
        want = levels.get(name, job["sparsity"])
        if isinstance(pattern, NMPattern):
            ok = pattern.holds(m)
        elif job["ranking"] == "global":
            ok = True
        else:
            ok = int((~m).sum()) == zero_groups(want, m.numel())
        w = ckpt["state_dict"].get(f"{name}.weight")
        if w is not None and int(((w != 0) & ~pattern.expand(m, w.shape)).sum()):
            ok = False
        exact += ok
        if not ok:
            off.append(name)
    dense = ", ".join(f"{n} ({r})" for n, r in ckpt["dense_layers"].items()) or "none"
    print(f"pattern check: {exact}/{len(ckpt['masks'])} pruned layers carry the {pattern} "
          f"pattern at the asked sparsity with exact zeros"
          + (f"; NOT: {', '.join(off)}" if off else "") + f"; dense: {dense}")


def _scan(args: argparse.Namespace) -> int:
    if args.source is None:
        return _err("--scan needs a trained source checkpoint")
    pattern = _pattern(args)
    model, ck = load_checkpoint(args.source)
    if (ck.get("quant") or {}).get("form") == "qat":
        return _err(f"{args.source}: a QAT checkpoint; scan a float one")
    spec = args.data or (ck.get("data") or {}).get("spec")
    if not spec or spec == "none":
        return _err("--scan needs data (--data SPEC)")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = open_data(spec, seed=args.seed, train_subset=args.scan_images, augment=False)

    @torch.no_grad()
    def evaluate(m: torch.nn.Module) -> float:
        m.eval()
        c = t = 0
        for x, y in data.calib.epoch(0):
            c += int((m(x).argmax(1) == y).sum())
            t += int(y.numel())
        return c / t

    t0 = time.perf_counter()
    scan = sensitivity_scan(model, evaluate, pattern, args.scan_levels, args.score,
                            dense_first_conv=not args.prune_first_conv, pad=args.pad,
                            progress=lambda s: print(s, flush=True))
    print(scan.table())
    print(f"scan: {len(scan.accuracy)} layers x {len(scan.levels)} levels on "
          f"{args.scan_images} training images in {time.perf_counter() - t0:.0f} s")
    if args.target is not None:
        chosen = choose_sparsities(scan, args.target)
        print(f"chosen per-layer sparsities (overall {overall_sparsity(chosen, scan.weights):.4f}"
              f" of the scanned weights):")
        for n, s in chosen.items():
            print(f"  {n}: {s}")
        if args.scan_out is not None:
            import yaml

            args.scan_out.write_text(yaml.safe_dump({n: s for n, s in chosen.items() if s > 0},
                                                    sort_keys=False))
            print(f"wrote {args.scan_out} (use with --layer-sparsity)")
    return 0 if not math.isnan(scan.baseline) else 1
