"""Graph fusions onnxruntime does not find by itself in EVAR's exported graphs.

The tanh GELU of every FFN (`F.gelu(x, approximate="tanh")`) leaves the legacy exporter as ten elementwise nodes:
x·x, x·x², 0.044715·x³, x + …, √(2/π)·…, tanh, 1 + …, x·…, 0.5·…  Each reads and writes the whole (rows, FFN)
activation, and onnxruntime's own FastGelu fusion misses this node order (and its MatMulScaleFusion then folds
the trailing 0.5 into the next MatMul, so the pattern is gone for good). `fuse_tanh_gelu` rewrites each into one
`com.microsoft.FastGelu` (the same formula in fp32; onnxruntime's CPU kernel), folding the FFN's bias Add into it
when it feeds nothing else. Measured, it saves node dispatch on small graphs (digits: a few percent) and is within
noise on d16, where the matmuls dominate.

onnxruntime alone runs these graphs (Core ML is converted from PyTorch), so a contrib op costs no portability;
onnxruntime's Core ML execution provider runs FastGelu on the CPU (`--no-fuse-gelu` keeps the plain nodes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MS_DOMAIN = "com.microsoft"
CUBE_COEF, SQRT_2_OVER_PI = 0.044715, math.sqrt(2.0 / math.pi)


@dataclass
class _Graph:
    """Name → producing node, name → consuming nodes, and the constants (initializers, Constant nodes) of one ONNX
    graph, kept as TensorProtos: converting every weight of a d16 graph to numpy would copy it for nothing."""

    producer: dict[str, Any]
    consumers: dict[str, list[Any]]
    constants: dict[str, Any]
    outputs: set[str]

    @classmethod
    def of(cls, graph) -> _Graph:
        producer, consumers = {}, {}
        constants = {init.name: init for init in graph.initializer}  # TensorProtos: read only where needed
        for node in graph.node:
            for name in node.output:
                producer[name] = node
            for name in node.input:
                consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                constants[node.output[0]] = node.attribute[0].t
        return cls(producer, consumers, constants, {o.name for o in graph.output})

    def scalar(self, name: str) -> float | None:
        from onnx import numpy_helper

        tensor = self.constants.get(name)
        if tensor is None or math.prod(tensor.dims) != 1:
            return None
        return float(numpy_helper.to_array(tensor).reshape(-1)[0])

    def is_vector(self, name: str) -> bool:
        tensor = self.constants.get(name)
        return tensor is not None and len(tensor.dims) == 1

    def node(self, name: str, op: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def only_consumer(self, name: str, op: str):
        """The single node reading `name`, if it is an `op` and `name` is no graph output."""
        users = self.consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != op or name in self.outputs:
            return None
        return users[0]

    def split_const(self, node, value: float) -> str | None:
        """For a binary node with one scalar input equal to `value`: the other input."""
        a, b = node.input
        for const, other in ((a, b), (b, a)):
            got = self.scalar(const)
            if got is not None and math.isclose(got, value, rel_tol=1e-5):
                return other
        return None


def node_attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def plain_gemm(node) -> bool:
    """A Gemm that is a linear layer, A @ op(B) + C: alpha = beta = 1 and A not transposed (transB may be set)."""
    attrs = node_attrs(node)
    return (node.op_type == "Gemm" and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
            and not attrs.get("transA", 0))


def keep_read_initializers(graph, new: list[Any] | tuple = ()) -> None:
    """Add `new` to the graph's initializers and drop those nothing reads any more (a rewrite's replaced weights)."""
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept + list(new))


def _cube_of(g: _Graph, name: str, x: str) -> list | None:
    """The nodes computing x³ into `name`: Pow(x, 3), or Mul(x, Mul(x, x)) in either order."""
    pow_node = g.node(name, "Pow")
    if pow_node is not None:
        return [pow_node] if pow_node.input[0] == x and g.scalar(pow_node.input[1]) == 3.0 else None
    outer = g.node(name, "Mul")
    if outer is None or x not in outer.input:
        return None
    inner = g.node(outer.input[1] if outer.input[0] == x else outer.input[0], "Mul")
    if inner is None or list(inner.input) != [x, x] or len(g.consumers[inner.output[0]]) != 1:
        return None
    return [inner, outer]


def _match(g: _Graph, tanh) -> tuple[str, list, str] | None:
    """(x, the pattern's nodes, its output) for the tanh GELU around this Tanh node, or None."""
    scaled = g.node(tanh.input[0], "Mul")
    inner_sum = g.split_const(scaled, SQRT_2_OVER_PI) if scaled is not None else None
    add = g.node(inner_sum, "Add") if inner_sum else None
    if add is None:
        return None
    for x, cubic in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        coef = g.node(cubic, "Mul")
        cube = g.split_const(coef, CUBE_COEF) if coef is not None else None
        cube_nodes = _cube_of(g, cube, x) if cube else None
        if cube_nodes is not None:
            break
    else:
        return None
    one_plus = g.only_consumer(tanh.output[0], "Add")
    times_x = g.only_consumer(one_plus.output[0], "Mul") if one_plus is not None else None
    half = g.only_consumer(times_x.output[0], "Mul") if times_x is not None else None
    if (half is None or g.split_const(one_plus, 1.0) != tanh.output[0] or x not in times_x.input
            or g.split_const(half, 0.5) != times_x.output[0]):
        return None
    nodes = [*cube_nodes, coef, add, scaled, tanh, one_plus, times_x, half]
    inner = {n.output[0] for n in nodes[:-1]}
    if any(len(g.consumers.get(name, [])) != 1 or name in g.outputs for name in inner - {cube_nodes[0].output[0]}):
        return None
    return x, nodes, half.output[0]


def _bias_of(g: _Graph, x: str, pattern: list) -> tuple[list[str], Any] | None:
    """FastGelu's inputs: (matmul_out, bias) when x = MatMul + 1-D constant bias read only by the pattern."""
    add = g.node(x, "Add")
    pattern_outs = {n.output[0] for n in pattern}
    if add is None or x in g.outputs or not all(u.output[0] in pattern_outs for u in g.consumers[x]):
        return None
    for a, b in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        if g.is_vector(b) and g.node(a, "MatMul") is not None:
            return [a, b], add
    return None


def fuse_tanh_gelu(model) -> int:
    """Rewrite every tanh-GELU subgraph of `model` (in place) into one com.microsoft.FastGelu; how many."""
    from onnx import helper

    graph = model.graph
    g = _Graph.of(graph)
    drop: set[str] = set()  # nodes are keyed by their first output: unique in SSA form (protobuf wrappers are not)
    fused: dict[str, Any] = {}  # pattern output → its FastGelu, which takes the place of the pattern's last node
    for tanh in (node for node in graph.node if node.op_type == "Tanh"):
        found = _match(g, tanh)
        if found is None:
            continue
        x, nodes, out = found
        inputs, bias_add = _bias_of(g, x, nodes) or ([x], None)
        drop.update(n.output[0] for n in nodes + ([bias_add] if bias_add is not None else []))
        fused[out] = helper.make_node("FastGelu", inputs, [out], name=f"{nodes[-1].name}/FastGelu", domain=MS_DOMAIN)
    if fused:
        _replace_nodes(graph, fused, drop)
        _retype(graph, gone=drop - set(fused), new=list(fused))
        if not any(op.domain == MS_DOMAIN for op in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(fused)


def _replace_nodes(graph, fused: dict[str, Any], drop: set[str]) -> None:
    kept = [fused.get(node.output[0], node) for node in graph.node
            if node.output[0] in fused or node.output[0] not in drop]
    del graph.node[:]
    graph.node.extend(kept)


def _retype(graph, gone: set[str], new: list[str]) -> None:
    """Forget removed tensors and declare FastGelu outputs as float: onnx's shape inference does not know contrib
    ops, and without a type everything downstream is untyped (onnxruntime's quantizer refuses the MatMul it feeds)."""
    from onnx import TensorProto, helper

    kept = [v for v in graph.value_info if v.name not in gone]
    typed = {v.name for v in kept}
    kept += [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in new if name not in typed]
    del graph.value_info[:]
    graph.value_info.extend(kept)
