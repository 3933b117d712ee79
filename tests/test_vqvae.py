import warnings

import pytest
import torch
import torch.nn.functional as F

from evar.config import ConfigError, VQVAEConfig
from evar.models.vqvae import VQVAE, MultiScaleQuantizer, phi_schedule, resize, resize_matrix

TINY = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, v_patch_nums=(1, 2, 3, 4))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny convs gain nothing from threads, and on a busy 2-core box oversubscription makes them ~100x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def official_sd():
    with torch.device("meta"):  # no allocation: instant even at 109M params
        model = VQVAE(VQVAEConfig())
    return model, model.state_dict()


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return VQVAE(TINY)


def _img(batch=2, cfg=TINY, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1


# ---------------------------------------------------------------------------- official layout


def test_official_state_dict_has_checkpoint_keys(official_sd):
    _, sd = official_sd
    assert len(sd) == 324
    expected = {
        "encoder.conv_in.weight": (160, 3, 3, 3),
        "encoder.down.0.block.1.conv2.weight": (160, 160, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (320, 160, 1, 1),
        "encoder.down.4.block.0.nin_shortcut.weight": (640, 320, 1, 1),
        "encoder.down.3.downsample.conv.weight": (320, 320, 3, 3),
        "encoder.down.4.attn.0.qkv.weight": (1920, 640, 1, 1),
        "encoder.down.4.attn.1.proj_out.weight": (640, 640, 1, 1),
        "encoder.mid.attn_1.norm.weight": (640,),
        "encoder.conv_out.weight": (32, 640, 3, 3),
        "decoder.conv_in.weight": (640, 32, 3, 3),
        "decoder.mid.block_2.conv1.weight": (640, 640, 3, 3),
        "decoder.up.4.attn.2.qkv.weight": (1920, 640, 1, 1),
        "decoder.up.4.block.2.conv2.weight": (640, 640, 3, 3),
        "decoder.up.1.upsample.conv.weight": (160, 160, 3, 3),
        "decoder.up.0.block.0.conv1.weight": (160, 160, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (160, 320, 1, 1),
        "decoder.norm_out.weight": (160,),
        "decoder.conv_out.weight": (3, 160, 3, 3),
        "quantize.quant_resi.qresi_ls.3.weight": (32, 32, 3, 3),
        "quantize.quant_resi.qresi_ls.0.bias": (32,),
        "quantize.ema_vocab_hit_SV": (10, 4096),
        "quantize.embedding.weight": (4096, 32),
        "quant_conv.weight": (32, 32, 3, 3),
        "post_quant_conv.bias": (32,),
    }
    for name, shape in expected.items():
        assert tuple(sd[name].shape) == shape, name
    # Equal-width blocks carry no shortcut; only levels 0..3 downsample; only up.1..4 upsample.
    assert "encoder.down.0.block.0.nin_shortcut.weight" not in sd
    assert "encoder.down.4.downsample.conv.weight" not in sd
    assert "decoder.up.0.upsample.conv.weight" not in sd
    assert not any(k.startswith("decoder.up.3.attn") for k in sd)


def test_official_param_count(official_sd):
    model, _ = official_sd
    n = sum(p.numel() for p in model.parameters())  # the ema buffer is not a parameter
    assert abs(n / 1e6 - 108.95) < 0.01


def test_phi_schedule():
    assert phi_schedule(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert phi_schedule(1, 4) == (0,)
    assert set(phi_schedule(6, 1)) == {0}
    with torch.device("meta"):
        q = MultiScaleQuantizer(VQVAEConfig())
    assert [q.phi_index(si) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_invalid_config_rejected():
    with pytest.raises(ConfigError):
        VQVAE(VQVAEConfig(ch=48))


# ---------------------------------------------------------------------------------- resizing


@pytest.mark.parametrize("src,dst,mode", [
    (1, 16, "bicubic"), (2, 16, "bicubic"), (3, 16, "bicubic"), (5, 16, "bicubic"), (13, 16, "bicubic"),
    (3, 7, "bicubic"), (16, 13, "bicubic"),
    (16, 1, "area"), (16, 3, "area"), (16, 5, "area"), (16, 10, "area"), (16, 13, "area"), (7, 3, "area"),
])
def test_resize_matches_interpolate(src, dst, mode):
    x = torch.randn(2, 5, src, src, generator=torch.Generator().manual_seed(src * 31 + dst))
    kw = {"align_corners": False} if mode == "bicubic" else {}
    ref = F.interpolate(x, size=(dst, dst), mode=mode, **kw)
    out = resize(x, dst, mode)
    assert out.shape == (2, 5, dst, dst)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


def test_resize_matrix_is_a_copy_and_identity_is_free():
    m = resize_matrix(3, 16, "bicubic")
    assert m.shape == (16, 3) and m.dtype == torch.float32
    m.zero_()
    assert resize_matrix(3, 16, "bicubic").abs().sum() > 0  # the cache was not touched
    x = torch.randn(1, 2, 4, 4)
    assert resize(x, 4, "area") is x
    with pytest.raises(ValueError):
        resize_matrix(3, 4, "bilinear")


# -------------------------------------------------------------------------------- tiny model


def test_img_to_idx_shapes(tiny):
    idx = tiny.img_to_idx(_img())
    assert [tuple(t.shape) for t in idx] == [(2, pn * pn) for pn in TINY.v_patch_nums]
    assert all(t.dtype == torch.long and 0 <= t.min() and t.max() < TINY.vocab_size for t in idx)


def _random_idx(cfg=TINY, batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (batch, pn * pn), generator=g) for pn in cfg.v_patch_nums]


def test_var_input_equals_stepwise_next_input(tiny):
    idx, q, pns = _random_idx(), tiny.quantize, TINY.v_patch_nums
    with torch.no_grad():
        x = tiny.idx_to_var_input(idx)
        f_hat = torch.zeros(2, TINY.z_channels, pns[-1], pns[-1])
        steps, ref_steps, ref_fhat = [], [], torch.zeros_like(f_hat)
        for si, pn in enumerate(pns):
            h = q.embed_idx(idx[si], pn)
            f_hat, nxt = q.next_input(si, f_hat, h)
            # Independent reference: VAR's formulas with F.interpolate itself.
            up = F.interpolate(h, size=(pns[-1], pns[-1]), mode="bicubic") if si < len(pns) - 1 else h
            ref_fhat = ref_fhat + q.phi(si, up)
            if si < len(pns) - 1:
                steps.append(nxt.flatten(2).transpose(1, 2))
                down = F.interpolate(ref_fhat, size=(pns[si + 1],) * 2, mode="area")
                ref_steps.append(down.flatten(2).transpose(1, 2))
        assert x.shape == (2, sum(pn * pn for pn in pns) - 1, TINY.z_channels)
        assert torch.equal(x, torch.cat(steps, 1))
        assert torch.allclose(x, torch.cat(ref_steps, 1), atol=1e-5)
        assert torch.equal(nxt, f_hat)  # last scale: the "next input" is f_hat itself
        assert torch.allclose(tiny.idx_to_fhat(idx), f_hat, atol=1e-6)


def test_next_input_does_not_mutate(tiny):
    q = tiny.quantize
    f_hat, h = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2)
    f0, h0 = f_hat.clone(), h.clone()
    with torch.no_grad():
        new, nxt = q.next_input(1, f_hat, h)
    assert torch.equal(f_hat, f0) and torch.equal(h, h0)
    assert nxt.shape == (1, 8, 3, 3) and not torch.equal(new, f0)


def test_embed_idx_is_row_major(tiny):
    idx = torch.arange(9).view(1, 9)
    h = tiny.quantize.embed_idx(idx, 3)  # (1, Cvae, 3, 3)
    assert torch.equal(h[0, :, 1, 2], tiny.quantize.embedding.weight[5])


def test_idx_to_img_shape_and_range(tiny):
    with torch.no_grad():
        img = tiny.idx_to_img(_random_idx())
    assert img.shape == (2, 3, TINY.image_size, TINY.image_size)
    assert img.min() >= -1 and img.max() <= 1


def test_forward_trains(tiny):
    tiny.train()
    rec, vq_loss, usage = tiny(_img())
    assert rec.shape == (2, 3, TINY.image_size, TINY.image_size)
    assert torch.isfinite(vq_loss) and vq_loss.ndim == 0 and 0 < usage <= 100
    (F.mse_loss(rec, _img()) + vq_loss).backward()
    for p in (tiny.encoder.conv_in.weight, tiny.quantize.embedding.weight,
              tiny.quantize.quant_resi.qresi_ls[0].weight, tiny.decoder.conv_out.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    hits = tiny.quantize.ema_vocab_hit_SV
    assert torch.allclose(hits.sum(1), torch.tensor([2.0 * pn * pn for pn in TINY.v_patch_nums]))


def test_eval_roundtrip_matches_forward(tiny):
    tiny.eval()
    x = _img()
    with torch.no_grad():
        rec, _, _ = tiny(x)
        via_idx = tiny.idx_to_img(tiny.img_to_idx(x))
    assert torch.allclose(via_idx, rec.clamp(-1, 1), atol=1e-5)
    assert tiny.quantize.ema_vocab_hit_SV.abs().sum() == 0  # eval never touches the EMA


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_export_graph_has_no_interpolation(tiny, strict):
    """The resize matrices must reach an exported graph as constants, not as traced interpolate ops."""
    q = tiny.quantize.eval()

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = q

        def forward(self, f_hat, idx):
            return self.q.next_input(1, f_hat, self.q.embed_idx(idx, 2))

    args = (torch.randn(1, 8, 4, 4), torch.randint(0, TINY.vocab_size, (1, 4)))
    ep = torch.export.export(Step(), args, strict=strict)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("upsample" in o or "pool" in o or "eye" in o for o in ops), ops
    for a, b in zip(ep.module()(*args), Step()(*args)):
        assert torch.allclose(a, b, atol=1e-6)


def test_jit_trace_decoder_path(tiny):
    """idx -> image traces to convs and matmuls only, and the trace replays on other indices."""
    tiny.eval()

    class IdxToImg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = tiny

        def forward(self, *idx):
            return self.vae.idx_to_img(list(idx))

    wrapper = IdxToImg()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes become constants, as intended
        warnings.simplefilter("ignore", DeprecationWarning)  # jit.trace still works in torch 2.13
        traced = torch.jit.trace(wrapper, tuple(_random_idx(seed=4)))
        kinds = {n.kind() for n in traced.inlined_graph.nodes()}
        assert not any("upsample_bicubic" in k or "pool" in k or "eye" in k for k in kinds), kinds
        other = _random_idx(seed=5)
        assert torch.allclose(traced(*other), wrapper(*other), atol=1e-5)
