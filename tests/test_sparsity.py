"""N:M and unstructured sparsity (evar.sparsity): the patterns, Wanda and SparseGPT on hand-checkable cases,
the block-by-block pass on a tiny VAR, masks in model directories, and the command's bad inputs."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evar.checkpoints import load_model_dir, save_model_dir
from evar.errors import CheckpointError, EvarError
from evar.sparsity import methods, storage
from evar.sparsity.oneshot import sparsify
from evar.sparsity.patterns import Pattern, follows, nm_mask
from evar.sparsity.recipe import SparsifyRecipe
from evar.sparsity.targets import linear, target_layers
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(calib_samples=8, calib_batch=4)


def groups_have_exactly(weight: torch.Tensor, zeros: int, m: int) -> bool:
    return bool(((weight == 0).reshape(-1, m).sum(-1) == zeros).all())


# ---------------------------------------------------------------- patterns and scores
def test_nm_mask_drops_the_n_lowest_of_every_group():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 9.0, 8.0]])
    assert nm_mask(score, 2, 4).tolist() == [[True, False, True, False, False, False, True, True]]
    assert nm_mask(score, 4, 8).tolist() == [[True, False, True, False, False, False, True, True]]
    assert nm_mask(score, 6, 8).tolist() == [[False, False, False, False, False, False, True, True]]


def test_wanda_score_on_a_hand_computed_example():
    W = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    norms = torch.tensor([4.0, 1.0, 2.0, 0.25])  # ‖X_j‖₂ of the four inputs
    assert methods.wanda_score(W, norms).tolist() == [[4.0, 2.0, 6.0, 1.0]]
    H = torch.diag(norms ** 2) * (2.0 / 10)  # (2/n)·Σxxᵀ has ‖X_j‖² · 2/n on its diagonal
    result = methods.wanda(W, H, Pattern.parse("2:4"))
    assert result.mask.tolist() == [[True, False, True, False]]  # |W| alone would keep columns 2 and 3
    assert result.weight.tolist() == [[1.0, 0.0, 3.0, 0.0]]
    assert methods.magnitude(W, Pattern.parse("2:4")).mask.tolist() == [[False, False, True, True]]


def test_sparsegpt_update_lowers_the_reconstruction_error():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=gen) @ torch.randn(64, 64, generator=gen)  # correlated inputs
    W = torch.randn(32, 64, generator=gen)
    H = 2.0 / len(X) * X.T @ X
    for pattern in (Pattern.parse("2:4"), Pattern.parse("unstructured", 0.5)):
        with_update = methods.sparsegpt(W, H, pattern, blocksize=16, percdamp=0.01, update=True)
        without = methods.sparsegpt(W, H, pattern, blocksize=16, percdamp=0.01, update=False)
        magnitude = methods.magnitude(W, pattern)
        errors = [methods.reconstruction_error(W, r.weight, H) for r in (with_update, without, magnitude)]
        assert errors[0] < 0.8 * errors[1] and errors[0] < errors[2], errors
        assert follows(with_update.mask, pattern) and torch.equal(with_update.weight != 0, with_update.mask)
        assert torch.equal(without.weight, W * without.mask)  # no update: the kept weights are the originals


def test_pattern_parsing_refuses_bad_patterns_and_sparsities():
    assert Pattern.parse("2:4").sparsity == 0.5 and Pattern.parse("unstructured", 0.3).sparsity == 0.3
    for text, sparsity, words in (("4:4", None, "0 < N < M"), ("2-4", None, "N:M"), ("0:4", None, "0 < N < M"),
                                  ("unstructured", None, "needs --sparsity"), ("unstructured", 1.0, "[0, 1)"),
                                  ("unstructured", -0.1, "[0, 1)"), ("2:4", 0.3, "contradicts")):
        with pytest.raises(EvarError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            Pattern.parse(text, sparsity)


# ---------------------------------------------------------------- the pass over a VAR
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_group_of_4_has_exactly_2_zeros(method):
    model = tiny_model()
    sp = sparsify(model, SparsifyRecipe(method=method, **FAST), progress=False)
    names = target_layers(model.var)
    assert list(sp.masks) == names and len(names) == 3 * 5  # ada_lin, qkv, proj, fc1, fc2 per block
    for name in names:
        w = linear(model.var, name).weight
        assert groups_have_exactly(w, 2, 4), name
        assert torch.equal(w != 0, sp.masks[name])
    assert model.var.head.weight.ne(0).all() and model.var.word_embed.weight.ne(0).all()  # off by default


def test_4_8_unstructured_head_and_embeddings():
    model = tiny_model()
    sparsify(model, SparsifyRecipe(pattern="4:8", method="sparsegpt", head=True, embed=True, **FAST), progress=False)
    for name in target_layers(model.var, head=True, embed=True):
        assert groups_have_exactly(linear(model.var, name).weight, 4, 8), name
    model = tiny_model()
    sp = sparsify(model, SparsifyRecipe(pattern="unstructured", sparsity=0.3, method="wanda", **FAST), progress=False)
    for name, mask in sp.masks.items():  # Wanda compares within rows: 30% of every row
        assert ((~mask).sum(1) == int(mask.shape[1] * 0.3)).all(), name


def test_later_blocks_are_calibrated_on_sparsified_outputs():
    """Block 2's masks come from its inputs after blocks 0 and 1 were sparsified, not from the dense model's."""
    from evar.prune.calibrate import calibration
    from evar.prune.sequential import ActivationStream
    from evar.sparsity.oneshot import stage_hessians

    recipe = SparsifyRecipe(method="wanda", **FAST)
    dense = tiny_model()
    sp = sparsify(tiny_model(), recipe, progress=False)
    stream = ActivationStream(dense.var, calib := calibration(dense, recipe.calibration_recipe()), 4)
    assert len(calib) == 8
    for block in dense.var.blocks[:2]:
        stream.run(block, write=True)
    H = stage_hessians(dense.var, ["blocks.2.ffn.fc1"], lambda: stream.run(dense.var.blocks[2], False), stop=True)
    on_dense = methods.wanda(linear(dense.var, "blocks.2.ffn.fc1").weight, H["blocks.2.ffn.fc1"], Pattern.parse("2:4"))
    assert not torch.equal(on_dense.mask, sp.masks["blocks.2.ffn.fc1"])


# ---------------------------------------------------------------- model directories
def test_masks_pack_into_bits_and_round_trip():
    mask = torch.rand(7, 12, generator=torch.Generator().manual_seed(1)) > 0.5
    packed = storage.pack(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == 11  # ceil(84 / 8)
    assert torch.equal(storage.unpack(packed, (7, 12)), mask)
    assert storage.pack(torch.tensor([True, False, False, True, False, False, False, False, True])).tolist() == [9, 1]


def test_sparse_model_directory_loads_verified(tmp_path):
    model = tiny_model()
    model.sparsity = sparsify(model, SparsifyRecipe(method="magnitude"), progress=False)
    save_model_dir(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["sparsity"]["pattern"] == "2:4" and config["sparsity"]["layers"]["blocks.0.ffn.fc1"]["zeros"] == 0.5
    assert (tmp_path / "m" / storage.MASK_FILE).stat().st_size < 0.1 * (tmp_path / "m" / "var.safetensors").stat().st_size
    loaded = load_model_dir(tmp_path / "m")
    assert loaded.sparsity.pattern.name == "2:4"
    for name, mask in model.sparsity.masks.items():
        assert torch.equal(loaded.sparsity.masks[name], mask)
        assert torch.equal(linear(loaded.var, name).weight, linear(model.var, name).weight)
    # saving again (e.g. `evar convert`) keeps the masks, and re-applies them to weights trained since
    with torch.no_grad():
        loaded.var.blocks[0].ffn.fc1.weight.add_(1.0)
    save_model_dir(loaded, tmp_path / "again")
    assert groups_have_exactly(load_model_dir(tmp_path / "again").var.blocks[0].ffn.fc1.weight, 2, 4)


def test_damaged_sparse_directories_are_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    model.sparsity = sparsify(model, SparsifyRecipe(method="magnitude"), progress=False)
    save_model_dir(model, tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "var.safetensors"))
    state["blocks.1.attn.proj.weight"] = state["blocks.1.attn.proj.weight"] + 1.0
    save_file(state, str(tmp_path / "m" / "var.safetensors"))
    with pytest.raises(CheckpointError, match="blocks.1.attn.proj.*non-zero weights where its mask is 0"):
        load_model_dir(tmp_path / "m")
    save_model_dir(model, tmp_path / "n")
    (tmp_path / "n" / storage.MASK_FILE).unlink()
    with pytest.raises(CheckpointError, match="missing masks.safetensors"):
        load_model_dir(tmp_path / "n")


def test_structured_pruned_then_2_4(tmp_path):
    from evar.prune import PruneRecipe, prune_model

    pruned = prune_model(tiny_model(), PruneRecipe(sparsity=0.25, method="magnitude", heads=False), progress=False).model
    assert pruned.config.var.ffn_dims == (96, 72, 48)
    sp = sparsify(pruned, SparsifyRecipe(method="sparsegpt", **FAST), progress=False)
    assert groups_have_exactly(pruned.var.blocks[1].ffn.fc2.weight, 2, 4) and len(sp.masks) == 15


def test_onnx_export_keeps_every_group_of_4_with_2_zeros(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from evar.export.artifact import build_onnx
    from evar.export.onnx import OnnxOptions

    model = tiny_model()
    model.sparsity = sparsify(model, SparsifyRecipe(method="sparsegpt", **FAST), progress=False)
    save_model_dir(model, tmp_path / "m")
    result = build_onnx(load_model_dir(tmp_path / "m"), "tests:sparse", tmp_path / "art", OnnxOptions())
    assert result["parity"].passed
    graph = onnx.load(str(next((tmp_path / "art").glob("*step*.onnx"))))
    weights = {init.name: numpy_helper.to_array(init) for init in graph.graph.initializer}
    found = 0
    for name in model.sparsity.masks:
        w = linear(model.var, name).weight.detach()
        for v in weights.values():  # a graph stores a Linear's weight as is, or transposed for MatMul
            if v.ndim != 2:
                continue
            v = torch.from_numpy(v.copy())
            oriented = v if torch.equal(v, w) else v.T if v.T.shape == w.shape and torch.equal(v.T, w) else None
            if oriented is not None:
                found += 1
                assert groups_have_exactly(oriented, 2, 4), name
                break
    assert found >= len(model.sparsity.masks) // 2, found


# ---------------------------------------------------------------- the command
def _evar(monkeypatch, capsys, cwd: Path, *args: str) -> tuple[int, str, str]:
    """The `evar` CLI in this process (as a user runs it, minus the interpreter start-up)."""
    from evar.apps import cli

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["evar", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_sparsify_command_writes_a_sparse_directory_that_info_reads(tmp_path, monkeypatch, capsys):
    save_model_dir(tiny_model(), tmp_path / "dense")
    code, out, err = _evar(monkeypatch, capsys, tmp_path, "sparsify", "--model", "dense", "--method", "wanda",
                           "--calib-samples", "8", "--out", "sparse")
    assert code in (0, None), err
    assert "2:4 wanda: 15 layers, 50.0%" in out
    code, out, _ = _evar(monkeypatch, capsys, tmp_path, "info", "--model", "sparse")
    assert "sparsity: 2:4 (wanda), 15 masked layers" in out
    assert "blocks.2.ffn.fc2" in out and "50.0% zero" in out


@pytest.mark.parametrize("args,words", [
    (["--pattern", "2:3"], ["--pattern 2:3", "blocks.0.ada_lin.1", "not a multiple of 3"]),
    (["--pattern", "4:4"], ["0 < N < M"]),
    (["--pattern", "unstructured", "--sparsity", "1.0"], ["--sparsity must be in [0, 1)"]),
    (["--pattern", "unstructured", "--sparsity", "-0.2"], ["--sparsity must be in [0, 1)"]),
    (["--method", "learnable"], ["--method learnable", "--teacher"]),
    (["--method", "obs"], ["unknown --method 'obs'"]),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, words):
    save_model_dir(tiny_model(), tmp_path / "dense")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _evar(monkeypatch, capsys, tmp_path, "sparsify", "--model", "dense", "--out", "sparse", *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bad_input_as_a_subprocess(tmp_path):
    """One case end to end as a user runs it: one line, exit 2, no traceback, nothing written."""
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "evar.apps.cli", "sparsify", "--model", "builtin:digits",
                           "--pattern", "3:4", "--sparsity", "0.5", "--out", "x"], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --pattern 3:4 zeroes 0.75 of the weights; --sparsity 0.5 contradicts it (leave --sparsity out, "
        "or use --pattern unstructured)"]
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- learnable masks
def test_candidates_are_the_six_2_of_4_masks_and_the_prior_starts_ahead():
    from evar.sparsity.learnable import CANDIDATES, hard_mask, prior_gates

    assert CANDIDATES.shape == (6, 4) and (CANDIDATES.sum(1) == 2).all() and len({tuple(c.tolist()) for c in CANDIDATES}) == 6
    prior = nm_mask(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), 2, 4)
    gates = prior_gates(prior, 3.0, torch.Generator().manual_seed(0))
    agree = (hard_mask(gates) == prior).reshape(-1, 4).all(-1).float().mean()
    assert agree > 0.4, agree  # a soft start: chance is 1/6 per group; the Gumbel samples then explore


def _held_out_kl(teacher, student, n: int = 16) -> float:
    from evar.calibration import token_set
    from evar.distill.trainer import teacher_forcing_inputs
    from evar.samples import SamplingSettings

    data = token_set(teacher, "teacher", n, SamplingSettings(seed=99), seed=99)
    x = teacher_forcing_inputs(teacher, data.tokens)
    with torch.no_grad():
        t = teacher.var(data.labels, x).log_softmax(-1)
        s = student.var(data.labels, x).log_softmax(-1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_learnable_masks_lower_the_kl_of_their_prior(tmp_path):
    from evar.sparsity.pipeline import learnable

    recipe = SparsifyRecipe(method="learnable", prior="magnitude", steps=40, batch_size=8, data_samples=32, lr=0.05,
                            ckpt_every=20, **FAST)
    teacher = tiny_model()
    prior_model = tiny_model()
    sparsify(prior_model, recipe, method="magnitude", progress=False)
    student = tiny_model()
    sp = learnable(student, teacher, recipe, tmp_path / "work", "tests:tiny", "tests:tiny")
    for name, mask in sp.masks.items():
        assert follows(mask, Pattern.parse("2:4")) and torch.equal(linear(student.var, name).weight != 0, mask)
    assert not any(k.startswith("parametrizations") for k in student.var.state_dict())  # plain weights again
    assert 0.5 < sp.details["agreement_with_prior"] < 1.0  # it moved, from where the prior put it
    kl_prior, kl_learnt = _held_out_kl(teacher, prior_model), _held_out_kl(teacher, student)
    print(f"KL to the teacher: magnitude prior {kl_prior:.4f}, learnt {kl_learnt:.4f}")
    assert kl_learnt < 0.9 * kl_prior, (kl_learnt, kl_prior)


# ---------------------------------------------------------------- Core ML
def test_coreml_2_4_needs_a_2_4_model(tmp_path):
    pytest.importorskip("coremltools")
    from evar.export.artifact import build_coreml
    from evar.export.coreml import CoremlOptions

    with pytest.raises(EvarError, match="2:4-sparse model, and this model is dense: make one with `evar sparsify"):
        build_coreml(tiny_model(), "tests:tiny", tmp_path / "art", CoremlOptions(compress="2:4"))
    model = tiny_model()
    model.sparsity = sparsify(model, SparsifyRecipe(pattern="4:8", method="magnitude"), progress=False)
    with pytest.raises(EvarError, match="this model is 4:8 sparse"):
        build_coreml(model, "tests:tiny", tmp_path / "art", CoremlOptions(compress="2:4+palettize4"))
    assert not (tmp_path / "art").exists()


@pytest.mark.slow
def test_coreml_stores_2_4_sparse_and_inspect_says_so(request, tmp_path):
    expr = request.config.getoption("markexpr") or ""
    if "slow" not in expr or "not slow" in expr:
        pytest.skip("opt-in: pytest -m slow (a Core ML conversion)")
    from evar import contract
    from evar.export.artifact import build_coreml
    from evar.export.coreml import CoremlOptions
    from evar.export.inspect import report
    from tests.test_export import tiny_coreml_model

    model = tiny_coreml_model()
    model.sparsity = sparsify(model, SparsifyRecipe(method="magnitude"), progress=False)
    result = build_coreml(model, "tests:sparse", tmp_path / "art", CoremlOptions(compress="2:4+palettize4"))
    m = contract.load_artifact(tmp_path / "art", verify_hashes=True).data
    assert result["parity"].passed and m["compression"]["method"] == "2:4+palettize4"
    assert m["precision"]["weights"] == "sparse-palettized" and m["compression"]["details"]["pattern"] == "2:4"
    text = report(tmp_path / "art")
    assert "sparse storage: 2:4 masks of 10 layers (magnitude)" in text and "constexpr_lut_to_sparse" in text


def test_learnable_run_resumes_and_refuses_other_settings(tmp_path):
    from evar.sparsity.pipeline import learnable

    recipe = SparsifyRecipe(method="learnable", prior="magnitude", steps=6, batch_size=4, data_samples=8,
                            ckpt_every=3, **FAST)
    first = learnable(tiny_model(), tiny_model(), recipe, tmp_path / "work", "tests:tiny", "tests:tiny")
    assert (tmp_path / "work" / "train_state.pt").exists()
    again = learnable(tiny_model(), tiny_model(), recipe, tmp_path / "work", "tests:tiny", "tests:tiny")
    assert all(torch.equal(first.masks[n], again.masks[n]) for n in first.masks)  # continued at step 6: done
    with pytest.raises(EvarError, match="other settings.*recipe"):
        learnable(tiny_model(), tiny_model(), dataclasses.replace(recipe, lr=0.01), tmp_path / "work", "tests:tiny",
                  "tests:tiny")


def test_a_resumed_learnable_run_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    """The Gumbel noise is drawn from the run's checkpointed generator, so a run killed after its checkpoint
    at step 2 and rerun logs the losses and ends with the gates of a run that was never interrupted."""
    from evar.sparsity import learnable as learnable_module
    from evar.sparsity.pipeline import learnable

    recipe = SparsifyRecipe(method="learnable", prior="magnitude", steps=4, batch_size=4, data_samples=8,
                            ckpt_every=2, **FAST)

    def run(work):
        learnable(tiny_model(), tiny_model(), recipe, work, "tests:tiny", "tests:tiny")
        state = torch.load(work / "train_state.pt", weights_only=True)
        losses = [json.loads(line)["loss"] for line in (work / "train_log.jsonl").read_text().splitlines()]
        return losses, {f"{m}.{k}": t for m, sd in state.items() if m.startswith("module.") for k, t in sd.items()}

    whole_losses, whole_gates = run(tmp_path / "whole")
    real_call = learnable_module.MaskLoss.__call__

    def killed_at_step_2(self, gen, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_call(self, gen, step)

    monkeypatch.setattr(learnable_module.MaskLoss, "__call__", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        learnable(tiny_model(), tiny_model(), recipe, tmp_path / "resumed", "tests:tiny", "tests:tiny")
    monkeypatch.setattr(learnable_module.MaskLoss, "__call__", real_call)
    torch.manual_seed(12345)  # whatever the global state is at the rerun
    resumed_losses, resumed_gates = run(tmp_path / "resumed")
    assert resumed_losses == whole_losses and len(whole_losses) == 4
    assert whole_gates.keys() == resumed_gates.keys()
    assert all(torch.equal(t, resumed_gates[k]) for k, t in whole_gates.items())
