"""The DD student: its mask, its model directory (a family of its own), training (resumable) and few-step sampling."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from evar import zoo
from evar.checkpoints import save_model_dir
from evar.dd import trainer as dd_trainer
from evar.dd.model import attention_mask, from_teacher, levels, load_dd_dir, save_dd_dir
from evar.dd.pairs import PairsRecipe, make_pairs
from evar.dd.sampler import FewStep, dd_generate, plan
from evar.dd.trainer import DDRecipe, train
from evar.errors import EvarError, ModelRefError
from evar.samples import SamplingSettings
from evar.train import Schedule
from tests.conftest import tiny_model


def test_mask_each_token_sees_earlier_levels_and_itself():
    cfg = tiny_model().config.var  # scales 1, 2, 3, 4 → 1 + 30 positions
    lv = levels(cfg)
    assert lv[:6].tolist() == [0, 1, 2, 2, 2, 2] and len(lv) == 31
    visible = attention_mask(cfg) == 0
    assert visible[0].tolist() == [True] + [False] * 30  # the class token sees itself only
    assert visible[1, :2].tolist() == [True, True] and not visible[1, 2:].any()
    row = visible[3]  # a token of scale 1 (level 2): class token, scale 0, itself; not its neighbours
    assert row[:2].all() and row[3] and not row[2] and not row[4:].any()
    last = visible[30]
    assert last[:15].all() and last[30] and not last[15:30].any()


def test_the_network_obeys_the_mask():
    """Changing one token's input changes exactly the outputs of itself and of finer levels."""
    model = from_teacher(tiny_model())
    torch.manual_seed(0)
    with torch.no_grad():
        model.student.flag_embed.weight.normal_()
        x = torch.randn(2, 30, 8)
        is_data = torch.zeros(2, 30, dtype=torch.bool)
        base, _ = model.student(torch.tensor([1, 2]), x, is_data)
        x2 = x.clone()
        x2[:, 7] += 1.0  # scale 2 (positions 5..13)
        moved, _ = model.student(torch.tensor([1, 2]), x2, is_data)
    changed = (moved - base).abs().amax(dim=(0, 2)) > 1e-6
    expected = torch.zeros(30, dtype=torch.bool)
    expected[7] = True
    expected[14:] = True
    assert torch.equal(changed, expected)


def test_dd_directory_is_its_own_family(tmp_path):
    model = from_teacher(tiny_model())
    out = save_dd_dir(model, tmp_path / "dd", {"source": "tests"})
    loaded = load_dd_dir(out)
    x = torch.randn(1, 30, 8)
    a = model.student.eval()(torch.tensor([3]), x, torch.zeros(1, 30, dtype=torch.bool))[0]
    b = loaded.student(torch.tensor([3]), x, torch.zeros(1, 30, dtype=torch.bool))[0]
    assert torch.equal(a, b)
    with pytest.raises(ModelRefError, match=r"Distilled Decoding student \(evar dd train\); this command needs a VAR generator"):
        zoo.load(str(out))
    assert zoo.load_family(str(out), ("dd",)).config.var == model.config.var
    var_dir = save_model_dir(tiny_model(), tmp_path / "var")
    with pytest.raises(ModelRefError, match=r"is a VAR generator .*; this command needs a Distilled Decoding student"):
        zoo.load_family(str(var_dir), ("dd",))


def test_few_step_plans_and_bad_ones():
    assert plan(6, None, None, None) == FewStep((0,))
    assert plan(6, 2, None, None) == FewStep((0, 3))
    assert plan(6, None, "0,4", None) == FewStep((0, 4))
    assert plan(6, None, None, "3").teacher_scales == (3,)
    for args, msg in [((0, None, None), "--steps must be 1 or more"), ((None, "0,6", None), "beyond the model's scales"),
                      ((None, "2,4", None), "start at 0"), ((3, "0,2", None), "--steps 3 but --t-list"),
                      ((None, None, "2,4"), "consecutive"), ((None, None, "5"), "consecutive"),
                      ((None, "0,2", "3"), "exclude each other"), ((None, "a", None), "comma-separated")]:
        with pytest.raises(EvarError, match=msg):
            plan(6, *args)


def test_sampling_one_two_steps_and_with_the_teacher():
    teacher = tiny_model()
    model = from_teacher(teacher).eval()
    labels = torch.tensor([0, 5, 9])
    one, tok1 = dd_generate(model, labels, FewStep((0,)), seed=1)
    assert one.shape == (3, 3, 8, 8) and tok1.shape == (3, 30)
    _, again = dd_generate(model, labels[1:], FewStep((0,)), seed=1, first_sample=1)
    assert torch.equal(again, tok1[1:])  # a sample's tokens do not depend on its batch
    _, tok2 = dd_generate(model, labels, FewStep((0, 2)), seed=1)
    assert torch.equal(tok2[:, :5], tok1[:, :5])  # scales 0-1 kept from the first step
    _, tok_t = dd_generate(model, labels, FewStep((0,), (2,)), seed=1, teacher=teacher,
                           teacher_settings=SamplingSettings(1.5, 1, 0.0, 1))
    assert torch.equal(tok_t[:, :5], tok1[:, :5])
    # the teacher's scale 2 is its greedy choice given the student's scales 0-1 (top-k 1)
    x = teacher.vqvae.idx_to_var_input([tok_t[:, :1], tok_t[:, 1:5], tok_t[:, 5:14], tok_t[:, 14:]])
    logits = teacher.var(torch.cat((labels, torch.full_like(labels, 10))), x.repeat(2, 1, 1))
    cond, uncond = logits[:, 5:14].unflatten(0, (2, -1)).unbind(0)
    ratio = 1.5 * 2 / 3
    assert torch.equal(tok_t[:, 5:14], ((1 + ratio) * cond - ratio * uncond).argmax(-1))
    with pytest.raises(EvarError, match="needs --teacher"):
        dd_generate(model, labels, FewStep((0,), (2,)))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("dd")
    teacher = str(save_model_dir(tiny_model(), root / "teacher"))
    pairs = make_pairs(teacher, root / "pairs", PairsRecipe(12, SamplingSettings(1.5, 0, 0.9, 0), ode_steps=4, chunk=6))
    return teacher, pairs


def recipe(steps: int = 4) -> DDRecipe:
    return DDRecipe(Schedule(steps=steps, batch_size=4, lr=1e-3, weight_decay=0.0, warmup=1, ckpt_every=2))


def test_training_resumes_to_identical_weights(made, tmp_path, monkeypatch):
    teacher, pairs = made
    full = train(teacher, pairs, tmp_path / "full", recipe())
    model = load_dd_dir(full)
    assert len(model.provenance["teacher_var_sha256"]) == 64 and model.provenance["final"]["step"] == 4
    calls = {"n": 0}
    original = dd_trainer.StepLoss.__call__

    def dies_at_step_3(self, gen, step):
        calls["n"] += 1
        if step == 3:
            raise KeyboardInterrupt
        return original(self, gen, step)

    monkeypatch.setattr(dd_trainer.StepLoss, "__call__", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(teacher, pairs, tmp_path / "cut", recipe())
    monkeypatch.setattr(dd_trainer.StepLoss, "__call__", original)
    train(teacher, pairs, tmp_path / "cut", recipe())
    a, b = load_file(str(full / "dd.safetensors")), load_file(str(tmp_path / "cut" / "dd.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(EvarError, match="other settings"):
        bad = tmp_path / "other"
        monkeypatch.setattr(dd_trainer.StepLoss, "__call__", dies_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            train(teacher, pairs, bad, recipe())
        monkeypatch.setattr(dd_trainer.StepLoss, "__call__", original)
        train(teacher, pairs, bad, recipe(steps=6))


def test_pairs_of_another_teacher_are_refused(made, tmp_path):
    _, pairs = made
    other = str(save_model_dir(tiny_model(seed=1), tmp_path / "other"))
    with pytest.raises(EvarError, match="made by another teacher"):
        train(other, pairs, tmp_path / "out", recipe())
