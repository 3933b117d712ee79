"""Token sampling as VAR does it (CFG ramp, top-k, top-p), drawn by inverse CDF from explicit uniforms.

Everything here is plain tensor math without Python control flow on tensor values, so the same
functions run eagerly and inside exported graphs (ONNX / Core ML) where sampling is in-graph.
"""
from __future__ import annotations

import torch


def cfg_ratio(cfg: float, scale_index: int, num_scales: int) -> float:
    """VAR's linear guidance ramp: no guidance at the first scale, full `cfg` at the last."""
    return cfg * scale_index / max(num_scales - 1, 1)


def apply_cfg(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, t: float) -> torch.Tensor:
    return (1 + t) * cond_logits - t * uncond_logits


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Mask to -inf what top-k and then top-p exclude. (..., V) → (..., V).

    Top-p ranks only what top-k kept, and `topk` already returns those in order: no sort of the whole vocabulary
    (on d16, a sort of 4096 logits per token cost about a tenth of an int8 step graph's time, eager or exported)."""
    vocab = logits.shape[-1]
    k = top_k if 0 < top_k < vocab else vocab
    if k == vocab and top_p <= 0.0:
        return logits
    top = logits.topk(k, dim=-1).values  # (..., k), descending
    if k < vocab:
        logits = logits.masked_fill(logits < top[..., -1:], float("-inf"))
    if top_p > 0.0:
        ascending = top.flip(-1)
        # Drop the low tail whose total mass is at most 1 - top_p; the most likely token always stays. The
        # softmax over the kept values is the masked logits' (masked ones carry no mass).
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1.0 - top_p)
        # A constant (k,) mask, not an in-place write into a batch-shaped tensor, so traced graphs keep the
        # batch symbolic; logical_and, not `&`, which Core ML's converter lacks.
        drop = torch.logical_and(drop, torch.arange(k, device=logits.device) < k - 1)
        # The cumulated mass only grows, so the dropped values are a prefix: the first kept one is the threshold.
        first_kept = drop.to(torch.int32).sum(dim=-1, keepdim=True).long()
        logits = logits.masked_fill(logits < ascending.gather(-1, first_kept), float("-inf"))
    return logits


def sample_from_uniforms(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the first token whose cumulative probability exceeds u. (..., V), (...) → (...)."""
    cdf = logits.float().softmax(dim=-1).cumsum(dim=-1)
    threshold = uniforms.unsqueeze(-1) * cdf[..., -1:]
    # Masked tokens add no mass, so a threshold can never land on them (see tests).
    idx = (cdf <= threshold).sum(dim=-1)
    return idx.clamp(max=logits.shape[-1] - 1)


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    return sample_from_uniforms(filter_logits(logits, top_k, top_p), uniforms)
