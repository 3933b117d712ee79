"""Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019, arXiv 1904.06991).

Each feature set approximates its manifold as the union of balls around its points, each ball's radius
being the distance to the point's k-th nearest neighbour within its own set. Precision is the share of
generated points inside the real manifold (are samples realistic?); recall is the share of real points
inside the generated manifold (is the data's variety covered?). A generator that collapses onto a few
modes keeps its precision and loses recall, which is why EVAR reports recall beside the Fréchet distance.
numpy only; distances in float64, computed in row chunks so 50k × 50k sets fit in memory.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_K = 3  # the paper's choice for its main results
_CHUNK = 1024


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    k: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) squared Euclidean distances, clipped at 0 against round-off."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def knn_radii(feats: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
    """Squared distance from every point to its k-th nearest neighbour in the same set (itself excluded)."""
    feats = _as_features(feats, "features")
    if not 1 <= k < len(feats):
        raise ValueError(f"k must be in [1, {len(feats) - 1}] for {len(feats)} points, got {k}")
    radii = np.empty(len(feats))
    for start in range(0, len(feats), _CHUNK):
        d = _squared_distances(feats[start:start + _CHUNK], feats)
        # column k of the sorted row: column 0 is the point itself (distance 0)
        radii[start:start + _CHUNK] = np.partition(d, k, axis=1)[:, k]
    return radii


def coverage_share(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
    """Share of `queries` inside at least one ball (centre `manifold[i]`, squared radius `radii[i]`)."""
    inside = 0
    for start in range(0, len(queries), _CHUNK):
        d = _squared_distances(queries[start:start + _CHUNK], manifold)
        inside += int((d <= radii[None, :]).any(axis=1).sum())
    return inside / len(queries)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = DEFAULT_K) -> PrecisionRecall:
    """Improved precision and recall of `fake` against `real`, both (N, D) feature sets."""
    real, fake = _as_features(real, "real features"), _as_features(fake, "generated features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} (real) vs {fake.shape[1]} (generated)")
    precision = coverage_share(real, knn_radii(real, k), fake)
    recall = coverage_share(fake, knn_radii(fake, k), real)
    return PrecisionRecall(precision, recall, k)


def _as_features(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{what} must be (N, D) with N >= 2, got shape {x.shape}")
    return x
