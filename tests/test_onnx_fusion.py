"""The tanh-GELU fusion: it fires on the exporter's pattern, computes the same numbers, and leaves look-alikes."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from evar.export.onnx_fusion import fuse_tanh_gelu  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

ROWS, IN, FFN = 5, 8, 16


def _gelu_graph(extra_reader: bool = False, coef: float = 0.044715) -> onnx.ModelProto:
    """MatMul + bias, then the tanh GELU in the legacy exporter's node order; optionally x³ read elsewhere too."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(IN, FFN)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=FFN).astype(np.float32), "b")]
    for name, value in (("c_cube", coef), ("c_scale", math.sqrt(2 / math.pi)), ("one", 1.0), ("half", 0.5)):
        inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
    nodes = [helper.make_node("MatMul", ["inp", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["x"]),
             helper.make_node("Mul", ["x", "x"], ["x2"]), helper.make_node("Mul", ["x", "x2"], ["x3"]),
             helper.make_node("Mul", ["c_cube", "x3"], ["cx3"]), helper.make_node("Add", ["x", "cx3"], ["inner"]),
             helper.make_node("Mul", ["c_scale", "inner"], ["arg"]), helper.make_node("Tanh", ["arg"], ["t"]),
             helper.make_node("Add", ["one", "t"], ["onept"]), helper.make_node("Mul", ["x", "onept"], ["xt"]),
             helper.make_node("Mul", ["half", "xt"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, FFN])]
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["x3"], ["side"]))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [ROWS, FFN]))
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("inp", TensorProto.FLOAT, [ROWS, IN])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run what the graph says
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"inp": x})


def test_fusion_replaces_the_pattern_and_keeps_the_numbers():
    plain = _gelu_graph()
    fused = _gelu_graph()
    assert fuse_tanh_gelu(fused) == 1
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops == {"MatMul": 1, "FastGelu": 1}  # the bias Add went into FastGelu as well
    assert next(n for n in fused.graph.node if n.op_type == "FastGelu").input == ["mm", "b"]
    x = np.random.default_rng(1).normal(scale=2.0, size=(ROWS, IN)).astype(np.float32)
    np.testing.assert_allclose(_run(fused, x)[0], _run(plain, x)[0], rtol=1e-5, atol=1e-5)


def test_fusion_leaves_look_alikes_and_shared_intermediates():
    assert fuse_tanh_gelu(_gelu_graph(coef=0.05)) == 0  # another polynomial is not GELU
    shared = _gelu_graph(extra_reader=True)
    assert fuse_tanh_gelu(shared) == 0  # x³ is read by another node: removing it would break the graph
    assert "Tanh" in {n.op_type for n in shared.graph.node}


def test_exported_step_graph_is_fused_and_no_fuse_keeps_it(tmp_path):
    from evar.export.artifact import build_onnx
    from evar.export.onnx import OnnxOptions

    model = tiny_model()
    ops = {}
    for fuse in (True, False):
        out = tmp_path / f"fuse{fuse}"
        build_onnx(model, "tests:tiny", out, OnnxOptions(top_k=8, top_p=0.9, fuse_gelu=fuse))  # parity-checked
        graph = onnx.load(str(out / "decoder_step.onnx"), load_external_data=False).graph
        ops[fuse] = Counter(n.op_type for n in graph.node)
    depth = model.config.var.depth
    assert ops[True]["FastGelu"] == depth and ops[True]["Tanh"] == 0
    assert ops[False]["FastGelu"] == 0 and ops[False]["Tanh"] == depth
