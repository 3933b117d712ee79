"""Sparsity patterns and how a score becomes a mask.

`N:M` means N of every M consecutive weights along a row's input dimension are zero (2:4 and 4:8 keep
half): the layout sparse tensor cores and Core ML's n:m compression store. `unstructured` zeroes a share
`sparsity` of each layer's weights wherever they are. A mask is a bool tensor of the weight's shape,
True where the weight is kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from evar.errors import EvarError

UNSTRUCTURED = "unstructured"


@dataclass(frozen=True)
class Pattern:
    n: int  # zeros per group of m (0 and 0: unstructured)
    m: int
    sparsity: float  # share of zeros: n / m, or the unstructured target

    @classmethod
    def parse(cls, text: str, sparsity: float | None = None) -> Pattern:
        """`2:4`, `4:8`, … or `unstructured` (which needs `sparsity`); a bad pattern is one line."""
        if sparsity is not None and not (math.isfinite(sparsity) and 0.0 <= sparsity < 1.0):
            raise EvarError(f"--sparsity must be in [0, 1), got {sparsity}")
        if text == UNSTRUCTURED:
            if sparsity is None:
                raise EvarError("--pattern unstructured needs --sparsity (the share of weights to zero, in [0, 1))")
            return cls(0, 0, float(sparsity))
        n_text, sep, m_text = text.partition(":")
        if not (sep and n_text.isdigit() and m_text.isdigit()):
            raise EvarError(f"--pattern must be N:M (e.g. 2:4) or '{UNSTRUCTURED}', got '{text}'")
        n, m = int(n_text), int(m_text)
        if not 0 < n < m:
            raise EvarError(f"--pattern {text}: N:M needs 0 < N < M (N of every M weights are zero)")
        if sparsity is not None and abs(sparsity - n / m) > 1e-9:
            raise EvarError(f"--pattern {text} zeroes {n / m:g} of the weights; --sparsity {sparsity} contradicts it "
                            "(leave --sparsity out, or use --pattern unstructured)")
        return cls(n, m, n / m)

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else UNSTRUCTURED

    def check_layer(self, name: str, in_features: int) -> None:
        if self.structured and in_features % self.m:
            raise EvarError(f"--pattern {self.name}: layer {name} has {in_features} inputs, not a multiple of "
                            f"{self.m} (N:M groups run along the input dimension)")


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of m consecutive inputs of a row, the n lowest scores are dropped (ties: the first)."""
    out, cols = score.shape
    groups = score.reshape(out, cols // m, m)
    drop = torch.topk(groups, n, dim=-1, largest=False, sorted=False).indices
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
    return keep.reshape(out, cols)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The lowest `sparsity` share of every row dropped (scores compared within an output row)."""
    k = int(score.shape[1] * sparsity)
    keep = torch.ones_like(score, dtype=torch.bool)
    if k:
        keep.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
    return keep


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The lowest `sparsity` share of the whole layer dropped."""
    k = int(score.numel() * sparsity)
    keep = torch.ones(score.numel(), dtype=torch.bool)
    if k:
        keep[torch.topk(score.flatten(), k, largest=False).indices] = False
    return keep.reshape(score.shape)


def select(score: torch.Tensor, pattern: Pattern, per_row: bool) -> torch.Tensor:
    """The mask a score gives under `pattern`; unstructured compares per row (`per_row`) or per layer."""
    if pattern.structured:
        return nm_mask(score, pattern.n, pattern.m)
    return row_mask(score, pattern.sparsity) if per_row else layer_mask(score, pattern.sparsity)


def follows(mask: torch.Tensor, pattern: Pattern) -> bool:
    """Whether a mask is of the pattern: exactly n dropped in every group (unstructured: anything goes)."""
    if not pattern.structured:
        return True
    if mask.shape[-1] % pattern.m:
        return False
    dropped = (~mask).reshape(-1, pattern.m).sum(-1)
    return bool((dropped == pattern.n).all())
