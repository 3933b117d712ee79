"""Sample quality for digit generators: class accuracy and a Fréchet distance in classifier space.

The Fréchet distance is FID's formula with EVAR's digit classifier in place of Inception. Its
absolute value means little on its own, so every report carries `real_data_floor`: the score
real training digits get against the same reference, with as many of them as there are samples.
That matters: a Fréchet distance from n samples is biased upwards by roughly tr(covariance)/n, so 500 real
digits score about 43 where all 1,347 score 26, and a floor at another count flatters or blames the model.
Precision and recall have their own count dependence, so the report carries their real-digit values too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evar.data import from_uint8_nhwc, load_digits
from evar.eval.classifier import DEFAULT_PATH, IMAGE_SIZE, NUM_CLASSES, DigitClassifier, load_classifier, run_classifier
from evar.eval.manifold import DEFAULT_K, precision_recall

REFERENCE = "digits:test"

GaussianStats = tuple[np.ndarray, np.ndarray]  # mean (D,), covariance (D, D), float64


def gaussian_stats(feats: np.ndarray) -> GaussianStats:
    """Mean and (unbiased) covariance of an (N, D) feature set, in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {feats.shape}")
    if len(feats) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(feats)}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix; rounding's tiny negative eigenvalues become 0."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(a: GaussianStats, b: GaussianStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b).

    S_a S_b is not symmetric, but it is similar to sqrt(S_a) S_b sqrt(S_a), which is symmetric
    PSD, so the trace of its square root is the sum of square roots of eigh's eigenvalues.
    That avoids scipy's sqrtm and its complex-valued round-off on near-singular covariances.
    """
    (mu_a, s_a), (mu_b, s_b) = a, b
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    root_a = _psd_sqrt(s_a)
    middle = root_a @ s_b @ root_a
    middle = (middle + middle.T) / 2.0  # re-symmetrize what round-off broke
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum()
    diff = mu_a - mu_b
    distance = diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_sqrt
    return float(max(distance, 0.0))  # identical sets can land a hair below zero


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance_from_stats(gaussian_stats(feats_a), gaussian_stats(feats_b))


@dataclass
class QualityReport:
    """How good a batch of generated digits is; `per_class_accuracy[c]` is None if c wasn't asked for."""

    n_samples: int
    class_accuracy: float  # fraction 0..1 of samples classified as their requested label
    frechet_distance: float  # vs the `reference` split, in classifier feature space
    reference: str
    per_class_accuracy: list[float | None]
    real_data_floor: float  # Fréchet distance of min(n_samples, 1347) real 'train' digits vs 'test' (subset mean)
    # Improved precision / recall (k-NN manifolds, `evar.eval.manifold`) against the same reference:
    # recall is the share of real digits the samples' manifold covers, so a loss of diversity shows.
    # None with fewer than k + 1 samples (no k-th neighbour).
    precision: float | None = None
    recall: float | None = None
    k: int = DEFAULT_K
    # What the same number of real training digits score (the ceiling for precision and recall).
    real_data_precision: float | None = None
    real_data_recall: float | None = None
    real_data_samples: int = 0  # how many real digits each floor subset has

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Reference:
    test: GaussianStats
    real_data_floor: float  # all training digits
    test_feats: np.ndarray  # (N, D) float64, for precision / recall
    train_feats: np.ndarray  # (N, D) float64, for the floor at a sample count


@dataclass(frozen=True)
class RealBaseline:
    """What `samples` real training digits score against the reference: mean over `subsets` random draws."""

    samples: int
    subsets: int
    frechet_distance: float
    precision: float | None
    recall: float | None


FLOOR_SUBSETS = 8  # enough for the subset mean to move by well under 1 between seeds of the draw


def _compute_reference(classifier: DigitClassifier) -> _Reference:
    train_feats, _ = run_classifier(classifier, load_digits("train", IMAGE_SIZE)[0])
    test_feats, _ = run_classifier(classifier, load_digits("test", IMAGE_SIZE)[0])
    test = gaussian_stats(test_feats.numpy())
    floor = frechet_distance_from_stats(gaussian_stats(train_feats.numpy()), test)
    return _Reference(test=test, real_data_floor=floor, test_feats=test_feats.numpy().astype(np.float64),
                      train_feats=train_feats.numpy().astype(np.float64))


def _subset_baseline(reference: _Reference, feats: np.ndarray, n: int) -> RealBaseline:
    """How n of `feats` score against the reference: all of them once if n covers them, else seeded subsets."""
    total = len(feats)
    if n >= total:
        picks = [np.arange(total)]
    else:
        rng = np.random.default_rng(0)
        picks = [rng.choice(total, size=n, replace=False) for _ in range(FLOOR_SUBSETS)]
    fds, prs = [], []
    for pick in picks:
        subset = feats[pick]
        fds.append(frechet_distance_from_stats(gaussian_stats(subset), reference.test))
        if len(pick) > DEFAULT_K:
            prs.append(precision_recall(reference.test_feats, subset))
    mean = (lambda xs: float(np.mean(xs))) if prs else (lambda xs: None)
    return RealBaseline(samples=min(n, total), subsets=len(picks), frechet_distance=float(np.mean(fds)),
                        precision=mean([p.precision for p in prs]), recall=mean([p.recall for p in prs]))


def _real_baseline(reference: _Reference, n: int) -> RealBaseline:
    """The real-data floor at n samples: n ≥ the training split uses all of it once, else seeded subsets."""
    return _subset_baseline(reference, reference.train_feats, n)


def images_baseline(images: torch.Tensor, n: int) -> RealBaseline:
    """The same subset protocol for other real images (N, 3, 16, 16) in [-1, 1], e.g. augmented training digits."""
    classifier, reference = _classifier_and_reference(None)
    feats = run_classifier(classifier, images)[0].numpy().astype(np.float64)
    return _subset_baseline(reference, feats, n)


@lru_cache(maxsize=16)
def _default_real_baseline(path: str, mtime_ns: int, n: int) -> RealBaseline:
    return _real_baseline(_default_classifier_and_reference(path, mtime_ns)[1], n)


def real_data_baseline(n: int, classifier: DigitClassifier | None = None) -> RealBaseline:
    """Fréchet distance, precision and recall of n real training digits against the held-out reference."""
    if n < 2:
        raise ValueError(f"need at least 2 digits for a covariance, got {n}")
    if classifier is not None:
        return _real_baseline(_classifier_and_reference(classifier)[1], n)
    path = Path(DEFAULT_PATH)
    return _default_real_baseline(str(path), path.stat().st_mtime_ns if path.is_file() else 0, n)


@lru_cache(maxsize=4)
def _default_classifier_and_reference(path: str, mtime_ns: int) -> tuple[DigitClassifier, _Reference]:
    # Keyed by mtime so that retraining the asset in a live session is picked up, not shadowed.
    classifier = load_classifier(path)
    return classifier, _compute_reference(classifier)


def _classifier_and_reference(classifier: DigitClassifier | None) -> tuple[DigitClassifier, _Reference]:
    if classifier is not None:
        # A caller's module may change between calls, so its reference is never cached.
        return classifier, _compute_reference(classifier)
    path = Path(DEFAULT_PATH)
    mtime = path.stat().st_mtime_ns if path.is_file() else 0
    return _default_classifier_and_reference(str(path), mtime)


def _check_inputs(images: np.ndarray, labels: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got dtype {images.dtype}")
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    if len(images) < 2:
        raise ValueError("need at least 2 images: the Fréchet distance fits a covariance")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"need one label per image: {len(images)} images, labels of shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels must lie in 0..{NUM_CLASSES - 1}, got {labels.min()}..{labels.max()}")


def _to_classifier_input(images: np.ndarray) -> torch.Tensor:
    x = from_uint8_nhwc(images)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        # antialias matters only when shrinking: without it bilinear samples just 4 pixels of
        # each output's footprint and a 256px digit would come out as aliased speckle.
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


def _per_class_accuracy(correct: np.ndarray, labels: np.ndarray) -> list[float | None]:
    return [float(correct[labels == c].mean()) if (labels == c).any() else None for c in range(NUM_CLASSES)]


def evaluate_digits(
    images_uint8_nhwc: np.ndarray, labels: np.ndarray, classifier: DigitClassifier | None = None
) -> QualityReport:
    """Score generated digits (uint8 (N, H, W, 3), any H, W) against the labels they were asked for.

    `classifier` defaults to the shipped one; the Fréchet distance is measured against the
    digits 'test' split. At least 2 images are needed (a covariance needs two points).
    """
    images = np.asarray(images_uint8_nhwc)
    labels = np.asarray(labels)
    _check_inputs(images, labels)
    custom = classifier is not None
    classifier, reference = _classifier_and_reference(classifier)
    real = _real_baseline(reference, len(images)) if custom else real_data_baseline(len(images))
    feats, logits = run_classifier(classifier, _to_classifier_input(images))
    correct = (logits.argmax(1).numpy() == labels)
    pr = precision_recall(reference.test_feats, feats.numpy()) if len(images) > DEFAULT_K else None
    return QualityReport(
        n_samples=len(images),
        class_accuracy=float(correct.mean()),
        frechet_distance=frechet_distance_from_stats(gaussian_stats(feats.numpy()), reference.test),
        reference=REFERENCE,
        per_class_accuracy=_per_class_accuracy(correct, labels),
        real_data_floor=real.frechet_distance,
        precision=pr.precision if pr else None,
        recall=pr.recall if pr else None,
        real_data_precision=real.precision,
        real_data_recall=real.recall,
        real_data_samples=real.samples,
    )
