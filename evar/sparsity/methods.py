"""One-shot mask selection for one Linear layer: magnitude, Wanda and SparseGPT.

- magnitude: score |W_ij|, compared over the whole layer (unstructured) or within each N:M group.
- Wanda (arXiv:2306.11695): score |W_ij|·‖X_j‖₂ (the norm of input feature j over the calibration tokens),
  compared within each output row; no weight update.
- SparseGPT (arXiv:2301.00774): OBS column by column. With H = (2/n) Σ x xᵀ (damped) and U the upper
  Cholesky factor of H⁻¹, the weights are visited left to right in lazy blocks of `blocksize` columns; a
  weight's removal cost is w²/U_ii², the removed part's error err = (w − q)/U_ii is spread over the columns
  to its right, W[:, i:] −= err·U[i, i:]. N:M masks are chosen when the visit reaches each group's first
  column, on the weights as updated so far. Without the update the same costs are read on the original
  weights and nothing is compensated (the ablation the MaskLLM paper reports).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from evar.prune.obs import damped_inverse
from evar.sparsity.patterns import Pattern, select

METHODS = ("magnitude", "wanda", "sparsegpt")
NEEDS = {"magnitude": "weights", "wanda": "norms", "sparsegpt": "hessian"}


@dataclass
class Sparsified:
    weight: torch.Tensor  # (out, in): masked, and for SparseGPT with the update, compensated
    mask: torch.Tensor  # (out, in) bool, True = kept


def magnitude(weight: torch.Tensor, pattern: Pattern) -> Sparsified:
    mask = select(weight.abs(), pattern, per_row=False)
    return Sparsified(weight * mask, mask)


def wanda_score(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖X_j‖₂: `input_norms` (in,) are the column norms of the layer's calibration inputs."""
    return weight.abs() * input_norms.unsqueeze(0)


def wanda(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern) -> Sparsified:
    """Wanda from the input Hessian: diag(H) = (2/n)·‖X_j‖², so √diag(H) ∝ ‖X_j‖₂ (one constant per layer,
    which does not change a within-row ranking)."""
    mask = select(wanda_score(weight, torch.diagonal(hessian).clamp_min(0).sqrt()), pattern, per_row=True)
    return Sparsified(weight * mask, mask)


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, blocksize: int = 128,
              percdamp: float = 0.01, update: bool = True, dtype: torch.dtype = torch.float32) -> Sparsified:
    W = weight.detach().to(dtype).clone()
    Hinv, dead = damped_inverse(hessian, percdamp, dtype)
    W[:, dead] = 0.0  # inputs that are never non-zero: their weights do nothing
    U = torch.linalg.cholesky(Hinv, upper=True)
    rows, cols = W.shape
    if pattern.structured:  # a lazy block holds whole groups
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    mask = torch.ones_like(W, dtype=torch.bool)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        Wb, Ub = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        d = torch.diagonal(Ub)
        errors = torch.zeros_like(Wb)
        if not pattern.structured:  # unstructured: one threshold per lazy block, on the block's costs
            mask[:, b0:b1] = select(Wb ** 2 / d ** 2, pattern, per_row=False)
        for i in range(b1 - b0):
            if pattern.structured and i % pattern.m == 0:
                g = slice(i, i + pattern.m)
                mask[:, b0 + i:b0 + i + pattern.m] = select(Wb[:, g] ** 2 / d[g] ** 2, pattern, per_row=True)
            w = Wb[:, i]
            q = w * mask[:, b0 + i]
            err = (w - q) / d[i]
            if update:
                Wb[:, i:] -= err.unsqueeze(1) * Ub[i, i:].unsqueeze(0)
            Wb[:, i] = q
            errors[:, i] = err
        W[:, b0:b1] = Wb
        if update:
            W[:, b1:] -= errors @ U[b0:b1, b1:]
    return Sparsified((W * mask).to(weight.dtype), mask)


def reconstruction_error(weight: torch.Tensor, sparse: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) = (2/n)·Σ‖(W − Ŵ)x‖²: the layer's output error on its calibration inputs."""
    delta = (weight - sparse).double()
    return float((delta @ hessian.double() * delta).sum())
