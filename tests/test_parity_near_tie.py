"""The near-tie rule of the fp32 parity checks: a draw whose uniform sits within NEAR_TIE of an inverse-CDF
boundary may flip under float32 rounding of the logits; any other differing token is a failure."""
from __future__ import annotations

import numpy as np

from evar.export import parity as pt

V = 8


def _case(u: float):
    """One row, one token: equal logits (boundaries at k/V), uniform u; the reference drew floor(u·V)."""
    logits = np.zeros((1, 1, V), np.float32)
    want = np.array([[int(u * V)]])
    return logits, want, np.array([[u]], np.float32)


def test_a_flip_at_a_boundary_is_a_near_tie():
    logits, want, u = _case(3 / V + 2e-5)  # just past the boundary between tokens 2 and 3
    assert want[0, 0] == 3
    assert pt.near_tie_flips(logits, np.array([[2]]), want, u, 0, 0.0) == 1


def test_a_flip_far_from_a_boundary_is_not():
    logits, want, u = _case(3.5 / V)
    assert pt.near_tie_flips(logits, np.array([[2]]), want, u, 0, 0.0) is None
    assert pt.near_tie_flips(logits, np.array([[5]]), want, u, 0, 0.0) is None  # not even adjacent


def test_equal_tokens_or_unknown_uniforms_are_not_near_ties():
    logits, want, u = _case(3 / V + 2e-5)
    assert pt.near_tie_flips(logits, want, want, u, 0, 0.0) is None
    assert pt.near_tie_flips(logits, np.array([[2]]), want, None, 0, 0.0) is None


def test_the_filter_is_applied_before_the_boundaries():
    """top-k 4 of 8 equal logits keeps tokens 0-3 (stable order is the first four): boundaries at k/4."""
    logits = np.zeros((1, 1, V), np.float32)
    logits[..., 4:] = -1.0
    u = np.array([[0.5 + 2e-5]], np.float32)
    assert pt.near_tie_flips(logits, np.array([[1]]), np.array([[2]]), u, 4, 0.0) == 1
    assert pt.near_tie_flips(logits, np.array([[3]]), np.array([[4]]), u, 0, 0.0) is None


def _run_and_ref(tokens_got):
    logits, want, u = _case(3 / V + 2e-5)
    ref = pt.Reference(np.array([0]), [want, want], [logits, logits], np.zeros((1, 2)), np.zeros((1, 3)))
    outs = [{"idx": tokens_got[0], "logits": logits, "next_f_hat": np.zeros((1, 2))},
            {"idx": tokens_got[1], "logits": logits, "next_f_hat": np.ones((1, 2))}]
    return ref, pt.Run([{"uniforms": u}, {"uniforms": u}], outs)


def test_check_stops_after_a_near_tie_and_says_so():
    ref, run = _run_and_ref([np.array([[2]]), np.array([[6]])])  # scale 1 and f_hat follow the flip: not compared
    report = pt.ParityReport()
    pt.check_against_reference(report, "x", ref, run, 1e-4, None, 1e-3, sampling=(0, 0.0))
    assert report.passed and any("near-tie" in s for s in report.skipped)
    assert [c.metric for c in report.checks] == ["max_rel_diff", "near_tie_flips"]
    strict = pt.ParityReport()
    pt.check_against_reference(strict, "x", ref, run, 1e-4, None, 1e-3)  # without sampling: exact tokens
    assert not strict.passed


def test_check_fails_a_flip_that_is_not_a_near_tie():
    ref, run = _run_and_ref([np.array([[3]]), np.array([[6]])])  # scale 0 exact, scale 1 far from any boundary
    report = pt.ParityReport()
    pt.check_against_reference(report, "x", ref, run, 1e-4, None, 1e-3, sampling=(0, 0.0))
    assert not report.passed
