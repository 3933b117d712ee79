"""AdaLN as class tables: the Gemms of SiLU(class embedding) become lookups with the same values, other Gemms stay,
tables never outgrow their weights, and the int8 quantizer still finds AdaLN when it is asked to quantize it."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from evar.export.onnx_class_tables import adaln_as_class_tables
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import tiny_model

ROWS, C = 2, 32


def _graph(classes: int = 11) -> onnx.ModelProto:
    """labels → class embedding → SiLU → two AdaLN Gemms (transB, bias); plus a Gemm of another input."""
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)

    inits = [w("emb", classes, C), w("ada0_w", 6 * C, C), w("ada0_b", 6 * C), w("ada1_w", 2 * C, C),
             w("other_w", C, C)]
    nodes = [helper.make_node("Gather", ["emb", "labels"], ["cond"], axis=0),
             helper.make_node("Sigmoid", ["cond"], ["sig"]), helper.make_node("Mul", ["cond", "sig"], ["silu"]),
             helper.make_node("Gemm", ["silu", "ada0_w", "ada0_b"], ["ada0"], transB=1),
             helper.make_node("Gemm", ["silu", "ada1_w"], ["ada1"], transB=1),
             helper.make_node("Gemm", ["x", "other_w"], ["other"])]
    f = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "adaln", [helper.make_tensor_value_info("labels", TensorProto.INT64, [ROWS]),
                                               helper.make_tensor_value_info("x", f, [ROWS, C])],
                              [helper.make_tensor_value_info(n, f, None) for n in ("ada0", "ada1", "other")], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, labels) -> list[np.ndarray]:
    x = np.random.default_rng(1).normal(size=(ROWS, C)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"labels": labels, "x": x})


def test_adaln_gemms_become_lookups_with_the_same_values():
    plain, tabled = _graph(), _graph()
    assert adaln_as_class_tables(tabled) == 2
    ops = Counter(n.op_type for n in tabled.graph.node)
    assert ops == {"Gather": 3, "Gemm": 1}  # the SiLU went with its readers; the other Gemm stays
    names = {i.name for i in tabled.graph.initializer}
    assert not {"ada0_w", "ada0_b", "ada1_w"} & names and "other_w" in names
    for labels in (np.array([0, 10]), np.array([3, 3])):
        for got, want in zip(_run(tabled, labels), _run(plain, labels)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_no_table_larger_than_its_weight():
    model = _graph(classes=C + 1)  # more classes than channels
    assert adaln_as_class_tables(model) == 0
    assert Counter(n.op_type for n in model.graph.node)["Gemm"] == 3


def test_export_tables_and_the_int8_exception(tmp_path):
    from evar.export.artifact import build_onnx
    from evar.export.onnx import OnnxOptions
    from evar.export.quantize import Int8Options

    from evar.files import read_json

    model = tiny_model()
    depth = model.config.var.depth
    runs = {"tables": OnnxOptions(top_k=8, top_p=0.9),
            "no-tables": OnnxOptions(top_k=8, top_p=0.9, class_tables=False),
            "int8-adaln": OnnxOptions(top_k=8, top_p=0.9, quantize="int8", int8=Int8Options(keep_fp32=("head",)))}
    ops = {}
    for name, options in runs.items():
        build_onnx(model, "tests:tiny", tmp_path / name, options)  # parity (and the int8 gate) on the final graph
        graph = onnx.load(str(tmp_path / name / "decoder_step.onnx"), load_external_data=False).graph
        ops[name] = Counter(n.op_type for n in graph.node)
        notes = read_json(tmp_path / name / "manifest.json")["graphs"]["decoder_step"]["notes"]
        assert any("class tables" in n for n in notes) == (name == "tables")
    assert ops["no-tables"]["Gemm"] + ops["no-tables"]["MatMul"] - depth - 1 >= \
        ops["tables"]["Gemm"] + ops["tables"]["MatMul"]  # every block's AdaLN and head_nm's became a lookup
    assert ops["int8-adaln"]["Sigmoid"] >= 1  # the AdaLN stayed a projection for the quantizer to take
