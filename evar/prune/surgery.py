"""Cutting whole heads and FFN units out of VAR blocks, and rebuilding the model from its new config.

A head is head_dim consecutive channels of each of q, k and v (rows of `mat_qkv`, `q_bias`,
`zero_k_bias`, `v_bias`), its entry in `scale_mul_1H11`, and the same channels as `proj` input columns.
An FFN unit is one `fc1` row (+ bias) and the matching `fc2` column. The residual width never changes.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from evar.checkpoints import Model, build_model, load_strict
from evar.config import ModelConfig
from evar.errors import EvarError
from evar.models.var import FFN, SelfAttention


def _tp():
    """torch-pruning does the Linear slicing; only pruning needs it (pruned models load without it)."""
    try:
        import torch_pruning
    except ImportError:
        raise EvarError("evar prune needs torch-pruning: pip install 'evar[prune]'") from None
    return torch_pruning


def head_channels(heads: Sequence[int], head_dim: int) -> list[int]:
    return [h * head_dim + j for h in heads for j in range(head_dim)]


def remove_heads(attn: SelfAttention, heads: Sequence[int]) -> None:
    """Remove attention heads `heads` (current positions) in place and update `num_heads`."""
    heads = sorted(set(heads))
    if not heads:
        return
    if len(heads) >= attn.num_heads or heads[0] < 0 or heads[-1] >= attn.num_heads:
        raise EvarError(f"cannot remove heads {heads} from an attention with {attn.num_heads} heads")
    tp, inner = _tp(), attn.num_heads * attn.head_dim
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
    """Remove FFN hidden units `units` (current positions) in place."""
    units = sorted(set(units))
    if not units:
        return
    if len(units) >= ffn.fc1.out_features or units[0] < 0 or units[-1] >= ffn.fc1.out_features:
        raise EvarError(f"cannot remove units {units[:5]}… from an FFN of width {ffn.fc1.out_features}")
    tp = _tp()
    tp.prune_linear_out_channels(ffn.fc1, units)
    tp.prune_linear_in_channels(ffn.fc2, units)


def set_weight(layer: nn.Linear, weight: torch.Tensor) -> None:
    """Write a criterion's (possibly compensated) consumer weight back before its columns are cut."""
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight.dtype))


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
