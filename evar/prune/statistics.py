"""Statistics criteria ask for, gathered the same way for every family.

`gradient_moments`: mean gradient and mean squared mini-batch gradient of a calibration loss for some
weights (what Taylor scores are made of). `InputHessians`: (2/n) Σ xᵀx of the inputs of consumer layers,
seen by forward hooks in one pass over the calibration data (a conv's inputs unfolded, so the Hessian's
columns are those of its (out, in·kh·kw) weight: the layer-wise objective of OBS, arXiv:2301.00774).
VAR's block-by-block Hessians are in `evar.prune.sequential`; they need the pruned earlier blocks.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from evar.prune.obs import HessianAccumulator


def gradient_moments(model: nn.Module, weights: list[torch.Tensor],
                     losses: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mean g, mean g²) per weight over the mini-batch `losses` (computed lazily, with only `weights`
    requiring grad, so the backward pass stops there)."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    sums = [(torch.zeros_like(w), torch.zeros_like(w)) for w in weights]
    n = 0
    try:
        with torch.enable_grad():
            for loss in losses:
                for (g_sum, g2_sum), g in zip(sums, torch.autograd.grad(loss, weights)):
                    g_sum += g
                    g2_sum += g * g
                n += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return [(g / n, g2 / n) for g, g2 in sums]


def layer_inputs(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A consumer's inputs as rows (tokens or positions, in·kh·kw)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (B, in·kh·kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class InputHessians:
    """Forward pre-hooks that accumulate each layer's input Hessian while the model runs; use as a context.

    A conv at a high resolution sees far more positions than a Hessian needs (a 256² map: 65536 per image,
    each a row of in·kh·kw): each image contributes at most `max_rows` of them, chosen at random with a
    fixed seed, so the estimate costs the same at any resolution and is the same on every run."""

    def __init__(self, layers: dict[str, nn.Module], max_rows: int = 4096, seed: int = 0):
        self.layers, self.max_rows = layers, max_rows
        self.acc: dict[str, HessianAccumulator] = {}
        self.handles: list = []
        self.gen = torch.Generator().manual_seed(seed)

    def __enter__(self) -> Self:
        for name, layer in self.layers.items():
            self.handles.append(layer.register_forward_pre_hook(self._hook(name, layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, name: str, layer: nn.Module):
        def hook(module: nn.Module, args: tuple) -> None:
            for x in args[0].detach().split(1):  # one image at a time bounds the unfolded copy
                rows = layer_inputs(layer, x)
                if len(rows) > self.max_rows:
                    rows = rows[torch.randperm(len(rows), generator=self.gen)[:self.max_rows]]
                if name not in self.acc:
                    self.acc[name] = HessianAccumulator(rows.shape[1])
                self.acc[name].add(rows)
        return hook

    def take(self, name: str) -> torch.Tensor:
        """The layer's Hessian; its running sum is dropped (at d16 the sums of every consumer add up to GBs)."""
        return self.acc.pop(name).matrix()
