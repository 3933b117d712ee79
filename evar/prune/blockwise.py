"""`evar prune`'s pass over the VAR blocks: how many heads and FFN units each block loses in one step, with
the statistics its criterion needs.

Criteria that need only weights (magnitude) or gradients (Taylor: one backward pass of the teacher-forced
cross-entropy per iterative step) score every block directly. Criteria that need layer-input Hessians
(OBS) run sequentially: block i is calibrated on the outputs of the already pruned blocks 0..i-1, through
the full block-causal sequence (see `evar.prune.sequential`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from evar.checkpoints import Model
from evar.prune.calibrate import gradients
from evar.prune.criteria import Criterion
from evar.prune.recipe import PruneRecipe
from evar.prune.sequential import ActivationStream, Calibration, Capture, Replay, Skip, swapped
from evar.prune.surgery import prune
from evar.prune.var_adapter import block_ffn, block_heads, head_channels


@dataclass
class Kept:
    """Original indices of the surviving heads and the surviving FFN-unit count, per block."""

    heads: list[list[int]]
    units: list[int]


class BlockPruner:
    """Applies a criterion's removals to one block (through VAR's adapter) and keeps the bookkeeping."""

    def __init__(self, criterion: Criterion, kept: Kept):
        self.criterion, self.kept = criterion, kept

    def heads(self, i: int, block, n: int, **stats) -> list[int]:
        """Remove `n` heads of block i; returns the positions (before the cut) of the heads that stay."""
        n_heads = block.attn.num_heads
        removal = prune(block_heads(block, i), self.criterion, n, [stats])
        stay = [j for j in range(n_heads) if j not in set(removal.units)]
        self.kept.heads[i] = [self.kept.heads[i][j] for j in stay]
        return stay

    def units(self, i: int, block, n: int, **stats) -> None:
        prune(block_ffn(block, i), self.criterion, n, [stats])
        self.kept.units[i] = block.ffn.fc1.out_features


def sequential_block(pruner: BlockPruner, i: int, block, stream: ActivationStream, amount: tuple[int, int],
                     tokens: slice, last: bool) -> None:
    """Hessians of `proj` then `fc2` inputs on the current stream, removals, and the stream advanced."""
    n_heads, n_units = amount
    replay = None
    if n_heads:
        stash: list[torch.Tensor] = []
        capture = Capture(block.attn.proj, tokens, stash, stop=True)
        with swapped(block.attn, "proj", capture):
            stream.run(block, write=False)
        stay = pruner.heads(i, block, n_heads, hessian=capture.hessian.matrix())
        replay = Replay(block.attn.proj, stash, torch.tensor(head_channels(stay, block.attn.head_dim)))
    if n_units:
        capture = Capture(block.ffn.fc2, tokens, None, stop=False)
        with swapped(block, "attn", replay), swapped(block.ffn, "fc2", capture):
            stream.run(block, write=True)  # the buffer now holds the post-attention residual
        pruner.units(i, block, n_units, hessian=capture.hessian.matrix())
        if not last:
            with swapped(block, "attn", Skip()):
                stream.run(block, write=True)
    elif not last:
        with swapped(block, "attn", replay):
            stream.run(block, write=True)


def run_step(model: Model, recipe: PruneRecipe, criterion: Criterion, amounts: list[tuple[int, int]],
             calib: Calibration | None, pruner: BlockPruner, bar: tqdm, label: str, first_block: int = 0,
             stream_x: torch.Tensor | None = None, after_block: Callable[[int, ActivationStream], None] | None = None,
             ) -> None:
    """One pass over the blocks, from `first_block` (a resumed run, whose stream is `stream_x`).
    `after_block(next_block, stream)` runs after each block pruned with Hessians (to save progress)."""
    var, tokens = model.var, recipe.token_range(model.config.var)
    blocks = list(var.blocks)
    stream = ActivationStream(var, calib, recipe.calib_batch) if criterion.needs == "hessian" else None
    if stream is not None and stream_x is not None:
        stream.x = stream_x
    grads: list = []
    if criterion.needs == "gradients":
        bar.set_description(f"{label}gradients")
        layers = [layer for b in blocks for layer in (b.attn.proj, b.ffn.fc2)]
        grads = gradients(model, calib, layers, tokens, recipe.calib_batch)
    for i, block in enumerate(blocks[first_block:], start=first_block):
        bar.set_description(f"{label}pruning block {i + 1}/{len(blocks)}")
        n_heads, n_units = amounts[i]
        if stream is not None:
            sequential_block(pruner, i, block, stream, amounts[i], tokens, last=i == len(blocks) - 1)
            if after_block is not None:
                after_block(i + 1, stream)
        else:
            g = grads[2 * i: 2 * i + 2] or [(None, None), (None, None)]
            if n_heads:
                pruner.heads(i, block, n_heads, grad=g[0][0], grad_sq=g[0][1])
            if n_units:
                pruner.units(i, block, n_units, grad=g[1][0], grad_sq=g[1][1])
        bar.update()
