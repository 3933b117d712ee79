"""Tiny models for fast tests: non-uniform per-block dims, as pruned models have."""
from __future__ import annotations

import pytest
import torch

from evar.checkpoints import Model, build_model
from evar.config import ModelConfig, VARConfig, VQVAEConfig

TINY_PATCH_NUMS = (1, 2, 3, 4)


def tiny_config(shared_aln: bool = False, attn_l2_norm: bool = True) -> ModelConfig:
    vqvae = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                        v_patch_nums=TINY_PATCH_NUMS)
    var = VARConfig(depth=3, embed_dim=64, num_heads=(2, 1, 3), ffn_dims=(128, 96, 64), head_dim=16,
                    vocab_size=64, cvae=8, num_classes=10, patch_nums=TINY_PATCH_NUMS,
                    shared_aln=shared_aln, attn_l2_norm=attn_l2_norm)
    return ModelConfig(var=var, vqvae=vqvae, provenance={"source": "tests"})


def tiny_model(seed: int = 0, **kw) -> Model:
    torch.manual_seed(seed)
    model = build_model(tiny_config(**kw))
    # Random init leaves AdaLN gates near zero; scale them up so every block matters in the tests.
    with torch.no_grad():
        for block in model.var.blocks:
            if hasattr(block, "ada_lin"):
                block.ada_lin[-1].weight.normal_(0, 0.05)
                block.ada_lin[-1].bias.normal_(0, 0.5)
        model.var.head.weight.normal_(0, 0.2)
    return model.eval()


@pytest.fixture
def tiny() -> Model:
    return tiny_model()
