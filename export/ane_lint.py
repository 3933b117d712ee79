"""Which ops of a Core ML artifact are expected on the Neural Engine, and why the others are not.

Heuristics (the ground truth is MLComputePlan on a Mac; these are the rules public reports and Apple's
ml-ane-transformers notes agree on), applied to every non-const op of every function:
  fp32          an op producing float32: the ANE computes in fp16 only
  int/bool      an op producing int32/int64/bool (comparisons, index math): not ANE arithmetic
  not ANE       sort/top-k, cumulative sums, scatters, gathers, random draws, control flow
  fp16 square   `square`/`pow` in fp16: overflows above 65504 (a decomposed GroupNorm/variance); a
                squared value bounded first (divided by its max) is a `mul` and passes
  dynamic slice slice_by_index / slice_update / slice_by_size whose begin/end/size is not a constant
  > 16384       an output dimension the ANE cannot tile
and per function, over its states: every dim other than the batch (axis 0) and singleton axes a multiple
of 32 (coremltools #2631: unaligned states fail on the ANE).

`--strict-ane` fails when a function meant for the ANE (every graph whose manifest compute_units is not
`cpu_only`) has any finding; CPU functions (the host-sampled artifact's fhat_update) are listed, not judged.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evar.errors import EvarError

ALIGN = 32
ANE_MAX_DIM = 16384
NOT_ANE = {"argsort", "topk", "cumsum", "scatter", "scatter_along_axis", "scatter_nd", "gather", "gather_along_axis",
           "gather_nd", "non_zero", "random_uniform", "random_categorical", "random_bernoulli", "random_normal",
           "cond", "while_loop", "logical_and", "logical_or", "logical_not", "band_part"}
SQUARES = {"square", "pow"}
SLICES = {"slice_by_index": ("begin", "end"), "slice_update": ("begin", "end"), "slice_by_size": ("begin", "size")}
# proto DataType: FLOAT16 10, FLOAT32 11, FLOAT64 12, INT32 23, INT64 25, BOOL 1 (see MIL.proto)
FP32, FP16, FP64, BOOL = 11, 10, 12, 1
INTS = {21, 22, 23, 24, 25, 31, 32, 33, 34}  # int/uint widths


class AneLintError(EvarError):
    """`inspect --strict-ane`: a function meant for the Neural Engine has findings."""


@dataclass
class FunctionLint:
    role: str
    name: str
    ops: int  # non-const ops
    on_ane: int
    reasons: Counter = field(default_factory=Counter)  # "reason: op" → count
    state_findings: list[str] = field(default_factory=list)
    judged: bool = True  # False: a CPU function by design

    @property
    def findings(self) -> list[str]:
        by_reason: dict[str, list[str]] = {}
        for key, n in sorted(self.reasons.items()):
            reason, op = key.split(": ", 1)
            by_reason.setdefault(reason, []).append(f"{op}×{n}")
        return [f"{reason}: {', '.join(ops)}" for reason, ops in by_reason.items()] + self.state_findings

    def line(self) -> str:
        head = f"{self.role}/{self.name}: {self.on_ane}/{self.ops} ops expected on the ANE"
        if not self.judged:
            head += " (CPU by design: not judged)"
        return head + ("" if not self.findings else "; " + "; ".join(self.findings))


def graph_ops(root: Path, graph: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """{manifest function: ops}, from the graph's package or each function's own (iOS17)."""
    from evar.export.coreml import function_packages

    if not any(f.get("file") for f in graph["functions"]):
        return read_ops(root / graph["file"])
    return {name: next(iter(read_ops(path).values())) for name, (path, _) in function_packages(root, graph).items()}


def read_ops(path: Path) -> dict[str, list[dict[str, Any]]]:
    """{function: [{type, outputs: [(dtype, dims)], const_inputs: {name: bool}}]} of a saved mlprogram."""
    from evar.export.coreml import _ct, _quiet

    ct = _ct()
    with _quiet():
        spec = ct.utils.load_spec(str(path))
    result: dict[str, list[dict[str, Any]]] = {}
    for name, fn in spec.mlProgram.functions.items():
        block = fn.block_specializations[fn.opset]
        consts = {o.name for op in block.operations if op.type == "const" for o in op.outputs}
        ops = []
        for op in block.operations:
            outs = []
            for o in op.outputs:
                t = o.type.tensorType
                dims = [int(d.constant.size) if d.WhichOneof("dimension") == "constant" else -1 for d in t.dimensions]
                outs.append((t.dataType, dims))
            const_inputs = {k: all(a.WhichOneof("binding") == "value" or a.name in consts for a in v.arguments)
                            for k, v in op.inputs.items()}
            ops.append({"type": op.type, "outputs": outs, "const_inputs": const_inputs})
        result[name] = ops
    return result


def op_reason(op: dict[str, Any]) -> str | None:
    """Why this op is not expected on the ANE, or None."""
    kind = op["type"]
    if kind in NOT_ANE:
        return "not an ANE op"
    if kind in SLICES and not all(op.get("const_inputs", {}).get(k, True) for k in SLICES[kind]):
        return "dynamic slice bounds"
    dtype = op["outputs"][0][0] if op["outputs"] else None
    if dtype in (FP32, FP64):
        return "fp32 (the ANE computes in fp16)"
    if dtype in INTS or dtype == BOOL:
        return "int/bool math"
    if kind in SQUARES and dtype == FP16:
        return "fp16 square can overflow"
    if any(dims and max(dims) > ANE_MAX_DIM for _, dims in op["outputs"]):
        return f"a dimension > {ANE_MAX_DIM}"
    return None


def state_findings(states: list[dict[str, Any]]) -> list[str]:
    bad = []
    for t in states:
        dims = [d for a, d in enumerate(t["shape"]) if a > 0 and isinstance(d, int) and d != 1]
        if any(d % ALIGN for d in dims):
            bad.append(f"{t['name']} {tuple(t['shape'])}")
    return [f"state dims not a multiple of {ALIGN}: {', '.join(bad)}"] if bad else []


def lint_function(role: str, name: str, ops: list[dict[str, Any]], states: list[dict[str, Any]], judged: bool) -> FunctionLint:
    live = [o for o in ops if o["type"] != "const"]
    reasons = Counter(f"{r}: {o['type']}" for o in live if (r := op_reason(o)))
    return FunctionLint(role, name, len(live), len(live) - sum(reasons.values()), reasons, state_findings(states), judged)


def lint_artifact(manifest: dict[str, Any], root: Path) -> list[FunctionLint]:
    out = []
    for role, graph in manifest["graphs"].items():
        if graph["format"] != "coreml":
            continue
        judged = graph.get("compute_units") != "cpu_only"
        declared = {f["name"]: f for f in graph["functions"]}
        for fn_name, ops in sorted(graph_ops(root, graph).items()):
            states = declared.get(fn_name, {}).get("states", [])
            out.append(lint_function(role, fn_name, ops, states, judged))
    return out


def strict_failures(manifest: dict[str, Any], lints: list[FunctionLint]) -> list[str]:
    """What makes `--strict-ane` fail: an ONNX artifact, or any finding in a judged function."""
    if any(g["format"] != "coreml" for g in manifest["graphs"].values()):
        return ["not a Core ML artifact (export with `evar-export coreml --target ane`)"]
    return [f"{f.role}/{f.name}: {'; '.join(f.findings)}" for f in lints if f.judged and f.findings]


def check_strict(manifest: dict[str, Any], lints: list[FunctionLint]) -> None:
    failures = strict_failures(manifest, lints)
    if failures:
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        raise AneLintError(f"--strict-ane: {len(failures)} function(s) meant for the Neural Engine have findings: "
                           + " | ".join(failures[:3]) + more)
