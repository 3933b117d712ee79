"""Distilled Decoding artifacts (manifest family "dd"), numpy only: the per-token noise and the chain of passes.

The noise has one definition that PyTorch (`evar.dd.flow`), the exporter's parity checks and the torch-free
runtime share, so the same seed gives the same noise, hence the same tokens, everywhere.

Token j of scale si of sample i has `dim` standard normals, made by Box–Muller from the `evar.rng` uniforms of
stream NOISE_STREAM + si: normal d takes uniforms 2·(i·pn²·dim + j·dim + d) and the one after it
(z = sqrt(−2·log(1 − u0)) · cos(2π·u1), in float64, rounded once to float32).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from evar import rng
from evar.contract import step_feeds

# Noise streams are distinct from the sampling streams (which are the scale indices 0, 1, …).
NOISE_STREAM = 1 << 32
DESCRIPTION = ("evar.contract.few_step.sequence_noise(seed, first_sample, batch, patch_nums, cvae): per scale si, "
               "Box–Muller (z = sqrt(-2 log(1 - u0)) cos(2 pi u1), float64 → float32) on evar.rng stream "
               "2**32 + si; normal d of token j of sample i takes uniforms 2*(i*pn*pn*cvae + j*cvae + d) and the next")


def token_noise(seed: int, si: int, first_sample: int, batch: int, tokens: int, dim: int) -> np.ndarray:
    """(batch, tokens, dim) float32 N(0, 1) for scale `si` of samples first_sample … first_sample + batch − 1."""
    per_sample = 2 * tokens * dim  # two uniforms per normal (Box–Muller)
    u = rng.uniforms(seed, NOISE_STREAM + si, batch * per_sample, start=first_sample * per_sample)
    u = u.astype(np.float64).reshape(batch, tokens, dim, 2)
    radius = np.sqrt(-2.0 * np.log1p(-u[..., 0]))  # 1 - u in (0, 1]: never log(0)
    return (radius * np.cos(2.0 * math.pi * u[..., 1])).astype(np.float32)


def sequence_noise(seed: int, first_sample: int, batch: int, patch_nums, dim: int) -> np.ndarray:
    """(batch, L, dim): every scale's noise, scales concatenated coarse to fine."""
    return np.concatenate([token_noise(seed, si, first_sample, batch, pn * pn, dim)
                           for si, pn in enumerate(patch_nums)], axis=1)


PassFn = Callable[[dict[str, np.ndarray]], dict[str, Any]]  # feeds by input name → outputs by output name


def run_passes(passes: list[tuple[dict[str, Any], PassFn]], labels: np.ndarray, noise: np.ndarray
               ) -> list[dict[str, Any]]:
    """Run a t-list's passes in order: each gets the labels, the noise and (after the first) the previous pass's
    tokens and vectors, bound by the roles of its manifest `function`. → every pass's outputs by role."""
    results: list[dict[str, Any]] = []
    for function, call in passes:
        values = {"labels": labels, "noise": noise}
        if results:
            values |= {"given_tokens": results[-1]["tokens"], "given_vectors": results[-1]["vectors"]}
        named = call(step_feeds(function["inputs"], values, {}, lambda t: None))
        results.append({t["role"]: named[t["name"]] for t in function["outputs"]})
    return results
