"""ImageNet-style scores from Inception features, and the reference files they are measured against.

- FID: the Fréchet distance between Gaussians fitted to pool features (`evar.eval.metrics`), against the
  reference's own `mu`/`sigma` when its file has them (what ADM's evaluator does), else against statistics
  of its features.
- IS (Salimans et al., arXiv 1606.03498): exp(E_x KL(p(y|x) ‖ p(y))) on the 1008-way softmax of the
  bias-free logits, averaged over 10 equal splits (50k samples: splits of 5000, ADM's evaluator's).
- Precision and recall (Kynkäänniemi et al., arXiv 1904.06991): `evar.eval.manifold`, k = 3 on the
  reference's features (ADM computes them from the 10k reference images in its file).

Reference files (`--ref-stats`), npz, read without pickle:
  ADM's VIRTUAL_imagenet256_labeled.npz   `arr_0` uint8 (N, H, W, 3) reference images, `mu`, `sigma`
                                          (+ `mu_s`, `sigma_s` for sFID, not used): FID, precision, recall
  a `mu`/`sigma` file (pytorch-fid's      FID only: without features there is no manifold to test
  --save-stats, clean-fid, …)
  EVAR's --save-ref-stats output          `mu`, `sigma`, `features` float32 (N, 2048), `preprocess`,
                                          `inception_sha256`: FID, precision, recall
Images inside an npz are read a slice at a time (each rank reads only its shards), never all at once.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evar.errors import EvarError
from evar.eval.manifold import DEFAULT_K, precision_recall
from evar.eval.metrics import GaussianStats, frechet_distance_from_stats, gaussian_stats
from evar.files import atomic_write_bytes

IS_SPLITS = 10
IMAGE_KEYS = ("arr_0", "images")  # ADM's reference/sample batches; evar sample's samples.npz


# ---------------------------------------------------------------- Inception Score
def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, std) over `splits` equal consecutive parts of exp(mean KL(p(y|x) ‖ p_part(y)))."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"need (N, classes) logits with N >= {splits}, got shape {logits.shape}")
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    n, scores = len(log_p), []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_marginal = np.log(np.exp(part).mean(axis=0))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------- npz members read in slices
class NpyMember:
    """One array of an .npz, read a row range at a time (seeking inside the zip member)."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_2_0 if version >= (2, 0) else np.lib.format.read_array_header_1_0
            self.shape, fortran, self.dtype = header(f)
            self.offset = f.tell()
        if fortran:
            raise EvarError(f"{path}: '{key}' is stored in Fortran order; re-save it with np.savez")
        if self.dtype.hasobject:
            raise EvarError(f"{path}: '{key}' holds Python objects; only plain arrays are read")

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> np.ndarray:
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        stop = min(stop, len(self))
        with zipfile.ZipFile(self.path) as z, z.open(f"{self.key}.npy") as f:
            f.seek(self.offset + start * row_bytes)
            data = f.read((stop - start) * row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape((stop - start, *self.shape[1:])).copy()


def npz_keys(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as err:
        raise EvarError(f"{path} is not an .npz file ({err})") from None


def image_member(path: Path) -> NpyMember:
    """The uint8 (N, H, W, 3) images of an npz (`arr_0` or `images`), checked without reading them."""
    keys = npz_keys(path)
    key = next((k for k in IMAGE_KEYS if k in keys), None)
    if key is None:
        raise EvarError(f"{path} holds no images: expected an array named {' or '.join(IMAGE_KEYS)}, "
                        f"found {', '.join(keys) or 'nothing'}")
    member = NpyMember(path, key)
    if member.dtype != np.uint8 or len(member.shape) != 4 or member.shape[3] != 3 or not len(member):
        raise EvarError(f"{path}: '{key}' must be uint8 images (N, H, W, 3), got {member.dtype} {member.shape}")
    return member


# ---------------------------------------------------------------- reference files
@dataclass
class Reference:
    """What a --ref-stats file offers. Images are read later (sharded); features/statistics are small."""

    path: Path
    kind: str  # "adm" (images + mu/sigma), "mu-sigma", "features" (EVAR's), "images"
    stats: GaussianStats | None  # from the file; None: computed from the features
    features: np.ndarray | None  # (N, D) float, when the file holds them
    images: NpyMember | None  # reference images to run through the Inception
    made_with: dict[str, str]  # preprocess / inception_sha256 recorded by EVAR, if any

    @property
    def has_manifold(self) -> bool:
        return self.features is not None or self.images is not None

    def describe(self) -> dict[str, Any]:
        n = len(self.features) if self.features is not None else len(self.images) if self.images is not None else None
        return {"path": str(self.path), "kind": self.kind, "reference_images": n,
                "fid_statistics": "from the file (mu, sigma)" if self.stats is not None else "from reference features",
                **({"made_with": self.made_with} if self.made_with else {})}


def read_reference(path: str | Path, pool_dim: int, preprocess: str, inception_sha256: str) -> Reference:
    """Open a reference file and check it fits this Inception (dimension; EVAR files: how they were made)."""
    path = Path(path)
    if not path.is_file():
        raise EvarError(f"reference statistics not found: {path} (ADM's VIRTUAL_imagenet256_labeled.npz, "
                        "a mu/sigma npz, or a file written by --save-ref-stats)")
    keys = npz_keys(path)
    with np.load(path, allow_pickle=False) as z:
        stats = _stats_in(z, keys, path, pool_dim)
        features = _features_in(z, keys, path, pool_dim)
        made_with = {k: str(z[k]) for k in ("preprocess", "inception_sha256") if k in keys}
    images = image_member(path) if any(k in keys for k in IMAGE_KEYS) else None
    if stats is None and features is None and images is None:
        raise EvarError(f"{path} holds neither mu/sigma nor features nor images (found {', '.join(keys) or 'nothing'})")
    n = len(features) if features is not None else len(images) if images is not None else None
    if n is not None and n <= DEFAULT_K:
        raise EvarError(f"{path} holds {n} reference images; precision and recall need more than k = {DEFAULT_K}")
    _check_made_with(path, made_with, preprocess, inception_sha256)
    kind = ("features" if features is not None else "adm" if images is not None and stats is not None
            else "images" if images is not None else "mu-sigma")
    return Reference(path, kind, stats, features, images, made_with)


def _stats_in(z: Any, keys: list[str], path: Path, dim: int) -> GaussianStats | None:
    if "mu" not in keys and "sigma" not in keys:
        return None
    if "mu" not in keys or "sigma" not in keys:
        raise EvarError(f"{path} has {'mu' if 'mu' in keys else 'sigma'} without {'sigma' if 'mu' in keys else 'mu'}")
    mu, sigma = np.asarray(z["mu"], dtype=np.float64), np.asarray(z["sigma"], dtype=np.float64)
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise EvarError(f"{path} holds statistics of dimension {mu.shape[0] if mu.ndim == 1 else mu.shape} "
                        f"(mu {mu.shape}, sigma {sigma.shape}); this Inception's pool features are {dim}-d: "
                        "the file was made with another feature extractor")
    return mu, sigma


def _features_in(z: Any, keys: list[str], path: Path, dim: int) -> np.ndarray | None:
    if "features" not in keys:
        return None
    feats = z["features"]
    if feats.ndim != 2 or feats.shape[1] != dim or len(feats) < 2:
        raise EvarError(f"{path}: 'features' has shape {feats.shape}; this Inception's pool features are {dim}-d "
                        "(and at least 2 are needed)")
    return feats


def _check_made_with(path: Path, made_with: dict[str, str], preprocess: str, inception_sha256: str) -> None:
    if made_with.get("preprocess", preprocess) != preprocess:
        raise EvarError(f"{path} was made with --preprocess {made_with['preprocess']}; this run uses {preprocess}: "
                        "features of different resizing are not comparable")
    if made_with.get("inception_sha256", inception_sha256) != inception_sha256:
        raise EvarError(f"{path} was made with other Inception weights (sha256 {made_with['inception_sha256'][:12]}…) "
                        f"than --inception-weights (sha256 {inception_sha256[:12]}…)")


def write_reference(path: str | Path, features: np.ndarray, preprocess: str, inception_sha256: str) -> None:
    """mu/sigma (readable by pytorch-fid and ADM's evaluator) + the features, for precision/recall later."""
    mu, sigma = gaussian_stats(features)
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, features=np.asarray(features, dtype=np.float32),
             preprocess=np.array(preprocess), inception_sha256=np.array(inception_sha256))
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------- all scores
def score(features: np.ndarray, logits: np.ndarray, reference: Reference | None,
          reference_features: np.ndarray | None, k: int = DEFAULT_K) -> dict[str, Any]:
    """FID, IS (mean ± std over splits), precision and recall; what cannot be computed is None, with why."""
    is_mean, is_std = inception_score(logits)
    out: dict[str, Any] = {"fid": None, "inception_score": is_mean, "inception_score_std": is_std,
                           "is_splits": IS_SPLITS, "precision": None, "recall": None, "k": k,
                           "num_samples": len(features)}
    if reference is None:
        out["not_computed"] = "FID, precision and recall: no --ref-stats given"
        return out
    ref_stats = reference.stats if reference.stats is not None else gaussian_stats(reference_features)
    out["fid"] = frechet_distance_from_stats(gaussian_stats(features), ref_stats)
    if reference_features is None:
        out["not_computed"] = (f"precision and recall: {reference.path.name} holds only mu/sigma; they need reference "
                               "features (ADM's file with its images, or one written by --save-ref-stats)")
        return out
    pr = precision_recall(reference_features, features, k)
    out["precision"], out["recall"] = pr.precision, pr.recall
    return out
