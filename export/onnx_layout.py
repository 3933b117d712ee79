"""The transformer's linear layers as 1×1 convolutions (`evar-export onnx --linear-layout conv`, the default).

onnxruntime runs a `MatMul` by a constant weight through MLAS's sgemm, and a `Conv` whose channels are a multiple
of the vector width through its NCHWc convolution kernels. On an AVX-512 CPU (AMD EPYC, Zen 4) the second is up to
1.33× faster for the same product (one thread, d16's FFN on 2 × 256 tokens: 73 GFLOP/s as MatMuls, 97 as 1×1
convolutions; `benchmarks/linear_layout.py`); d16's ten scales gained 1.15-1.17× with it (the last ones most). The
rewrite is exact up to fp32 summation order, and the export's parity check runs on the rewritten graph.

For an activation x (B, T, K) and a weight W (K, N):  y = x @ W + b  becomes
    Transpose(x) (B, K, T) → Unsqueeze (B, K, T, 1) → Conv(Wᵀ as (N, K, 1, 1), b) → Transpose (B, T, 1, N) → Squeeze
The FFN's fc1 → FastGelu(bias) → fc2 stays channel-major between its two products (GELU is elementwise): fc1's
bias goes into its convolution and the two transposes of the 4·C-wide activation disappear.

Only MatMuls on (B, T, K) activations whose K and N are multiples of 16 (the AVX-512 block; AVX2's 8 divides it) and
at least `MIN_CHANNELS` are rewritten: below that the layout nodes cost more than the kernel saves (builtin:digits,
C = 128, keeps its MatMuls). Gemms stay: on d16 they are AdaLN's, two rows each, where a convolution measured
slower (and `--class-tables` turns them into lookups anyway). `--linear-layout matmul` keeps the exporter's graph;
`--quantize int8` does too (onnxruntime's quantizer matches MatMuls to the model's linears). Measured on one CPU
class only (the README says which).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evar.export.onnx_fusion import MS_DOMAIN, _Graph, keep_read_initializers

LAYOUTS = ("conv", "matmul")
CHANNEL_MULTIPLE = 16
# Below this many input or output channels the four layout nodes cost about what the faster kernel saves
# (benchmarks/linear_layout.py, one thread, FFN of width C on 2 × 16-256 tokens: C = 128 0.86-0.91×, 256 1.04-1.06×
# and 0.95× in another run, 512-768 1.00-1.15×, 1024 1.04-1.33×)
MIN_CHANNELS = 512


@dataclass
class _Product:
    """One MatMul by a constant weight: its node, the weight's shape (K, N) and a bias folded into it."""

    node: Any
    k: int
    n: int
    bias: str | None = None  # a constant 1-D tensor of n values added right after
    bias_add: Any = None  # the Add node that bias came from (removed)


def _ranks(graph) -> dict[str, int]:
    infos = list(graph.value_info) + list(graph.input) + list(graph.output)
    return {v.name: len(v.type.tensor_type.shape.dim) for v in infos if v.type.tensor_type.HasField("shape")}


def _product(g: _Graph, node, ranks: dict[str, int]) -> _Product | None:
    weight = g.constants.get(node.input[1]) if node.op_type == "MatMul" else None
    if (weight is None or len(weight.dims) != 2 or any(d % CHANNEL_MULTIPLE for d in weight.dims)
            or min(weight.dims) < MIN_CHANNELS or ranks.get(node.input[0]) != 3):
        return None
    return _Product(node, int(weight.dims[0]), int(weight.dims[1]))


def _vector_of(g: _Graph, name: str, n: int) -> bool:
    tensor = g.constants.get(name)
    return tensor is not None and list(tensor.dims) == [n]


def _fold_bias(g: _Graph, p: _Product) -> None:
    """A bias Add that reads only this product's output joins the convolution."""
    out = p.node.output[0]
    add = g.only_consumer(out, "Add")
    if add is None:
        return
    other = add.input[1] if add.input[0] == out else add.input[0]
    if _vector_of(g, other, p.n):
        p.bias, p.bias_add = other, add


def _ffn_pair(g: _Graph, first: _Product, products: dict[str, _Product]):
    """(FastGelu, second product) when first → FastGelu(·, bias) → second with nothing else reading between."""
    gelu = g.only_consumer(first.node.output[0], "FastGelu")
    if gelu is None or gelu.domain != MS_DOMAIN or gelu.input[0] != first.node.output[0]:
        return None
    if len(gelu.input) > 1 and not _vector_of(g, gelu.input[1], first.n):
        return None
    users = g.consumers.get(gelu.output[0], [])
    if len(users) != 1 or gelu.output[0] in g.outputs:
        return None
    second = products.get(users[0].output[0])
    if second is None or second.node.input[0] != gelu.output[0]:
        return None
    return gelu, second


class _Writer:
    """New nodes and weights of the rewrite, named after the node they replace."""

    def __init__(self, g: _Graph):
        from onnx import helper, numpy_helper

        self.g, self.numpy_helper = g, numpy_helper
        # int64 axes: Unsqueeze to (B, K, T, 1) on the way in, Squeeze of (B, T, 1, N) on the way back
        self.image_axes, self.token_axes = "linear_layout/axes_3", "linear_layout/axes_2"
        self.initializers: list[Any] = [helper.make_tensor(self.image_axes, 7, [1], [3]),
                                        helper.make_tensor(self.token_axes, 7, [1], [2])]

    def conv_weight(self, p: _Product) -> str:
        import numpy as np

        w = self.numpy_helper.to_array(self.g.constants[p.node.input[1]])
        name = f"{p.node.input[1]}/conv"
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(w.T.reshape(p.n, p.k, 1, 1)), name))
        return name

    def to_channels(self, p: _Product) -> tuple[list[Any], str]:
        from onnx import helper

        base = p.node.name or p.node.output[0]
        t, u = f"{base}/to_channels", f"{base}/as_image"
        return [helper.make_node("Transpose", [p.node.input[0]], [t], perm=[0, 2, 1], name=t),  # (B, K, T)
                helper.make_node("Unsqueeze", [t, self.image_axes], [u], name=u)], u  # (B, K, T, 1)

    def conv(self, p: _Product, x: str, bias: str | None) -> tuple[Any, str]:
        from onnx import helper

        base = p.node.name or p.node.output[0]
        out = f"{base}/conv"
        inputs = [x, self.conv_weight(p)] + ([bias] if bias else [])
        return helper.make_node("Conv", inputs, [out], name=out, kernel_shape=[1, 1]), out

    def from_channels(self, p: _Product, x: str, out: str) -> list[Any]:
        """(B, N, T, 1) → (B, T, N): the 4-D transpose straight after the convolution is what onnxruntime folds
        into the convolution's own output reorder (one pass instead of reorder + transpose)."""
        from onnx import helper

        base = p.node.name or p.node.output[0]
        t = f"{base}/to_tokens"
        return [helper.make_node("Transpose", [x], [t], perm=[0, 2, 3, 1], name=t),  # (B, T, 1, N)
                helper.make_node("Squeeze", [t, self.token_axes], [out], name=f"{base}/as_sequence")]


def linears_as_convs(model) -> int:
    """Rewrite (in place) every eligible MatMul by a constant weight of `model` into a 1×1 Conv; how many."""
    from onnx import helper

    graph = model.graph
    g = _Graph.of(graph)
    ranks = _ranks(graph)
    products = {n.output[0]: p for n in graph.node if (p := _product(g, n, ranks)) is not None}
    if not products:
        return 0
    w = _Writer(g)
    replace: dict[str, list[Any]] = {}  # a node's first output → the nodes taking its place ([] removes it)
    gone: set[str] = set()  # tensors that no longer exist (their value_info is dropped)
    done: set[str] = set()
    for key, p in products.items():
        if key in done:
            continue
        pair = _ffn_pair(g, p, products)
        if pair is None:
            _fold_bias(g, p)
            head, x = w.to_channels(p)
            conv, y = w.conv(p, x, p.bias)
            out = p.bias_add.output[0] if p.bias_add is not None else p.node.output[0]
            replace[key] = head + [conv] + w.from_channels(p, y, out)
            if p.bias_add is not None:
                replace[p.bias_add.output[0]] = []
                gone.add(key)
            done.add(key)
            continue
        gelu, second = pair
        _fold_bias(g, second)
        head, x = w.to_channels(p)
        conv1, y1 = w.conv(p, x, gelu.input[1] if len(gelu.input) > 1 else None)
        act = f"{gelu.name or gelu.output[0]}/channels"
        conv2, y2 = w.conv(second, act, second.bias)
        out = second.bias_add.output[0] if second.bias_add is not None else second.node.output[0]
        replace[key] = head + [conv1]
        replace[gelu.output[0]] = [helper.make_node("FastGelu", [y1], [act], name=act, domain=MS_DOMAIN)]
        replace[second.node.output[0]] = [conv2] + w.from_channels(second, y2, out)
        if second.bias_add is not None:
            replace[second.bias_add.output[0]] = []
            gone.add(second.node.output[0])
        gone.update({key, gelu.output[0]})
        done.update({key, second.node.output[0]})
    nodes = [new for node in graph.node for new in replace.get(node.output[0], [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    keep_read_initializers(graph, w.initializers)  # the (K, N) originals go
    kept = [v for v in graph.value_info if v.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return sum(node.op_type == "Conv" for nodes in replace.values() for node in nodes)

