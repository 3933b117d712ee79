"""`evar-export inspect DIR`: what an artifact holds, and what will likely fall off the Neural Engine.

The ANE-risk rules are heuristics from Apple's ml-ane-transformers notes and coremltools' issue tracker; they flag,
they do not prove: a compute plan on a Mac (MLComputePlan) is the ground truth.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from evar.contract import STEP_GRAPH, load_artifact

ANE_MULTIPLE = 32
LARGE_ELEMENTS = 1 << 24  # one tensor of more than 16M elements
ANE_MAX_DIM = 16384
IPHONE_MODEL_BYTES = 1 << 30  # Apple: keep one model <= 1 GB on iPhone
# ops that Core ML is not expected to place on the ANE (sorting, cumulative, scatter/gather-along-axis, int math)
NON_ANE_OPS = {"argsort", "topk", "cumsum", "scatter", "scatter_along_axis", "scatter_nd", "gather_along_axis",
               "gather_nd", "non_zero", "random_uniform", "random_categorical", "cond", "while_loop", "logical_and"}
MIL_FP32, MIL_FP16 = 11, 10  # proto DataType FLOAT32, FLOAT16


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _shape(t: dict[str, Any]) -> str:
    return "(" + ", ".join(str(d) for d in t["shape"]) + ")"


def _kv_line(tensors: list[dict[str, Any]]) -> str:
    """'6 × past_key_values.{i}.key/value (cfg_batch, heads [2, 1, 3], 14, 16) float32': heads differ per layer."""
    first = tensors[0]
    heads = [t["shape"][1] for t in tensors if t["role"] in ("past_key", "present_key", "key_cache")]
    pattern = first["name"].replace(f"{first['layer']}", "{i}", 1)
    for a, b in (("key_cache", "key/value_cache"), (".key", ".key/value"), ("_key_", "_key/value_")):
        if a in pattern:
            pattern = pattern.replace(a, b, 1)
            break
    dims = [str(first["shape"][0]), f"heads {heads}" if len(set(heads)) > 1 else str(heads[0])] + \
        [str(d) for d in first["shape"][2:]]
    return f"{len(tensors)} × {pattern} ({', '.join(dims)}) {first['dtype']}"


def _graph_files(root: Path, graph: dict[str, Any], manifest: dict[str, Any]) -> int:
    prefix = graph["file"]
    return sum(f["bytes"] for f in manifest["files"] if f["path"] == prefix or f["path"].startswith(prefix + "/")
               or (graph.get("external_data") and f["path"] == graph["external_data"]))


def onnx_ops(path: Path) -> Counter:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return Counter(n.op_type for n in model.graph.node)


def coreml_ops(root: Path, graph: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """{function: ops} of a graph's package, or of its per-function packages (iOS17)."""
    from evar.export.coreml import function_packages, package_ops

    if not any(f.get("file") for f in graph["functions"]):
        return package_ops(root / graph["file"])
    return {name: next(iter(package_ops(path).values())) for name, (path, _) in function_packages(root, graph).items()}


def ane_risks(manifest: dict[str, Any], root: Path) -> list[str]:
    risks: list[str] = []
    kv = manifest.get("kv_cache") or {"max_length": 0, "head_dim": 0, "mode": "none"}  # DD artifacts have no cache
    if "padded_length" in kv:  # ANE layout: the states' own dims are judged per function (ane_lint)
        kv = {**kv, "max_length": kv["padded_length"], "head_dim": ANE_MULTIPLE}
    bad_dims = {}
    if kv["max_length"] % ANE_MULTIPLE:
        bad_dims["sequence (max_length)"] = kv["max_length"]
    if kv["head_dim"] % ANE_MULTIPLE:
        bad_dims["head_dim"] = kv["head_dim"]
    if bad_dims and kv["mode"] == "state":
        risks.append("state dims not a multiple of 32: " + ", ".join(f"{k}={v}" for k, v in bad_dims.items())
                     + " (state buffers may not be ANE-resident)")
    elif bad_dims:
        risks.append("KV dims not a multiple of 32: " + ", ".join(f"{k}={v}" for k, v in bad_dims.items()))
    for role, graph in manifest["graphs"].items():
        size = _graph_files(root, graph, manifest)
        if size > IPHONE_MODEL_BYTES:
            risks.append(f"{role}: {_mib(size)} > 1 GiB: too large for one model on iPhone (split, or compress)")
        for fn in graph["functions"]:
            for t in fn["inputs"] + fn["outputs"] + fn.get("states", []):
                dims = [d for d in t["shape"] if isinstance(d, int)]
                if any(isinstance(d, str) for d in t["shape"]) and graph["format"] == "coreml":
                    risks.append(f"{role}/{fn['name']}: {t['name']} has a dynamic shape")
                n = 1
                for d in dims:
                    n *= d
                if n > LARGE_ELEMENTS or any(d > ANE_MAX_DIM for d in dims):
                    risks.append(f"{role}/{fn['name']}: {t['name']} {_shape(t)} is very large")
        if graph["format"] == "onnx":
            risks.append(f"{role}: ONNX graph with symbolic shapes: the onnxruntime CoreML EP runs dynamic-shape "
                         "subgraphs on the CPU; use the Core ML artifact for the ANE")
            continue
        if graph.get("compute_units") == "cpu_only":  # on the CPU by design (fhat_update): listed per function below
            continue
        # the same finding in every function is reported once, naming the functions
        by_finding: dict[str, list[str]] = {}
        for fn_name, ops in sorted(coreml_ops(root, graph).items()):
            for finding in _coreml_findings(ops):
                by_finding.setdefault(finding, []).append(fn_name)
        for finding, fns in by_finding.items():
            risks.append(f"{role}/{'{' + ','.join(fns) + '}' if len(fns) > 1 else fns[0]}: {finding}")
    return risks


def _coreml_findings(ops: list[dict[str, Any]]) -> list[str]:
    found = []
    fp32 = Counter(o["type"] for o in ops if o["type"] != "const" and o["outputs"] and o["outputs"][0][0] == MIL_FP32)
    if fp32:
        found.append(f"{sum(fp32.values())} fp32 ops (ANE is fp16-only; they run on CPU/GPU): "
                     + ", ".join(f"{k}×{v}" for k, v in sorted(fp32.items())))
    off = Counter(o["type"] for o in ops if o["type"] in NON_ANE_OPS)
    if off:
        found.append("ops not expected on the ANE: " + ", ".join(f"{k}×{v}" for k, v in sorted(off.items())))
    squares = sum(1 for o in ops if o["type"] == "square" and o["outputs"] and o["outputs"][0][0] == MIL_FP16)
    if squares:
        found.append(f"{squares} fp16 square ops (a decomposed GroupNorm/variance): fp16 overflow above 65504 is possible")
    big = [o for o in ops for _, dims in o["outputs"] if dims and max(dims) > ANE_MAX_DIM]
    if big:
        found.append(f"{len(big)} ops with a dimension > {ANE_MAX_DIM}")
    return found


def _few_step_lines(m: dict[str, Any]) -> list[str]:
    f = m["few_step"]
    return [f"Distilled Decoding: passes given t = {[p['t'] for p in f['passes']]} scales (default t-list "
            f"{f['default_t_list']}), argmax tokens, regression vectors from scale {f['continuous_from']}; noise: "
            f"{f['noise']['method']} on {f['noise']['rng']} uniforms, computed on the host; no KV cache, no CFG"]


def report(root: str | Path, verify_files: bool = True) -> str:
    root = Path(root)
    m = load_artifact(root, verify_hashes=verify_files).data
    var = m["model"]["var"]
    lines = [f"EVAR artifact {root} (format {m['format']} v{m['format_version']}, backend {m.get('backend')})",
             f"model: {m['provenance']['model_ref']} depth {var['depth']}, width {var['embed_dim']}, heads {var['num_heads']}, "
             f"FFN {var['ffn_dims']}, vocab {var['vocab_size']}, patch_nums {m['patch_nums']}, image {m['image_size']}px",
             f"batch: {m['batch']['mode']}" + (f" {m['batch']['size']}" if m['batch'].get('size') else "")
             + ("; CFG batch formed in-graph (KV has 2*batch rows)" if m["batch"].get("cfg_doubled", True) else ""),
             f"precision: weights {m['precision']['weights']}, compute {m['precision']['compute']}; "
             f"compression: {m['compression']['method']}",
             ] + (_few_step_lines(m) if m.get("family") == "dd" else [
             (f"sampling: {m['sampling']['method']} from {m['sampling']['rng']} uniforms, top_k {m['sampling']['top_k']}, "
              f"top_p {m['sampling']['top_p']} (baked), cfg input '{m['sampling']['cfg']['input']}'"
              if m["sampling"].get("where") != "host" else
              f"sampling: on the host ({m['sampling']['method']} from {m['sampling']['rng']} uniforms, CFG, default top_k "
              f"{m['sampling']['top_k']} / top_p {m['sampling']['top_p']}); the step functions return raw logits"),
             f"KV cache: {m['kv_cache']['mode']}, {m['kv_cache']['layout']}, dims {m['kv_cache']['dims']}, "
             f"max_length {m['kv_cache']['max_length']}"
             + (f" (state padded to {m['kv_cache']['padded_length']}, masked)" if "padded_length" in m["kv_cache"] else "")
             + f", heads per layer {[l['heads'] for l in m['kv_cache']['layers']]}"])
    lines += _sparse_storage(m, root)
    parity = m.get("parity")
    if parity:
        worst = max((c["value"] / c["tolerance"] for c in parity["checks"] if c.get("metric") in
                     ("max_abs_diff", "max_rel_diff") and c["value"] is not None and c.get("tolerance")), default=0.0)
        lines.append(f"parity: {'passed' if parity['passed'] else 'FAILED'} ({len(parity['checks'])} checks, the "
                     f"closest difference at {worst:.2g}× its tolerance)"
                     + (f"; skipped: {'; '.join(parity['skipped'])}" if parity.get("skipped") else ""))
    for role, g in m["graphs"].items():
        lines.append("")
        lines.append(f"[{role}] {g['file']} ({g['format']}"
                     + (f", opset {g['opset']}" if g.get("opset") else "") + (f", {g['target']}" if g.get("target") else "")
                     + (f", external data {g['external_data']}" if g.get("external_data") else "")
                     + f") {_mib(_graph_files(root, g, m))}")
        for fn in g["functions"]:
            head = f"  {fn['name']}" + (f" scale {fn['scale_index']} (pn {fn['patch_num']}, tokens {fn['token_range']})"
                                        if fn.get("scale_index") is not None else "")
            lines.append(head)
            kv_in = [t for t in fn["inputs"] if t["role"].startswith("past")]
            kv_out = [t for t in fn["outputs"] if t["role"].startswith("present")]
            for t in fn["inputs"]:
                if not t["role"].startswith("past"):
                    lines.append(f"    in  {t['name']:<12} {_shape(t):<24} {t['dtype']}")
            if kv_in:
                lines.append(f"    in  {_kv_line(kv_in)}")
            for t in fn["outputs"]:
                if not t["role"].startswith("present"):
                    lines.append(f"    out {t['name']:<12} {_shape(t):<24} {t['dtype']}")
            if kv_out:
                lines.append(f"    out {_kv_line(kv_out)}")
            if fn.get("states"):
                lines.append(f"    state {_kv_line(fn['states'])}")
        lines.append("  ops: " + _histogram(root, g))
    lines.append("")
    lines.append("files: " + ", ".join(f"{f['path']} {_mib(f['bytes'])}" for f in m["files"] if f["bytes"] > 1 << 16)
                 + f"; total {_mib(sum(f['bytes'] for f in m['files']))} in {len(m['files'])} files")
    risks = ane_risks(m, root)
    lines.append("")
    lines.append(f"ANE-risk report ({len(risks)} findings; heuristics: confirm with MLComputePlan on a Mac):")
    lines += [f"  - {r}" for r in risks] or ["  none"]
    if all(g["format"] == "coreml" for g in m["graphs"].values()):
        from evar.export.ane_lint import lint_artifact

        lines.append("")
        lines.append("per function (the rules: evar.export.ane_lint):")
        lines += [f"  {f.line()}" for f in lint_artifact(m, root)]
    return "\n".join(lines)


def strict_ane(root: str | Path) -> None:
    """Raise AneLintError unless every function meant for the Neural Engine has no finding."""
    from evar.export.ane_lint import check_strict, lint_artifact

    root = Path(root)
    m = load_artifact(root).data
    if any(g["format"] != "coreml" for g in m["graphs"].values()):
        check_strict(m, [])
    check_strict(m, lint_artifact(m, root))


def _sparse_storage(m: dict[str, Any], root: Path) -> list[str]:
    """For a 2:4 export: how the zeros are stored, how many weights, and what the step graph weighs."""
    details = m["compression"].get("details") or {}
    if details.get("pattern") != "2:4":
        return []
    step = m["graphs"][STEP_GRAPH]
    ops = Counter(o["type"] for fn in coreml_ops(root, step).values() for o in fn
                  if o["type"].startswith("constexpr_")) if step["format"] == "coreml" else Counter()
    stored = ", ".join(f"{k}×{v}" for k, v in sorted(ops.items())) or "none found"
    return [f"sparse storage: {details['pattern']} masks of {details['masked_layers']} layers "
            f"({details.get('sparsity_method', '?')}) stored as {details.get('storage', '?')}; constexpr ops "
            f"(all functions): {stored}; step graph {_mib(_graph_files(root, step, m))}"]


def _histogram(root: Path, graph: dict[str, Any]) -> str:
    if graph["format"] == "onnx":
        ops = onnx_ops(root / graph["file"])
        label = f"{sum(ops.values())} nodes"
    else:
        per_fn = coreml_ops(root, graph)
        name = graph.get("default_function") or next(iter(per_fn))
        ops = Counter(o["type"] for o in per_fn.get(name, next(iter(per_fn.values()))) if o["type"] != "const")
        label = f"{sum(ops.values())} non-const ops in {name}"
    return label + ": " + ", ".join(f"{k}×{v}" for k, v in ops.most_common(14))
