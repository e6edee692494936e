"""Training data that exists offline: Fashion-MNIST, IDX files and ImageFolder directories.

A data *spec* names a data set (``tilewright train --data SPEC``):

* ``fashion-mnist`` -- the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/``, gzipped IDX; installed by the README's set-up);
  ``fashion-mnist:DIR`` reads the same four files from ``DIR``.
* ``idx:DIR`` -- any MNIST-layout directory: ``train-images-idx3-ubyte[.gz]``,
  ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``,
  ``t10k-labels-idx1-ubyte[.gz]``.
* ``DIR`` -- an ImageFolder tree with ``train/`` and ``val/`` sub-directories (one directory
  per class, ImageNet's layout); images are resized to the model's input size.

In-memory data sets (the first two) are batched by :class:`ArrayLoader`, whose order and
augmentation depend only on ``(seed, epoch, batch)``: a run resumed mid-epoch sees exactly
the batches it would have seen.
"""

from __future__ import annotations

import gzip
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "FASHION_MNIST_DIR",
    "ArrayLoader",
    "DataError",
    "Dataset",
    "FolderLoader",
    "load_idx_split",
    "open_data",
    "read_idx",
]

#: Where the Debian package ``dataset-fashion-mnist`` puts its files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Fashion-MNIST training-set pixel mean and standard deviation (of x/255).
FASHION_MNIST_NORM = ((0.2860,), (0.3530,))
SETUP_HINT = ("run the README set-up (`bash .ci/setup`, which installs Debian's "
              "dataset-fashion-mnist; or `sudo apt-get install dataset-fashion-mnist`)")

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataError(ValueError):
    """A data set is missing or malformed. The message names the file and what is expected."""


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped when its name ends in ``.gz``).

    Raises
    ------
    DataError
        If the file is missing, truncated or not IDX.
    """
    p = Path(path)
    try:
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{p}: no such file") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{p}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{p}: not an IDX file (magic {raw[:4].hex() or 'missing'}; expected "
                        f"00 00 <type> <ndim>)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dt = np.dtype(_IDX_TYPES[raw[2]])
    off = 4 + 4 * ndim
    need = int(np.prod(dims)) * dt.itemsize
    if len(raw) - off != need:
        raise DataError(f"{p}: IDX header promises {dims} ({need} bytes of data), the file has "
                        f"{len(raw) - off}")
    return np.frombuffer(raw, dtype=dt, offset=off).reshape(dims)


def _find(d: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (d / name).is_file():
            return d / name
    raise DataError(f"{d}: no {stem}[.gz]")


def load_idx_split(d: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64 of an MNIST-layout directory.

    Parameters
    ----------
    d : str or Path
        Directory holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
    split : str
        ``"train"`` or ``"test"``.
    """
    d = Path(d)
    stem = {"train": "train", "test": "t10k"}.get(split)
    if stem is None:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    x = read_idx(_find(d, f"{stem}-images-idx3-ubyte"))
    y = read_idx(_find(d, f"{stem}-labels-idx1-ubyte"))
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{d}: {split} images {x.shape} and labels {y.shape} do not pair up "
                        f"(expected (N, H, W) and (N,))")
    return torch.from_numpy(np.array(x, dtype=np.uint8)), torch.from_numpy(y.astype(np.int64))


class Loader(Protocol):
    """What the trainer needs of a batch source."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor,
                                                                   torch.Tensor]]: ...


class ArrayLoader:
    """Batches of an in-memory image set, normalised, optionally augmented.

    Parameters
    ----------
    images : torch.Tensor
        uint8 ``(N, C, H, W)``.
    labels : torch.Tensor
        int64 ``(N,)``.
    batch_size : int
    mean, std : sequence of float
        Per-channel normalisation of ``x / 255``.
    shuffle : bool
        A new order every epoch (from ``seed`` and the epoch).
    augment : bool
        Random shifts of up to ``shift`` pixels (zero fill) and horizontal flips.
    seed : int
    drop_last : bool
        Drop the last partial batch (training).
    shift : int
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], shuffle: bool = False,
                 augment: bool = False, seed: int = 0, drop_last: bool = False,
                 shift: int = 2) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size!r}")
        self.images, self.labels = images, labels
        self.batch_size = int(batch_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.shuffle, self.augment, self.seed = shuffle, augment, int(seed)
        self.drop_last, self.shift = drop_last, int(shift)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _gen(self, *key: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(hash((self.seed, *key)) & 0x7FFF_FFFF_FFFF_FFFF)
        return g

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of epoch ``epoch`` from batch ``start`` on."""
        n = len(self.labels)
        order = (torch.randperm(n, generator=self._gen(epoch)) if self.shuffle
                 else torch.arange(n))
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx].to(torch.float32).div_(255.0)
            if self.augment:
                x = self._augment(x, self._gen(epoch, b))
            yield (x - self.mean) / self.std, self.labels[idx]

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        s = self.shift
        flip = torch.rand(n, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if s <= 0:
            return x
        pad = F.pad(x, (s, s, s, s))
        dy = torch.randint(0, 2 * s + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * s + 1, (n,), generator=g)
        rows = (dy.view(-1, 1) + torch.arange(h).view(1, -1))          # (n, h)
        cols = (dx.view(-1, 1) + torch.arange(w).view(1, -1))          # (n, w)
        ar = torch.arange(n).view(-1, 1, 1)
        return pad.permute(0, 2, 3, 1)[ar, rows.view(n, h, 1), cols.view(n, 1, w)] \
            .permute(0, 3, 1, 2).contiguous()


class FolderLoader:
    """Batches of an ImageFolder directory through a torch ``DataLoader``.

    Parameters
    ----------
    root : Path
        One sub-directory per class.
    batch_size : int
    size : (int, int)
        Model input ``(H, W)``.
    train : bool
        Random resized crops and flips (else resize and centre crop).
    seed : int
    workers : int
    """

    def __init__(self, root: Path, batch_size: int, size: tuple[int, int], train: bool,
                 seed: int = 0, workers: int = 2) -> None:
        from ..vision import load_torchvision

        torchvision = load_torchvision()
        T = torchvision.transforms

        norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        if train:
            tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                            norm])
        else:
            tf = T.Compose([T.Resize(int(size[0] * 8 / 7)), T.CenterCrop(size), T.ToTensor(),
                            norm])
        self.dataset = torchvision.datasets.ImageFolder(str(root), transform=tf)
        self.batch_size, self.train, self.seed, self.workers = batch_size, train, seed, workers

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + epoch)
        dl = torch.utils.data.DataLoader(self.dataset, self.batch_size, shuffle=self.train,
                                         drop_last=self.train, num_workers=self.workers,
                                         generator=g)
        return itertools.islice(iter(dl), start, None)


@dataclass
class Dataset:
    """A data set opened from a spec: loaders and what a model and a checkpoint need.

    Attributes
    ----------
    spec : str
    train, test : Loader
    calib : Loader
        Unaugmented training batches (calibration, sensitivity scans).
    num_classes, in_channels : int
    image_size : (int, int)
    mean, std : tuple of float
    """

    spec: str
    train: Any
    test: Any
    calib: Any
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...] = field(default=(0.0,))
    std: tuple[float, ...] = field(default=(1.0,))

    def record(self) -> dict[str, Any]:
        """What a checkpoint stores about its data."""
        return {"spec": self.spec, "num_classes": self.num_classes,
                "in_channels": self.in_channels, "image_size": list(self.image_size),
                "mean": list(self.mean), "std": list(self.std)}


def open_data(spec: str, batch_size: int = 128, seed: int = 0, train_subset: int | None = None,
              test_subset: int | None = None, augment: bool = True,
              image_size: tuple[int, int] = (224, 224), eval_batch_size: int = 500) -> Dataset:
    """Open a data set by its spec (see the module docstring).

    Parameters
    ----------
    spec : str
    batch_size : int
        Training batch size.
    seed : int
        Seeds the order and augmentation.
    train_subset, test_subset : int, optional
        Use only the first so many images (a fixed seeded choice for training).
    augment : bool
        Shifts and flips on the training batches.
    image_size : (int, int)
        ImageFolder only: the model's input size.
    eval_batch_size : int

    Raises
    ------
    DataError
        If the files are missing (for Fashion-MNIST the message says to run the README set-up)
        or malformed.
    """
    if spec == "fashion-mnist" or spec.startswith("fashion-mnist:"):
        d = Path(spec.partition(":")[2] or FASHION_MNIST_DIR)
        if not d.is_dir():
            raise DataError(f"Fashion-MNIST not found at {d}; {SETUP_HINT}")
        try:
            xtr, ytr = load_idx_split(d, "train")
            xte, yte = load_idx_split(d, "test")
        except DataError as e:
            raise DataError(f"{e}; {SETUP_HINT}") from None
        mean, std = FASHION_MNIST_NORM
    elif spec.startswith("idx:"):
        d = Path(spec[4:])
        xtr, ytr = load_idx_split(d, "train")
        xte, yte = load_idx_split(d, "test")
        f = xtr.to(torch.float64) / 255.0
        mean = tuple(float(v) for v in f.mean(dim=(0, 2, 3)))
        std = tuple(max(float(v), 1e-6) for v in f.std(dim=(0, 2, 3)))
    else:
        root = Path(spec)
        if not (root / "train").is_dir() or not (root / "val").is_dir():
            raise DataError(f"data spec {spec!r}: not 'fashion-mnist', 'fashion-mnist:DIR', "
                            f"'idx:DIR', nor a directory with train/ and val/ ImageFolder trees")
        tr = FolderLoader(root / "train", batch_size, image_size, True, seed)
        te = FolderLoader(root / "val", eval_batch_size, image_size, False, seed)
        cal = FolderLoader(root / "train", eval_batch_size, image_size, False, seed)
        return Dataset(spec, tr, te, cal, len(tr.dataset.classes), 3, image_size,
                       (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if train_subset is not None:
        g = torch.Generator()
        g.manual_seed(seed)
        pick = torch.randperm(len(ytr), generator=g)[:train_subset]
        xtr, ytr = xtr[pick], ytr[pick]
    if test_subset is not None:
        xte, yte = xte[:test_subset], yte[:test_subset]
    classes = int(max(int(ytr.max()), int(yte.max())) + 1)
    tr = ArrayLoader(xtr, ytr, batch_size, mean, std, shuffle=True, augment=augment,
                     seed=seed, drop_last=True)
    te = ArrayLoader(xte, yte, eval_batch_size, mean, std)
    cal = ArrayLoader(xtr, ytr, eval_batch_size, mean, std, shuffle=True, seed=seed + 1)
    return Dataset(spec, tr, te, cal, classes, int(xtr.shape[1]),
                   (int(xtr.shape[2]), int(xtr.shape[3])), tuple(mean), tuple(std))
