import numpy as np
import pytest
import torch

from evar import rng
from evar.models.sampling import cfg_ratio, filter_logits, sample_from_uniforms, sample_tokens


def test_rng_reference_values_are_stable():
    # Changing these numbers breaks every exported artifact and the Swift port: don't.
    u = rng.uniforms(0, 0, 4)
    assert u.dtype == np.float32 and ((u >= 0) & (u < 1)).all()
    again = rng.uniforms(0, 0, 4)
    assert np.array_equal(u, again)
    assert not np.array_equal(u, rng.uniforms(1, 0, 4)) and not np.array_equal(u, rng.uniforms(0, 1, 4))
    assert np.array_equal(rng.uniforms(3, 2, 10)[4:], rng.uniforms(3, 2, 6, start=4))
    # 24 bits: every value is an exact multiple of 2^-24
    assert np.all((u * 2**24) == np.round(u * 2**24))


def test_rng_is_uniform_enough():
    u = rng.uniforms(42, 7, 200_000)
    hist, _ = np.histogram(u, bins=10, range=(0, 1))
    assert np.all(np.abs(hist / len(u) - 0.1) < 0.005)


def test_rng_rejects_bad_seeds():
    with pytest.raises(ValueError):
        rng.uniforms(-1, 0, 3)
    with pytest.raises(ValueError):
        rng.uniforms(2**64, 0, 3)


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]
    assert torch.isfinite(filter_logits(logits, top_k=900)).all()  # k above the vocabulary keeps everything


def test_top_p_drops_low_tail_and_keeps_the_best():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # ascending cumulative mass: 0.05, 0.20, 0.50, 1.0; with top_p 0.75, drop those <= 0.25
    assert torch.isfinite(filter_logits(logits, top_p=0.75)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).tolist() == [[True, False, False, False]]


def test_inverse_cdf_picks_by_cumulative_mass_and_never_a_masked_token():
    logits = torch.tensor([0.0, float("-inf"), 0.0, float("-inf")]).expand(5, 4)
    u = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.99999])
    assert sample_from_uniforms(logits, u).tolist() == [0, 0, 0, 2, 2]


def test_sampled_frequencies_follow_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    u = torch.from_numpy(rng.uniforms(1, 0, 50_000))
    idx = sample_tokens(probs.log().expand(len(u), 3), u)
    freq = torch.bincount(idx, minlength=3).float() / len(u)
    assert torch.allclose(freq, probs, atol=0.01)


def test_cfg_ramp_is_linear_from_zero():
    assert cfg_ratio(1.5, 0, 10) == 0.0 and cfg_ratio(1.5, 9, 10) == 1.5 and cfg_ratio(1.5, 3, 10) == pytest.approx(0.5)


def test_top_p_after_top_k_equals_a_sort_of_the_whole_vocabulary():
    # filter_logits ranks only top-k's own sorted output; the host sampler (numpy) sorts every logit, as VAR does.
    # The two must keep the same tokens (no exact ties in real logits; a tie at the cut is order-dependent anyway).
    from evar.contract.host_sampling import filter_logits as sort_everything

    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        logits = torch.randn(16, 512, generator=gen) * (0.5 + trial % 4)
        for top_k, top_p in ((100, 0.96), (0, 0.9), (300, 0.5), (512, 0.96), (20, 0.999), (100, 0.0)):
            got = torch.isfinite(filter_logits(logits, top_k, top_p)).numpy()
            want = np.isfinite(sort_everything(logits.numpy(), top_k, top_p))
            assert (got == want).all(), (trial, top_k, top_p)
