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


def _seeded_model(config: ModelConfig, seed: int) -> Model:
    torch.manual_seed(seed)
    model = build_model(config)
    # Random init leaves AdaLN gates near zero; scale them up so every block matters in the tests.
    with torch.no_grad():
        for block in model.var.blocks:
            if hasattr(block, "ada_lin"):
                block.ada_lin[-1].weight.normal_(0, 0.05)
                block.ada_lin[-1].bias.normal_(0, 0.5)
        model.var.head.weight.normal_(0, 0.2)
    return model.eval()


def tiny_model(seed: int = 0, **kw) -> Model:
    return _seeded_model(tiny_config(**kw), seed)


def few_scale_model(patch_nums: tuple[int, ...] = (1, 2), seed: int = 0) -> Model:
    """A one-level VQVAE and 2-block VAR over few scales: every Core ML conversion is per scale, so fewer scales
    make faster tests."""
    vqvae = VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1,), num_res_blocks=1, using_sa=False,
                        using_mid_sa=False, v_patch_nums=patch_nums)
    var = VARConfig(depth=2, embed_dim=32, num_heads=(2, 1), ffn_dims=(64, 48), head_dim=16, vocab_size=32, cvae=8,
                    num_classes=4, patch_nums=patch_nums)
    return _seeded_model(ModelConfig(var, vqvae, {"source": "tests"}), seed)


@pytest.fixture
def tiny() -> Model:
    return tiny_model()
