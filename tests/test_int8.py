"""`evar-export onnx --quantize int8`: integer ops in the graph, the statistical gate against the fp32 export
(thresholds in the manifest), the runtime, and bad options as one clear line with nothing written."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.conftest import tiny_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from evar.contract import STEP_GRAPH, load_artifact  # noqa: E402
from evar.export import parity as pt  # noqa: E402
from evar.export.artifact import build_onnx  # noqa: E402
from evar.export.onnx import OnnxOptions  # noqa: E402
from evar.export.quantize import Int8Options, token_kl  # noqa: E402
from evar.runtime.generator import Generator  # noqa: E402

INTEGER_OPS = {"MatMulInteger", "DynamicQuantizeMatMul"}


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "art"
    build_onnx(tiny_model(), "tests:tiny", out, OnnxOptions(top_k=40, top_p=0.9, quantize="int8"))
    return out


def test_int8_graph_has_integer_matmuls_and_says_so(int8_artifact):
    a = load_artifact(int8_artifact, verify_hashes=True)
    ops = [n.op_type for n in onnx.load(str(a.graph_path(STEP_GRAPH))).graph.node]
    depth = a.var["depth"]
    # qkv, proj, fc1, fc2 of every block; AdaLN projections and the head stay fp32 by default
    assert sum(op in INTEGER_OPS for op in ops) == 4 * depth
    assert a.data["precision"] == {"weights": "int8", "compute": "int8",
                                   "fp32_ops": ["every op but the quantized transformer matmuls"]}
    comp = a.data["compression"]
    assert comp["method"] == "int8" and comp["details"]["quantized_layers"] == 4 * depth
    assert not any("ada_lin" in name or name == "head" for name in comp["details"]["quantized"])
    gate = [c for c in a.data["parity"]["checks"] if c["name"].startswith("int8 vs fp32")]
    assert len(gate) == 2 * a.num_scales and all(c["passed"] for c in gate)
    assert {c["tolerance"] for c in gate} == {Int8Options().max_kl, Int8Options().min_token_agreement}
    assert not [p for p in int8_artifact.iterdir() if p.name.startswith(".")]  # staging removed


def test_int8_artifact_runs_and_stays_close_to_the_model(int8_artifact):
    model = tiny_model()
    from evar.models.decoding import generate
    import torch

    labels = np.array([1, 4, 7])
    out = Generator(int8_artifact, "cpu", threads=1).generate(labels, seed=5, cfg=1.5)
    ref = generate(model.var, model.vqvae, torch.from_numpy(labels), guidance=1.5, top_k=40, top_p=0.9, seed=5)
    assert out.images.dtype == np.uint8 and out.images.shape[:1] == (3,)
    # the first scale has one token per sample and int8 barely moves its logits
    assert np.array_equal(out.tokens[0], ref.tokens[0].numpy())


def test_keeping_nothing_fp32_quantizes_the_head_and_adaln_too(tmp_path):
    out = tmp_path / "art"
    # (on this tiny model int8 AdaLN drops token agreement to ~0.78 already at scale 0: why it stays fp32 by default)
    build_onnx(tiny_model(), "tests:tiny", out, OnnxOptions(quantize="int8", simplify=False, int8=Int8Options(
        keep_fp32=(), max_kl=1.0, min_token_agreement=0.5)))
    details = load_artifact(out).data["compression"]["details"]
    depth = tiny_model().config.var.depth
    assert details["quantized_layers"] == 5 * depth + 1 and "head" in details["quantized"]


def test_gate_breach_raises_and_leaves_no_artifact(tmp_path):
    with pytest.raises(pt.ParityError, match="int8 vs fp32 export: mean token KL"):
        build_onnx(tiny_model(), "tests:tiny", tmp_path / "art",
                   OnnxOptions(quantize="int8", simplify=False, int8=Int8Options(max_kl=1e-12)))
    assert not list(tmp_path.iterdir())


def test_token_kl():
    a = np.array([[[2.0, 0.0, -1.0]]])
    assert token_kl(a, a) == pytest.approx(0.0, abs=1e-12)
    assert token_kl(a, a + 5.0) == pytest.approx(0.0, abs=1e-12)  # a shift is the same distribution
    assert token_kl(a, a[..., ::-1]) > 0.5


@pytest.mark.parametrize("args", [["--quantize", "int4"], ["--quantize", "int8", "--precision", "fp16"],
                                  ["--quantize", "int8", "--int8-fp32", "attention"]])
def test_bad_int8_options_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, args):
    from evar.export import cli

    monkeypatch.setattr(sys, "argv", ["evar-export", "onnx", "--model", "random:digits", "--out",
                                      str(tmp_path / "art"), *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_token_agreement_is_one_minus_total_variation():
    from evar.export.quantize import token_agreement

    ref = np.log(np.array([[0.5, 0.3, 0.2]]))
    got = np.log(np.array([[0.4, 0.4, 0.2]]))
    assert token_agreement(ref, ref) == pytest.approx(1.0)
    assert token_agreement(ref, got) == pytest.approx(0.9)  # TV = (0.1 + 0.1) / 2
