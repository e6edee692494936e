"""Command-line arguments of ``tilewright train`` and ``tilewright prune``.

Kept free of torch imports: ``sw/cli.py`` builds every subcommand's parser on each call, and
``tilewright --help`` or ``tilewright generate`` should not pay for loading PyTorch. The
names accepted here (methods, rankings, scores) are the ones the trainer checks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["ARCH_NAMES", "PADS", "PRUNE_METHODS", "RANKINGS", "SCORES", "TRAIN_METHODS",
           "add_prune_args", "add_train_args"]

#: ``tilewright train --method``.
TRAIN_METHODS = ("dense", "dropback", "gradual")
#: ``tilewright prune --method``.
PRUNE_METHODS = ("oneshot", "iterative", "gradual")
#: ``"layer"``: every layer gets its own ``sparsity_level``; ``"global"``: one level for the
#: model, groups ranked across layers by per-weight score (``l2/sqrt(size)``, ``l1/size``).
RANKINGS = ("layer", "global")
#: Group scores (``"variance"`` only for blocks).
SCORES = ("l2", "l1", "variance")
#: What to do with layers the pattern does not divide.
PADS = ("pad", "dense")
#: Architectures known by name (:data:`tilewright.sw.prune.models.ARCHS`).
ARCH_NAMES = ("fmnist-resnet", "resnet50", "inception_v3", "vgg16")


# Arguments ------------------------------------------------------------------------------------

def _pattern_args(p: argparse.ArgumentParser, default_sparsity: float) -> None:
    g = p.add_argument_group("pattern")
    g.add_argument("--pattern", default=None, metavar="P",
                   help="BOUTxBIN weight blocks (e.g. 8x8, 16x4), N:M (e.g. 2:4) or "
                        "unstructured (default: 8x8, or the overlay's block)")
    g.add_argument("--overlay", default=None, metavar="CONFIG",
                   help="take the block size (b x b) from an overlay configuration (a YAML "
                        "path or a shipped name such as aie2-1x1)")
    g.add_argument("--sparsity", type=float, default=default_sparsity, metavar="S",
                   help=f"target sparsity of every layer (or the global one) "
                        f"(default {default_sparsity})")
    g.add_argument("--layer-sparsity", type=Path, default=None, metavar="FILE",
                   help="YAML or JSON {layer: sparsity} (per-layer targets, e.g. from "
                        "prune --scan --scan-out)")
    g.add_argument("--score", choices=SCORES, default="l2",
                   help="block score (default l2)")
    g.add_argument("--ranking", choices=RANKINGS, default="layer",
                   help="layer: each layer its own fraction; global: one fraction, blocks "
                        "ranked across layers (default layer)")
    g.add_argument("--pad", choices=PADS, default="pad",
                   help="layers whose channels do not divide the block: pad logically or "
                        "leave dense (default pad)")
    g.add_argument("--prune-first-conv", action="store_true",
                   help="prune the first convolution too (default: kept dense)")
    k = g.add_mutually_exclusive_group()
    k.add_argument("--keep-rows", dest="keep_rows", action="store_true", default=None,
                   help="every block row (b_out output channels) keeps at least one block "
                        "(default: on for Dropback, off otherwise)")
    k.add_argument("--no-keep-rows", dest="keep_rows", action="store_false")


def _training_args(p: argparse.ArgumentParser, epochs: float, lr: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--data", default=None, metavar="SPEC",
                   help="fashion-mnist, fashion-mnist:DIR, idx:DIR, an ImageFolder directory "
                        "with train/ and val/, or none")
    g.add_argument("--epochs", type=float, default=epochs, metavar="E",
                   help=f"(fine-)tuning epochs (default {epochs:g})")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    g.add_argument("--batch-size", type=int, default=128, metavar="N")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--warmup-epochs", type=float, default=0.0)
    g.add_argument("--no-augment", action="store_true", help="no random shifts and flips")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="train on N images only (a fixed seeded choice)")
    g.add_argument("--test-subset", type=int, default=None, metavar="N",
                   help="measure on the first N test images only")
    q = p.add_argument_group("int8")
    q.add_argument("--qat-epochs", type=float, default=0.0, metavar="E",
                   help="quantisation-aware fine-tuning epochs at the end (default 0: "
                        "post-training calibration only)")
    q.add_argument("--qat-lr", type=float, default=0.002)
    q.add_argument("--calib-batches", type=int, default=10, metavar="N",
                   help="calibration batches of 500 training images (default 10)")
    q.add_argument("--no-int8-eval", action="store_true",
                   help="skip the int8 measurement through the integer reference")
    r = p.add_argument_group("running")
    r.add_argument("-o", "--output", type=Path, default=None, metavar="CKPT",
                   help="checkpoint to write (a partial one goes to CKPT.partial)")
    r.add_argument("--resume", action="store_true", help="continue from CKPT.partial")
    r.add_argument("--checkpoint-every", type=int, default=200, metavar="STEPS")
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``tilewright train``."""
    p.add_argument("--arch", default="fmnist-resnet",
                   help=f"network: {', '.join(ARCH_NAMES)}, any torchvision.models name, or "
                        f"package.module:factory (default fmnist-resnet)")
    p.add_argument("--arch-kwargs", default="{}", metavar="JSON",
                   help='keyword arguments of the network, e.g. \'{"widths": [32, 64, 128]}\'')
    p.add_argument("--method", choices=TRAIN_METHODS, default="dense",
                   help="dense; dropback (Procrustes-style sparse training from scratch); "
                        "gradual (cubic schedule during training)")
    _pattern_args(p, 0.5)
    d = p.add_argument_group("dropback")
    d.add_argument("--decay", type=float, default=0.9,
                   help="initial-weight decay factor (default 0.9)")
    d.add_argument("--decay-every", type=int, default=10, metavar="STEPS")
    d.add_argument("--zero-below", type=float, default=1e-3)
    _gradual_args(p)
    _training_args(p, 10.0, 0.1)


def _gradual_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("gradual")
    g.add_argument("--prune-every", type=int, default=50, metavar="STEPS",
                   help="steps between mask updates (default 50)")
    g.add_argument("--gradual-start", type=float, default=0.0, metavar="F",
                   help="fraction of the phase where pruning starts (default 0)")
    g.add_argument("--gradual-end", type=float, default=0.7, metavar="F",
                   help="fraction of the phase where the target is reached (default 0.7)")


def add_prune_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``tilewright prune``."""
    p.add_argument("source", nargs="?", type=Path, default=None,
                   help="trained checkpoint (from tilewright train) to prune")
    p.add_argument("--arch", default=None,
                   help="prune an untrained network by name instead (e.g. resnet50)")
    p.add_argument("--arch-kwargs", default="{}", metavar="JSON")
    p.add_argument("--method", choices=PRUNE_METHODS, default="oneshot",
                   help="oneshot (+ fine-tune), iterative (rounds of at most "
                        "--round-fraction of the remaining blocks, fine-tuned between), "
                        "gradual (cubic during fine-tuning)")
    _pattern_args(p, 0.5)
    it = p.add_argument_group("iterative")
    it.add_argument("--round-fraction", type=float, default=0.2, metavar="F",
                    help="at most this fraction of the remaining blocks per round (default 0.2)")
    it.add_argument("--epochs-per-round", type=float, default=1.0, metavar="E")
    _gradual_args(p)
    s = p.add_argument_group("sensitivity scan")
    s.add_argument("--scan", action="store_true",
                   help="scan accuracy against sparsity per layer (no pruning run)")
    s.add_argument("--scan-levels", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9],
                   metavar="S")
    s.add_argument("--scan-images", type=int, default=2000, metavar="N",
                   help="training images the scan measures on (default 2000)")
    s.add_argument("--target", type=float, default=None, metavar="S",
                   help="choose per-layer sparsities reaching this overall sparsity")
    s.add_argument("--scan-out", type=Path, default=None, metavar="FILE",
                   help="write the chosen {layer: sparsity} (YAML) for --layer-sparsity")
    p.add_argument("--time-steps", type=int, default=1, metavar="N",
                   help="time sparsifier.step() N times at each prune round (default 1)")
    _training_args(p, 3.0, 0.01)
