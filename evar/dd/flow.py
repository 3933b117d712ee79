"""Distilled Decoding's noise → token map: a straight-line flow from N(0, I) to a categorical over codebook vectors.

For one token with probabilities p over codebook vectors c_k, the straight-line paths x_t = t·c + (1 − t)·ε
(ε ~ N(0, I), c ~ p) have the marginal velocity

    v(x, t) = (E[c | x_t = x] − x) / (1 − t),   E[c | x] = Σ_k w_k c_k,   w_k ∝ p_k · N(x; t·c_k, (1 − t)² I),

known in closed form because the target is a finite set. Integrating dx/dt = v from x_0 = ε to t = 1 is a
deterministic map that pushes N(0, I) onto Σ_k p_k δ(c_k): the same noise always gives the same token, and
noise drawn at random gives tokens distributed as p. The token is the code holding the posterior at the last
evaluated time (where x lands). Euler steps on a uniform grid; the last step lands on E[c | x] exactly.

The noise itself comes from EVAR's portable random source (`evar.contract.few_step`: Box–Muller on `evar.rng`
uniforms, one stream per scale, numbered by sample), so sample i's noise is the same in any batch, on any rank,
in any run, and in the torch-free runtime.
"""
from __future__ import annotations

import torch
from torch import Tensor

from evar.contract import few_step
from evar.models.sampling import filter_logits

DEFAULT_ODE_STEPS = 32


def token_noise(seed: int, si: int, first_sample: int, batch: int, tokens: int, dim: int) -> Tensor:
    """(batch, tokens, dim) float32 N(0, 1) for scale `si` of samples first_sample … first_sample + batch − 1."""
    return torch.from_numpy(few_step.token_noise(seed, si, first_sample, batch, tokens, dim))


def sequence_noise(seed: int, first_sample: int, batch: int, patch_nums: tuple[int, ...], dim: int) -> Tensor:
    """(batch, L, dim): every scale's noise, scales concatenated coarse to fine."""
    return torch.from_numpy(few_step.sequence_noise(seed, first_sample, batch, patch_nums, dim))


@torch.no_grad()
def flow_tokens(noise: Tensor, probs: Tensor, codebook: Tensor, steps: int = DEFAULT_ODE_STEPS) -> Tensor:
    """Integrate the flow from `noise` (..., C) to the categorical `probs` (..., V) over `codebook` (V, C).

    Returns (...) int64 token indices. Codes that no token of this call can reach (probability 0 everywhere,
    e.g. after top-k/top-p) are left out of the arithmetic: they would only add exact zeros.
    """
    if steps < 1:
        raise ValueError(f"the flow needs at least one step, got {steps}")
    shape, C = noise.shape[:-1], noise.shape[-1]
    x = noise.reshape(-1, C).float()
    p = probs.reshape(-1, probs.shape[-1]).float()
    reachable = (p > 0).any(0).nonzero().squeeze(1)
    codes = codebook.float()[reachable]  # (K, C)
    log_p = p[:, reachable].log()  # (N, K), -inf where a token cannot go
    sq = codes.square().sum(1)  # (K,)
    w = p[:, reachable]
    for i in range(steps):
        t, h = i / steps, 1.0 / steps
        # log N(x; t c, (1-t)^2 I) up to terms equal for every code: -(t^2 |c|^2 - 2t x.c) / (2 (1-t)^2)
        w = (log_p - (t * t * sq - 2 * t * (x @ codes.T)) / (2 * (1 - t) ** 2)).softmax(-1)
        x = x + h * (w @ codes - x) / (1 - t)
    return reachable[w.argmax(-1)].reshape(shape)


class FlowPicker:
    """A `TokenPicker` for `evar.models.decoding`: the teacher's guided, top-k/top-p filtered distribution at
    each token, reached from that token's noise by the flow (instead of an inverse-CDF draw)."""

    def __init__(self, codebook: Tensor, steps: int = DEFAULT_ODE_STEPS):
        self.codebook, self.steps = codebook.detach().float(), steps

    def __call__(self, logits: Tensor, noise: Tensor, top_k: int, top_p: float) -> Tensor:
        probs = filter_logits(logits.float(), top_k, top_p).softmax(-1)
        return flow_tokens(noise, probs, self.codebook.to(noise.device), self.steps)
