"""Scale split (`evar-export onnx --early-model BIG --split-scale N`): PyTorch reference, one artifact running two
weight sets, runtime tokens equal the reference of the same recipe, bad values are one clear line."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from evar.errors import EvarError
from evar.models.decoding import generate
from tests.conftest import tiny_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from evar.checkpoints import save_model_dir  # noqa: E402
from evar.contract import EARLY_STEP_GRAPH, PREFILL_GRAPH, STEP_GRAPH, load_artifact  # noqa: E402
from evar.export.artifact import build_onnx  # noqa: E402
from evar.export.onnx import OnnxOptions  # noqa: E402
from evar.runtime.generator import Generator  # noqa: E402

N, TOP_K, TOP_P = 2, 40, 0.9
LABELS = np.array([2, 5, 9])


def _late():
    """Another transformer on the same tokenizer (as a pruned copy would be): other weights, other widths."""
    big = tiny_model()
    small = tiny_model(seed=1)
    small.vqvae.load_state_dict(big.vqvae.state_dict())
    return big, small


def _gen(late, cfg, early=None, n=None, trim=None, **kw):
    return generate(late.var, late.vqvae, torch.from_numpy(LABELS), guidance=cfg, top_k=TOP_K, top_p=TOP_P, seed=7,
                    early=None if early is None else early.var, split_scale=n, cfg_until_scale=trim, **kw)


@pytest.mark.parametrize("cfg", [0.0, 1.5])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_split_with_one_model_is_the_plain_model(cfg, n):
    m = tiny_model()
    plain, split = _gen(m, cfg), _gen(m, cfg, m, n)
    assert all(torch.equal(a, b) for a, b in zip(plain.tokens, split.tokens))


def test_split_runs_the_early_model_before_n_and_the_other_after():
    big, small = _late()
    split, early_only, late_only = _gen(small, 1.5, big, N), _gen(big, 1.5), _gen(small, 1.5)
    for si in range(N):
        assert torch.equal(split.tokens[si], early_only.tokens[si])
    assert not all(torch.equal(a, b) for a, b in zip(split.tokens[N:], late_only.tokens[N:]))
    assert not all(torch.equal(a, b) for a, b in zip(split.tokens[N:], early_only.tokens[N:]))


@pytest.fixture(scope="module")
def split_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    big, small = _late()
    big_dir, small_dir = save_model_dir(big, root / "big"), save_model_dir(small, root / "small")
    out = root / "art"
    build_onnx(small, str(small_dir), out, OnnxOptions(top_k=TOP_K, top_p=TOP_P, split_scale=N,
                                                        early_model=str(big_dir)), early=big)
    return out


def test_manifest_says_which_weights_run_which_scale(split_artifact):
    a = load_artifact(split_artifact, verify_hashes=True)
    assert a.data["format_version"] == 3 and a.split_scale == N
    g = a.data["generation"]
    assert g["early_graph"] == EARLY_STEP_GRAPH and g["prefill_graph"] == PREFILL_GRAPH
    assert [f["scale_index"] for f in a.graph(EARLY_STEP_GRAPH)["functions"]] == list(range(N))
    # two weight sets: the early graph's KV has the early model's heads, decoder_step the compressed model's
    early_heads = [t["shape"][1] for t in a.graph(EARLY_STEP_GRAPH)["signature"]["inputs"] if t["role"] == "past_key"]
    late_heads = [t["shape"][1] for t in a.graph(STEP_GRAPH)["signature"]["inputs"] if t["role"] == "past_key"]
    assert early_heads == list(tiny_model().config.var.num_heads) and late_heads == list(a.var["num_heads"])
    w_early = {t.name for t in onnx.load(str(a.graph_path(EARLY_STEP_GRAPH))).graph.initializer}
    assert w_early  # its own weights, in its own file
    T = sum(pn * pn for pn in a.patch_nums[:N])
    prefill = a.function(PREFILL_GRAPH)
    assert prefill["inputs"][1]["shape"] == ["batch", T]
    assert all(o["shape"][2] == T for o in prefill["outputs"])
    checks = [c for c in a.data["parity"]["checks"] if c["name"].startswith("split at")]
    assert checks and all(c["passed"] for c in checks)


@pytest.mark.parametrize("cfg", [0.0, 1.5])
@pytest.mark.parametrize("backend", ["cpu", "torch-cpu"])
def test_runtime_tokens_equal_pytorch_of_the_same_recipe(split_artifact, cfg, backend):
    big, small = _late()
    out = Generator(split_artifact, backend, threads=1).generate(LABELS, seed=7, cfg=cfg)
    ref = _gen(small, cfg, big, N)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(out.tokens, ref.tokens))


def test_split_composes_with_trimming(tmp_path):
    big, small = _late()
    out = tmp_path / "art"
    build_onnx(small, "tests:small", out, OnnxOptions(simplify=False, top_k=TOP_K, top_p=TOP_P, split_scale=N,
                                                       early_model="tests:big", cfg_until_scale=3), early=big)
    got = Generator(out, "cpu", threads=1).generate(LABELS, seed=7, cfg=1.5)
    ref = _gen(small, 1.5, big, N, trim=3)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(got.tokens, ref.tokens))


@pytest.mark.slow  # ~8 s: the int8 gate drives the split pipeline over three seeds
def test_split_composes_with_int8(tmp_path):
    big, small = _late()
    q = tmp_path / "q"
    build_onnx(small, "tests:small", q, OnnxOptions(simplify=False, split_scale=N, early_model="tests:big",
                                                     quantize="int8"), early=big)
    a = load_artifact(q)
    assert {n.op_type for n in onnx.load(str(a.graph_path(STEP_GRAPH))).graph.node} & {"MatMulInteger",
                                                                                       "DynamicQuantizeMatMul"}
    assert Generator(q, "cpu", threads=1).generate(LABELS, seed=1).images.shape[0] == 3


def test_pytorch_split_scale_out_of_range_is_an_error():
    m = tiny_model()
    for n in (0, 4):
        with pytest.raises(EvarError, match="split-scale"):
            _gen(m, 1.5, m, n)


def _cli(monkeypatch, capsys, argv):
    from evar.export import cli

    monkeypatch.setattr(sys, "argv", ["evar-export", "onnx", *argv])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    return err


@pytest.mark.parametrize("extra,what", [(["--split-scale", "0"], "split-scale"), (["--split-scale", "4"], "split-scale"),
                                        (["--split-scale", "2", "--cfg-until-scale", "1"], "cfg-until-scale"),
                                        (["--split-scale", "2", "--other-tokenizer"], "tokenizer"),
                                        (["--split-scale", "2", "--no-early"], "early-model")])
def test_bad_split_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, extra, what):
    big, small = _late()
    small_dir = save_model_dir(small, tmp_path / "small")
    other = tiny_model(seed=2)  # its own tokenizer
    early_dir = save_model_dir(other if "--other-tokenizer" in extra else big, tmp_path / "big")
    argv = ["--model", str(small_dir), "--out", str(tmp_path / "art"), "--simplify"] + \
        [e for e in extra if not e.startswith("--other") and e != "--no-early"]
    if "--no-early" not in extra:
        argv += ["--early-model", str(early_dir)]
    err = _cli(monkeypatch, capsys, argv)
    assert what in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "small"]


def test_evar_sample_split_with_one_model_gives_the_plain_images(tmp_path, monkeypatch):
    from evar.apps import cli

    model_dir = save_model_dir(tiny_model(), tmp_path / "m")
    outs = {}
    for name, extra in (("plain", []), ("split", ["--early-model", str(model_dir), "--split-scale", "2"])):
        monkeypatch.setattr(sys, "argv", ["evar", "sample", "--model", str(model_dir), "--classes", "1,4",
                                          "--per-class", "2", "--out", str(tmp_path / name), *extra])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        assert exc.value.code in (0, None)
        outs[name] = np.load(tmp_path / name / "samples.npz")["images"]
    assert np.array_equal(outs["plain"], outs["split"])


def test_a_pruned_decoder_shares_the_tokenizer_and_another_codebook_does_not():
    """The split needs the token side of the tokenizer only: the late model's decoder draws the image."""
    import copy

    from evar.export.split import check_shared_tokenizer
    from evar.prune.decoder import DecoderRecipe, prune_decoder

    big, small = _late()
    pruned = prune_decoder(copy.deepcopy(small), DecoderRecipe(0.25, method="magnitude"), parent="tiny").model
    assert pruned.config.vqvae.decoder_widths is not None
    check_shared_tokenizer(big, pruned)
    with torch.no_grad():
        pruned.vqvae.quantize.embedding.weight[0] += 1.0
    with pytest.raises(EvarError, match="tokenizer"):
        check_shared_tokenizer(big, pruned)
