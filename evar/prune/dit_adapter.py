"""DiT's adapter: per block, its attention heads and its FFN units (as VAR's, with DiT's module names).

A head is head_dim consecutive rows of each third of `attn.qkv` (q | k | v, head-major) and the same
channels as `attn.proj` input columns (the consumer the criteria see); an FFN unit is one `mlp.fc1` row
and the matching `mlp.fc2` column. The residual width and the adaLN modulations never change.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import nn

from evar.checkpoints import load_strict
from evar.dit.checkpoint import DiTModel, build_dit
from evar.dit.model import Attention, DiT
from evar.errors import EvarError
from evar.prune.adapter import Prunable
from evar.prune.surgery import torch_pruning
from evar.prune.var_adapter import head_channels, remove_units  # an FFN is fc1 → fc2 in both families


class DiTAdapter:
    def __init__(self, dit: DiT):
        self.dit = dit

    def prunables(self) -> list[Prunable]:
        return [p for i, block in enumerate(self.dit.blocks) for p in (block_heads(block, i), block_ffn(block, i))]


def block_heads(block: nn.Module, i: int) -> Prunable:
    attn = block.attn
    return Prunable(f"blocks.{i}.heads", "heads", {f"blocks.{i}.attn.proj": attn.proj}, attn.head_dim,
                    lambda heads: remove_heads(attn, heads), position=i, coupled=[f"blocks.{i}.attn.qkv"])


def block_ffn(block: nn.Module, i: int) -> Prunable:
    mlp = block.mlp
    return Prunable(f"blocks.{i}.ffn", "ffn", {f"blocks.{i}.mlp.fc2": mlp.fc2}, 1,
                    lambda units: remove_units(mlp, units), position=i, coupled=[f"blocks.{i}.mlp.fc1"])


def remove_heads(attn: Attention, heads: Sequence[int]) -> None:
    heads = sorted(set(heads))
    if not heads:
        return
    if len(heads) >= attn.heads or heads[0] < 0 or heads[-1] >= attn.heads:
        raise EvarError(f"cannot remove heads {heads} from an attention with {attn.heads} heads")
    tp, inner = torch_pruning(), attn.heads * attn.head_dim
    cut = head_channels(heads, attn.head_dim)
    tp.prune_linear_out_channels(attn.qkv, [part * inner + c for part in range(3) for c in cut])
    tp.prune_linear_in_channels(attn.proj, cut)
    attn.heads -= len(heads)


def rebuild(model: DiTModel, provenance: dict[str, Any]) -> DiTModel:
    """A DiT built from the pruned config alone and loaded strictly from the cut weights (as loading its
    directory will do), so an inconsistent cut fails before anything is written."""
    heads = tuple(b.attn.heads for b in model.dit.blocks)
    ffns = tuple(b.mlp.fc1.out_features for b in model.dit.blocks)
    config = dataclasses.replace(model.config, num_heads=heads, ffn_dims=ffns)
    fresh = build_dit(config)
    load_strict(fresh, model.dit.state_dict(), "pruned DiT")
    return DiTModel(config, fresh, provenance).eval()
