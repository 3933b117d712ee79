"""Which Linear layers of a VAR are sparsified, in the order their inputs are computed.

Inside a block the order is the data path's: the AdaLN modulation (its output scales the next inputs),
the fused qkv, the attention projection, then the FFN; so a layer is calibrated on the outputs of the
already sparsified layers before it. The head (the head's AdaLN and the vocabulary projection) and the
embeddings (`word_embed`, a shared AdaLN) are left dense unless asked for.
"""
from __future__ import annotations

from torch import nn

from evar.models.var import VAR


def block_stages(var: VAR, i: int) -> list[list[str]]:
    """Block i's layers as stages: each stage's inputs depend only on the stages before it."""
    p = f"blocks.{i}."
    ada = [] if var.cfg.shared_aln else [[p + "ada_lin.1"]]
    return [*ada, [p + "attn.mat_qkv"], [p + "attn.proj"], [p + "ffn.fc1"], [p + "ffn.fc2"]]


def embed_layers(var: VAR) -> list[str]:
    return ["word_embed", *(["shared_ada_lin.1"] if var.cfg.shared_aln else [])]


def head_stages() -> list[list[str]]:
    return [["head_nm.ada_lin.1"], ["head"]]


def target_layers(var: VAR, head: bool = False, embed: bool = False) -> list[str]:
    names = embed_layers(var) if embed else []
    names += [n for i in range(var.cfg.depth) for stage in block_stages(var, i) for n in stage]
    if head:
        names += [n for stage in head_stages() for n in stage]
    return names


def linear(var: VAR, name: str) -> nn.Linear:
    layer = var.get_submodule(name)
    assert isinstance(layer, nn.Linear), name
    return layer
