"""The shipped `builtin:digits`: strict loading, a tokenizer that uses its codebook, samples a classifier reads."""
import json

import torch

from evar import zoo
from evar.checkpoints import build_model, load_strict, read_safetensors
from evar.data import load_digits
from evar.eval.metrics import evaluate_digits
from evar.models.codebook import tokenizer_report
from evar.samples import SamplingSettings, class_labels, sample_images

DIGITS = zoo.BUILTIN["digits"]


def test_shipped_weights_load_strictly_into_the_architecture():
    model = build_model(zoo.load("builtin:digits").config)
    load_strict(model.var, read_safetensors(DIGITS / "var.safetensors"), "var")
    load_strict(model.vqvae, read_safetensors(DIGITS / "vqvae.safetensors"), "vqvae")
    prov = json.loads((DIGITS / "config.json").read_text())["provenance"]
    assert prov["commands"] and prov["wall_time_s"]  # the recipe travels with the weights


def test_shipped_tokenizer_uses_its_codebook_on_held_out_digits():
    report = tokenizer_report(zoo.load("builtin:digits").vqvae, load_digits("test", 16)[0])
    assert report["scales"][-1]["used"] >= 64  # the issue-17 acceptance (the first tokenizer used 21)
    assert report["mse"] <= 0.0029


def test_shipped_model_draws_the_digits_it_is_asked_for():
    """A quick smoke test of quality: 3 samples per digit, judged by the shipped classifier."""
    model = zoo.load("builtin:digits")
    labels = class_labels(list(range(10)), 3)
    torch.manual_seed(0)
    images = sample_images(model, labels, SamplingSettings(1.5, 900, 0.96, 0))
    assert evaluate_digits(images, labels.numpy()).class_accuracy >= 0.9
