"""Block-by-block calibration: the calibration set's hidden states advance one block at a time.

The hidden states (N, L, C) live in one buffer that each pass overwrites in mini-batches, so memory is
one activation set however deep the model. A consumer layer's inputs are seen by swapping the layer
for a stand-in for one pass (the block's own `forward` runs unchanged, so the calibration path cannot
drift from the model):
  pass 1  `proj` → Capture: Hessian of the head outputs, stash them, stop the block there;
  pass 2  attention → Replay (pruned `proj` on the stashed kept heads: heads are independent, so this
          equals the pruned attention without recomputing it), `fc2` → Capture returning zeros: the
          block then outputs its post-attention residual, which becomes the buffer;
  pass 3  attention → Skip: only the pruned FFN runs on that residual → the block output.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from evar.models.var import VAR
from evar.prune.obs import HessianAccumulator


@dataclass
class Calibration:
    labels: torch.Tensor  # (N,) int64; the null class for the unconditional share (CFG runs both halves)
    tokens: torch.Tensor  # (N, L) int64 targets
    x_in: torch.Tensor  # (N, L-1, Cvae) teacher-forcing inputs
    source: str

    def __len__(self) -> int:
        return len(self.labels)


class StopBlock(Exception):
    """Raised by a capture that has seen what it needs: the rest of the block is not computed."""


class Capture(nn.Module):
    """Stands in for a consumer Linear: accumulates its input's Hessian over `tokens`, optionally stashes
    the input, then stops the block or returns zeros (so the block outputs its pre-FFN residual)."""

    def __init__(self, layer: nn.Linear, tokens: slice, stash: list[torch.Tensor] | None, stop: bool):
        super().__init__()
        self.hessian = HessianAccumulator(layer.in_features)
        self.out_features, self.tokens, self.stash, self.stop = layer.out_features, tokens, stash, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (b, L, in)
        self.hessian.add(x[:, self.tokens])
        if self.stash is not None:
            self.stash.append(x.detach())
        if self.stop:
            raise StopBlock
        return x.new_zeros(*x.shape[:-1], self.out_features)


class Replay(nn.Module):
    """Stands in for a block's attention: the (pruned) `proj` applied to the stashed head outputs, kept columns only."""

    def __init__(self, proj: nn.Linear, stash: list[torch.Tensor], keep: torch.Tensor):
        super().__init__()
        self.proj, self.stash, self.keep, self.next = proj, stash, keep, 0

    def forward(self, x: torch.Tensor, bias=None, past=None):
        a = self.stash[self.next]
        self.next = (self.next + 1) % len(self.stash)
        return self.proj(a.index_select(-1, self.keep)), None


class Skip(nn.Module):
    """Stands in for a block's attention whose output is already in the residual."""

    def forward(self, x: torch.Tensor, bias=None, past=None):
        return torch.zeros_like(x), None


@contextlib.contextmanager
def swapped(parent: nn.Module, name: str, stand_in: nn.Module | None) -> Iterator[None]:
    if stand_in is None:
        yield
        return
    original = getattr(parent, name)
    setattr(parent, name, stand_in)
    try:
        yield
    finally:
        setattr(parent, name, original)


class ActivationStream:
    """The calibration set's input to the current block, advanced in mini-batches of `batch_size`."""

    def __init__(self, var: VAR, calib: Calibration, batch_size: int):
        self.var, self.batch_size = var, batch_size
        n, L, C = len(calib), var.cfg.seq_len, var.cfg.embed_dim
        self.x = torch.empty(n, L, C)
        cond = []
        with torch.no_grad():
            for sl in self.batches():
                self.x[sl], cond_BD = var.embed_sequence(calib.labels[sl], calib.x_in[sl])
                cond.append(var.block_condition(cond_BD))
        self.cond = torch.cat(cond)  # (N, C) or (N, 1, 6, C) with shared AdaLN

    def batches(self) -> Iterator[slice]:
        for start in range(0, self.x.shape[0], self.batch_size):
            yield slice(start, start + self.batch_size)

    @torch.no_grad()
    def run(self, block: nn.Module, write: bool) -> None:
        """Run `block` on every mini-batch; with `write`, its outputs replace the buffer."""
        bias = self.var.attn_bias_for_masking
        for sl in self.batches():
            try:
                out, _ = block(self.x[sl], self.cond[sl], bias)
            except StopBlock:
                continue
            if write:
                self.x[sl] = out
