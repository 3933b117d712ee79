"""VAR's adapter: per block, its attention heads and its FFN units, and how to cut them.

A head is head_dim consecutive channels of each of q, k and v (rows of `mat_qkv`, `q_bias`, `zero_k_bias`,
`v_bias`), its entry in `scale_mul_1H11`, and the same channels as `proj` input columns (`proj` is the
consumer the criteria see). An FFN unit is one `fc1` row (+ bias) and the matching `fc2` column (`fc2` is
the consumer). The residual width never changes. `rebuild` makes the model from its new config alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from evar.checkpoints import Model, build_model, load_strict
from evar.config import ModelConfig
from evar.errors import EvarError
from evar.models.var import FFN, VAR, SelfAttention
from evar.prune.adapter import Prunable
from evar.prune.surgery import torch_pruning


class VARAdapter:
    def __init__(self, var: VAR):
        self.var = var

    def prunables(self) -> list[Prunable]:
        return [p for i, block in enumerate(self.var.blocks) for p in (block_heads(block, i), block_ffn(block, i))]


def block_heads(block: nn.Module, i: int) -> Prunable:
    attn = block.attn
    return Prunable(f"blocks.{i}.heads", "heads", {f"blocks.{i}.attn.proj": attn.proj}, attn.head_dim,
                    lambda heads: remove_heads(attn, heads), position=i,
                    coupled=[f"blocks.{i}.attn.{n}" for n in ("mat_qkv", "q_bias", "zero_k_bias", "v_bias",
                                                              "scale_mul_1H11") if hasattr(attn, n)])


def block_ffn(block: nn.Module, i: int) -> Prunable:
    ffn = block.ffn
    return Prunable(f"blocks.{i}.ffn", "ffn", {f"blocks.{i}.ffn.fc2": ffn.fc2}, 1,
                    lambda units: remove_units(ffn, units), position=i, coupled=[f"blocks.{i}.ffn.fc1"])


def head_channels(heads: Sequence[int], head_dim: int) -> list[int]:
    return [h * head_dim + j for h in heads for j in range(head_dim)]


def remove_heads(attn: SelfAttention, heads: Sequence[int]) -> None:
    """Remove attention heads `heads` (current positions) in place and update `num_heads`."""
    heads = sorted(set(heads))
    if not heads:
        return
    if len(heads) >= attn.num_heads or heads[0] < 0 or heads[-1] >= attn.num_heads:
        raise EvarError(f"cannot remove heads {heads} from an attention with {attn.num_heads} heads")
    tp, inner = torch_pruning(), attn.num_heads * attn.head_dim
    cut = head_channels(heads, attn.head_dim)
    tp.prune_linear_out_channels(attn.mat_qkv, [part * inner + c for part in range(3) for c in cut])
    tp.prune_linear_in_channels(attn.proj, cut)
    keep = torch.tensor(sorted(set(range(inner)) - set(cut)))
    attn.q_bias = nn.Parameter(attn.q_bias.detach()[keep].clone())
    attn.v_bias = nn.Parameter(attn.v_bias.detach()[keep].clone())
    attn.zero_k_bias = attn.zero_k_bias[keep].clone()  # a registered buffer: assignment replaces it
    if hasattr(attn, "scale_mul_1H11"):
        kept_heads = torch.tensor(sorted(set(range(attn.num_heads)) - set(heads)))
        attn.scale_mul_1H11 = nn.Parameter(attn.scale_mul_1H11.detach()[:, kept_heads].clone())
    attn.num_heads -= len(heads)


def remove_units(ffn: FFN, units: Sequence[int]) -> None:
    """Remove FFN hidden units `units` (current positions) in place (any module with fc1 → fc2: a DiT's Mlp too)."""
    units = sorted(set(units))
    if not units:
        return
    if len(units) >= ffn.fc1.out_features or units[0] < 0 or units[-1] >= ffn.fc1.out_features:
        raise EvarError(f"cannot remove units {units[:5]}… from an FFN of width {ffn.fc1.out_features}")
    tp = torch_pruning()
    tp.prune_linear_out_channels(ffn.fc1, units)
    tp.prune_linear_in_channels(ffn.fc2, units)


def rebuild(model: Model, provenance: dict[str, Any]) -> Model:
    """A fresh model built from the pruned config alone and loaded strictly from the cut weights.

    This is what `load_model_dir` will do later, so a surgery that left any shape inconsistent with
    the config fails here, before anything is written.
    """
    var = model.var
    heads = tuple(b.attn.num_heads for b in var.blocks)
    ffns = tuple(b.ffn.fc1.out_features for b in var.blocks)
    config = ModelConfig(model.config.var.with_blocks(heads, ffns), model.config.vqvae, provenance)
    with torch.device("meta"):
        fresh = build_model(config)
    fresh.var.to_empty(device="cpu")
    load_strict(fresh.var, var.state_dict(), "pruned VAR")
    return Model(config, fresh.var, model.vqvae).eval()
