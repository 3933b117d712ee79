"""What a generation costs, from the manifest alone: parameters and multiply-accumulates (MACs).

Counted from the model config (per-block heads and FFN widths) for the decoder step, as the exported
graph executes it: the transformer runs on the CFG batch (2 rows per image), one scale at a time with the
KV cache; a query of scale si attends to every token up to the end of si. The VQVAE decoder is counted
from its ONNX graph (Conv / MatMul / Gemm after shape inference at batch 1). FLOPs = 2 × MACs.
No torch here: `var_params` mirrors `sum(p.numel() for p in VAR(cfg).parameters())` (tests check it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def seq_len(var: dict[str, Any]) -> int:
    return sum(pn * pn for pn in var["patch_nums"])


def scale_ranges(var: dict[str, Any]) -> list[tuple[int, int]]:
    out, begin = [], 0
    for pn in var["patch_nums"]:
        out.append((begin, begin + pn * pn))
        begin += pn * pn
    return out


def var_params(var: dict[str, Any]) -> int:
    """Parameters of the VAR transformer (VQVAE excluded), from `model.var` of a manifest or ModelConfig.to_dict()."""
    C, hd = var["embed_dim"], var["head_dim"]
    count = C + seq_len(var) * C + var["cvae"] * C + C + (var["num_classes"] + 1) * C + len(var["patch_nums"]) * C
    for heads, hidden in zip(var["num_heads"], var["ffn_dims"]):
        a = heads * hd
        count += heads if var["attn_l2_norm"] else 0  # scale_mul_1H11
        count += 2 * a + 3 * a * C + a * C + C  # q/v bias, mat_qkv, proj
        count += 2 * hidden * C + hidden + C  # fc1, fc2
        count += 6 * C if var["shared_aln"] else 6 * C * C + 6 * C
    if var["shared_aln"]:
        count += 6 * C * C + 6 * C
    return count + 2 * C * C + 2 * C + var["vocab_size"] * C + var["vocab_size"]


def step_macs(var: dict[str, Any], si: int, batch: int = 1, cfg_rows: int = 2, keep: int | None = None,
              past: int | None = None) -> dict[str, int]:
    """MACs of the decoder step at scale si for `batch` images (`cfg_rows` transformer rows per image).

    transformer: AdaLN conditions, input word embedding, blocks (qkv, proj, FFN, attention products), head;
    resample: the graph's f_hat bookkeeping (area downsample, bicubic upsample as matrices, Phi conv).
    Token pruning: the blocks run on `keep` tokens attending to a `past` shortened by earlier pruned scales
    (the head still runs on every token).
    """
    C, V, Cv, H = var["embed_dim"], var["vocab_size"], var["cvae"], var["patch_nums"][-1]
    pn = var["patch_nums"][si]
    n, (begin, end) = pn * pn, scale_ranges(var)[si]
    head_tokens = n
    if keep is not None:
        n, end = keep, (begin if past is None else past) + keep
    rows = batch * cfg_rows
    depth = len(var["num_heads"])
    adaln = rows * (6 * C * C * (1 if var["shared_aln"] else depth) + 2 * C * C)
    embed = batch * n * Cv * C  # the ONNX graph embeds at scale 0 too (and selects the class token)
    linear = attention = 0
    for heads, hidden in zip(var["num_heads"], var["ffn_dims"]):
        a = heads * var["head_dim"]
        linear += rows * n * (3 * a * C + a * C + 2 * hidden * C)
        attention += rows * 2 * a * n * end  # q·kᵀ and p·v over the past and this scale
    head = rows * head_tokens * C * V
    resample = batch * (2 * Cv * H * H * n + H * H * Cv * Cv * 9)
    transformer = adaln + embed + linear + attention + head
    return {"adaln": adaln, "embed": embed, "linear": linear, "attention": attention, "head": head,
            "transformer": transformer, "resample": resample, "total": transformer + resample}


def generation_macs(var: dict[str, Any], batch: int = 1, cfg_rows: int = 2,
                    cfg_until_scale: int | None = None, token_keep: dict[int, int] | None = None,
                    early_var: dict[str, Any] | None = None, split_scale: int | None = None) -> dict[str, Any]:
    """Every scale's MACs; with CFG trimming the scales from `cfg_until_scale` on run one row per image; with
    token pruning the blocks of the scales in `token_keep` run on K tokens; with a scale split the scales before
    `split_scale` are `early_var`'s, and the prefill (the blocks over those tokens, no head) is added at the split."""
    def rows(si: int) -> int:
        return 1 if cfg_until_scale is not None and si >= cfg_until_scale else cfg_rows

    keep, per_scale, past = token_keep or {}, [], 0
    for si, pn in enumerate(var["patch_nums"]):
        model = early_var if split_scale is not None and si < split_scale else var
        step = step_macs(model, si, batch, rows(si), keep.get(si), past if keep else None)
        if si == split_scale:
            for s in range(si):
                pre = step_macs(var, s, batch, rows(s))
                step["transformer"] += pre["transformer"] - pre["head"]
                step["total"] += pre["transformer"] - pre["head"]
        per_scale.append(step)
        past += keep.get(si, pn * pn)
    return {"per_scale": [s["total"] for s in per_scale],
            "transformer": sum(s["transformer"] for s in per_scale),
            "resample": sum(s["resample"] for s in per_scale),
            "total": sum(s["total"] for s in per_scale)}


def onnx_macs(path: str | Path, batch: int = 1) -> int:
    """MACs of an ONNX graph with static shapes after binding every symbolic batch axis to `batch`.

    Counts Conv, ConvTranspose, MatMul and Gemm (what dominates a VQVAE decoder); needs the `onnx` package.
    """
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path), load_external_data=False)
    for inp in model.graph.input:
        for d in inp.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_value = batch  # every symbolic axis of the decoder is the batch
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)

    def prod(xs: list[int]) -> int:
        out = 1
        for x in xs:
            out *= x
        return out

    total = 0
    for node in inferred.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if not out or -1 in out:
            if node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
                raise ValueError(f"{Path(path).name}: no static output shape for {node.op_type} {node.name}")
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            w = shapes[node.input[1]]  # Conv: (Cout, Cin/g, k...); ConvTranspose: (Cin, Cout/g, k...)
            if node.op_type == "Conv":
                total += prod(out) * prod(w[1:])
            else:
                total += prod(shapes[node.input[0]]) * prod(w[1:])
        elif node.op_type == "MatMul":
            k = shapes[node.input[0]][-1]
            total += prod(out) * k
        elif node.op_type == "Gemm":
            a = shapes[node.input[0]]
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            total += prod(out) * (a[0] if trans_a else a[-1])
    return total
