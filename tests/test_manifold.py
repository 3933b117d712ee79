"""Improved precision/recall against a direct transcription of the paper's definitions."""
import numpy as np
import pytest

from evar.eval.manifold import knn_radii, precision_recall


def brute_force(real, fake, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def share(centres, r, queries):
        d = np.linalg.norm(queries[:, None] - centres[None], axis=-1)
        return float((d <= r[None]).any(axis=1).mean())

    return share(real, radii(real), fake), share(fake, radii(fake), real)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_the_definition(k):
    rs = np.random.default_rng(k)
    real, fake = rs.normal(size=(60, 5)), rs.normal(0.3, 1.2, size=(45, 5))
    got = precision_recall(real, fake, k)
    want_p, want_r = brute_force(real, fake, k)
    assert got.precision == pytest.approx(want_p) and got.recall == pytest.approx(want_r)


def test_mode_collapse_keeps_precision_and_loses_recall():
    rs = np.random.default_rng(0)
    real = np.concatenate([rs.normal(c, 0.3, size=(100, 2)) for c in (-4, 0, 4)])
    collapsed = rs.normal(0, 0.3, size=(300, 2))  # one of the three modes
    pr = precision_recall(real, collapsed)
    assert pr.precision > 0.9 and pr.recall < 0.45
    assert precision_recall(real, real.copy()).recall == 1.0


def test_chunked_radii_equal_one_block():
    x = np.random.default_rng(1).normal(size=(2100, 3))  # more rows than one chunk
    d = ((x[:300, None] - x[None]) ** 2).sum(-1)
    assert np.allclose(knn_radii(x, 3)[:300], np.sort(d, axis=1)[:, 3])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="k must be"):
        knn_radii(np.zeros((3, 2)), 3)
