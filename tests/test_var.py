import math

import pytest
import torch

from evar.config import ConfigError, VARConfig
from evar.models.decoding import generate
from evar.models.var import VAR
from tests.conftest import tiny_model

D16_SHAPES = {  # the FoundationVision var_d16.pth release file, C = 1024
    "pos_start": (1, 1, 1024), "pos_1LC": (1, 680, 1024), "lvl_1L": (1, 680),
    "attn_bias_for_masking": (1, 1, 680, 680), "word_embed.weight": (1024, 32), "word_embed.bias": (1024,),
    "class_emb.weight": (1001, 1024), "lvl_embed.weight": (10, 1024),
    "blocks.0.attn.scale_mul_1H11": (1, 16, 1, 1), "blocks.0.attn.q_bias": (1024,), "blocks.0.attn.v_bias": (1024,),
    "blocks.0.attn.zero_k_bias": (1024,), "blocks.0.attn.mat_qkv.weight": (3072, 1024),
    "blocks.15.attn.proj.weight": (1024, 1024), "blocks.15.attn.proj.bias": (1024,),
    "blocks.7.ffn.fc1.weight": (4096, 1024), "blocks.7.ffn.fc1.bias": (4096,), "blocks.7.ffn.fc2.weight": (1024, 4096),
    "blocks.7.ada_lin.1.weight": (6144, 1024), "blocks.7.ada_lin.1.bias": (6144,),
    "head_nm.ada_lin.1.weight": (2048, 1024), "head_nm.ada_lin.1.bias": (2048,),
    "head.weight": (4096, 1024), "head.bias": (4096,),
}


def test_official_d16_layout_by_name_and_shape():
    with torch.device("meta"):
        var = VAR(VARConfig.official(16))
    state = var.state_dict()
    assert len(state) == 220
    for name, shape in D16_SHAPES.items():
        assert tuple(state[name].shape) == shape, name
    assert not any(k.endswith("mat_qkv.bias") for k in state)  # fused qkv has no weight bias
    assert abs(sum(p.numel() for p in var.parameters()) / 1e6 - 310.28) < 0.01


def test_official_depths_param_counts():
    expected = {20: 600.92, 24: 1033.4, 30: 2010.0}
    for depth, millions in expected.items():
        with torch.device("meta"):
            var = VAR(VARConfig.official(depth))
        assert abs(sum(p.numel() for p in var.parameters()) / 1e6 - millions) / millions < 1e-4


def test_shared_adaln_keys():
    cfg = VARConfig.uniform(depth=2, embed_dim=64, heads=2, head_dim=32, shared_aln=True, vocab_size=32,
                            num_classes=4, patch_nums=(1, 2))
    keys = VAR(cfg).state_dict().keys()
    assert "blocks.0.ada_gss" in keys and "shared_ada_lin.1.weight" in keys
    assert not any(".ada_lin." in k and k.startswith("blocks.") for k in keys)


def test_block_causal_mask():
    var = tiny_model().var
    mask = var.attn_bias_for_masking[0, 0]
    # token 0 (scale 0) sees only itself; tokens of scale 1 (1..4) see scales 0 and 1 but not scale 2
    assert mask[0, 0] == 0 and torch.isinf(mask[0, 1:]).all()
    assert (mask[1:5, :5] == 0).all() and torch.isinf(mask[1:5, 5:]).all()
    assert (mask[-1] == 0).all()


def _teacher_forced_logits(model, labels, tokens):
    x = model.vqvae.idx_to_var_input(tokens)
    return model.var(labels, x)


@pytest.mark.parametrize("variant", [{}, {"shared_aln": True}, {"attn_l2_norm": False}])
def test_cached_generation_equals_full_sequence(variant):
    model = tiny_model(**variant)
    labels = torch.tensor([1, 7, 3])
    gen = generate(model.var, model.vqvae, labels, guidance=2.0, top_k=10, top_p=0.9, seed=5, keep_logits=True)
    doubled = torch.cat((labels, torch.full_like(labels, model.config.var.num_classes)))
    tokens2 = [t.repeat(2, 1) for t in gen.tokens]  # both CFG halves were fed the same sampled tokens
    full = _teacher_forced_logits(model, doubled, tokens2)
    cached = torch.cat(gen.scale_logits, dim=1)
    assert cached.shape == full.shape
    assert (cached - full).abs().max().item() <= 1e-4


def test_math_attention_equals_sdpa():
    model = tiny_model()
    math_var = VAR(model.config.var, attn_impl="math")
    math_var.load_state_dict(model.var.state_dict())
    labels = torch.tensor([2, 5])
    tokens = [torch.randint(64, (2, pn * pn)) for pn in model.config.var.patch_nums]
    x = model.vqvae.idx_to_var_input(tokens)
    assert torch.allclose(model.var(labels, x), math_var.eval()(labels, x), atol=1e-5)


def test_same_seed_same_tokens_and_chunking_invariance():
    model = tiny_model()
    labels = torch.tensor([0, 1, 2, 3])
    a = generate(model.var, model.vqvae, labels, guidance=1.5, top_k=20, top_p=0.9, seed=11)
    b = generate(model.var, model.vqvae, labels, guidance=1.5, top_k=20, top_p=0.9, seed=11)
    c = generate(model.var, model.vqvae, labels, guidance=1.5, top_k=20, top_p=0.9, seed=12)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert not all(torch.equal(x, y) for x, y in zip(a.tokens, c.tokens))
    tail = generate(model.var, model.vqvae, labels[2:], guidance=1.5, top_k=20, top_p=0.9, seed=11, first_sample=2)
    assert all(torch.equal(x[2:], y) for x, y in zip(a.tokens, tail.tokens))
    assert a.images.shape == (4, 3, 8, 8) and a.images.min() >= -1 and a.images.max() <= 1
    tokens_only = generate(model.var, model.vqvae, labels, guidance=1.5, top_k=20, top_p=0.9, seed=11, decode=False)
    assert tokens_only.images is None and all(torch.equal(x, y) for x, y in zip(a.tokens, tokens_only.tokens))


def test_hidden_states_returned_per_block():
    model = tiny_model()
    tokens = [torch.randint(64, (2, pn * pn)) for pn in model.config.var.patch_nums]
    logits, hidden = model.var(torch.tensor([1, 2]), model.vqvae.idx_to_var_input(tokens), return_hidden=True)
    assert len(hidden) == 3 and hidden[-1].shape == (2, 30, 64) and logits.shape == (2, 30, 64)


def test_config_validation_errors():
    with pytest.raises(ConfigError, match="one head count"):
        VARConfig(depth=2, embed_dim=64, num_heads=(1,), ffn_dims=(8, 8)).validate()
    with pytest.raises(ConfigError, match="at least one attention head"):
        VARConfig(depth=1, embed_dim=64, num_heads=(0,), ffn_dims=(8,)).validate()
    with pytest.raises(ConfigError, match="no official VAR"):
        VARConfig.official(17)
    assert math.isclose(VARConfig.official(16).seq_len, 680)


def test_generations_made_in_parts_concatenate_to_the_whole():
    """What DDP distillation relies on: each rank samples its part of the set, rank 0 concatenates them."""
    from evar.calibration import from_generations
    from evar.samples import SamplingSettings

    model, settings = tiny_model(), SamplingSettings(seed=5)
    whole = from_generations(model, 7, settings, batch_size=3, progress=False)
    parts = [from_generations(model, 7, settings, batch_size=2, progress=False, part=p) for p in ((0, 3), (3, 7))]
    assert torch.equal(torch.cat([p.tokens for p in parts]), whole.tokens)
    assert torch.equal(torch.cat([p.labels for p in parts]), whole.labels)
