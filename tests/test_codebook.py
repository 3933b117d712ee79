"""Codebook health: usage and perplexity per scale, dead-code restarts, and their place in training."""
import dataclasses
import json
import math

import pytest
import torch

from evar import train
from evar.config import VQVAEConfig
from evar.models.codebook import code_usage, describe_usage, perplexity, restart_dead_codes, tokenizer_report
from evar.models.vqvae import VQVAE
from evar.train import CodebookCare, Schedule, TokenizerTraining, train_tokenizer

TINY_VQVAE = VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                         using_sa=False, using_mid_sa=False, v_patch_nums=(1, 2, 4, 8))


def test_usage_and_perplexity_of_a_hand_made_assignment():
    scales = [torch.tensor([[3]]),  # one code
              torch.tensor([[0, 0, 1, 1]]),  # two codes, evenly: perplexity 2
              torch.tensor([[0, 0, 0, 1], [5, 5, 5, 5]]),  # p = (3/8, 1/8, 4/8)
              torch.arange(16).view(1, 16)]  # 16 codes evenly
    usage = code_usage(scales, vocab_size=32, patch_nums=(1, 2, 2, 4))
    assert [u.used for u in usage] == [1, 2, 3, 16]
    expected = math.exp(-(3 / 8 * math.log(3 / 8) + 1 / 8 * math.log(1 / 8) + 1 / 2 * math.log(1 / 2)))
    assert [u.perplexity for u in usage] == pytest.approx([1.0, 2.0, expected, 16.0])
    assert [u.patch_num for u in usage] == [1, 2, 2, 4]
    assert perplexity(torch.tensor([0, 7, 0])) == pytest.approx(1.0)


def test_restarts_touch_only_dead_codes():
    gen = torch.Generator().manual_seed(0)
    book = torch.randn(10, 4)
    before = book.clone()
    hits = torch.tensor([5.0, 0.0, 0.2, 0.01, 3.0, 0.0, 1.0, 0.04, 2.0, 9.0])
    candidates = torch.randn(50, 4) + 100.0  # far from every code: a restarted row is unmistakable
    dead = restart_dead_codes(book, hits, candidates, dead_below=0.05, gen=gen)
    assert sorted(dead.tolist()) == [1, 3, 5, 7]
    live = torch.tensor([0, 2, 4, 6, 8, 9])
    assert torch.equal(book[live], before[live])
    for i in dead.tolist():
        assert any(torch.equal(book[i], c) for c in candidates), i
    assert len({tuple(book[i].tolist()) for i in dead.tolist()}) == 4  # drawn without replacement
    assert len(restart_dead_codes(book, torch.ones(10), candidates, 0.05, gen)) == 0  # nothing dead: no change


def test_quantizer_hands_out_the_residuals_it_quantised():
    torch.manual_seed(0)
    vq = VQVAE(TINY_VQVAE).eval()
    f = vq.encode_features(torch.rand(2, 3, 16, 16) * 2 - 1)
    residuals = []
    f_hat, idx, _ = vq.quantize.residual_quantize(f, residuals)
    assert [r.shape for r in residuals] == [(2 * pn * pn, 8) for pn in (1, 2, 4, 8)]
    plain, idx_plain, _ = vq.quantize.residual_quantize(f)  # collecting changes nothing
    assert torch.equal(f_hat, plain) and all(torch.equal(a, b) for a, b in zip(idx, idx_plain))
    # the first scale's residual is f itself, area-averaged to 1x1
    assert torch.allclose(residuals[0], f.mean(dim=(2, 3)), atol=1e-6)


def _job(steps, restart_every):
    sched = Schedule(steps=steps, batch_size=8, lr=1e-3, weight_decay=0.0, warmup=2, ckpt_every=steps)
    return TokenizerTraining(schedule=sched, codebook=CodebookCare(restart_every=restart_every, dead_below=0.05,
                                                                   until=1.0))


def test_training_restarts_dead_codes_and_reports_usage(tmp_path):
    out = train_tokenizer(_job(steps=4, restart_every=2), tmp_path / "tok", TINY_VQVAE)
    rows = [json.loads(r) for r in (out / train.LOG_FILE).read_text().splitlines()]
    assert rows[0]["restarted"] == 0  # never at step 0: no hit statistics yet
    assert rows[2]["restarted"] > 0  # a fresh 32-code book has dead codes at step 2
    report = json.loads((out / train.TOKENIZER_CONFIG).read_text())["codebook"]
    assert report["split"] == "test" and report["images"] == 450
    assert [s["patch_num"] for s in report["scales"]] == [1, 2, 4, 8]
    assert all(1 <= s["used"] <= 32 and 1.0 <= s["perplexity"] <= s["used"] + 1e-9 for s in report["scales"])
    assert "codes used per scale" in describe_usage(report)
    off = train_tokenizer(_job(steps=4, restart_every=0), tmp_path / "off", TINY_VQVAE)
    assert all(json.loads(r)["restarted"] == 0 for r in (off / train.LOG_FILE).read_text().splitlines())


def test_care_schedule():
    care = CodebookCare(restart_every=50, until=0.8)
    assert [s for s in range(1000) if care.due(s, 1000)] == list(range(50, 800, 50))
    assert not any(CodebookCare(restart_every=0).due(s, 100) for s in range(100))


def test_tokenizer_report_counts_held_out_images():
    torch.manual_seed(0)
    vq = VQVAE(TINY_VQVAE)
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    report = tokenizer_report(vq, images, batch=2)
    assert report["images"] == 5 and report["vocab_size"] == 32 and report["mse"] > 0
    assert report["scales"][0]["used"] <= 5 and vq.training  # mode restored


def test_training_can_start_from_another_tokenizer(tmp_path):
    first = train_tokenizer(_job(steps=2, restart_every=0), tmp_path / "a", TINY_VQVAE)
    sched = Schedule(steps=1, batch_size=8, lr=1e-9, weight_decay=0.0, warmup=1, ckpt_every=1)
    job = TokenizerTraining(schedule=sched, codebook=CodebookCare(restart_every=0), init=str(first))
    again = train.load_tokenizer(train_tokenizer(job, tmp_path / "b", TINY_VQVAE))
    start = train.load_tokenizer(first)
    for (name, a), b in zip(start.named_parameters(), again.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name  # one step at lr 1e-9: the init, kept
    other = dataclasses.replace(TINY_VQVAE, vocab_size=16)
    with pytest.raises(train.EvarError, match="another architecture"):
        train_tokenizer(job, tmp_path / "c", other)
