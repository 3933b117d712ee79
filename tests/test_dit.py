"""DiT, the second generator family: the official layout, sampling, pruning through the adapter API,
distillation, training resume and the commands."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from evar.dit.checkpoint import DiTModel, load_dit_dir, load_official_dit, save_dit_dir
from evar.dit.diffusion import DiTSampling, ddim_sample, ddim_timesteps, guided, start_noise
from evar.dit.model import DiT, DiTConfig
from evar.errors import CheckpointError, EvarError

TINY = DiTConfig(input_size=16, patch_size=4, in_channels=3, hidden_size=32, num_heads=(2, 3), ffn_dims=(64, 48),
                 head_dim=8, num_classes=10)


def tiny_dit(seed: int = 0, config: DiTConfig = TINY) -> DiTModel:
    torch.manual_seed(seed)
    dit = DiT(config)
    with torch.no_grad():  # adaLN-Zero starts at zero: give every block and the output something to do
        for p in dit.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return DiTModel(config, dit.eval(), {"source": "tests"})


def official_keys(depth: int) -> set[str]:
    """facebookresearch/DiT's state-dict names, written out by hand."""
    keys = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight",
            "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
            "y_embedder.embedding_table.weight", "final_layer.linear.weight", "final_layer.linear.bias",
            "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}
    for i in range(depth):
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"}
    return keys


def test_state_dict_has_the_official_names_and_shapes():
    cfg = DiTConfig.uniform(depth=2, hidden_size=64, heads=4, input_size=8, patch_size=2, in_channels=4,
                            num_classes=1000, learn_sigma=True)
    state = DiT(cfg).state_dict()
    assert set(state) == official_keys(2)
    assert state["y_embedder.embedding_table.weight"].shape == (1001, 64)  # + the null class
    assert state["pos_embed"].shape == (1, 16, 64)
    assert state["final_layer.linear.weight"].shape == (2 * 2 * 8, 64)  # p·p·2C with learned sigma
    assert state["blocks.1.adaLN_modulation.1.weight"].shape == (6 * 64, 64)


def test_a_dit_layout_checkpoint_loads_strictly_and_a_mismatch_names_the_key(tmp_path):
    cfg = DiTConfig.uniform(depth=2, hidden_size=32, heads=2, input_size=8, patch_size=2, in_channels=4,
                            learn_sigma=True)
    state = {k: torch.randn_like(v) for k, v in DiT(cfg).state_dict().items()}
    torch.save({"ema": state}, tmp_path / "ckpt.pt")  # the training checkpoints' wrapper
    model = load_official_dit(tmp_path / "ckpt.pt", cfg)
    assert torch.equal(model.dit.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])
    bad = dict(state)
    bad["blocks.1.attn.qkv_renamed.weight"] = bad.pop("blocks.1.attn.qkv.weight")
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing key 'blocks.1.attn.qkv.weight'"):
        load_official_dit(tmp_path / "bad.pt", cfg)
    torch.save({**state, "pos_embed": torch.zeros(1, 9, 32)}, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match="key 'pos_embed' has shape"):
        load_official_dit(tmp_path / "shape.pt", cfg)


def test_model_directory_round_trip(tmp_path):
    model = tiny_dit()
    save_dit_dir(model, tmp_path / "dit")
    back = load_dit_dir(tmp_path / "dit")
    assert back.config == TINY
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 900]), torch.tensor([1, 10])
    assert torch.equal(back.dit(x, t, y), model.dit(x, t, y))


def test_sampling_is_seeded_per_sample_and_batch_independent():
    model = tiny_dit()
    labels = torch.tensor([0, 1, 2, 3])
    settings = DiTSampling(guidance=1.0, steps=4, seed=7)
    whole = ddim_sample(model.dit, labels, settings)
    halves = torch.cat([ddim_sample(model.dit, labels[:2], settings), ddim_sample(model.dit, labels[2:], settings,
                                                                                   first_sample=2)])
    assert torch.allclose(whole, halves, atol=1e-5)
    assert not torch.allclose(whole, ddim_sample(model.dit, labels, dataclasses.replace(settings, seed=8)))
    z = start_noise(0, 0, 2000, (8,)).flatten()
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03


def test_guidance_zero_runs_the_conditional_model_only():
    model = tiny_dit()
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([10, 500, 999]), torch.tensor([1, 2, 3])
    assert torch.equal(guided(model.dit, x, t, y, 0.0), model.dit.predict(x, t, y))
    null = torch.full_like(y, 10)
    want = 2.5 * model.dit.predict(x, t, y) - 1.5 * model.dit.predict(x, t, null)
    assert torch.allclose(guided(model.dit, x, t, y, 1.5), want, atol=1e-5)


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 1) == [999]
    assert ddim_timesteps(1000, 4) == [999, 666, 333, 0]
    with pytest.raises(EvarError, match="--steps must be in 1..1000"):
        DiTSampling(steps=0).validate(1000)


# ---------------------------------------------------------------- pruning
def test_adapter_lists_what_a_hand_count_gives():
    from evar.prune.dit_adapter import DiTAdapter

    units = {p.name: (p.count, p.kind, list(p.consumers)) for p in DiTAdapter(tiny_dit().dit).prunables()}
    assert units == {"blocks.0.heads": (2, "heads", ["blocks.0.attn.proj"]),
                     "blocks.0.ffn": (64, "ffn", ["blocks.0.mlp.fc2"]),
                     "blocks.1.heads": (3, "heads", ["blocks.1.attn.proj"]),
                     "blocks.1.ffn": (48, "ffn", ["blocks.1.mlp.fc2"])}


@pytest.mark.parametrize("method", ["magnitude", "taylor", "obs"])
def test_prune_removes_what_it_says_and_loads_from_its_config(tmp_path, method):
    from evar.dit.prune import DiTPruneRecipe, prune_dit

    model = tiny_dit()
    recipe = DiTPruneRecipe(sparsity=0.5, attn_sparsity=0.34, method=method, calib_samples=16, calib_batch=8)
    pruned, report = prune_dit(model, recipe, progress=False)
    assert pruned.config.num_heads == (1, 2) and pruned.config.ffn_dims == (32, 24)
    assert report["units"]["blocks.1.heads"] == {"before": 3, "after": 2}
    save_dit_dir(pruned, tmp_path / "p")
    back = load_dit_dir(tmp_path / "p")
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 700]), torch.tensor([4, 10])
    assert torch.equal(back.dit(x, t, y), model.dit(x, t, y))  # the cut model in place is the loaded one


def test_obs_compensation_beats_plain_removal():
    """OBS with its weight update predicts the dense model's noise better than the same cut without it."""
    from evar.dit.prune import DiTPruneRecipe, calibration, prune_dit

    data = calibration(tiny_dit(), DiTPruneRecipe(sparsity=0.5, calib_samples=64))
    dense = tiny_dit().dit(data.x_t, data.t, data.labels)
    errors = {}
    for compensate in (True, False):
        recipe = DiTPruneRecipe(sparsity=0.5, attn_sparsity=0.0, method="obs", compensate=compensate, calib_samples=64)
        pruned, _ = prune_dit(tiny_dit(), recipe, progress=False)
        with torch.no_grad():
            errors[compensate] = float((pruned.dit(data.x_t, data.t, data.labels) - dense).pow(2).mean())
    assert errors[True] < errors[False]


def test_zero_rate_removes_nothing_and_bad_rates_are_refused():
    from evar.dit.prune import DiTPruneRecipe, prune_dit

    model = tiny_dit()
    pruned, _ = prune_dit(tiny_dit(), DiTPruneRecipe(sparsity=0.0, method="magnitude"), progress=False)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1])
    assert torch.equal(pruned.dit(x, t, y), model.dit(x, t, y))
    with pytest.raises(EvarError, match="--ffn-sparsity must be in"):
        DiTPruneRecipe(sparsity=0.3, ffn_sparsity=1.0).validate()
    with pytest.raises(EvarError, match="would remove all 2 heads"):
        prune_dit(tiny_dit(), DiTPruneRecipe(sparsity=0.0, attn_sparsity=0.9, method="magnitude"), progress=False)
    with pytest.raises(EvarError, match="calibrates on images"):
        DiTPruneRecipe(sparsity=0.3, calib_data="teacher").validate()


# ---------------------------------------------------------------- training and distillation
def test_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    import evar.dit.train as dit_train
    from evar.train import Schedule

    job = dit_train.DiTTraining(schedule=Schedule(steps=4, batch_size=8, lr=1e-3, weight_decay=0.0, warmup=2,
                                                  ckpt_every=2))
    whole = load_dit_dir(dit_train.train_dit(job, tmp_path / "a", TINY))
    real_loss, calls = dit_train.diffusion_loss, []

    def killed_at_step_3(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the checkpoint of step 2 is on disk
        return real_loss(*args)

    monkeypatch.setattr(dit_train, "diffusion_loss", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        dit_train.train_dit(job, tmp_path / "b", TINY)
    monkeypatch.setattr(dit_train, "diffusion_loss", real_loss)
    resumed = load_dit_dir(dit_train.train_dit(job, tmp_path / "b", TINY))
    for (name, a), b in zip(whole.dit.state_dict().items(), resumed.dit.state_dict().values()):
        assert torch.equal(a, b), name


def test_distillation_brings_a_pruned_student_closer_to_its_teacher(tmp_path):
    from evar.dit.distill import DiTDistillation, distill_dit
    from evar.dit.prune import DiTPruneRecipe, calibration, prune_dit
    from evar.train import Schedule

    teacher = tiny_dit()
    student, _ = prune_dit(tiny_dit(), DiTPruneRecipe(sparsity=0.5, method="magnitude"), progress=False)
    data = calibration(teacher, DiTPruneRecipe(sparsity=0.5, calib_samples=64, seed=3))

    def gap(m: DiTModel) -> float:
        return float((m.dit(data.x_t, data.t, data.labels) - teacher.dit(data.x_t, data.t, data.labels)).pow(2).mean())

    before = gap(student)
    job = DiTDistillation(schedule=Schedule(steps=30, batch_size=16, lr=3e-3, weight_decay=0.0, warmup=5, ckpt_every=30))
    after = gap(load_dit_dir(distill_dit(teacher, student, job, tmp_path / "d")))
    assert after < 0.7 * before
    other = tiny_dit(config=dataclasses.replace(TINY, hidden_size=48, head_dim=8))
    with pytest.raises(EvarError, match="hidden_size differ"):
        distill_dit(teacher, other, job, tmp_path / "e")


# ---------------------------------------------------------------- commands
def _cli(*args):
    from typer.testing import CliRunner

    from evar.apps.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_commands_on_a_dit_directory(tmp_path):
    save_dit_dir(tiny_dit(), tmp_path / "dit")
    info = _cli("info", "--model", tmp_path / "dit")
    assert info.exit_code == 0 and "DiT: depth 2, width 32, heads [2, 3]" in info.output
    listed = _cli("prunable", "--model", tmp_path / "dit")
    assert listed.exit_code == 0 and "blocks.1.heads: 3 heads" in listed.output
    sample = _cli("sample", "--model", tmp_path / "dit", "--classes", "1,2", "--per-class", "2", "--ddim-steps", "3",
                  "--out", tmp_path / "s")
    assert sample.exit_code == 0, sample.output
    assert (tmp_path / "s" / "grid.png").is_file()
    pruned = _cli("prune-dit", "--model", tmp_path / "dit", "--ffn-sparsity", "0.5", "--method", "magnitude",
                  "--out", tmp_path / "p")
    assert pruned.exit_code == 0, pruned.output
    assert load_dit_dir(tmp_path / "p").config.ffn_dims == (32, 24)


@pytest.mark.parametrize("args, message", [
    (["prune", "--sparsity", "0.3"], "is a diffusion transformer (DiT); this command needs a VAR generator"),
    (["prune-dit"], "nothing to prune"),
    (["prune-dit", "--sparsity", "0.3", "--method", "wanda"], "unknown pruning method 'wanda'"),
    (["prune-dit", "--sparsity", "0.3", "--calib-data", "teacher"], "calibrates on images"),
    (["prunable", "--component", "decoder"], "is a DiT: its component is dit"),
    (["sample", "--ddim-steps", "0"], "--steps must be in 1..1000"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    save_dit_dir(tiny_dit(), tmp_path / "dit")
    out = [] if args[0] == "prunable" else ["--out", tmp_path / "out"]
    result = _cli(*args, "--model", tmp_path / "dit", *out)
    assert isinstance(result.exception, EvarError) and message in str(result.exception), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit"]


def test_convert_refuses_an_unknown_architecture(tmp_path):
    result = _cli("convert-dit", "--ckpt", tmp_path / "x.pt", "--arch", "M/3", "--out", tmp_path / "o")
    assert isinstance(result.exception, EvarError) and "unknown DiT architecture 'M/3'" in str(result.exception)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_lands_on_the_image_an_exact_predictor_points_to(prediction):
    """With the exact prediction for a one-image data set, DDIM returns that image (either parametrisation)."""
    from evar.dit.diffusion import alphas_cumprod, target

    image = torch.rand(1, 3, 16, 16) * 2 - 1
    abar = alphas_cumprod(1000)

    class Exact(torch.nn.Module):
        cfg = dataclasses.replace(TINY, prediction=prediction)

        def predict(self, x, t, labels):
            a = abar[t].float().view(-1, 1, 1, 1)
            noise = (x - a.sqrt() * image) / (1 - a).sqrt()
            return target(prediction, image, noise, t, abar)

    out = ddim_sample(Exact(), torch.tensor([0, 1]), DiTSampling(0.0, 10, 0))
    assert torch.allclose(out, image.expand(2, -1, -1, -1), atol=1e-4)


def test_the_shipped_dit_loads_strictly_and_draws_the_digits_it_is_asked_for():
    from evar import zoo
    from evar.dit.sample import sample_dit_images
    from evar.eval.metrics import evaluate_digits

    model = zoo.load_family("builtin:dit-digits", ("dit",))  # strict: every key and shape
    labels = torch.arange(10)
    images = sample_dit_images(model, labels, DiTSampling(guidance=1.5, steps=10, seed=0), progress=False)
    assert evaluate_digits(images, labels.numpy()).class_accuracy >= 0.8
