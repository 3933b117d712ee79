"""Linears as 1×1 convolutions (`--linear-layout conv`): the same numbers, the FFN kept channel-major, small layers
and odd shapes left alone, and the export's parity run on the rewritten graph."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from evar.export import onnx_layout
from evar.export.onnx_layout import linears_as_convs
from onnx import TensorProto, helper, numpy_helper

from evar.errors import EvarError
from tests.conftest import tiny_model

B, T, C = 2, 5, 512


def _block(width: int = C) -> onnx.ModelProto:
    """proj (MatMul + bias Add) → fc1 (MatMul) → FastGelu(bias) → fc2 (MatMul + bias) on (B, T, width); then a
    Gemm with transB and a bias on a rank-2 input (like AdaLN's: it stays), and a MatMul whose K is no multiple of 16."""
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array(rng.normal(scale=0.05, size=shape).astype(np.float32), name)

    ffn = 2 * width
    inits = [w("proj_w", width, width), w("proj_b", width), w("fc1_w", width, ffn), w("fc1_b", ffn),
             w("fc2_w", ffn, width), w("fc2_b", width), w("ada_w", 3 * width, width), w("ada_b", 3 * width),
             w("odd_w", 24, width)]
    nodes = [helper.make_node("MatMul", ["x", "proj_w"], ["p"]), helper.make_node("Add", ["p", "proj_b"], ["pb"]),
             helper.make_node("MatMul", ["pb", "fc1_w"], ["h"]),
             helper.make_node("FastGelu", ["h", "fc1_b"], ["g"], domain="com.microsoft"),
             helper.make_node("MatMul", ["g", "fc2_w"], ["f"]), helper.make_node("Add", ["fc2_b", "f"], ["y"]),
             helper.make_node("Gemm", ["cond", "ada_w", "ada_b"], ["ada"], transB=1),
             helper.make_node("MatMul", ["small", "odd_w"], ["odd"])]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "block",
        [helper.make_tensor_value_info("x", f, [B, T, width]), helper.make_tensor_value_info("cond", f, [B, width]),
         helper.make_tensor_value_info("small", f, [B, T, 24])],
        [helper.make_tensor_value_info(n, f, None) for n in ("y", "ada", "odd")], inits,
        value_info=[helper.make_tensor_value_info(n, f, [B, T, width]) for n in ("p", "pb")]
        + [helper.make_tensor_value_info("g", f, [B, T, ffn])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _feeds(width: int = C) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"x": rng.normal(size=(B, T, width)).astype(np.float32),
            "cond": rng.normal(size=(B, width)).astype(np.float32),
            "small": rng.normal(size=(B, T, 24)).astype(np.float32)}


def test_rewrite_keeps_the_numbers_and_the_ffn_channel_major():
    plain, conv = _block(), _block()
    assert linears_as_convs(conv) == 3  # proj, fc1, fc2; not the Gemm, not the 24-wide product
    ops = Counter(n.op_type for n in conv.graph.node)
    assert ops["Conv"] == 3 and ops["MatMul"] == 1 and ops["Gemm"] == 1 and ops["Add"] == 0  # biases folded
    # proj: a transpose in and out; the FFN: one in, one out, none around its GELU
    assert ops["Transpose"] == 4
    gelu = next(n for n in conv.graph.node if n.op_type == "FastGelu")
    assert len(gelu.input) == 1  # its bias moved into fc1's convolution
    names = {i.name for i in conv.graph.initializer}
    assert not {"proj_w", "fc1_w", "fc2_w"} & names and {"odd_w", "ada_w"} <= names
    for got, want in zip(_run(conv, _feeds()), _run(plain, _feeds())):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_onnxruntime_folds_the_way_back_into_its_reorders(tmp_path):
    """The (B, N, T, 1) → (B, T, 1, N) transpose right after a convolution is what onnxruntime's NCHWc pass turns
    into a channels-last ReorderOutput: the optimized graph keeps only the transposes on the way in."""
    model = _block()
    linears_as_convs(model)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(options.optimized_model_filepath).graph.node
    if not any(n.domain == "com.microsoft.nchwc" for n in nodes):
        pytest.skip("this CPU has no NCHWc kernels in onnxruntime")
    channels_last = [helper.get_attribute_value(a) for n in nodes if n.op_type == "ReorderOutput"
                     for a in n.attribute if a.name == "channels_last"]
    assert 1 in channels_last  # fc2's output goes straight to tokens
    perms = [list(helper.get_attribute_value(n.attribute[0])) for n in nodes if n.op_type == "Transpose"]
    assert perms and [0, 2, 3, 1] not in perms  # only ways in are left


def test_small_layers_are_left_alone():
    model = _block(width=onnx_layout.MIN_CHANNELS // 2)
    assert linears_as_convs(model) == 0
    assert "Conv" not in {n.op_type for n in model.graph.node}


def test_export_checks_parity_on_the_rewritten_graph(tmp_path, monkeypatch):
    from evar.export.artifact import build_onnx
    from evar.export.onnx import OnnxOptions

    from evar.files import read_json

    monkeypatch.setattr(onnx_layout, "MIN_CHANNELS", 16)  # the tiny model's widths; the rule is the same
    model = tiny_model()
    ops = {}
    for layout in ("conv", "matmul"):
        out = tmp_path / layout
        build_onnx(model, "tests:tiny", out, OnnxOptions(top_k=8, top_p=0.9, linear_layout=layout))  # parity
        graph = onnx.load(str(out / "decoder_step.onnx"), load_external_data=False).graph
        ops[layout] = Counter(n.op_type for n in graph.node)
        notes = read_json(out / "manifest.json")["graphs"]["decoder_step"]["notes"]
        assert any("1×1 convolutions" in n for n in notes) == (layout == "conv")
    added = 4 * model.config.var.depth  # qkv, proj, fc1, fc2 of every block at least (the tokenizer's Phi is one)
    assert ops["conv"]["Conv"] >= ops["matmul"]["Conv"] + added
    assert ops["conv"]["MatMul"] <= ops["matmul"]["MatMul"] - added


def test_bad_layout_is_refused_before_any_work():
    from evar.export.onnx import OnnxOptions

    with pytest.raises(EvarError, match="--linear-layout must be one of conv, matmul"):
        OnnxOptions(linear_layout="nchw").validate()
