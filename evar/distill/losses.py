"""Distillation losses over teacher-forced VAR sequences (the EVAR paper's normal and scale-aware KD, with two corrections).

Shapes: logits (B, L, V) over the whole token sequence, scales concatenated coarse to fine; a scale
range is the [begin, end) slice of L that `VARConfig.scale_ranges()` gives. Every term is a mean, so a
batch split across DDP ranks averages back to the single-process value.

Where EVAR differs from upstream (aden9460/EVAR-code):
- scale-aware KD averages each scale over its own tokens before weighting. Upstream summed token KLs
  per scale, so a 16x16 scale outweighed a 1x1 scale 256:1 whatever the weights said;
- the weights are then normalised to sum to 1 over the scales in play, so `--beta` means the same for
  `normal`, `scale_aware` and `both`, and across progressive stages.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KD_MODES = ("normal", "scale_aware", "both")
DEFAULT_FIRST_WEIGHT, DEFAULT_LAST_WEIGHT = 2.0, 0.2


def task_loss(logits: torch.Tensor, tokens: torch.Tensor, end: int | None = None) -> torch.Tensor:
    """VAR's training objective: CE = (1/(B·L')) Σ_b Σ_{j<L'} −log softmax(logits[b, j])[tokens[b, j]].

    Every token weighs the same (1/L' with L' = `end`, default all L tokens), as in VAR's own training.
    """
    end = logits.shape[1] if end is None else end
    return F.cross_entropy(logits[:, :end].flatten(0, 1).float(), tokens[:, :end].flatten())


def token_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token T²·KL(p_t ‖ p_s) with p = softmax(logits / T): (B, L, V) → (B, L).

    KL(p_t ‖ p_s) = Σ_v p_t(v)·(log p_t(v) − log p_s(v)); the T² factor keeps gradient sizes
    comparable across temperatures (Hinton et al.).
    """
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    return kl * temperature ** 2


def normal_kd(kl_BL: torch.Tensor, end: int | None = None) -> torch.Tensor:
    """Normal KD: the per-token mean of T²·KL over the batch and the first `end` tokens (default all).

    Each token weighs 1/(B·L'), the same reduction as the task loss (upstream's `batchmean` over the
    flattened (B·L, V) logits is this same per-token mean).
    """
    end = kl_BL.shape[1] if end is None else end
    return kl_BL[:, :end].mean()


def per_scale_means(kl_BL: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """m_i = mean of T²·KL over the batch and the tokens of scale i: (B, L) → (S,)."""
    return torch.stack([kl_BL[:, begin:end].mean() for begin, end in ranges])


def scale_aware_kd(scale_means: torch.Tensor, weights: torch.Tensor, active: int | None = None) -> torch.Tensor:
    """Scale-aware KD = Σ_{i<k} w_i·m_i / Σ_{i<k} w_i over the first k = `active` scales (default all).

    m_i is already a mean over scale i's own tokens (`per_scale_means`), so w_i is exactly the share of
    scale i in this term: w = (2, 1) makes scale 0 count twice as much as scale 1, whatever their sizes.
    Upstream used Σ_i w_i·(sum of KL over scale i's tokens)/B: unnormalised, so token counts dominated.
    """
    k = len(scale_means) if active is None else active
    w = weights[:k].to(scale_means)
    return (w * scale_means[:k]).sum() / w.sum()


def kd_loss(mode: str, kl_BL: torch.Tensor, scale_means: torch.Tensor, weights: torch.Tensor,
            active: int, end: int) -> torch.Tensor:
    """The KD term of `mode`: normal, scale_aware, or both = ½·normal + ½·scale_aware."""
    if mode == "normal":
        return normal_kd(kl_BL, end)
    if mode == "scale_aware":
        return scale_aware_kd(scale_means, weights, active)
    if mode == "both":
        return 0.5 * normal_kd(kl_BL, end) + 0.5 * scale_aware_kd(scale_means, weights, active)
    raise ValueError(f"unknown KD mode {mode!r}; expected one of {', '.join(KD_MODES)}")


def feature_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
                 end: int | None = None) -> torch.Tensor:
    """Hidden-state distillation: (1/depth)·Σ_blocks MSE(h_s, h_t) over the first `end` tokens.

    Block i of the student is matched to block i of the teacher: pruning keeps depth and the residual
    width C, so every block output is (B, L, C) in both.
    """
    terms = [F.mse_loss(s[:, :end].float(), t[:, :end].float()) for s, t in zip(student_hidden, teacher_hidden)]
    return torch.stack(terms).mean()


def default_scale_weights(num_scales: int) -> tuple[float, ...]:
    """EVAR's 2.0 → 0.2, coarse scales first, spread linearly over however many scales the model has
    (10 scales: 2.0, 1.8, …, 0.2; the digits model's 6: 2.0, 1.64, 1.28, 0.92, 0.56, 0.2)."""
    if num_scales == 1:
        return (DEFAULT_FIRST_WEIGHT,)
    step = (DEFAULT_FIRST_WEIGHT - DEFAULT_LAST_WEIGHT) / (num_scales - 1)
    return tuple(round(DEFAULT_FIRST_WEIGHT - i * step, 6) for i in range(num_scales))


def progressive_scales(step: int, steps: int, num_scales: int) -> int:
    """How many scales (coarsest first) the losses cover at `step` of a progressive run.

    The first half of the run is split into `num_scales` equal stages: stage k (0-based) covers
    steps [k·h/S, (k+1)·h/S) with h = steps // 2, and trains scales 0..k. The second half trains all
    scales. Teacher forcing is block-causal, so the losses on scales 0..k are exactly those of a model
    that stops at scale k: the coarse scales settle first, then each finer one joins.
    """
    half = steps // 2
    if half == 0 or step >= half:
        return num_scales
    return min(num_scales, 1 + step * num_scales // half)
