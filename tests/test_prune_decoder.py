"""Pruning the VQVAE decoder: adapters, coupled channel sets, decoder widths in the config, the commands."""
import dataclasses
import json
import sys

import pytest
import torch
from torch import nn

from evar.checkpoints import build_model, load_model_dir, save_model_dir
from evar.config import ConfigError, DecoderLevel, DecoderWidths, ModelConfig, VARConfig, VQVAEConfig
from evar.errors import EvarError
from evar.prune.decoder import DecoderRecipe, decoder_macs, prune_decoder
from evar.prune.decoder_adapter import DecoderAdapter
from evar.prune.obs import HessianAccumulator, ObsPart, obs_prune, obs_remove
from evar.prune.pipeline import save_pruned
from evar.prune.var_adapter import VARAdapter
from tests.conftest import tiny_model

pytest.importorskip("torch_pruning")


def three_level_model(seed: int = 0):
    """16-pixel model whose decoder has a shortcut conv (up.2 → up.1) and a plain add (up.1 → up.0), attention
    at the lowest level, and 2 or 4 channels per GroupNorm group (so 50% pruning is possible everywhere)."""
    patch_nums = (1, 2, 4)
    vqvae = VQVAEConfig(vocab_size=64, z_channels=8, ch=64, ch_mult=(1, 1, 2), num_res_blocks=1,
                        v_patch_nums=patch_nums)
    var = VARConfig(depth=2, embed_dim=64, num_heads=(2, 2), ffn_dims=(128, 128), head_dim=32, vocab_size=64, cvae=8,
                    num_classes=10, patch_nums=patch_nums)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(var, vqvae, {"source": "tests"}))
    with torch.no_grad():  # random GroupNorm affines, so channels differ in what they carry
        for m in model.vqvae.decoder.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.2, 2.0)
    return model.eval()


def _decode(model, f_hat):
    with torch.no_grad():
        return model.vqvae.fhat_to_img(f_hat)


def _f_hat(model, n=4, seed=1):
    c = model.config.vqvae
    return torch.randn(n, c.z_channels, c.v_patch_nums[-1], c.v_patch_nums[-1], generator=torch.Generator().manual_seed(seed))


FAST = dict(calib_samples=8, calib_batch=4)


# ---------------------------------------------------------------- adapters against a hand count
def test_var_adapter_lists_heads_and_ffn_units_of_every_block():
    sets = VARAdapter(tiny_model().var).prunables()
    assert [(p.name, p.kind, p.count, list(p.consumers)) for p in sets] == [
        ("blocks.0.heads", "heads", 2, ["blocks.0.attn.proj"]), ("blocks.0.ffn", "ffn", 128, ["blocks.0.ffn.fc2"]),
        ("blocks.1.heads", "heads", 1, ["blocks.1.attn.proj"]), ("blocks.1.ffn", "ffn", 96, ["blocks.1.ffn.fc2"]),
        ("blocks.2.heads", "heads", 3, ["blocks.2.attn.proj"]), ("blocks.2.ffn", "ffn", 64, ["blocks.2.ffn.fc2"])]
    assert sets[0].channels == 16 and sets[1].channels == 1 and "blocks.0.attn.mat_qkv" in sets[0].coupled


def test_decoder_adapter_matches_a_hand_count():
    """By hand: the top stream runs conv_in → mid → up.2; up.2's upsample feeds up.1 through a shortcut conv;
    up.1's upsample output is added unchanged in up.0, so up.0's stream starts at that upsample conv."""
    sets = {p.name: p for p in DecoderAdapter(three_level_model().vqvae).prunables()}
    d = "decoder."
    assert list(sets) == ["up.2.stream", "mid.block_1.inner", "mid.block_2.inner", "up.2.block.0.inner",
                          "up.2.block.1.inner", "up.2.upsample", "up.1.stream", "up.1.block.0.inner",
                          "up.1.block.1.inner", "up.0.stream", "up.0.block.0.inner", "up.0.block.1.inner"]
    assert {n: p.count for n, p in sets.items()} == {
        "up.2.stream": 128, "mid.block_1.inner": 128, "mid.block_2.inner": 128, "up.2.block.0.inner": 128,
        "up.2.block.1.inner": 128, "up.2.upsample": 128, "up.1.stream": 64, "up.1.block.0.inner": 64,
        "up.1.block.1.inner": 64, "up.0.stream": 64, "up.0.block.0.inner": 64, "up.0.block.1.inner": 64}
    assert all(p.partitions == 32 and p.kind == "channels" for p in sets.values())
    top = sets["up.2.stream"]
    assert set(top.consumers) == {d + n for n in ("mid.block_1.conv1", "mid.attn_1.qkv", "mid.block_2.conv1",
                                                  "up.2.block.0.conv1", "up.2.attn.0.qkv", "up.2.block.1.conv1",
                                                  "up.2.attn.1.qkv", "up.2.upsample.conv")}
    assert {d + "conv_in", d + "mid.attn_1.proj_out", d + "up.2.attn.1.norm", d + "up.2.block.1.conv2"} <= set(top.coupled)
    assert set(sets["up.2.upsample"].consumers) == {d + "up.1.block.0.conv1", d + "up.1.block.0.nin_shortcut"}
    assert set(sets["up.1.stream"].consumers) == {d + "up.1.block.1.conv1", d + "up.1.upsample.conv"}
    assert set(sets["up.0.stream"].consumers) == {d + n for n in ("up.0.block.0.conv1", "up.0.block.1.conv1", "conv_out")}
    assert {d + "up.1.upsample.conv", d + "norm_out", d + "up.0.block.0.norm1"} <= set(sets["up.0.stream"].coupled)
    assert set(sets["up.1.block.0.inner"].consumers) == {d + "up.1.block.0.conv2"}


# ---------------------------------------------------------------- pruning
@pytest.mark.parametrize("method", ["magnitude", "taylor", "obs"])
def test_pruning_keeps_every_residual_and_groupnorm_consistent(method):
    model = three_level_model()
    data = "digits" if method == "taylor" else "teacher"
    result = prune_decoder(model, DecoderRecipe(0.5, method=method, calib_data=data, **FAST), progress=False)
    dec = result.model.vqvae.decoder
    for m in dec.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_groups == 32 and m.num_channels % 32 == 0 and m.weight.shape == (m.num_channels,)
    for block in [dec.mid.block_1, dec.mid.block_2, *(b for lv in dec.up for b in lv.block)]:
        assert block.conv1.in_channels == block.norm1.num_channels and block.conv2.in_channels == block.norm2.num_channels
        assert block.conv1.out_channels == block.norm2.num_channels
    # every channel count halved: 4 or 2 per group → 2 or 1
    assert result.report["decoder_widths"] == {
        "mid": [64, 64], "levels": [{"width": 32, "blocks": [32, 32], "upsample": None},
                                    {"width": 32, "blocks": [32, 32], "upsample": 32},
                                    {"width": 64, "blocks": [64, 64], "upsample": 64}]}
    for s in result.report["sets"]:
        assert s["channels"][1] == s["channels"][0] // 2
    assert result.report["decoder_params"]["after"] == sum(p.numel() for p in dec.parameters())
    assert result.report["decoder_macs_per_image"]["after"] == decoder_macs(result.model.config.vqvae)
    image = _decode(result.model, _f_hat(model))
    assert image.shape == (4, 3, 16, 16) and torch.isfinite(image).all()


def test_removed_counts_follow_the_schedule_per_groupnorm_group():
    model = three_level_model()
    recipe = DecoderRecipe(0.25, method="magnitude", schedule="log_increase", min_sparsity=0.0, max_sparsity=0.5)
    result = prune_decoder(model, recipe, progress=False)
    per_level = recipe.sparsity_schedule().per_block(3)  # lowest resolution (level 2) first
    for s in result.report["sets"]:
        before, after = s["channels"]
        sparsity = per_level[2 - s["level"]]
        assert s["sparsity"] == pytest.approx(sparsity, abs=1e-4)
        assert before - after == 32 * int(before // 32 * sparsity + 0.5 + 1e-9)
    assert result.report["decoder_widths"]["levels"][2]["width"] == 128  # the lowest level keeps everything


def test_zero_sparsity_is_the_identity():
    model = three_level_model()
    dense = _decode(model, _f_hat(model))
    result = prune_decoder(model, DecoderRecipe(0.0, method="obs", **FAST), progress=False)
    assert result.model.config.vqvae.decoder_widths is None and result.report["calibration"] is None
    assert torch.equal(_decode(result.model, _f_hat(model)), dense)


def test_iterative_steps_reach_the_one_shot_widths():
    one = prune_decoder(three_level_model(), DecoderRecipe(0.5, method="obs", **FAST), progress=False)
    two = prune_decoder(three_level_model(), DecoderRecipe(0.5, method="obs", iterative_steps=2, **FAST), progress=False)
    assert one.model.config.vqvae.decoder_widths == two.model.config.vqvae.decoder_widths


def test_obs_compensation_brings_the_output_closer_to_the_dense_decoder():
    model = three_level_model()
    f_hat = _f_hat(model, n=8, seed=3)
    dense = _decode(model, f_hat)
    errors = {}
    for compensate in (True, False):
        pruned = prune_decoder(three_level_model(), DecoderRecipe(0.25, method="obs", compensate=compensate,
                                                                  calib_samples=16), progress=False)
        errors[compensate] = float(((_decode(pruned.model, f_hat) - dense) ** 2).mean())
    assert errors[True] < errors[False]


def test_group_obs_over_several_consumers_is_the_sum_of_their_closed_forms():
    """Removing a set of channels from two layers with their own inputs: the error OBS reports is the sum of
    both layers' least-squares refit errors, and with equal partitions each run loses the same number."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(300, 8, generator=g) @ (torch.eye(8) + 0.3 * torch.randn(8, 8, generator=g)) for _ in range(2)]
    ws = [torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g)]
    parts = []
    for x, w in zip(xs, ws):
        acc = HessianAccumulator(8)
        acc.add(x)
        parts.append(ObsPart(w, acc.matrix().double(), 1))
    res = obs_remove(parts, 4, partitions=2, percdamp=0.0, dtype=torch.float64)
    assert sorted(g // 4 for g in res.removed) == [0, 0, 1, 1]
    keep = [c for c in range(8) if c not in res.removed]
    refit = 0.0
    for x, w, w_hat in zip(xs, ws, res.weights):
        x = x.double()
        best = torch.linalg.lstsq(x[:, keep], x @ w.double().T).solution
        refit += float(((x @ w.double().T - x[:, keep] @ best) ** 2).sum()) * 2 / len(x)
        assert torch.allclose(x @ w_hat.double().T, x[:, keep] @ best, atol=1e-6)
    assert res.error == pytest.approx(refit, rel=1e-6)
    one = obs_prune(ws[0], parts[0].hessian, 1, 3, percdamp=0.0, dtype=torch.float64)
    assert obs_remove(parts[:1], 3, percdamp=0.0, dtype=torch.float64).removed == one.removed


# ---------------------------------------------------------------- the config and the model directory
def test_decoder_widths_round_trip_and_load_without_torch_pruning(tmp_path, monkeypatch):
    result = prune_decoder(three_level_model(), DecoderRecipe(0.5, method="magnitude"), parent="tests", progress=False)
    save_pruned(result, tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["vqvae"]["decoder_widths"]["levels"][0] == {"width": 32, "blocks": [32, 32], "upsample": None}
    assert config["provenance"]["source"] == "evar prune-decoder"
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # loading must not need it
    loaded = load_model_dir(tmp_path / "p")
    f_hat = _f_hat(loaded)
    assert torch.equal(_decode(loaded, f_hat), _decode(result.model, f_hat))
    assert loaded.vqvae.decoder.up[1].block[0].nin_shortcut.weight.shape == (32, 64, 1, 1)


def test_an_unpruned_config_reads_as_before():
    cfg = tiny_model().config
    assert "decoder_widths" not in cfg.to_dict()["vqvae"]
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("level1, message", [
    (DecoderLevel(32, (48, 32), 32), "multiples of 32"),
    (DecoderLevel(32, (32, 32), 64), "must equal level 0's width 32"),
    (DecoderLevel(32, (32,), 32), "needs 2 block widths"),
    (DecoderLevel(32, (32, 32), None), "level 1 has no upsample width"),
])
def test_inconsistent_decoder_widths_are_refused(level1, message):
    vq = three_level_model().config.vqvae
    plan = DecoderWidths.dense(vq)
    levels = (DecoderLevel(32, (32, 32), None), level1, plan.levels[2])
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(vq, decoder_widths=DecoderWidths(plan.mid, levels)).validate()


# ---------------------------------------------------------------- the commands
def _cli(*args):
    from typer.testing import CliRunner

    from evar.apps.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("args, message", [
    (["prune-decoder", "--sparsity", "0.5"], "would leave the GroupNorm groups of decoder up.0.stream with no channels"),
    (["prune-decoder", "--sparsity", "0.3", "--method", "taylor"], "--method taylor scores decoder channels"),
    (["prune-decoder", "--sparsity", "0.3", "--method", "wanda"], "unknown pruning method 'wanda'"),
    (["prunable", "--component", "vit"], "unknown component 'vit'"),
    (["prunable", "--component", "dit"], "is a VAR generator: its components are var and decoder"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    save_model_dir(tiny_model(), tmp_path / "model")  # 32- and 64-wide decoder: 1 or 2 channels per group
    out = [] if args[0] == "prunable" else ["--out", tmp_path / "out"]
    result = _cli(*args, "--model", tmp_path / "model", *out)
    assert isinstance(result.exception, EvarError) and message in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_prune_then_distill_decoder_from_the_cli(tmp_path):
    model = three_level_model()
    save_model_dir(model, tmp_path / "dense")
    assert _cli("prune-decoder", "--model", tmp_path / "dense", "--sparsity", "0.5", "--method", "magnitude",
                "--out", tmp_path / "p").exit_code == 0
    pruned = load_model_dir(tmp_path / "p")
    assert torch.equal(pruned.var.state_dict()["head.weight"], model.var.state_dict()["head.weight"])  # VAR unchanged
    result = _cli("distill-decoder", "--teacher", tmp_path / "dense", "--student", tmp_path / "p", "--out",
                  tmp_path / "d", "--samples", 16, "--steps", 12, "--batch-size", 8, "--lr", 3e-3, "--ckpt-every", 4)
    assert result.exit_code == 0, result.output
    distilled = load_model_dir(tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "dense", "p"]  # no partial directory left
    f_hat = _f_hat(model, n=8)
    dense = _decode(model, f_hat)
    assert float(((_decode(distilled, f_hat) - dense) ** 2).mean()) < float(((_decode(pruned, f_hat) - dense) ** 2).mean())
    assert distilled.config.vqvae.decoder_widths == pruned.config.vqvae.decoder_widths
    assert distilled.config.provenance["source"] == "evar distill-decoder"
    assert (tmp_path / "d" / "loss.png").exists() and len((tmp_path / "d" / "train_log.jsonl").read_text().splitlines()) == 12


def test_interrupted_decoder_distillation_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from evar.prune import decoder_distill as dd
    from evar.train import Schedule

    model = three_level_model()
    save_model_dir(model, tmp_path / "dense")
    save_pruned(prune_decoder(three_level_model(), DecoderRecipe(0.5, method="magnitude"), progress=False), tmp_path / "p")
    recipe = dd.DecoderDistillRecipe(samples=8, schedule=Schedule(steps=6, batch_size=4, lr=1e-3, weight_decay=0.0,
                                                                  warmup=2, ckpt_every=2))
    whole = load_model_dir(dd.distill_decoder(str(tmp_path / "dense"), str(tmp_path / "p"), tmp_path / "a", recipe))
    real = dd.DecoderLoss.__call__

    def stop_at_step_3(self, gen, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, gen, step)

    monkeypatch.setattr(dd.DecoderLoss, "__call__", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        dd.distill_decoder(str(tmp_path / "dense"), str(tmp_path / "p"), tmp_path / "b", recipe)
    assert (tmp_path / "b.partial" / "train_state.pt").exists() and not (tmp_path / "b").exists()
    monkeypatch.setattr(dd.DecoderLoss, "__call__", real)
    other = dataclasses.replace(recipe, feature_weight=0.5)
    with pytest.raises(EvarError, match="unfinished run with other settings"):
        dd.distill_decoder(str(tmp_path / "dense"), str(tmp_path / "p"), tmp_path / "b", other)
    resumed = load_model_dir(dd.distill_decoder(str(tmp_path / "dense"), str(tmp_path / "p"), tmp_path / "b", recipe))
    a, b = whole.vqvae.state_dict(), resumed.vqvae.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distilling_into_another_tokenizer_is_refused(tmp_path):
    from evar.prune.decoder_distill import DecoderDistillRecipe, distill_decoder

    save_model_dir(three_level_model(), tmp_path / "dense")
    save_model_dir(tiny_model(), tmp_path / "other")
    with pytest.raises(EvarError, match="not the teacher's with another decoder"):
        distill_decoder(str(tmp_path / "dense"), str(tmp_path / "other"), tmp_path / "d", DecoderDistillRecipe())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "other"]


def test_decoder_macs_agree_with_torch_pruning_on_the_convolutions():
    """torch-pruning's hook counter sees every conv (and counts GroupNorms, which we do not: hence the
    tolerance) but not the attention products, which we add."""
    tp = pytest.importorskip("torch_pruning")
    vqvae = three_level_model().vqvae
    net = nn.Sequential(vqvae.post_quant_conv, vqvae.decoder)
    ops, _ = tp.utils.count_ops_and_params(net, torch.zeros(1, 8, 4, 4))
    attention = 2 * 128 * 16 * 16 * 3  # 3 attention blocks at 4×4 on the 128-wide level
    assert decoder_macs(vqvae.cfg) - attention == pytest.approx(ops, rel=0.03)


def test_a_pruned_decoder_exports_and_runs_without_torch(tmp_path):
    """The ONNX artifact of a pruned model passes the export's parity checks (the decoder graph against
    PyTorch), records the decoder widths in its manifest, and the runtime decodes with it."""
    import numpy as np

    from evar.export.artifact import build_onnx
    from evar.export.onnx import OnnxOptions
    from evar.runtime import Generator
    from evar.contract import load_artifact

    pruned = prune_decoder(three_level_model(), DecoderRecipe(0.5, method="magnitude"), progress=False).model
    result = build_onnx(pruned, "tests:pruned-decoder", tmp_path / "art", OnnxOptions())
    assert result["parity"].passed
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["model"]["vqvae"]["decoder_widths"]["levels"][2]["width"] == 64
    images = Generator(load_artifact(tmp_path / "art"), "cpu").generate(np.array([1, 2]), seed=0).images
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
