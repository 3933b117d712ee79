"""Distilled Decoding pairs: the noise → token flow, and `evar dd pairs` (deterministic, resumable, rank-independent)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evar.calibration import balanced_labels
from evar.checkpoints import save_model_dir
from evar.dd.flow import flow_tokens, sequence_noise, token_noise
from evar.dd.pairs import PairsRecipe, load_pairs, make_pairs, part_path
from evar.errors import EvarError
from evar.models.decoding import generate
from evar.samples import SamplingSettings
from tests.conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]
# chi-square 0.999 quantiles by degrees of freedom
CHI2_999 = {5: 20.52, 6: 22.46, 7: 24.32}


def test_noise_is_numbered_by_sample_and_standard_normal():
    whole = token_noise(3, 2, 0, 5, 9, 4)
    assert torch.equal(token_noise(3, 2, 3, 2, 9, 4), whole[3:5])  # sample i's noise does not depend on the batch
    assert not torch.equal(token_noise(3, 1, 0, 5, 9, 4), whole[:, :, :])  # another scale, another stream
    z = token_noise(0, 0, 0, 1, 20000, 8)
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    seq = sequence_noise(3, 0, 5, (1, 2, 3), 4)
    assert seq.shape == (5, 14, 4) and torch.equal(seq[:, 5:], token_noise(3, 2, 0, 5, 9, 4))


@pytest.mark.parametrize("dim", [4, 32])
def test_flow_lands_on_codes_with_the_target_frequencies(dim):
    torch.manual_seed(0)
    codes = torch.randn(8, dim) * 0.5
    p = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.1, 0.05, 0.0])
    n = 4000
    noise = token_noise(0, 0, 0, 1, n, dim)[0]
    tokens = flow_tokens(noise, p.expand(n, 8), codes, steps=32)
    assert torch.equal(tokens, flow_tokens(noise, p.expand(n, 8), codes, steps=32))  # deterministic
    counts = torch.bincount(tokens, minlength=8).double()
    assert counts[7] == 0  # a code of probability 0 is never reached
    expected = n * p[:7].double()
    chi2 = float(((counts[:7] - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[6], (counts.tolist(), chi2)
    # and the flow is not the identity of something trivial: a skewed target moves the frequencies with it
    q = torch.tensor([0.05, 0.05, 0.1, 0.1, 0.1, 0.15, 0.2, 0.25])
    moved = torch.bincount(flow_tokens(noise, q.expand(n, 8), codes, steps=32), minlength=8).double()
    assert float(((moved - n * q.double()) ** 2 / (n * q.double())).sum()) < 24.32


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    return str(save_model_dir(tiny_model(), tmp_path_factory.mktemp("teacher") / "tiny"))


def recipe(samples: int = 10, **kw) -> PairsRecipe:
    return PairsRecipe(samples, SamplingSettings(1.5, 0, 0.9, 0), ode_steps=kw.pop("ode_steps", 8),
                       chunk=kw.pop("chunk", 4))


def test_pairs_are_deterministic_and_resume_to_the_same_set(teacher_dir, tmp_path):
    a = load_pairs(make_pairs(teacher_dir, tmp_path / "a", recipe()))
    assert a.tokens.shape == (10, 30) and torch.equal(a.labels, balanced_labels(10, 10))
    b = tmp_path / "b"
    make_pairs(teacher_dir, b, recipe())
    part_path(b, 1).unlink()  # as if killed before chunk 1 was written
    record = json.loads((b / "pairs.json").read_text())
    (b / "pairs.json").write_text(json.dumps({**record, "complete": False}))
    with pytest.raises(EvarError, match="unfinished"):
        load_pairs(b)
    make_pairs(teacher_dir, b, recipe())
    again = load_pairs(b)
    assert torch.equal(again.tokens, a.tokens) and again.record["tokens_sha256"] == a.record["tokens_sha256"]
    assert len(again.record["runs"]) == 2 and again.record["runs"][1]["chunks_made"] == 1
    assert len(again.record["teacher_var_sha256"]) == 64
    with pytest.raises(EvarError, match="other settings"):  # a different job into the same folder
        make_pairs(teacher_dir, b, recipe(ode_steps=4))


def test_greedy_teacher_gives_its_argmax_tokens(teacher_dir, tmp_path):
    """With top-k 1 the teacher's distribution is one code: the flow must land on it whatever the noise, so the
    pairs are exactly the teacher's greedy generation (the scale loop and the cache are the decoder's)."""
    r = PairsRecipe(6, SamplingSettings(1.5, 1, 0.0, 0), ode_steps=4, chunk=6)
    pairs = load_pairs(make_pairs(teacher_dir, tmp_path / "greedy", r))
    model = tiny_model()
    greedy = generate(model.var, model.vqvae, pairs.labels, guidance=1.5, top_k=1, seed=5, decode=False)
    assert torch.equal(pairs.tokens, torch.cat(greedy.tokens, dim=1))


@pytest.mark.slow  # two torchrun processes start in ~30 s on a loaded 2-core machine
def test_two_ranks_make_the_same_pairs_as_one(teacher_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ["--teacher", teacher_dir, "--samples", "10", "--cfg", "1.5", "--top-k", "0", "--top-p", "0.9",
             "--ode-steps", "8", "--chunk", "4"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "evar.dd", "pairs", *flags, "--out", str(tmp_path / "ddp")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one = load_pairs(make_pairs(teacher_dir, tmp_path / "one", recipe()))
    two = load_pairs(tmp_path / "ddp")
    assert torch.equal(one.tokens, two.tokens) and two.record["runs"][0]["ranks"] == 2
