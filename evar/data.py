"""Image data for EVAR: the scikit-learn digits set, image folders, and minibatching.

Model code sees float32 tensors (N, 3, H, W) in [-1, 1]; files and npz archives hold uint8
(N, H, W, 3). The two converters below are the only place that knows both layouts.
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

DigitsSplit = Literal["train", "test", "all"]
DIGITS_SPLITS: tuple[str, ...] = ("train", "test", "all")
DIGITS_TEST_SIZE = 0.25
DIGITS_SPLIT_SEED = 0
DIGITS_MAX_VALUE = 16.0  # sklearn digits are 4-bit intensities, 0..16 inclusive

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})


# ---------------------------------------------------------------------------------------------
# Layout conversion


def to_uint8_nhwc(x: Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8. Out-of-range values are clamped."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
    # NaN (a diverged decoder) → -1 (black), explicitly: a cast of NaN to uint8 is undefined; EVARKit does the same
    scaled = (x.detach().float().nan_to_num(nan=-1.0).clamp(-1.0, 1.0) + 1.0) * 127.5
    return scaled.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8_nhwc(a: np.ndarray) -> Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]; exact inverse of `to_uint8_nhwc`."""
    a = np.asarray(a)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got dtype {a.dtype}")
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # e.g. np.asarray(PIL image); torch warns on read-only memory
        a = a.copy()
    x = torch.from_numpy(a).permute(0, 3, 1, 2).float()
    return (x / 127.5 - 1.0).contiguous()


# ---------------------------------------------------------------------------------------------
# scikit-learn digits


@lru_cache(maxsize=8)
def _digits_arrays(size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All 1797 digits at `size`, their labels, and the train/test index sets.

    Cached because training, calibration and evaluation all ask for the same arrays; callers
    receive indexed copies, so nobody can corrupt the cache by writing into a result.
    """
    # Imported here so that importing evar.data stays cheap for code that never uses digits.
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    gray = torch.from_numpy(bunch.images.astype(np.float32))[:, None]  # (N, 1, 8, 8)
    gray = gray / DIGITS_MAX_VALUE * 2.0 - 1.0
    if gray.shape[-1] != size:
        gray = F.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    images = gray.expand(-1, 3, -1, -1).contiguous()  # (N, 3, size, size)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_SIZE,
        random_state=DIGITS_SPLIT_SEED,
        stratify=bunch.target,
    )
    return images, labels, torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))


def load_digits(split: str, size: int = 16) -> tuple[Tensor, Tensor]:
    """Digits as ((N, 3, size, size) float32 in [-1, 1], (N,) int64 labels).

    'train' (1347) and 'test' (450) are a fixed stratified 75/25 split; 'all' is both (1797).
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {', '.join(DIGITS_SPLITS)}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    images, labels, train_idx, test_idx = _digits_arrays(size)
    if split == "all":
        idx = torch.arange(len(labels))
    else:
        idx = train_idx if split == "train" else test_idx
    return images[idx], labels[idx]


# ---------------------------------------------------------------------------------------------
# Image folders


def _list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_names(root: Path, files: list[Path]) -> list[str] | None:
    """Sorted names of the immediate subfolders holding the images, or None if unlabeled.

    A folder counts as labeled only when no image sits directly in `root`: a mix of loose and
    foldered images has no consistent labeling, so it is treated as one unlabeled class.
    """
    tops = {p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1}
    loose = any(len(p.relative_to(root).parts) == 1 for p in files)
    if loose or not tops:
        return None
    return sorted(tops)


def load_image_file(path: Path, size: int) -> Tensor:
    """One image as (3, size, size) in [-1, 1]: RGB, center-cropped to a square, bicubic resize."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        im = im.resize((size, size), Image.Resampling.BICUBIC)
        pixels = np.asarray(im, dtype=np.uint8)
    return from_uint8_nhwc(pixels[None])[0]


class ImageFolder(Dataset):
    """Every image under `root` (recursive, sorted), yielding ((3, size, size) in [-1, 1], label).

    With images in immediate subfolders, `class_names` are the sorted subfolder names and the
    label is the index of an image's subfolder; otherwise there is one class (`root`'s name).
    """

    def __init__(self, root: str | Path, size: int) -> None:
        self.root = Path(root)
        self.size = size
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.files = _list_images(self.root)
        if not self.files:
            suffixes = "/".join(sorted(IMAGE_SUFFIXES))
            raise FileNotFoundError(f"no images ({suffixes}) under {self.root}")
        names = _class_names(self.root, self.files)
        self.labeled = names is not None
        self.class_names: list[str] = names if names is not None else [self.root.name]
        index = {name: i for i, name in enumerate(self.class_names)}
        self.labels: list[int] = [
            index[p.relative_to(self.root).parts[0]] if self.labeled else 0 for p in self.files
        ]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return load_image_file(self.files[i], self.size), self.labels[i]


# ---------------------------------------------------------------------------------------------
# Entry points used by training and calibration


def load_images(source: str, split: str = "train", size: int = 16) -> tuple[Tensor, Tensor]:
    """Images (N, 3, size, size) in [-1, 1] and int64 labels from 'digits' or an image folder.

    `split` selects the digits split; a folder has no splits, so it always yields all its images.
    """
    if source == "digits":
        return load_digits(split, size)
    folder = ImageFolder(source, size)
    images = torch.stack([folder[i][0] for i in range(len(folder))])
    return images, torch.tensor(folder.labels, dtype=torch.int64)


def batches(
    images: Tensor, labels: Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled (images, labels) minibatches, forever; deterministic given `generator`'s state.

    Indices come from a fresh permutation each epoch and batches run across epoch boundaries,
    so every batch has exactly `batch_size` items (even for a dataset smaller than a batch)
    and every item is seen once per epoch.
    """
    n = len(images)
    if n == 0:
        raise ValueError("cannot batch an empty dataset")
    if len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pending = torch.empty(0, dtype=torch.int64)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        idx, pending = pending[:batch_size], pending[batch_size:]
        yield images[idx], labels[idx]
