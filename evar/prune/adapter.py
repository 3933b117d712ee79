"""The adapter contract: how a model family shows its prunable units to the criteria and the surgery.

A `Prunable` is one set of units that go together: attention heads of a block, FFN units of a block, or the
channels of a feature map that every layer around it shares (a residual stream, a conv block's inner
width). It says
  - which layers read the units as input channels (`consumers`: nn.Linear or nn.Conv2d; a unit is
    `channels` input channels of each, i.e. channels·kh·kw columns of a conv's (out, in·kh·kw) weight);
  - how the units must be removed to keep the model valid (`partitions`: e.g. GroupNorm groups, which must
    all lose the same number of channels);
  - how to cut them (`cut`): from every producer, norm and consumer, leaving a smaller but working model.
Criteria see only the consumers' weights and statistics (`evar.prune.criteria.Group`); `evar.prune.surgery`
applies their choice through `cut`. Neither learns the family's name: a new family (DiT, ViT, ...) adds an
adapter that lists its `Prunable`s and nothing else changes. Families so far: `var_adapter` (the VAR
transformer), `dit_adapter` (a DiT's blocks), `decoder_adapter` (the VQVAE decoder).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn


@dataclass
class Prunable:
    name: str  # e.g. "blocks.3.heads", "up.1.stream": for messages and reports
    kind: str  # "heads" | "ffn" | "channels": what one unit is
    consumers: dict[str, nn.Module]  # module name → layer whose input channels hold the units
    channels: int  # input channels per unit (head_dim for a head, 1 for an FFN unit or a conv channel)
    cut: Callable[[list[int]], None]  # remove these units (current positions) everywhere they live
    partitions: int = 1  # the units form this many equal consecutive runs, each losing the same number
    position: int = 0  # where a schedule sees it (a VAR block; a decoder level in data-flow order)
    coupled: list[str] = field(default_factory=list)  # every other layer that loses the units' channels

    @property
    def count(self) -> int:
        layer = next(iter(self.consumers.values()))
        return in_channels(layer) // self.channels


class Adapter(Protocol):
    """A model family: every prunable set of units, in data-flow order."""

    def prunables(self) -> list[Prunable]: ...


def in_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def columns_per_channel(layer: nn.Module) -> int:
    """Columns of the 2-D weight per input channel: 1 for a Linear, kh·kw for a conv."""
    return 1 if isinstance(layer, nn.Linear) else math.prod(layer.kernel_size)


def matrix(layer: nn.Module) -> torch.Tensor:
    """A copy of the layer's weight as (out, in·kh·kw): input channel c owns columns [c·kh·kw, (c+1)·kh·kw),
    which is also the order `F.unfold` lays out a conv's inputs in (so Hessians line up with columns)."""
    return layer.weight.detach().flatten(1).clone()


def write_matrix(layer: nn.Module, weight: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype).view_as(layer.weight))
