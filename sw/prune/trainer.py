"""Training and pruning runs: phases, periodic checkpoints, resume, int8 measurement.

A :class:`Job` describes a run of ``tilewright train`` (dense, Dropback or cubic-gradual
training from scratch) or ``tilewright prune`` (one-shot + fine-tune, iterative, or gradual
pruning of a trained checkpoint). :func:`plan` turns it into :class:`Phase` objects --
prune rounds, training stretches with their own cosine learning-rate schedules, a final QAT
stretch -- and :func:`run_job` executes them with a progress bar, writing a resumable
``OUTPUT.partial`` every ``checkpoint_every`` steps and at every phase end. A run interrupted
at any point and started again with ``resume=True`` continues from the last partial
checkpoint and produces the same result: batches, augmentation and masks depend only on the
seed and the position in the plan.

At the end the masks are squashed (pruned weights exactly 0), the model is measured on the
test set in float and in int8 -- through the integer reference
(:class:`~tilewright.sw.prune.int8.Int8Network`) after QAT, or after post-training
calibration when no QAT was asked for -- and the checkpoint of
:mod:`tilewright.sw.prune.checkpoint` is written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .data import Dataset, open_data
from .dropback import DropbackSparsifier
from .int8 import Int8Error, Int8Network, evaluate_int8
from .models import arch_record, build_model
from .options import PRUNE_METHODS, TRAIN_METHODS
from .patterns import BlockPattern, NMPattern, Pattern, pattern_from_dict
from .qat import calibrate, prepare_qat, quant_params
from .schedule import CubicSL, IterativeSL, iterative_levels
from .sparsifier import MaskError, PatternSparsifier, format_report

__all__ = ["Job", "Phase", "RunOptions", "float_path", "plan", "run_job"]

PARTIAL_FORMAT = "tilewright-partial/1"


@dataclass
class Job:
    """Everything that determines a run's result (checked again on resume).

    Attributes
    ----------
    command : str
        ``"train"`` or ``"prune"``.
    method : str
        train: ``dense``, ``dropback``, ``gradual``; prune: ``oneshot``, ``iterative``,
        ``gradual``.
    output : str
        Checkpoint path.
    arch : dict or None
        Architecture record (train, or prune of an untrained torchvision model).
    source : str or None
        prune: the checkpoint to start from.
    data : str or None
        Data spec (:func:`~tilewright.sw.prune.data.open_data`); None: no training or
        measurement (prune only, with ``epochs == 0``).
    pattern : dict
        ``pattern.as_dict()``.
    sparsity : float
        Target sparsity (every layer, or the global one).
    layer_sparsity : dict or None
        ``{layer: sparsity}`` (per-layer targets; overrides ``sparsity``).
    keep_rows : bool or None
        Every block row keeps a block; ``None``: on for Dropback, off otherwise.
    epochs : float
        train: training epochs; oneshot/gradual: fine-tune epochs; iterative: extra fine-tune
        epochs after the last round.
    """

    command: str
    method: str
    output: str
    arch: dict[str, Any] | None = None
    source: str | None = None
    data: str | None = "fashion-mnist"
    pattern: dict[str, Any] = field(default_factory=lambda: BlockPattern().as_dict())
    sparsity: float = 0.5
    layer_sparsity: dict[str, float] | None = None
    score: str = "l2"
    ranking: str = "layer"
    pad: str = "pad"
    dense_first_conv: bool = True
    keep_rows: bool | None = None
    epochs: float = 10.0
    epochs_per_round: float = 1.0
    round_fraction: float = 0.2
    prune_every: int = 50
    gradual_start: float = 0.0
    gradual_end: float = 0.7
    decay: float = 0.9
    decay_every: int = 10
    zero_below: float = 1e-3
    qat_epochs: float = 0.0
    qat_lr: float = 0.002
    int8_eval: bool = True
    lr: float = 0.1
    ft_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    seed: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    calib_batches: int = 10
    augment: bool = True

    def check(self) -> None:
        """Raise ``ValueError`` naming the field for an impossible combination."""
        methods = TRAIN_METHODS if self.command == "train" else PRUNE_METHODS
        if self.command not in ("train", "prune"):
            raise ValueError(f"command must be 'train' or 'prune', not {self.command!r}")
        if self.method not in methods:
            raise ValueError(f"{self.command} method must be one of {', '.join(methods)}, not "
                             f"{self.method!r}")
        if self.command == "train" and self.arch is None:
            raise ValueError("train needs an arch")
        if self.command == "prune" and (self.source is None) == (self.arch is None):
            raise ValueError("prune needs exactly one of a source checkpoint or an arch")
        pattern = pattern_from_dict(self.pattern)
        if isinstance(pattern, NMPattern) and self.method in ("iterative", "dropback"):
            raise ValueError(f"method {self.method!r} needs a block or unstructured pattern, "
                             f"not {pattern}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), not {self.sparsity!r}")
        for name in ("epochs", "epochs_per_round", "qat_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)!r}")
        if self.data is None and (self.epochs > 0 or self.qat_epochs > 0
                                  or self.method in ("iterative", "gradual")
                                  or self.command == "train"):
            raise ValueError("training needs data: give a data spec (e.g. fashion-mnist), or "
                             "prune one-shot with 0 epochs")
        if not 0.0 <= self.gradual_start < self.gradual_end <= 1.0:
            raise ValueError(f"need 0 <= gradual_start < gradual_end <= 1, not "
                             f"{self.gradual_start!r}, {self.gradual_end!r}")
        if self.prune_every < 1:
            raise ValueError(f"prune_every must be >= 1, not {self.prune_every!r}")


@dataclass
class RunOptions:
    """How to run a job (does not change its result).

    Attributes
    ----------
    device : str
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda"``.
    threads : int or None
        ``torch.set_num_threads``.
    checkpoint_every : int
        Steps between partial checkpoints.
    resume : bool
        Continue from ``OUTPUT.partial``.
    progress : bool
        tqdm progress bars.
    log : callable
        Where status lines go.
    stop_after : int or None
        Stop (as if interrupted) after this many optimiser steps of this invocation; for tests.
    time_steps : int
        Time ``sparsifier.step()`` this many times per prune round (the mean is reported;
        masks only lose groups, so repeating a step at the same level changes nothing).
    """

    device: str = "auto"
    threads: int | None = None
    checkpoint_every: int = 200
    resume: bool = False
    progress: bool = True
    log: Callable[[str], None] = print
    stop_after: int | None = None
    time_steps: int = 1


@dataclass
class Phase:
    """One stretch of a run: a prune round, a training stretch or the QAT stretch."""

    name: str
    kind: str                      # "prune" | "train" | "qat"
    steps: int = 0
    lr: float = 0.0
    warmup: int = 0
    dropback: bool = False
    gradual: bool = False


class Interrupted(Exception):
    """Raised by ``RunOptions.stop_after``; the partial checkpoint is on disk."""


def plan(job: Job, steps_per_epoch: int, rounds: int = 0) -> list[Phase]:
    """The phases of ``job`` (``rounds``: of the iterative schedule)."""
    def n(epochs: float) -> int:
        return round(epochs * steps_per_epoch)
    ph: list[Phase] = []
    if job.command == "train":
        ph.append(Phase("train", "train", n(job.epochs), job.lr, n(job.warmup_epochs),
                        dropback=job.method == "dropback", gradual=job.method == "gradual"))
    elif job.method == "oneshot":
        ph.append(Phase("prune", "prune"))
        if job.epochs > 0:
            ph.append(Phase("finetune", "train", n(job.epochs), job.ft_lr))
    elif job.method == "iterative":
        for r in range(rounds):
            ph.append(Phase(f"prune round {r + 1}/{rounds}", "prune"))
            ph.append(Phase(f"finetune round {r + 1}/{rounds}", "train",
                            n(job.epochs_per_round), job.ft_lr))
        if job.epochs > 0:
            ph.append(Phase("finetune", "train", n(job.epochs), job.ft_lr))
    else:
        ph.append(Phase("finetune", "train", n(job.epochs), job.ft_lr, gradual=True))
    if job.qat_epochs > 0:
        ph.append(Phase("qat", "qat", n(job.qat_epochs), job.qat_lr))
    return [p for p in ph if p.kind != "train" or p.steps > 0]


def _cosine(step: int, total: int, base: float, warmup: int) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available; accepted: "
                         f"auto, cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device) -> float:
    """Top-1 accuracy of ``model`` over a loader's epoch 0."""
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader.epoch(0):
        out = model(x.to(device))
        correct += int((out.argmax(1).cpu() == y).sum())
        total += int(y.numel())
    model.train(was)
    return correct / total if total else 0.0


def _optimizer(model: nn.Module, job: Job, lr: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    return torch.optim.SGD([{"params": decay, "weight_decay": job.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=job.momentum, nesterov=job.momentum > 0)


# The run state --------------------------------------------------------------------------------

class _Run:
    """Mutable state of one run (what a partial checkpoint holds)."""

    def __init__(self, job: Job, opts: RunOptions) -> None:
        self.job, self.opts = job, opts
        self.device = _device(opts.device)
        self.pattern: Pattern = pattern_from_dict(job.pattern)
        self.partial_path = Path(job.output + ".partial")
        self.phase = 0
        self.phase_step = 0
        self.form = "float"
        self.kind: str | None = None          # "pattern" | "dropback" | "frozen" | None
        self.sparsifier: PatternSparsifier | DropbackSparsifier | None = None
        self.schedule: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.train_seconds = 0.0
        self.history: list[dict[str, Any]] = []
        self.source_ckpt: dict[str, Any] | None = None
        self.steps_this_call = 0
        self.data: Dataset | None = None
        self.model: nn.Module = nn.Identity()
        self.arch: dict[str, Any] = {}

    # model construction ---------------------------------------------------------------------
    def base_model(self) -> nn.Module:
        """The float model the run starts from (fresh init or the source checkpoint)."""
        job = self.job
        torch.manual_seed(job.seed)
        if job.source is not None:
            model, ck = load_checkpoint(job.source)
            if (ck.get("quant") or {}).get("form") == "qat":
                raise CheckpointError(f"{job.source}: a QAT checkpoint; prune a float "
                                      f"checkpoint (one written without --qat-epochs)")
            self.source_ckpt = ck
            self.arch = ck["arch"]
            return model.train()
        assert job.arch is not None
        self.arch = dict(job.arch)
        name = self.arch["name"]
        if self.data is not None and ":" not in name:
            # a network named here gets the data set's classes (and channels) unless given
            kw = dict(self.arch.get("kwargs") or {})
            kw.setdefault("num_classes", self.data.num_classes)
            if name == "fmnist-resnet":
                kw.setdefault("in_channels", self.data.in_channels)
            self.arch = arch_record(name, kw)
        return build_model(self.arch)

    def layer_config(self) -> dict[str, float] | None:
        return dict(self.job.layer_sparsity) if self.job.layer_sparsity else None

    def new_sparsifier(self) -> None:
        """Prepare the sparsifier (and schedule) of the job's method on ``self.model``."""
        job = self.job
        if job.method == "dense":
            self.kind = None
            return
        if job.method == "dropback":
            sp: Any = DropbackSparsifier(self.pattern, job.sparsity, job.score, job.decay,
                                         job.decay_every, job.zero_below, job.ranking,
                                         job.dense_first_conv, job.pad,
                                         keep_rows=job.keep_rows is not False)
            sp.prepare(self.model, self.layer_config())
            self.kind, self.sparsifier = "dropback", sp
            return
        level = (self.pattern.sparsity if isinstance(self.pattern, NMPattern)
                 else job.sparsity)
        sp = PatternSparsifier(self.pattern, level, job.score, job.ranking,
                               job.dense_first_conv, job.pad, keep_rows=bool(job.keep_rows))
        sp.prepare(self.model, self.layer_config())
        self.kind, self.sparsifier = "pattern", sp
        if job.method == "iterative":
            self.schedule = IterativeSL(sp, job.round_fraction)
        elif job.method == "gradual":
            self.schedule = CubicSL(sp, init_sl=0.0, init_t=0, delta_t=1,
                                    total_t=max(1, self._gradual_events() - 1))

    def _gradual_events(self) -> int:
        ph = next((p for p in self.phases if p.gradual), None)
        if ph is None:
            return 1
        lo, hi = self._gradual_window(ph)
        return max(1, len(range(lo, hi + 1, self.job.prune_every)))

    def _gradual_window(self, ph: Phase) -> tuple[int, int]:
        return (int(self.job.gradual_start * ph.steps),
                max(int(self.job.gradual_start * ph.steps),
                    int(self.job.gradual_end * ph.steps) - 1))

    def _frozen(self, masks: dict[str, torch.Tensor], dense: dict[str, str],
                padded: dict[str, str]) -> None:
        self.sparsifier = (PatternSparsifier.from_masks(self.model, masks, self.pattern,
                                                        dense, padded) if masks else None)
        self.kind = "frozen" if masks else None
        self.schedule = None

    def _squash(self) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
        sp = self.sparsifier
        if sp is None:
            return {}, {}, {}
        out = (sp.masks(), dict(sp.dense_layers), dict(sp.padded_layers))
        sp.squash_mask()
        return out

    def freeze_masks(self) -> None:
        """Replace the sparsifier by a frozen one holding its final masks (after squash)."""
        if self.sparsifier is not None:
            self._frozen(*self._squash())

    def to_qat(self) -> None:
        """Switch the model to its QAT form, keeping the masks (frozen).

        The float model (masks squashed) is saved first as ``OUTPUT.float.pt``: the starting
        point for pruning a QAT'd run's network further.
        """
        kept = self._squash()
        if self.job.output:
            top = [e["top1"] for e in self.history if "top1" in e]
            metrics = {"train_seconds": self.train_seconds}
            if top:
                metrics["top1_fp32"] = top[-1]
            save_checkpoint(float_path(self.job.output),
                            _assemble(self, *kept, metrics=metrics, quant=None))
        self.model = prepare_qat(self.model.to(self.device)).to(self.device)
        self._frozen(*kept)
        self.form = "qat"

    # partial checkpoints --------------------------------------------------------------------
    def save_partial(self) -> None:
        save_checkpoint(self.partial_path, {
            "format": PARTIAL_FORMAT, "job": asdict(self.job), "phase": self.phase,
            "phase_step": self.phase_step, "form": self.form, "kind": self.kind,
            "sparsifier": self.sparsifier.state_dict() if self.sparsifier is not None else None,
            "schedule": (self.schedule.state_dict() if self.schedule is not None else None),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "train_seconds": self.train_seconds, "history": self.history})

    def restore(self, part: dict[str, Any]) -> None:
        """Rebuild the model, sparsifier, schedule and optimiser of a partial checkpoint."""
        saved = part.get("job", {})
        mine = asdict(self.job)
        diff = [k for k in mine if k != "output" and saved.get(k) != mine[k]]
        if diff:
            k = diff[0]
            raise CheckpointError(f"{self.partial_path}: was started with {k}="
                                  f"{saved.get(k)!r}, this run has {k}={mine[k]!r}; resume with "
                                  f"the same options or delete the partial checkpoint")
        self.phase, self.phase_step = int(part["phase"]), int(part["phase_step"])
        self.train_seconds = float(part["train_seconds"])
        self.history = list(part["history"])
        kind, form = part["kind"], part["form"]
        sp_state = part["sparsifier"]
        try:
            if form == "qat" or kind == "frozen":
                kept = ({g["tensor_fqn"].removesuffix(".weight"):
                         sp_state["state"][g["tensor_fqn"]]["mask"] for g in sp_state["groups"]}
                        if sp_state else {},
                        dict(sp_state.get("dense_layers", {})) if sp_state else {},
                        dict(sp_state.get("padded_layers", {})) if sp_state else {})
                if form == "qat":
                    self.model = prepare_qat(self.model)
                    self.form = "qat"
                self._frozen(*kept)
            elif kind is not None:
                self.new_sparsifier()
                assert self.sparsifier is not None
                self.sparsifier.load_state_dict(sp_state)
                if self.schedule is not None and part["schedule"] is not None:
                    self.schedule.load_state_dict(part["schedule"])
            self.model.to(self.device)
            self.model.load_state_dict(part["model"])
        except (MaskError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"{self.partial_path}: cannot resume: {e}") from None
        if part["optimizer"] is not None and self.phase < len(self.phases):
            self.optimizer = _optimizer(self.model, self.job, self.phases[self.phase].lr)
            self.optimizer.load_state_dict(part["optimizer"])

    # phases -----------------------------------------------------------------------------------
    phases: list[Phase]

    def log(self, msg: str) -> None:
        self.opts.log(msg)

    def do_prune(self, ph: Phase) -> None:
        sp = self.sparsifier
        assert isinstance(sp, PatternSparsifier)
        reps = max(1, self.opts.time_steps)
        t0 = time.perf_counter()
        for _ in range(reps):
            sp.step()
        dt = (time.perf_counter() - t0) / reps
        s = sp.sparsity()
        mean = sum(s.values()) / len(s) if s else 0.0
        entry = {"phase": ph.name, "step_seconds": dt, "mean_layer_sparsity": mean}
        if self.schedule is not None:
            self.schedule.step()
        if self.data is not None and self.job.epochs + self.job.epochs_per_round > 0:
            entry["top1_after_prune"] = evaluate(self.model, self.data.test, self.device)
        self.history.append(entry)
        extra = (f", test top-1 {entry['top1_after_prune']:.4f} before fine-tuning"
                 if "top1_after_prune" in entry else "")
        self.log(f"[{ph.name}] sparsifier.step() {dt:.3f} s, mean layer sparsity "
                 f"{mean:.4f}{extra}")

    def do_train(self, ph: Phase) -> None:
        from tqdm import tqdm

        assert self.data is not None
        job, model = self.job, self.model
        if self.optimizer is None:
            self.optimizer = _optimizer(model, job, ph.lr)
        opt = self.optimizer
        spe = len(self.data.train)
        model.train()   # in the QAT form: observers follow an EMA (batch norm is folded)
        window = self._gradual_window(ph) if ph.gradual else (0, -1)
        bar = tqdm(total=ph.steps, initial=self.phase_step, desc=ph.name, unit="step",
                   disable=not self.opts.progress, dynamic_ncols=True, mininterval=2.0)
        it = None
        t0 = time.perf_counter()
        run_loss, run_acc = 0.0, 0.0
        try:
            while self.phase_step < ph.steps:
                step = self.phase_step
                epoch, b = divmod(step, spe)
                if it is None or b == 0:
                    it = self.data.train.epoch(self.phase * 100_000 + epoch, start=b)
                x, y = next(it)
                x, y = x.to(self.device), y.to(self.device)
                lr = _cosine(step, ph.steps, ph.lr, ph.warmup)
                for g in opt.param_groups:
                    g["lr"] = lr
                out = model(x)
                loss = F.cross_entropy(out, y, label_smoothing=job.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if ph.dropback:
                    assert isinstance(self.sparsifier, DropbackSparsifier)
                    self.sparsifier.step()
                if ph.gradual and window[0] <= step <= window[1] \
                        and (step - window[0]) % job.prune_every == 0:
                    assert self.sparsifier is not None and self.schedule is not None
                    self.sparsifier.step()
                    self.schedule.step()
                self.phase_step += 1
                self.steps_this_call += 1
                lv = float(loss.detach())
                run_loss = 0.98 * run_loss + 0.02 * lv if step else lv
                acc = float((out.argmax(1) == y).float().mean())
                run_acc = 0.98 * run_acc + 0.02 * acc if step else acc
                bar.update(1)
                if self.phase_step % 20 == 0:
                    post = {"loss": f"{run_loss:.3f}", "acc": f"{run_acc:.3f}",
                            "lr": f"{lr:.4f}"}
                    if isinstance(self.sparsifier, DropbackSparsifier):
                        post["d"] = f"{self.sparsifier.decay_factor:.3g}"
                    bar.set_postfix(post, refresh=False)
                stop = (self.opts.stop_after is not None
                        and self.steps_this_call >= self.opts.stop_after)
                if self.phase_step % self.opts.checkpoint_every == 0 or stop:
                    self.train_seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save_partial()
                    if stop:
                        raise Interrupted(f"stopped after {self.steps_this_call} steps")
        finally:
            bar.close()
        self.train_seconds += time.perf_counter() - t0
        top1 = evaluate(model, self.data.test, self.device)
        entry: dict[str, Any] = {"phase": ph.name, "steps": ph.steps, "top1": top1,
                                 "train_seconds_total": self.train_seconds,
                                 "train_loss": run_loss}
        if isinstance(self.sparsifier, DropbackSparsifier):
            entry["dropback_decay"] = self.sparsifier.decay_factor
            entry["quantile_error_mean"] = self.sparsifier.mean_estimate_error
        self.history.append(entry)
        self.log(f"[{ph.name}] {ph.steps} steps, test top-1 {top1:.4f} "
                 f"({'fake-quant int8' if ph.kind == 'qat' else 'float'}), "
                 f"training time so far {self.train_seconds:.0f} s")

    def phase_end(self, ph: Phase) -> None:
        nxt = self.phases[self.phase + 1] if self.phase + 1 < len(self.phases) else None
        if ph.dropback:
            self.freeze_masks()
        if nxt is not None and nxt.kind == "qat" and self.form == "float":
            if self.history and "top1" in self.history[-1]:
                self.history.append({"phase": "before qat", "top1_fp32": self.history[-1]["top1"]})
            self.to_qat()
            assert self.data is not None
            n = calibrate(self.model, _take(self.data.calib, self.job.calib_batches),
                          self.device)
            self.log(f"[qat] batch norm folded, {n} calibration batches")
        self.optimizer = None
        self.phase += 1
        self.phase_step = 0


def _take(loader: Any, n: int) -> Any:
    for i, b in enumerate(loader.epoch(0)):
        if i >= n:
            return
        yield b


def run_job(job: Job, opts: RunOptions | None = None) -> dict[str, Any]:
    """Run (or resume) a job; returns the checkpoint dict it wrote to ``job.output``.

    Raises
    ------
    ValueError, CheckpointError, DataError, MaskError
        On bad options, data or checkpoints (messages name the field, file or layer).
    Interrupted
        When ``opts.stop_after`` stopped the run (its partial checkpoint is on disk).
    """
    opts = opts or RunOptions()
    job.check()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    r = _Run(job, opts)
    part = None
    if r.partial_path.exists():
        if not opts.resume:
            raise CheckpointError(f"{r.partial_path}: a partial run exists; pass --resume to "
                                  f"continue it, or delete it to start again")
        try:
            part = torch.load(r.partial_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{r.partial_path}: unreadable ({e})") from None
        if not isinstance(part, dict) or part.get("format") != PARTIAL_FORMAT:
            raise CheckpointError(f"{r.partial_path}: not a tilewright partial checkpoint")
    if job.data is not None:
        shape = (job.arch or {}).get("input_shape") or [3, 224, 224]
        if job.source is not None:
            shape = read_checkpoint(job.source)["arch"].get("input_shape") or shape
        r.data = open_data(job.data, job.batch_size, job.seed, job.train_subset,
                           job.test_subset, job.augment,
                           image_size=(int(shape[1]), int(shape[2])))
    r.model = r.base_model().to(r.device)
    spe = len(r.data.train) if r.data is not None else 1
    rounds = 0
    if job.method == "iterative":
        levels = list((job.layer_sparsity or {}).values()) or [job.sparsity]
        rounds = max(len(iterative_levels(s, job.round_fraction)) for s in levels)
    r.phases = plan(job, spe, rounds)
    if part is not None:
        r.restore(part)
        r.log(f"resumed {r.partial_path} at phase {r.phase + 1}/{len(r.phases)}, step "
              f"{r.phase_step}")
    else:
        r.new_sparsifier()
        if r.phases and r.phases[0].kind == "qat":
            r.to_qat()
            assert r.data is not None
            calibrate(r.model, _take(r.data.calib, job.calib_batches), r.device)
    if r.data is not None and not r.history and r.phase == 0 and r.phase_step == 0 \
            and job.command == "prune":
        top = evaluate(r.model, r.data.test, r.device)
        r.history.append({"phase": "start", "top1": top})
        r.log(f"[start] test top-1 {top:.4f} (the source model)")
    while r.phase < len(r.phases):
        ph = r.phases[r.phase]
        if ph.kind == "prune":
            r.do_prune(ph)
        else:
            r.do_train(ph)
        r.phase_end(ph)
        r.save_partial()
    ckpt = _finish(r)
    save_checkpoint(job.output, ckpt)
    if r.partial_path.exists():
        r.partial_path.unlink()
    return ckpt


def _finish(r: _Run) -> dict[str, Any]:
    """Squash, measure (float and int8) and assemble the checkpoint."""
    job = r.job
    masks = r.sparsifier.masks() if r.sparsifier is not None else {}
    reports = r.sparsifier.report(r.model) if r.sparsifier is not None else []
    dense_layers = dict(getattr(r.sparsifier, "dense_layers", {}))
    padded = dict(getattr(r.sparsifier, "padded_layers", {}))
    if r.sparsifier is not None:
        r.sparsifier.squash_mask()
    r.model.eval()
    metrics: dict[str, Any] = {"train_seconds": r.train_seconds}
    before = [e["top1_fp32"] for e in r.history if "top1_fp32" in e]
    if before:
        metrics["top1_fp32"] = before[-1]       # measured just before QAT
    quant: dict[str, Any] | None = None
    if reports:
        r.log(format_report(reports))
    if r.data is not None:
        key = "top1_int8_fakequant" if r.form == "qat" else "top1_fp32"
        metrics[key] = evaluate(r.model, r.data.test, r.device)
        qmodel = r.model
        if r.form == "float" and job.int8_eval:
            qmodel = prepare_qat(r.model)
            calibrate(qmodel, _take(r.data.calib, job.calib_batches), r.device)
            qmodel.eval()
            metrics["top1_int8_fakequant"] = evaluate(qmodel, r.data.test, r.device)
        if r.form == "qat" or job.int8_eval:
            block = (r.pattern.b_out if isinstance(r.pattern, BlockPattern)
                     and r.pattern.b_out == r.pattern.b_in else None)
            quant = quant_params(qmodel)   # type: ignore[arg-type]
            quant["form"] = r.form if r.form == "qat" else "ptq"
            try:
                t0 = time.perf_counter()
                net = Int8Network(qmodel, masks, block)   # type: ignore[arg-type]
                top1, n = evaluate_int8(net, r.data.test.epoch(0))
                metrics["top1_int8"] = top1
                metrics["int8_eval_seconds"] = time.perf_counter() - t0
                metrics["int8_images"] = n
                quant["layers"] = {k: {"s_in": q.s_in, "s_out": q.s_out, "relu": q.relu}
                                   for k, q in net.layers.items()}
            except Int8Error as e:
                r.log(f"int8 evaluation through the integer reference skipped: {e}")
        r.log("results: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in metrics.items()))
    return _assemble(r, masks, dense_layers, padded, metrics, quant)


def float_path(output: str | Path) -> Path:
    """Where a run with QAT also writes its float checkpoint: ``NAME.float.pt``."""
    p = Path(output)
    return p.with_name(p.stem + ".float" + (p.suffix or ".pt"))


def _assemble(r: _Run, masks: dict[str, torch.Tensor], dense_layers: dict[str, str],
              padded: dict[str, str], metrics: dict[str, Any],
              quant: dict[str, Any] | None) -> dict[str, Any]:
    """The checkpoint dict of :mod:`tilewright.sw.prune.checkpoint` (masks squashed)."""
    job = r.job
    state = r.model.state_dict()
    return {
        "format": FORMAT,
        "arch": r.arch,
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "masks": masks,
        "pattern": r.pattern.as_dict(),
        "score": job.score,
        "ranking": job.ranking,
        "sparsity": {n: 1.0 - float(m.sum()) / m.numel() for n, m in masks.items()},
        "dense_layers": dense_layers,
        "padded_layers": padded,
        "quant": quant,
        "data": r.data.record() if r.data is not None else None,
        "metrics": metrics,
        "history": list(r.history),
        "job": asdict(job),
    }
