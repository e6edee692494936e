"""Training on real data, checkpoints, resume, QAT and the integer path, the command line.

A tiny ResNet-style network is trained on a few thousand Fashion-MNIST images (the Debian
package ``dataset-fashion-mnist``, installed by the README's set-up) and must beat chance by
a wide margin; it is then pruned, quantised and measured through the integer reference.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tilewright.sw.cli import main
from tilewright.sw.prune.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from tilewright.sw.prune.data import (
    FASHION_MNIST_DIR,
    SETUP_HINT,
    ArrayLoader,
    DataError,
    open_data,
    read_idx,
)
from tilewright.sw.prune.int8 import Int8Network
from tilewright.sw.prune.models import arch_record, fmnist_resnet
from tilewright.sw.prune.patterns import BlockPattern
from tilewright.sw.prune.qat import calibrate, prepare_qat
from tilewright.sw.prune.sparsifier import zero_groups
from tilewright.sw.prune.trainer import Interrupted, Job, RunOptions, float_path, run_job

SEED = 0
TINY = {"widths": [16, 32, 32], "blocks": [1, 1, 1]}
SUBSET = {"train_subset": 3000, "test_subset": 1000, "batch_size": 50, "augment": False}
QUIET = {"progress": False, "log": lambda m: None}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread is fastest and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _need_fashion_mnist() -> None:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST is missing from {FASHION_MNIST_DIR}: {SETUP_HINT}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A dense tiny net trained on 3000 images, then pruned 50 % one-shot + QAT."""
    _need_fashion_mnist()
    d = tmp_path_factory.mktemp("prune")
    dense = Job("train", "dense", str(d / "dense.pt"), arch=arch_record("fmnist-resnet", TINY),
                epochs=4, lr=0.1, seed=SEED, **SUBSET)
    ck_dense = run_job(dense, RunOptions(**QUIET))
    pruned = Job("prune", "oneshot", str(d / "pruned.pt"), source=str(d / "dense.pt"),
                 sparsity=0.5, epochs=1, ft_lr=0.02, qat_epochs=0.5, seed=SEED, **SUBSET)
    ck_pruned = run_job(pruned, RunOptions(**QUIET))
    return {"dir": d, "dense": ck_dense, "pruned": ck_pruned}


# Real data ----------------------------------------------------------------------------------

def test_fashion_mnist_training_beats_chance(runs: dict[str, Any]) -> None:
    m = runs["dense"]["metrics"]
    assert m["top1_fp32"] > 0.65, \
        f"seed {SEED}: 4 epochs on 3000 Fashion-MNIST images reached {m['top1_fp32']:.3f} " \
        f"(chance 0.1)"
    assert m["top1_int8"] > m["top1_fp32"] - 0.03, f"seed {SEED}: post-training int8 {m}"


def test_pruned_qat_checkpoint(runs: dict[str, Any]) -> None:
    ck = runs["pruned"]
    m = ck["metrics"]
    assert m["top1_int8"] > 0.55, f"seed {SEED}: 50 % blocks + QAT int8 top-1 {m}"
    # the fake-quantised model and the integer path agree closely
    assert abs(m["top1_int8"] - m["top1_int8_fakequant"]) <= 0.01, f"seed {SEED}: {m}"
    assert m["int8_images"] == 1000
    assert ck["quant"]["form"] == "qat"
    assert set(ck["quant"]["layers"]) >= set(ck["masks"])
    assert ck["pattern"] == {"kind": "block", "block": [8, 8]}
    assert "stem.0" in ck["dense_layers"] and "fc" in ck["padded_layers"]
    for name, mask in ck["masks"].items():
        assert ck["sparsity"][name] == 0.5, f"seed {SEED}: {name} {ck['sparsity'][name]}"
        w = ck["state_dict"][f"{name}.weight"]
        keep = BlockPattern(8, 8).expand(mask, w.shape)
        assert bool((w[~keep] == 0).all()), f"seed {SEED}: {name} pruned weights not zero"
    assert float_path(runs["dir"] / "pruned.pt").is_file()


def test_checkpoint_round_trip(runs: dict[str, Any]) -> None:
    d = runs["dir"]
    for name in ("dense.pt", "pruned.pt", "pruned.float.pt"):
        model, ck = load_checkpoint(d / name)
        data = open_data("fashion-mnist", test_subset=200, augment=False)
        x, _ = next(data.test.epoch(0))
        y1 = model(x)
        model2, _ = load_checkpoint(d / name)
        assert torch.equal(y1, model2(x)), name
        if ck["quant"] and ck["quant"]["form"] == "qat":
            # the integer path of the reloaded model reproduces the stored accuracy's model
            net = Int8Network(model, ck["masks"], 8)
            assert net.run(x).values.shape == (200, 10)


def test_resume_after_interruption_is_identical(runs: dict[str, Any], tmp_path: Path) -> None:
    src = str(runs["dir"] / "dense.pt")

    def job(out: Path) -> Job:
        return Job("prune", "iterative", str(out), source=src, sparsity=0.5,
                   epochs_per_round=0.1, epochs=0.1, qat_epochs=0.1, round_fraction=0.3,
                   seed=SEED, train_subset=1000, test_subset=200, batch_size=50,
                   augment=True)
    ref = run_job(job(tmp_path / "a.pt"), RunOptions(checkpoint_every=5, **QUIET))
    stops = 0
    while True:
        try:
            got = run_job(job(tmp_path / "b.pt"),
                          RunOptions(checkpoint_every=5, resume=True, stop_after=2, **QUIET))
            break
        except Interrupted:
            stops += 1
            assert (tmp_path / "b.pt.partial").is_file()
    assert stops >= 3, f"seed {SEED}: only {stops} interruptions"
    assert not (tmp_path / "b.pt.partial").exists()
    for k, v in ref["state_dict"].items():
        assert torch.equal(v, got["state_dict"][k]), f"seed {SEED}: {k} differs after resume"
    assert ref["metrics"]["top1_int8"] == got["metrics"]["top1_int8"]
    # a partial run is not silently overwritten, nor resumed with other options
    with pytest.raises(Interrupted):
        run_job(job(tmp_path / "c.pt"), RunOptions(stop_after=2, **QUIET))
    with pytest.raises(CheckpointError, match="--resume"):
        run_job(job(tmp_path / "c.pt"), RunOptions(**QUIET))
    other = job(tmp_path / "c.pt")
    other.sparsity = 0.75
    with pytest.raises(CheckpointError, match=r"sparsity=0\.5"):
        run_job(other, RunOptions(resume=True, **QUIET))


# Bad checkpoints ------------------------------------------------------------------------------

def _corrupt(runs: dict[str, Any], tmp_path: Path, edit: Any) -> Path:
    ck = read_checkpoint(runs["dir"] / "pruned.float.pt")
    edit(ck)
    p = tmp_path / "bad.pt"
    save_checkpoint(p, ck)
    return p


@pytest.mark.parametrize("case,match", [
    ("mask_shape", r"layer stages\.1\.0\.conv1: mask shape \(2, 2\).*expected \(4, 2\)"),
    ("no_layer", r"layer stages\.7\.conv: has a mask but the model"),
    ("not_conv", r"layer stages\.0\.0\.bn1: has a mask but the model.*BatchNorm2d"),
    ("nonzero", r"layer stages\.2\.0\.conv2: \d+ weights are non-zero inside pruned groups"),
    ("sparsity", r"layer fc: sparsity says"),
    ("missing", r"missing masks"),
    ("nm", r"layer stages\.0\.0\.conv1: mask shape .* 2:4 pattern"),
    ("arch", r"stages\.0\.0\.conv1: weight \(16, 16, 3, 3\) in the checkpoint, \(8, 8, 3, 3\)"),
    ("dtype", r"layer fc: mask dtype must be torch.bool"),
])
def test_bad_checkpoints_name_the_layer(runs: dict[str, Any], tmp_path: Path, case: str,
                                        match: str) -> None:
    def edit(ck: dict[str, Any]) -> None:
        if case == "mask_shape":
            ck["masks"]["stages.1.0.conv1"] = torch.ones(2, 2, dtype=torch.bool)
        elif case == "no_layer":
            ck["masks"]["stages.7.conv"] = torch.ones(2, 2, dtype=torch.bool)
            ck["sparsity"]["stages.7.conv"] = 0.0
        elif case == "not_conv":
            ck["masks"]["stages.0.0.bn1"] = torch.ones(2, 2, dtype=torch.bool)
        elif case == "nonzero":
            w = ck["state_dict"]["stages.2.0.conv2.weight"]
            keep = BlockPattern(8, 8).expand(ck["masks"]["stages.2.0.conv2"], w.shape)
            w[~keep] = 0.5
        elif case == "sparsity":
            ck["sparsity"]["fc"] = 0.1
        elif case == "missing":
            del ck["masks"]
        elif case == "nm":
            ck["pattern"] = {"kind": "nm", "n": 2, "m": 4}
        elif case == "arch":
            ck["arch"]["kwargs"]["widths"] = [8, 16, 32]
        elif case == "dtype":
            ck["masks"]["fc"] = ck["masks"]["fc"].to(torch.uint8)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(_corrupt(runs, tmp_path, edit))


def test_sparsifier_resume_rejects_foreign_masks(runs: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


# QAT and the integer path ---------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_int8_path_matches_fake_quant(seed: int) -> None:
    torch.manual_seed(seed)
    m = fmnist_resnet(widths=(8, 16, 16))
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    x = torch.randn(32, 1, 28, 28)
    gm = prepare_qat(m).double()
    calibrate(gm, [x.double()])
    gm.eval()
    fq = gm(x.double()).detach()
    out = Int8Network(gm).run(x)
    diff = (out.values.double() * out.scale - fq).abs() / out.scale
    # equal but for the int16 operand multipliers of residual additions (a 2**-15 error)
    assert float(diff.max()) <= 4.0 + 1e-6, f"seed {seed}: max {float(diff.max())} LSB"
    assert float((diff > 1e-6).float().mean()) < 0.2, f"seed {seed}: {diff.gt(0).sum()}"


# Data -----------------------------------------------------------------------------------------

def test_idx_reader(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw + arr.tobytes()))
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "b").write_bytes(raw + arr.tobytes()[:-1])
    with pytest.raises(DataError, match="promises"):
        read_idx(tmp_path / "b")
    with pytest.raises(DataError, match="README set-up"):
        open_data(f"fashion-mnist:{tmp_path / 'missing'}")
    with pytest.raises(DataError, match="ImageFolder"):
        open_data(str(tmp_path))


def test_loader_resumes_mid_epoch() -> None:
    g = torch.Generator().manual_seed(SEED)
    x = torch.randint(0, 256, (103, 1, 6, 6), dtype=torch.uint8, generator=g)
    y = torch.arange(103)
    ld = ArrayLoader(x, y, 10, (0.5,), (0.25,), shuffle=True, augment=True, seed=SEED,
                     drop_last=True)
    full = list(ld.epoch(3))
    tail = list(ld.epoch(3, start=4))
    assert len(full) == 10 and len(tail) == 6
    for (a, ya), (b, yb) in zip(full[4:], tail, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(full[0][1], next(ld.epoch(4))[1])


# Command line ---------------------------------------------------------------------------------

def test_cli_prune_and_errors(runs: dict[str, Any], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    src = str(runs["dir"] / "dense.pt")
    out = tmp_path / "p.pt"
    rc = main(["prune", src, "--data", "none", "--sparsity", "0.75", "--overlay", "tiny-1x1",
               "--no-progress", "--threads", "1", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "pattern check: 9/9 pruned layers carry the 4x4 blocks pattern" in text
    ck = read_checkpoint(out)
    assert ck["pattern"]["block"] == [4, 4]
    assert all(s == 0.75 for s in ck["sparsity"].values())
    assert main(["prune", src, "--pattern", "8by8", "-o", str(out)]) == 2
    assert "accepted" in capsys.readouterr().err
    assert main(["prune", src, "--pattern", "2:4", "--overlay", "tiny-1x1",
                 "-o", str(out)]) == 2
    assert "contradicts --overlay" in capsys.readouterr().err
    assert main(["train", "--data", f"fashion-mnist:{tmp_path}/none", "-o", str(out)]) == 2
    assert "README set-up" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "missing.pt"), "-o", str(out)]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_gradual_training_reaches_target(tmp_path: Path) -> None:
    _need_fashion_mnist()
    job = Job("train", "gradual", str(tmp_path / "g.pt"), arch=arch_record("fmnist-resnet", TINY),
              sparsity=0.6, epochs=1, prune_every=2, seed=SEED, int8_eval=False,
              train_subset=1000, test_subset=200, batch_size=50, augment=False)
    ck = run_job(job, RunOptions(**QUIET))
    assert ck["quant"] is None and "top1_fp32" in ck["metrics"]
    for name, mask in ck["masks"].items():
        want = zero_groups(0.6, mask.numel())
        assert int((~mask).sum()) == want, f"seed {SEED}: {name} {int((~mask).sum())} != {want}"
