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
    """Mask to -inf what top-k and then top-p exclude. (..., V) → (..., V)."""
    vocab = logits.shape[-1]
    if top_k > 0 and top_k < vocab:
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p > 0.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        # Drop the low tail whose total mass is at most 1 - top_p; the most likely token always stays.
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1.0 - top_p)
        # A constant (V,) mask, not an in-place write into a batch-shaped tensor, so traced graphs keep the
        # batch symbolic; logical_and, not `&`, which Core ML's converter lacks.
        droppable = torch.arange(vocab, device=logits.device) < vocab - 1
        drop_sorted = torch.logical_and(drop_sorted, droppable)
        as_float = drop_sorted.to(sorted_logits.dtype)  # Core ML scatters no bool tensors
        drop = as_float.scatter(-1, sorted_idx, as_float) > 0
        logits = logits.masked_fill(drop, float("-inf"))
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
