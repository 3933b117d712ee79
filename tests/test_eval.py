from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from evar.data import load_digits, to_uint8_nhwc
from evar.eval.classifier import (
    DEFAULT_PATH,
    DigitClassifier,
    accuracy,
    load_classifier,
    run_classifier,
    train_classifier,
)
from evar.eval.metrics import QualityReport, evaluate_digits, frechet_distance


def _exact_diagonal_samples(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """4 points in 3-D whose sample mean is mu and sample covariance (ddof=1) is diag(sigma^2).

    Columns of a 4x4 Hadamard matrix (minus the constant one) are zero-mean and orthogonal.
    """
    h = np.array([[1, 1, 1], [-1, 1, -1], [1, -1, -1], [-1, -1, 1]], dtype=np.float64)
    return mu + h * np.sqrt(3.0 / 4.0) * sigma


# ---------------------------------------------------------------------------------------------
# frechet_distance


def test_frechet_diagonal_closed_form():
    mu_a, sig_a = np.array([0.0, 1.0, -2.0]), np.array([1.0, 2.0, 0.5])
    mu_b, sig_b = np.array([1.0, 1.0, 0.0]), np.array([3.0, 2.0, 0.1])
    a, b = _exact_diagonal_samples(mu_a, sig_a), _exact_diagonal_samples(mu_b, sig_b)
    assert np.allclose(np.cov(a, rowvar=False), np.diag(sig_a**2))
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((sig_a - sig_b) ** 2)  # 5 + 4 + 0.16
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_general_matches_eigvals_of_product():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 0.5
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # S_a S_b has real non-negative eigenvalues, so tr sqrt(S_a S_b) is the sum of their roots.
    tr_sqrt = np.sqrt(np.linalg.eigvals(s_a @ s_b).real.clip(0)).sum()
    diff = a.mean(0) - b.mean(0)
    expected = diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_identical_and_symmetric():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50, 128)).astype(np.float32)  # rank-deficient covariance: N < D
    b = rng.normal(size=(80, 128)) * 1.5
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    assert frechet_distance(a, b) > 10.0


def test_frechet_bad_inputs():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(5), np.zeros(5))


# ---------------------------------------------------------------------------------------------
# The classifier


def test_classifier_shapes():
    model = DigitClassifier()
    x = torch.zeros(2, 3, 16, 16)
    assert model(x).shape == (2, 10) and model.features(x).shape == (2, 128)


def test_shipped_asset_small_and_accurate():
    assert DEFAULT_PATH.stat().st_size < 1_000_000
    with safe_open(str(DEFAULT_PATH), framework="pt") as f:
        assert "recipe" in f.metadata()  # the asset says how it was made
    model = load_classifier()
    assert not model.training
    x, y = load_digits("test")
    assert accuracy(model, x, y) >= 0.97


def test_run_classifier_batching_is_consistent():
    model = load_classifier()
    x, _ = load_digits("test")
    feats_a, logits_a = run_classifier(model, x[:40], batch_size=7)
    feats_b, logits_b = run_classifier(model, x[:40], batch_size=512)
    assert torch.allclose(feats_a, feats_b, atol=1e-5) and torch.allclose(logits_a, logits_b, atol=1e-5)


def test_train_smoke_saves_atomically(tmp_path: Path):
    out = tmp_path / "clf.safetensors"
    result = train_classifier(seed=0, epochs=1, out=out, max_steps=2, progress=False)
    assert set(result) >= {"test_accuracy", "epochs", "seconds"}
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf.safetensors"]  # no temp file left
    assert isinstance(load_classifier(out), DigitClassifier)


def test_load_classifier_missing(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        load_classifier(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------------
# evaluate_digits


@pytest.fixture(scope="module")
def real_test_digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits("test")
    return to_uint8_nhwc(x), y.numpy()


def test_evaluate_real_digits_beats_noise(real_test_digits):
    images, labels = real_test_digits
    report = evaluate_digits(images, labels)
    assert isinstance(report, QualityReport)
    assert report.n_samples == 450 and report.reference == "digits:test"
    assert report.class_accuracy >= 0.97
    assert len(report.per_class_accuracy) == 10 and min(report.per_class_accuracy) >= 0.9
    # Quantizing to uint8 barely moves the features, so the test split scores near zero
    # against itself: far under both the train-vs-test floor and pure noise.
    assert report.frechet_distance < report.real_data_floor
    noise = np.random.default_rng(0).integers(0, 256, size=images.shape, dtype=np.uint8)
    noise_report = evaluate_digits(noise, labels)
    assert noise_report.frechet_distance > 10 * max(report.real_data_floor, report.frechet_distance)
    assert noise_report.class_accuracy < 0.5
    assert report.to_dict()["real_data_floor"] == report.real_data_floor
    # the reference against itself: every point lies in its own k-NN ball; noise lies in none of them
    assert report.precision == 1.0 and report.recall == 1.0 and report.k == 3
    assert noise_report.precision < 0.05


def test_precision_recall_need_more_samples_than_k(real_test_digits):
    images, labels = real_test_digits
    few = evaluate_digits(images[:3], labels[:3])
    assert few.precision is None and few.recall is None
    collapsed = evaluate_digits(np.repeat(images[:10], 5, axis=0), np.repeat(labels[:10], 5))
    assert collapsed.recall < 0.2  # ten distinct digits repeated cover little of the reference


def test_real_training_digits_set_the_precision_recall_ceiling():
    from evar.eval.metrics import real_data_baseline

    pr = real_data_baseline(10_000)
    assert 0.8 < pr.precision <= 1.0 and 0.8 < pr.recall <= 1.0


def test_evaluate_resizes_and_reports_missing_classes(real_test_digits):
    images, labels = real_test_digits
    keep = labels < 5
    big = np.repeat(np.repeat(images[keep], 4, axis=1), 4, axis=2)  # (N, 64, 64, 3)
    report = evaluate_digits(big, labels[keep])
    assert report.class_accuracy >= 0.95
    assert report.per_class_accuracy[5:] == [None] * 5


def test_evaluate_rejects_bad_inputs(real_test_digits):
    images, labels = real_test_digits
    with pytest.raises(ValueError, match="no images"):
        evaluate_digits(images[:0], labels[:0])
    with pytest.raises(ValueError, match="one label per image"):
        evaluate_digits(images[:10], labels[:9])
    with pytest.raises(ValueError, match="0..9"):
        evaluate_digits(images[:3], np.array([0, 1, 10]))
    with pytest.raises(ValueError, match="0..9"):
        evaluate_digits(images[:3], np.array([0, -1, 2]))
    with pytest.raises(ValueError, match="uint8"):
        evaluate_digits(images[:3].astype(np.float32), labels[:3])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        evaluate_digits(images[:3, :, :, :1], labels[:3])
    with pytest.raises(ValueError, match="integers"):
        evaluate_digits(images[:3], labels[:3].astype(np.float64))


def test_real_data_floor_is_taken_at_the_sample_count():
    """A Fréchet distance from fewer samples is biased upwards, so the floor beside it must use as many."""
    from evar.eval.metrics import real_data_baseline

    everything = real_data_baseline(10_000)
    assert everything.samples == 1347 and everything.subsets == 1
    few, many = real_data_baseline(200), real_data_baseline(900)
    assert few.subsets == many.subsets > 1 and few.samples == 200
    assert few.frechet_distance > many.frechet_distance > everything.frechet_distance
    assert 0.5 < few.recall <= 1.0 and 0.5 < few.precision <= 1.0
    with pytest.raises(ValueError, match="at least 2"):
        real_data_baseline(1)


def test_reports_carry_the_floor_at_their_own_count(real_test_digits):
    from evar.eval.metrics import real_data_baseline

    images, labels = real_test_digits
    report = evaluate_digits(images[:300], labels[:300])
    assert report.real_data_samples == 300
    assert report.real_data_floor == real_data_baseline(300).frechet_distance
    assert report.real_data_recall == real_data_baseline(300).recall
