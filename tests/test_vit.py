"""The ViT family: timm's VisionTransformer layout loaded strictly, its directories, and 2:4 on its blocks."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from evar.errors import CheckpointError
from evar.sparsity.oneshot import sparsify
from evar.sparsity.patterns import Pattern, follows
from evar.sparsity.recipe import SparsifyRecipe
from evar.sparsity.targets import linear
from evar.vit.checkpoint import ViTModel, build_vit, load_timm, load_vit_dir, save_vit_dir
from evar.vit.model import ViTConfig, VisionTransformer

TINY = ViTConfig(img_size=8, patch_size=4, in_chans=3, num_classes=10, embed_dim=16, depth=2, num_heads=2, mlp_dim=32)
FAST = dict(calib_samples=16, calib_batch=8)


def timm_state(cfg: ViTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm `VisionTransformer` state dict with random weights, its key names and shapes written out here."""
    g = torch.Generator().manual_seed(seed)
    D, T, H = cfg.embed_dim, cfg.num_patches, cfg.mlp_dim
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, T + 1, D),
              "patch_embed.proj.weight": (D, cfg.in_chans, cfg.patch_size, cfg.patch_size),
              "patch_embed.proj.bias": (D,), "norm.weight": (D,), "norm.bias": (D,),
              "head.weight": (cfg.num_classes, D), "head.bias": (cfg.num_classes,)}
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        shapes.update({p + "norm1.weight": (D,), p + "norm1.bias": (D,), p + "attn.qkv.weight": (3 * D, D),
                       p + "attn.qkv.bias": (3 * D,), p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,),
                       p + "norm2.weight": (D,), p + "norm2.bias": (D,), p + "mlp.fc1.weight": (H, D),
                       p + "mlp.fc1.bias": (H,), p + "mlp.fc2.weight": (D, H), p + "mlp.fc2.bias": (D,)})
    return {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()}


def timm_forward(s: dict[str, torch.Tensor], cfg: ViTConfig, x: torch.Tensor) -> torch.Tensor:
    """timm's ViT forward, functionally, on the state dict (the layout the weights are written for)."""
    D, nh = cfg.embed_dim, cfg.num_heads
    x = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=cfg.patch_size)
    x = torch.cat([s["cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + s["pos_embed"]
    B, N, _ = x.shape
    ln = lambda t, k: F.layer_norm(t, (D,), s[k + ".weight"], s[k + ".bias"], eps=1e-6)  # noqa: E731
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        qkv = F.linear(ln(x, p + "norm1"), s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, N, 3, nh, D // nh).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) / math.sqrt(D // nh)).softmax(-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(B, N, D), s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, p + "norm2"), s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])
    return F.linear(ln(x, "norm")[:, 0], s["head.weight"], s["head.bias"])


def tiny_vit(seed: int = 0) -> ViTModel:
    torch.manual_seed(seed)
    return ViTModel(TINY, VisionTransformer(TINY).eval(), {"source": "tests", "recipe": {"data": "digits"}})


# ---------------------------------------------------------------- the layout
def test_a_timm_state_dict_loads_strictly_and_computes_timm_s_forward(tmp_path):
    state = timm_state(TINY)
    save_file(state, str(tmp_path / "model.safetensors"))
    model = load_timm(tmp_path / "model.safetensors", TINY)
    assert set(model.vit.state_dict()) == set(state)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model.vit(x)
    assert logits.shape == (3, 10)
    torch.testing.assert_close(logits, timm_forward(state, TINY, x), atol=1e-5, rtol=1e-5)
    save_vit_dir(model, tmp_path / "dir")
    again = load_vit_dir(tmp_path / "dir")
    torch.testing.assert_close(again.vit(x), logits)


@pytest.mark.parametrize("edit,words", [
    (lambda s: s.update({"blocks.1.mlp.fc1.weight": torch.zeros(48, 16)}),
     ["key 'blocks.1.mlp.fc1.weight' has shape (48, 16), the model expects (32, 16)"]),
    (lambda s: s.pop("blocks.0.attn.qkv.bias"), ["missing key 'blocks.0.attn.qkv.bias'"]),
    (lambda s: s.update({"fc_norm.weight": torch.ones(16)}), ["unexpected key 'fc_norm.weight'"]),
])
def test_a_mismatched_state_dict_is_refused_naming_the_key(tmp_path, edit, words):
    state = timm_state(TINY)
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_timm(tmp_path / "model.safetensors", TINY)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def _evar(monkeypatch, capsys, cwd: Path, *args: str) -> tuple[int, str, str]:
    from evar.apps import cli

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["evar", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_convert_vit_takes_a_timm_checkpoint_and_refuses_another_shape(tmp_path, monkeypatch, capsys):
    cfg = ViTConfig(img_size=32, patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_dim=768, num_classes=5)
    save_file(timm_state(cfg), str(tmp_path / "tiny.safetensors"))
    code, out, err = _evar(monkeypatch, capsys, tmp_path, "convert-vit", "--ckpt", "tiny.safetensors", "--out", "vt",
                           "--arch", "vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "5")
    assert code in (0, None), err
    code, out, _ = _evar(monkeypatch, capsys, tmp_path, "info", "--model", "vt")
    assert "ViT: depth 12, width 192, heads 3" in out
    code, _, err = _evar(monkeypatch, capsys, tmp_path, "convert-vit", "--ckpt", "tiny.safetensors", "--out", "vs",
                         "--arch", "vit_small_patch16_224", "--img-size", "32", "--num-classes", "5")
    assert code == 2 and err.count("\n") == 1 and "tiny.safetensors: key 'cls_token' has shape (1, 1, 192)" in err, err
    assert not (tmp_path / "vs").exists()
    (tmp_path / "model.pth").write_bytes(b"x")
    for args, words in ((["--ckpt", "model.pth"], "expected a .safetensors file"),
                        (["--ckpt", "tiny.safetensors", "--arch", "vit_huge"], "unknown ViT architecture 'vit_huge'")):
        code, _, err = _evar(monkeypatch, capsys, tmp_path, "convert-vit", "--out", "vx", *args)
        assert code == 2 and err.count("\n") == 1 and words in err, err
        assert not (tmp_path / "vx").exists()
    code, _, err = _evar(monkeypatch, capsys, tmp_path, "sample", "--model", "vt", "--out", "imgs")
    assert code == 2 and "is a ViT classifier" in err and not (tmp_path / "imgs").exists(), err


# ---------------------------------------------------------------- 2:4 on the blocks
@pytest.mark.parametrize("method,update", [("magnitude", True), ("wanda", True), ("sparsegpt", True),
                                           ("sparsegpt", False)])
def test_every_group_of_4_has_exactly_2_zeros(method, update):
    model = tiny_vit()
    sp = sparsify(model, SparsifyRecipe(method=method, update=update, **FAST), progress=False)
    assert sorted(sp.masks) == sorted(f"blocks.{i}.{n}" for i in range(2)
                                      for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    for name, mask in sp.masks.items():
        w = linear(model.vit, name).weight
        assert follows(mask, Pattern.parse("2:4")) and ((w == 0).reshape(-1, 4).sum(-1) == 2).all(), name
    assert linear(model.vit, "head").weight.ne(0).all()  # the head stays dense unless asked


def test_learnable_masks_follow_2_4_and_lower_the_kl_of_their_prior(tmp_path):
    from evar.sparsity.pipeline import learnable

    recipe = SparsifyRecipe(method="learnable", prior="magnitude", steps=60, batch_size=32, data_samples=128,
                            lr=0.05, ckpt_every=60, **FAST)
    teacher, prior_model, student = tiny_vit(), tiny_vit(), tiny_vit()
    sparsify(prior_model, recipe, method="magnitude", progress=False)
    sp = learnable(student, teacher, recipe, tmp_path / "work", "tests:tiny", "tests:tiny")
    for name, mask in sp.masks.items():
        assert follows(mask, Pattern.parse("2:4")) and torch.equal(linear(student.vit, name).weight != 0, mask)
    from evar.data import load_images

    x = load_images("digits", "test", 8)[0]
    with torch.no_grad():
        t = teacher.vit(x).log_softmax(-1)
        kl = {k: float(F.kl_div(m.vit(x).log_softmax(-1), t, log_target=True, reduction="batchmean"))
              for k, m in (("prior", prior_model), ("learnt", student))}
    assert kl["learnt"] < kl["prior"], kl


def test_sparsify_command_writes_a_vit_directory_that_eval_and_info_load(tmp_path, monkeypatch, capsys):
    save_vit_dir(tiny_vit(), tmp_path / "dense")
    code, out, err = _evar(monkeypatch, capsys, tmp_path, "sparsify", "--model", "dense", "--method", "sparsegpt",
                           "--calib-samples", "16", "--out", "sparse")
    assert code in (0, None), err
    assert "2:4 sparsegpt: 8 layers, 50.0%" in out and "ViT's" in out
    loaded = load_vit_dir(tmp_path / "sparse")
    assert loaded.sparsity.method == "sparsegpt" and loaded.provenance["parent"] == "dense"
    code, out, _ = _evar(monkeypatch, capsys, tmp_path, "info", "--model", "sparse")
    assert "sparsity: 2:4 (sparsegpt), 8 masked layers" in out and "blocks.1.mlp.fc2" in out
    code, out, err = _evar(monkeypatch, capsys, tmp_path, "eval", "--model", "sparse", "--out", "r.json")
    assert code in (0, None) and "top-1" in out and "test split (450 images)" in out, err
    import json

    assert json.loads((tmp_path / "r.json").read_text())["images"] == 450


@pytest.mark.parametrize("args,words", [
    (["--pattern", "2:3"], ["--pattern 2:3", "blocks.0.attn.qkv", "not a multiple of 3"]),
    (["--pattern", "unstructured", "--sparsity", "1.5"], ["--sparsity must be in [0, 1)"]),
    (["--method", "learnable"], ["--method learnable", "--teacher"]),
    (["--include-embed"], ["--include-embed", "convolution"]),
    (["--method", "learnable", "--teacher", "builtin:digits"], ["not a ViT"]),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, words):
    save_vit_dir(tiny_vit(), tmp_path / "dense")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _evar(monkeypatch, capsys, tmp_path, "sparsify", "--model", "dense", "--out", "sparse", *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_sparse_vit_whose_weights_changed_is_refused(tmp_path):
    model = tiny_vit()
    model.sparsity = sparsify(model, SparsifyRecipe(method="magnitude"), progress=False)
    save_vit_dir(model, tmp_path / "s")
    state = dict(model.vit.state_dict())
    state["blocks.0.mlp.fc1.weight"] = torch.ones_like(state["blocks.0.mlp.fc1.weight"])
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "s" / "vit.safetensors"))
    with pytest.raises(CheckpointError, match="layer 'blocks.0.mlp.fc1' has non-zero weights where its mask is 0"):
        load_vit_dir(tmp_path / "s")


def test_build_vit_refuses_a_bad_shape():
    from evar.config import ConfigError

    with pytest.raises(ConfigError, match="embed_dim 10 is not a multiple of num_heads 4"):
        build_vit(ViTConfig(embed_dim=10, num_heads=4))
