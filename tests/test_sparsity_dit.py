"""`evar sparsify` on DiTs, through the same per-family hook as VAR and ViT."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from evar.dit.checkpoint import load_dit_dir, save_dit_dir
from evar.sparsity.oneshot import sparsify
from evar.sparsity.patterns import Pattern, follows
from evar.sparsity.recipe import SparsifyRecipe
from evar.sparsity.targets import linear
from tests.test_dit import tiny_dit

FAST = dict(calib_samples=16, calib_batch=8)
BLOCK_LAYERS = ("adaLN_modulation.1", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@pytest.mark.parametrize("method,update", [("magnitude", True), ("wanda", True), ("sparsegpt", True),
                                           ("sparsegpt", False)])
def test_every_group_of_4_has_exactly_2_zeros(method, update):
    model = tiny_dit()
    sp = sparsify(model, SparsifyRecipe(method=method, update=update, **FAST), progress=False)
    assert sorted(sp.masks) == sorted(f"blocks.{i}.{n}" for i in range(2) for n in BLOCK_LAYERS)
    for name, mask in sp.masks.items():
        w = linear(model.dit, name).weight
        assert follows(mask, Pattern.parse("2:4")) and ((w == 0).reshape(-1, 4).sum(-1) == 2).all(), name
    assert linear(model.dit, "final_layer.linear").weight.ne(0).all()


def test_learnable_masks_lower_the_error_of_their_prior(tmp_path):
    from evar.dit.prune import DiTPruneRecipe, calibration
    from evar.sparsity.pipeline import learnable

    recipe = SparsifyRecipe(method="learnable", prior="magnitude", steps=40, batch_size=16, data_samples=64,
                            ckpt_every=40, **FAST)
    teacher, prior_model, student = tiny_dit(), tiny_dit(), tiny_dit()
    sparsify(prior_model, recipe, method="magnitude", progress=False)
    sp = learnable(student, teacher, recipe, tmp_path / "work", "tests:tiny", "tests:tiny")
    assert all(follows(m, Pattern.parse("2:4")) for m in sp.masks.values())
    held = calibration(teacher, DiTPruneRecipe(sparsity=0.0, calib_samples=64, seed=99))
    with torch.no_grad():
        t = teacher.dit(held.x_t, held.t, held.labels)
        err = {k: float(F.mse_loss(m.dit(held.x_t, held.t, held.labels), t))
               for k, m in (("prior", prior_model), ("learnt", student))}
    assert err["learnt"] < err["prior"], err


def test_sparsify_command_writes_a_dit_directory_that_info_and_sample_load(tmp_path, monkeypatch, capsys):
    from evar.apps import cli

    save_dit_dir(tiny_dit(), tmp_path / "dense")

    def evar(*args: str) -> tuple[int, str, str]:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", ["evar", *args])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        captured = capsys.readouterr()
        return exc.value.code, captured.out, captured.err

    code, out, err = evar("sparsify", "--model", "dense", "--method", "wanda", "--calib-samples", "16", "--out", "s")
    assert code in (0, None) and "2:4 wanda: 10 layers, 50.0%" in out and "DiT's" in out, err
    loaded = load_dit_dir(tmp_path / "s")
    assert loaded.sparsity.method == "wanda" and loaded.pixel_space
    code, out, _ = evar("info", "--model", "s")
    assert "sparsity: 2:4 (wanda), 10 masked layers" in out
    code, out, err = evar("sample", "--model", "s", "--classes", "1", "--per-class", "2", "--ddim-steps", "2",
                          "--out", "imgs")
    assert code in (0, None), err
    code, _, err = evar("sparsify", "--model", "dense", "--include-embed", "--out", "t")
    assert code == 2 and "--include-embed" in err and err.count("\n") == 1 and not (tmp_path / "t").exists()
