"""Distillation: loss values by hand, scale ranges, resume equivalence, DDP with 2 gloo ranks, bad input."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import evar.train
from evar.checkpoints import ModelConfig, build_model, save_model_dir
from evar.apps.cli import app
from evar.distill.losses import (default_scale_weights, feature_loss, kd_loss, normal_kd, per_scale_means,
                                 progressive_scales, scale_aware_kd, task_loss, token_kl)
from evar.distill.trainer import DistillRecipe, check_family, check_teacher, distill
from evar.errors import EvarError
from evar.train import Schedule
from tests.conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- losses, by hand
def test_token_kl_by_hand():
    student = torch.tensor([[[0.0, 0.0]]])  # p_s = (1/2, 1/2)
    teacher = torch.tensor([[[math.log(3.0), 0.0]]])  # p_t = (3/4, 1/4) at T = 1
    expected_t1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert token_kl(student, teacher, 1.0).item() == pytest.approx(expected_t1, abs=1e-6)
    # T = 2: p_t = softmax(log(3)/2, 0) = (√3, 1)/(√3 + 1); the result is scaled by T² = 4
    p = (math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1))
    expected_t2 = 4 * sum(pi * math.log(pi / 0.5) for pi in p)
    assert token_kl(student, teacher, 2.0).item() == pytest.approx(expected_t2, abs=1e-6)
    assert token_kl(teacher, teacher, 4.0).item() == pytest.approx(0.0, abs=1e-7)


def test_task_loss_is_the_per_token_mean_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # (B=1, L=2, V=2)
    tokens = torch.tensor([[1, 0]])
    ce = [-math.log(0.75), math.log(2.0)]
    assert task_loss(logits, tokens).item() == pytest.approx(sum(ce) / 2, abs=1e-6)
    assert task_loss(logits, tokens, end=1).item() == pytest.approx(ce[0], abs=1e-6)


# patch_nums (1, 2, 3): scale 0 = token 0, scale 1 = tokens 1..4, scale 2 = tokens 5..13
RANGES = [(0, 1), (1, 5), (5, 14)]
KL = torch.tensor([[3.0, 1.0, 2.0, 3.0, 4.0] + [1.0] * 9,
                   [3.0, 1.0, 2.0, 3.0, 4.0] + [4.0] * 9])  # (B=2, L=14)


def test_normal_kd_is_the_per_token_mean():
    assert normal_kd(KL).item() == pytest.approx(KL.sum().item() / 28)
    assert normal_kd(KL, end=5).item() == pytest.approx(KL[:, :5].sum().item() / 10)


def test_scale_aware_kd_averages_each_scale_over_its_own_tokens():
    means = per_scale_means(KL, RANGES)
    assert means.tolist() == pytest.approx([3.0, 2.5, 2.5])
    w = torch.tensor([2.0, 1.0, 0.5])
    assert scale_aware_kd(means, w).item() == pytest.approx((2 * 3 + 1 * 2.5 + 0.5 * 2.5) / 3.5)
    # progressive: only the first two scales, weights renormalised over them
    assert scale_aware_kd(means, w, active=2).item() == pytest.approx((2 * 3 + 1 * 2.5) / 3)
    # the 9-token scale does not outweigh the 1-token scale just by being bigger (upstream's sum did)
    one_hot = torch.tensor([0.0, 0.0, 1.0])
    assert scale_aware_kd(means, one_hot).item() == pytest.approx(2.5)
    mode = {m: kd_loss(m, KL, means, w, 3, 14).item() for m in ("normal", "scale_aware", "both")}
    assert mode["both"] == pytest.approx(0.5 * mode["normal"] + 0.5 * mode["scale_aware"])


def test_scale_weights_select_the_right_token_ranges():
    torch.manual_seed(0)
    student = torch.randn(2, 14, 5, requires_grad=True)
    teacher = torch.randn(2, 14, 5)
    for scale, (begin, end) in enumerate(RANGES):
        student.grad = None
        w = torch.zeros(3)
        w[scale] = 1.0
        scale_aware_kd(per_scale_means(token_kl(student, teacher, 4.0), RANGES), w).backward()
        touched = student.grad.abs().sum(dim=(0, 2)) > 0
        assert touched.nonzero().flatten().tolist() == list(range(begin, end))


def test_feature_loss_by_hand():
    teacher = [torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)]
    student = [torch.ones(1, 3, 4), torch.full((1, 3, 4), 2.0)]
    assert feature_loss(student, teacher).item() == pytest.approx((1 + 4) / 2)
    student[1][:, 2:] = 10.0  # beyond `end`: ignored
    assert feature_loss(student, teacher, end=2).item() == pytest.approx((1 + 4) / 2)


def test_default_scale_weights_and_progressive_stages():
    assert default_scale_weights(10) == pytest.approx([2.0, 1.8, 1.6, 1.4, 1.2, 1.0, 0.8, 0.6, 0.4, 0.2])
    assert default_scale_weights(6) == pytest.approx([2.0, 1.64, 1.28, 0.92, 0.56, 0.2])
    # 24 steps, 6 scales: the first 12 steps in 6 stages of 2 steps, then all scales
    assert [progressive_scales(s, 24, 6) for s in range(14)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 6, 6]
    assert progressive_scales(0, 1, 6) == 6


# ---------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[str, str]:
    """A trained-looking tiny teacher and a narrower student of its family, as model directories."""
    root = tmp_path_factory.mktemp("distill")
    teacher = tiny_model()
    save_model_dir(teacher, root / "teacher")
    c = teacher.config
    torch.manual_seed(1)
    student = build_model(ModelConfig(c.var.with_blocks((1, 1, 2), (64, 48, 32)), c.vqvae, {"source": "test"}))
    student.vqvae.load_state_dict(teacher.vqvae.state_dict())
    save_model_dir(student, root / "student")
    return str(root / "teacher"), str(root / "student")


def recipe(steps: int = 6, **kw) -> DistillRecipe:
    sched = Schedule(steps=steps, batch_size=8, lr=1e-3, weight_decay=0.0, warmup=2, ckpt_every=2)
    return DistillRecipe(data_samples=24, schedule=sched, **kw)


def log_rows(out: Path) -> list[dict]:
    return [json.loads(r) for r in (out / "train_log.jsonl").read_text().splitlines()]


class Interrupted(Exception):
    pass


def test_resume_ends_with_the_same_weights(pair, tmp_path, monkeypatch):
    teacher, student = pair
    full = distill(teacher, student, tmp_path / "full", recipe())

    save_state = evar.train._save_state

    def crash_after_step_4(out, modules, opt, gen, step, sched):
        save_state(out, modules, opt, gen, step, sched)
        if step == 4:
            raise Interrupted

    monkeypatch.setattr(evar.train, "_save_state", crash_after_step_4)
    with pytest.raises(Interrupted):
        distill(teacher, student, tmp_path / "cut", recipe())
    monkeypatch.setattr(evar.train, "_save_state", save_state)
    with pytest.raises(EvarError, match="--resume"):
        distill(teacher, student, tmp_path / "cut", recipe())
    with pytest.raises(EvarError, match="temperature"):
        distill(teacher, student, tmp_path / "cut", recipe(temperature=2.0), resume=True)
    resumed = distill(teacher, student, tmp_path / "cut", recipe(), resume=True)

    a, b = load_file(str(full / "var.safetensors")), load_file(str(resumed / "var.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_full, rows_cut = log_rows(full), log_rows(resumed)
    assert [r["step"] for r in rows_cut] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows_cut] == [r["loss"] for r in rows_full]
    assert {"task", "kd", "kd_scale0", "kd_scale3", "lr", "tokens_per_s"} <= set(rows_full[0])
    assert (full / "loss.png").stat().st_size > 0 and not (full / "train_state.pt").exists()
    prov = json.loads((full / "config.json").read_text())["provenance"]
    assert prov["teacher"] == teacher and prov["parent"] == student and prov["recipe"]["kd"] == "both"
    # a finished run is left alone by --resume
    assert distill(teacher, student, full, recipe(), resume=True) == full


def test_progressive_scale_aware_with_features_on_real_images(pair, tmp_path):
    r = recipe(steps=8, kd="scale_aware", progressive=True, feature_weight=0.1, data="digits")
    out = distill(*pair, tmp_path / "prog", r)
    w = default_scale_weights(4)
    for row in log_rows(out):
        k = int(row["active_scales"])
        assert k == progressive_scales(row["step"] - 1, 8, 4)
        # the KD term covers only the scales trained so far, weights renormalised over them
        expected = sum(w[i] * row[f"kd_scale{i}"] for i in range(k)) / sum(w[:k])
        assert row["kd"] == pytest.approx(expected, rel=1e-5)
        assert row["loss"] == pytest.approx(0.5 * row["task"] + 0.5 * row["kd"] + 0.1 * row["feature"], rel=1e-5)
    assert json.loads((out / "config.json").read_text())["provenance"]["data"]["source"] == "digits"


def test_ddp_two_gloo_ranks_match_one_process(pair, tmp_path):
    teacher, student = pair
    flags = ["--teacher", teacher, "--student", student, "--steps", "4", "--batch-size", "8", "--lr", "1e-3",
             "--warmup", "2", "--data-samples", "24", "--ckpt-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "evar.distill", *flags, "--out", str(tmp_path / "ddp")],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    single = distill(teacher, student, tmp_path / "single", recipe(steps=4))  # meanwhile, the same in one process
    _, stderr = ddp.communicate(timeout=120)
    assert ddp.returncode == 0, stderr[-2000:]
    data = [json.loads((d / "config.json").read_text())["provenance"]["data"] for d in (tmp_path / "ddp", single)]
    assert data[0] == data[1] and len(data[0]["sha256"]) == 64  # generated in halves and gathered: the same set
    a, b = load_file(str(tmp_path / "ddp" / "var.safetensors")), load_file(str(single / "var.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6  # gradients were averaged over both halves
    rows = log_rows(tmp_path / "ddp")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in log_rows(single)], rel=1e-5)
    run_info = json.loads((tmp_path / "ddp" / "config.json").read_text())["provenance"]["run"]
    assert run_info["world_size"] == 2 and run_info["backend"] == "gloo"


# ---------------------------------------------------------------- bad input
def test_student_of_another_family_is_refused(pair):
    c = tiny_model().config
    wider = ModelConfig(c.var.__class__(**{**c.var.__dict__, "embed_dim": 96}), c.vqvae)
    with pytest.raises(EvarError, match="embed_dim is 96 in the student but 64"):
        check_family(c, wider)
    other_vocab = ModelConfig(c.var.__class__(**{**c.var.__dict__, "patch_nums": (1, 2, 4)}), c.vqvae)
    with pytest.raises(EvarError, match="patch_nums"):
        check_family(c, other_vocab)
    check_family(c, ModelConfig(c.var.with_blocks((1, 1, 1), (8, 8, 8)), c.vqvae))  # pruned: fine


def test_untrained_teacher_is_refused():
    config = tiny_model().config
    torch.manual_seed(0)
    fresh = build_model(config).var.eval()  # built, never loaded: upstream's bug
    labels, x = torch.arange(4), torch.randn(4, 29, 8)
    with pytest.raises(EvarError, match="freshly initialised"):
        check_teacher(fresh, labels, x)
    torch.manual_seed(123)  # another seed: not equal to a fresh model, but still untrained
    with pytest.raises(EvarError, match="near-uniform"):
        check_teacher(build_model(config).var.eval(), labels, x)
    assert check_teacher(tiny_model().var, labels, x)["relative_logit_difference_vs_fresh_init"] > 0.1


def test_cli_errors_name_the_problem(pair, tmp_path):
    teacher, student = pair
    runner = CliRunner()

    def fails(*args: str) -> str:
        result = runner.invoke(app, ["distill", *args])
        assert isinstance(result.exception, EvarError), result.output
        return str(result.exception)

    assert "/no/such/teacher" in fails("--teacher", "/no/such/teacher", "--student", student,
                                       "--out", str(tmp_path / "a"))
    assert "--scale-weights has 2 values" in fails("--teacher", teacher, "--student", student, "--out",
                                                   str(tmp_path / "b"), "--scale-weights", "1,2")
    assert "--kd" in fails("--teacher", teacher, "--student", student, "--out", str(tmp_path / "c"), "--kd", "fancy")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    assert "notes.txt" in fails("--teacher", teacher, "--student", student, "--out", str(tmp_path / "d"))
    assert "overlaps the input" in fails("--teacher", teacher, "--student", student, "--out", student)
