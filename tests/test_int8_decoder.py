"""`evar-export onnx --quantize-decoder int8`: static int8 convolutions in the decoder graph, the PSNR gate against
the fp32 decoder graph (stated in the manifest), the runtime, and bad options as one clear line."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.conftest import tiny_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from evar.contract import DECODER_GRAPH, STEP_GRAPH, load_artifact  # noqa: E402
from evar.export import parity as pt  # noqa: E402
from evar.export.artifact import build_onnx  # noqa: E402
from evar.export.onnx import OnnxOptions  # noqa: E402
from evar.export.quantize import DecoderInt8Options, psnr_db  # noqa: E402
from evar.runtime.generator import Generator  # noqa: E402

FAST = DecoderInt8Options(calib_samples=4, check_samples=2)


def _conv_count(path) -> int:
    return sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("qdec")
    plain, quant = root / "plain", root / "int8"
    build_onnx(tiny_model(), "tests:tiny", plain, OnnxOptions(top_k=40, top_p=0.9))
    build_onnx(tiny_model(), "tests:tiny", quant, OnnxOptions(top_k=40, top_p=0.9, quantize_decoder="int8",
                                                              decoder_int8=FAST))
    return plain, quant


def test_decoder_graph_has_quantized_convolutions_and_says_so(artifacts):
    plain, quant = (load_artifact(p, verify_hashes=True) for p in artifacts)
    nodes = [n.op_type for n in onnx.load(str(quant.graph_path(DECODER_GRAPH))).graph.node]
    convs = _conv_count(plain.graph_path(DECODER_GRAPH))
    # QDQ: every convolution's weight and input pass through a (Quantize)DequantizeLinear pair
    assert nodes.count("Conv") == convs and nodes.count("DequantizeLinear") >= 2 * convs
    assert "DequantizeLinear" not in [n.op_type for n in onnx.load(str(quant.graph_path(STEP_GRAPH))).graph.node]
    comp = quant.data["compression"]
    assert comp["method"] == "int8" and comp["tool"] == "onnxruntime.quantization.quantize_static"
    gate = [c for c in quant.data["parity"]["checks"] if c["name"].startswith("int8 decoder")]
    assert len(gate) == 1 and gate[0]["passed"] and gate[0]["tolerance"] == FAST.min_psnr_db
    assert comp["details"]["decoder"]["psnr_db"] == pytest.approx(gate[0]["value"])
    assert quant.data["precision"]["weights"] == "int8"
    assert not [p for p in artifacts[1].iterdir() if ".fp32." in p.name]  # the fp32 decoder is gone


def test_int8_decoder_keeps_the_tokens_and_stays_close_to_the_fp32_images(artifacts):
    labels = np.array([1, 4, 7])
    plain, quant = (Generator(p, "cpu", threads=1).generate(labels, seed=5, cfg=1.5) for p in artifacts)
    assert all(np.array_equal(a, b) for a, b in zip(plain.tokens, quant.tokens))  # the transformer is untouched
    as_unit = [x.astype(np.float64) / 127.5 - 1 for x in (plain.images, quant.images)]
    assert psnr_db(*as_unit) >= FAST.min_psnr_db - 3  # uint8 rounding of both images costs a little


def test_gate_breach_raises_and_leaves_no_artifact(tmp_path):
    with pytest.raises(pt.ParityError, match="int8 decoder vs fp32 decoder graph"):
        build_onnx(tiny_model(), "tests:tiny", tmp_path / "art", OnnxOptions(
            simplify=False, quantize_decoder="int8", decoder_int8=DecoderInt8Options(1, 1, min_psnr_db=500.0)))
    assert not list(tmp_path.iterdir())


def test_psnr():
    a = np.zeros((1, 3, 4, 4))
    assert psnr_db(a, a) == float("inf")
    assert psnr_db(a, a + 0.02) == pytest.approx(10 * np.log10(4 / 0.02 ** 2))
    assert psnr_db(a, a + 5.0) == pytest.approx(10 * np.log10(4 / 1.0))  # clipped to [-1, 1] first


@pytest.mark.parametrize("args", [["--quantize-decoder", "int4"],
                                  ["--quantize-decoder", "int8", "--precision", "fp16"]])
def test_bad_decoder_int8_options_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, args):
    from evar.export import cli

    monkeypatch.setattr(sys, "argv", ["evar-export", "onnx", "--model", "random:digits", "--out",
                                      str(tmp_path / "art"), *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "decoder" in err
    assert not list(tmp_path.iterdir())
