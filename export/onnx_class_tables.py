"""AdaLN as class tables (`evar-export onnx --class-tables`, the default): look the modulation up, do not compute it.

Every block's AdaLN projection, `Linear(SiLU(class_emb[label]))`, depends on the class label alone, yet the step
graph recomputes it at every scale: on d16 that reads 16 fp32 weights of 6C × C (400 MB) per scale for two rows,
about a fifth of an int8 step graph's time. Here each such Gemm becomes a Gather from a table of its value for
every class (computed once at export in float64 and rounded once to fp32): the rows the graph needs are read,
nothing else. The table has one row per class (plus the null class), so it is no larger than the weight it
replaces when there are no more classes than channels (d16: 1001 rows of 6C against C = 1024 columns of 6C);
otherwise the Gemm stays. The export's parity check runs on the rewritten graph.
"""
from __future__ import annotations

from typing import Any

from evar.export.onnx_fusion import _Graph, keep_read_initializers, node_attrs, plain_gemm


def _silu_input(g: _Graph, name: str) -> str | None:
    """x when `name` = x · Sigmoid(x) (the exporter's SiLU), else None."""
    mul = g.node(name, "Mul")
    if mul is None:
        return None
    for x, s in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        sig = g.node(s, "Sigmoid")
        if sig is not None and sig.input[0] == x:
            return x
    return None


def _class_gather(g: _Graph, name: str):
    """(table, indices) when `name` = Gather(constant 2-D table, indices) along axis 0."""
    gather = g.node(name, "Gather")
    if gather is None or node_attrs(gather).get("axis", 0) != 0:
        return None
    table = g.constants.get(gather.input[0])
    return (table, gather.input[1]) if table is not None and len(table.dims) == 2 else None


def _table(g: _Graph, gemm, embedding) -> Any | None:
    """The Gemm's value for every row of `embedding` (float64, rounded once), or None if it is no plain linear."""
    import numpy as np
    from onnx import numpy_helper

    weight = g.constants.get(gemm.input[1])
    bias = g.constants.get(gemm.input[2]) if len(gemm.input) > 2 and gemm.input[2] else None
    if weight is None or not plain_gemm(gemm) or (len(gemm.input) > 2 and gemm.input[2] and bias is None):
        return None
    w = numpy_helper.to_array(weight).astype(np.float64)
    w = w.T if node_attrs(gemm).get("transB", 0) else w  # (K, N)
    e = numpy_helper.to_array(embedding).astype(np.float64)
    if e.shape[0] > w.shape[0]:  # more classes than channels: the table would outweigh the weight
        return None
    out = (e / (1.0 + np.exp(-e))) @ w
    if bias is not None:
        out = out + numpy_helper.to_array(bias).astype(np.float64)
    return out.astype(np.float32)


def adaln_as_class_tables(model) -> int:
    """Rewrite (in place) every Gemm of SiLU(Gather(class table, labels)) into a Gather of its precomputed values;
    how many."""
    from onnx import helper, numpy_helper

    graph = model.graph
    g = _Graph.of(graph)
    swapped: dict[str, Any] = {}
    tables = []
    for gemm in (n for n in graph.node if n.op_type == "Gemm"):
        x = _silu_input(g, gemm.input[0])
        found = _class_gather(g, x) if x is not None else None
        values = _table(g, gemm, found[0]) if found is not None else None
        if values is None:
            continue
        name = f"{gemm.input[1]}/class_table"
        tables.append(numpy_helper.from_array(values, name))
        swapped[gemm.output[0]] = helper.make_node("Gather", [name, found[1]], [gemm.output[0]], axis=0,
                                                   name=f"{gemm.name or gemm.output[0]}/class_table")
    if not swapped:
        return 0
    nodes = [swapped.get(n.output[0], n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(_without_dead_silu(nodes, {o.name for o in graph.output}))
    keep_read_initializers(graph, tables)
    return len(swapped)


def _without_dead_silu(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """Drop the SiLU's Mul and Sigmoid once nothing reads them (the tables took every reader)."""
    for op in ("Mul", "Sigmoid"):  # the Mul first: it is the Sigmoid's reader
        read = {name for node in nodes for name in node.input} | outputs
        nodes = [n for n in nodes if n.op_type != op or any(o in read for o in n.output)]
    return nodes
