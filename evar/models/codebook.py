"""Codebook health of the multi-scale quantizer: usage and perplexity per scale, and dead-code restarts.

A VQVAE trained without care settles on a handful of codes (the first shipped digits tokenizer used 4-21
of 512 per scale): the rest never win a nearest-code contest, get no gradient, and stay dead. A restart
moves each dead code onto a residual vector the encoder actually produced, where it will win; live codes
are never touched. Inference is unchanged: this is training-side care plus a diagnostic.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ScaleUsage:
    patch_num: int
    used: int  # distinct codes chosen at this scale
    perplexity: float  # exp(entropy of the code frequencies): the "effective" number of codes

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(counts: Tensor) -> float:
    """exp(H(p)) of the frequencies `counts` (V,); 1 for a single code, V for a uniform spread."""
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def code_usage(idx_per_scale: list[Tensor], vocab_size: int, patch_nums: tuple[int, ...]) -> list[ScaleUsage]:
    """Usage of each scale's token map (any shape per scale, int codes in [0, vocab_size))."""
    out = []
    for idx, pn in zip(idx_per_scale, patch_nums, strict=True):
        counts = idx.flatten().bincount(minlength=vocab_size)
        out.append(ScaleUsage(pn, int((counts > 0).sum()), perplexity(counts)))
    return out


@torch.no_grad()
def restart_dead_codes(codebook_VC: Tensor, hits_V: Tensor, candidates_NC: Tensor, dead_below: float,
                       gen: torch.Generator) -> Tensor:
    """Overwrite in place every code with `hits_V < dead_below` by a randomly drawn candidate vector.

    Candidates are residuals the encoder produced (what a code should be near to be chosen); drawn without
    replacement when there are enough, so restarted codes start apart. Returns the restarted indices.
    """
    dead = (hits_V < dead_below).nonzero().flatten()
    if len(dead) == 0 or len(candidates_NC) == 0:
        return dead[:0]
    if len(candidates_NC) >= len(dead):
        pick = torch.randperm(len(candidates_NC), generator=gen)[:len(dead)]
    else:
        pick = torch.randint(len(candidates_NC), (len(dead),), generator=gen)
    codebook_VC[dead] = candidates_NC[pick].to(codebook_VC.dtype)
    return dead


@torch.no_grad()
def tokenizer_report(vqvae, images: Tensor, batch: int = 256) -> dict:
    """Held-out health of a tokenizer: reconstruction MSE (images in [-1, 1]) and code usage per scale."""
    was_training = vqvae.training
    vqvae.eval()
    idx_parts, sq_err = [], 0.0
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        idx = vqvae.img_to_idx(x)
        sq_err += float((vqvae.idx_to_img(idx) - x).square().sum())
        idx_parts.append(idx)
    vqvae.train(was_training)
    per_scale = [torch.cat(parts) for parts in zip(*idx_parts)]
    usage = code_usage(per_scale, vqvae.cfg.vocab_size, tuple(vqvae.cfg.v_patch_nums))
    return {"images": len(images), "mse": sq_err / images.numel(), "vocab_size": vqvae.cfg.vocab_size,
            "scales": [u.to_dict() for u in usage]}


def describe_usage(report: dict) -> str:
    """One line: 'codes used per scale 1/2/…/64 of 512 (perplexity …), MSE …'."""
    scales = report["scales"]
    used = "/".join(str(s["used"]) for s in scales)
    ppl = "/".join(f"{s['perplexity']:.0f}" for s in scales)
    return (f"codes used per scale {used} of {report['vocab_size']} (perplexity {ppl}), "
            f"reconstruction MSE {report['mse']:.4f} on {report['images']} held-out images")
