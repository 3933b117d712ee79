"""Core ML export: one mlprogram function per scale (static shapes) sharing one copy of the weights, the KV
cache as model state (iOS18) or as inputs/outputs (iOS17), and the VQVAE decoder as its own package.

Path: `torch.export.export(...).run_decompositions({})` → `ct.convert` per scale → `save_multifunction`
(identical weight blobs are stored once). Under fp16 compute the sampling tail (CFG, top-k/top-p, softmax,
cumsum, the inverse-CDF compare) stays fp32: fp16 has too few bits for a cumulative distribution over
thousands of tokens, and the explicit uniforms carry 24 bits. Those few ops run off the Neural Engine,
which the ANE-risk report says.

Linux cannot run Core ML models: parity here is structural (the saved package's functions, inputs,
outputs and states equal the manifest) plus the export-ready PyTorch wrapper against the original model
(parity.py). `predict_runner` is the macOS path and fails with a clear message elsewhere.
"""
from __future__ import annotations

import contextlib
import io
import logging
import platform
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from evar.checkpoints import Model
from evar.errors import EvarError
from evar.export.coreml_gate import GATED, CompressGate
from evar.export.graphs import ScaleStep, VQVAEDecoder
from evar.contract import DECODER_GRAPH, STEP_GRAPH
from evar.export.interface import DecoderInterface, FunctionSpec, StepInterface

COMPUTE_UNITS = {"all": "ALL", "cpu_and_ne": "CPU_AND_NE", "cpu_and_gpu": "CPU_AND_GPU", "cpu_only": "CPU_ONLY"}
TARGETS = ("iOS18", "iOS17", "ane")  # ane: the Neural Engine layout, host sampling (export/ane_export.py), iOS18
COMPRESSIONS = ("none", "palettize6", "palettize4", "int8")
# The zeros of a 2:4-sparsified model (evar sparsify) stored sparse (bitmask + kept values), alone or with the
# kept values palettized (joint compression).
SPARSE_COMPRESSIONS = ("2:4", "2:4+palettize6", "2:4+palettize4")
WEIGHT_THRESHOLD = 2048  # smaller weights (biases, norms, Phi) stay fp16
NP_OF = {"float32": np.float32, "float16": np.float16, "int32": np.int32}


class CoremlExportError(EvarError):
    """coremltools refused a graph, or a saved package does not match its declared interface."""


@dataclass(frozen=True)
class CoremlOptions:
    precision: str = "fp16"
    target: str = "iOS18"
    compute_units: str = "all"
    compress: str = "none"
    batch: int = 1
    top_k: int = 0
    top_p: float = 0.0
    cfg_until_scale: int | None = None  # CFG trimming (evar.export.coreml_ladder): unguided functions from N
    split_scale: int | None = None  # scale split: the early model's functions run scales < N
    early_model: str | None = None  # its reference, as given
    token_keep: str | None = None  # refused: late-scale token pruning is ONNX only
    compress_gate: CompressGate | None = None  # thresholds of the --compress gate (coreml_gate.py); None = its defaults

    @property
    def gate(self) -> CompressGate:
        return self.compress_gate or CompressGate()

    def validate(self) -> None:
        self._validate_recipe()
        if self.precision not in ("fp16", "fp32"):
            raise EvarError(f"Core ML precision must be fp16 or fp32, got '{self.precision}'")
        if self.target not in TARGETS:
            raise EvarError(f"Core ML target must be one of {', '.join(TARGETS)}, got '{self.target}'")
        if self.compute_units not in COMPUTE_UNITS:
            raise EvarError(f"compute units must be one of {', '.join(COMPUTE_UNITS)}, got '{self.compute_units}'")
        if self.compress not in COMPRESSIONS + SPARSE_COMPRESSIONS:
            raise EvarError(f"--compress must be one of {', '.join(COMPRESSIONS + SPARSE_COMPRESSIONS)}, "
                            f"got '{self.compress}'")
        if self.batch < 1:
            raise EvarError(f"batch must be >= 1, got {self.batch}")
        if self.target == "ane" and self.precision != "fp16":
            raise EvarError("--target ane computes in fp16 (the Neural Engine has no fp32); drop --precision fp32")
        if self.compress_gate is not None:
            if self.compress not in GATED:
                raise EvarError(f"the --compress-* gate thresholds apply to --compress {'|'.join(GATED)} "
                                f"(got --compress {self.compress})")
            self.compress_gate.validate()

    def _validate_recipe(self) -> None:
        """What --token-keep and --target ane do not take: one line, before any model is loaded."""
        if self.token_keep:
            raise EvarError("--token-keep is ONNX only for now (its pruned step graph has no Core ML conversion): "
                            "use `evar-export onnx --token-keep`")
        asked = [flag for flag, value in (("--cfg-until-scale", self.cfg_until_scale),
                                          ("--split-scale", self.split_scale)) if value is not None]
        if self.target == "ane" and asked:
            raise EvarError(f"--target ane does not take {' / '.join(asked)} yet (its host-sampled layout has no "
                            "unguided, prefill or early functions): use --target iOS18 or iOS17")
        if (self.split_scale is None) != (self.early_model is None):
            raise EvarError("a scale split needs both --early-model and --split-scale")

    @property
    def kv_mode(self) -> str:
        return "io" if self.target == "iOS17" else "state"


@contextlib.contextmanager
def _quiet():
    """coremltools prints progress bars, version warnings and option notices on every conversion."""
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _ct():
    with _quiet():
        import coremltools as ct
    return ct


# ---------------------------------------------------------------- fp32 sampling tail
def sampling_tail_selector(vocab: int) -> Callable[[Any], bool]:
    """op_selector for FP16ComputePrecision: False (keep fp32) for the ops between the head's logits (or the
    uniforms input) and the sampled `idx` output; True (fp16) for everything else."""
    cache: dict[int, set[int]] = {}

    def tail_of(block) -> set[int]:
        idx_vars = [v for v in block.outputs if v.dtype is not None and "int" in str(v.dtype.__name__)]
        ancestors: set[int] = set()
        stack = [v.op for v in idx_vars if v.op is not None]
        while stack:
            op = stack.pop()
            if id(op) in ancestors:
                continue
            ancestors.add(id(op))
            stack += [v.op for v in op.inputs.values() if hasattr(v, "op") and v.op is not None]
            stack += [x.op for v in op.inputs.values() if isinstance(v, (list, tuple)) for x in v
                      if hasattr(x, "op") and x.op is not None]
        # the head: the last (topologically) projection to the vocabulary that the sampled tokens depend on
        heads = [op for op in block.operations if id(op) in ancestors and op.op_type in ("linear", "matmul")
                 and op.outputs[0].shape and op.outputs[0].shape[-1] == vocab]
        seeds = [child for out in heads[-1].outputs for child in out.child_ops] if heads else []
        seeds += [child for name, var in block.inputs.items() if name == "uniforms" for child in var.child_ops]
        tail: set[int] = set()
        while seeds:
            op = seeds.pop()
            if id(op) in tail or id(op) not in ancestors:
                continue
            tail.add(id(op))
            seeds += [child for out in op.outputs for child in out.child_ops]
        return tail

    def selector(op) -> bool:
        block = op.enclosing_block
        key = id(block)
        if key not in cache:
            cache[key] = tail_of(block)
        return id(op) not in cache[key]

    return selector


# ---------------------------------------------------------------- conversion
def _tensor_types(ct, specs: tuple) -> list:
    return [ct.TensorType(name=t.name, shape=tuple(int(d) for d in t.shape), dtype=NP_OF[t.dtype]) for t in specs]


def _convert(module: torch.nn.Module, fn: FunctionSpec, example: dict[str, np.ndarray], options: CoremlOptions,
             vocab: int | None):
    ct = _ct()
    args = tuple(torch.from_numpy(example[t.name]) for t in fn.inputs)
    try:
        with torch.no_grad(), _quiet():
            program = torch.export.export(module, args).run_decompositions({})
    except Exception as err:  # torch.export raises many types; all mean "this module did not trace"
        raise CoremlExportError(f"torch.export failed for {fn.name}: {str(err).splitlines()[0]}") from err
    if options.precision == "fp32":
        precision = ct.precision.FLOAT32
    else:
        precision = ct.transform.FP16ComputePrecision(op_selector=sampling_tail_selector(vocab) if vocab else None)
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(int(d) for d in t.shape), dtype=np.float16), name=t.name)
              for t in fn.states] or None
    with _quiet():
        pipeline = pass_pipeline(ct, options.compress)
    target = ct.target.iOS18 if options.target == "iOS18" else ct.target.iOS17
    try:
        with _quiet():
            return ct.convert(program, inputs=_tensor_types(ct, fn.inputs),
                              outputs=[ct.TensorType(name=t.name) for t in fn.outputs], states=states,
                              minimum_deployment_target=target, convert_to="mlprogram", compute_precision=precision,
                              compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[options.compute_units]),
                              pass_pipeline=pipeline, skip_model_load=True)
    except Exception as err:  # the converter raises ValueError/NotImplementedError/KeyError/RuntimeError
        raise CoremlExportError(f"ct.convert failed for {fn.name}: {type(err).__name__}: {str(err).splitlines()[0]}") from err


def pass_pipeline(ct, method: str):
    """The converter's pipeline, with weight compression (coremltools.optimize.coreml configs) run inside it.

    Compressing during conversion, not afterwards with `cto.palettize_weights(mlmodel)`: that re-runs the
    default pipeline, whose `canonicalize_inplace_pattern` crashes on fp16 state updates (coremltools 9.0,
    KeyError), and it would need the pass removed there too. The pass only reorders ops.
    """
    import coremltools.optimize.coreml as cto

    if method == "none":
        pipeline = ct.PassPipeline.DEFAULT
    elif method in SPARSE_COMPRESSIONS:
        pipeline = sparse_pipeline(ct, method)
    elif method.startswith("palettize"):
        pipeline = ct.PassPipeline.DEFAULT_PALETTIZATION
        op = cto.OpPalettizerConfig(mode="kmeans", nbits=int(method.removeprefix("palettize")),
                                    weight_threshold=WEIGHT_THRESHOLD)
        pipeline.set_options("compression::palettize_weights", {"config": cto.OptimizationConfig(global_config=op)})
    else:
        pipeline = ct.PassPipeline.DEFAULT
        pipeline.insert_pass(0, "compression::linear_quantize_weights")
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=WEIGHT_THRESHOLD)
        pipeline.set_options("compression::linear_quantize_weights", {"config": cto.OptimizationConfig(global_config=op)})
    pipeline.remove_passes(["common::canonicalize_inplace_pattern"])
    return pipeline


def sparse_pipeline(ct, method: str):
    """2:4 storage of the zeros the model's masks made. The pruner keeps every value: it stores as sparse the
    weights that are at least half zeros (the masked layers) and leaves the dense ones (head, embeddings,
    VQVAE) alone, where a magnitude n:m config would choose new zeros in every layer. With `+palettizeK`
    the kept values are then palettized (coremltools' joint compression: `constexpr_lut_to_sparse`)."""
    import coremltools.optimize.coreml as cto

    pipeline = ct.PassPipeline.DEFAULT_PRUNING
    prune = cto.OpThresholdPrunerConfig(threshold=1e-12, minimum_sparsity_percentile=0.5,
                                        weight_threshold=WEIGHT_THRESHOLD)
    pipeline.set_options("compression::prune_weights", {"config": cto.OptimizationConfig(global_config=prune)})
    if "+palettize" in method:
        pipeline.insert_pass(1, "compression::palettize_weights")
        op = cto.OpPalettizerConfig(mode="kmeans", nbits=int(method.rsplit("palettize", 1)[1]),
                                    weight_threshold=WEIGHT_THRESHOLD)
        pipeline.set_options("compression::palettize_weights", {"config": cto.OptimizationConfig(global_config=op),
                                                                "joint_compression": True})
    return pipeline


def _metadata(mlmodel, fields: dict[str, str]) -> None:
    for k, v in fields.items():
        mlmodel.user_defined_metadata[k] = v


def export_step(model: Model, out: Path, options: CoremlOptions, metadata: dict[str, str],
                 notes: list[str], extra: list[tuple[str, Path]] = ()) -> tuple[StepInterface, list[ScaleStep]]:
    """Convert every scale, merge them into OUT/decoder_step.mlpackage (one weight copy). Returns the wrappers.
    `extra`: more (function name, single-function package) to merge into it (the recipes of coreml_ladder)."""
    c = model.config.var
    iface = StepInterface(model.config, "coreml", kv_mode=options.kv_mode, batch=options.batch)
    wrappers = []
    if options.target == "iOS17":  # iOS 17 loads no multifunction package: one package per scale
        folder = out / STEP_GRAPH
        folder.mkdir()
        for si in range(c.num_scales):
            fn = iface.function(si)
            step = ScaleStep(model, si, top_k=options.top_k, top_p=options.top_p, kv_mode=options.kv_mode,
                             batch=options.batch, index_dtype=torch.int32).eval()
            wrappers.append(step)
            mlmodel = _convert(step, fn, iface.example_inputs(si, options.batch, seed=0), options, c.vocab_size)
            _metadata(mlmodel, metadata)
            with _quiet():
                mlmodel.save(str(folder / f"{fn.name}.mlpackage"))
            del mlmodel
        notes.append(f"iOS17: one package per scale ({STEP_GRAPH}/scale_i.mlpackage, the function entry's `file`): "
                     "multifunction packages need iOS18; each package stores its own copy of the weights")
        return iface, wrappers
    with tempfile.TemporaryDirectory(prefix="evar-coreml-", dir=out) as tmp:
        functions = []
        for si in range(c.num_scales):
            fn = iface.function(si)
            step = ScaleStep(model, si, top_k=options.top_k, top_p=options.top_p, kv_mode=options.kv_mode,
                             batch=options.batch, index_dtype=torch.int32).eval()
            wrappers.append(step)
            mlmodel = _convert(step, fn, iface.example_inputs(si, options.batch, seed=0), options, c.vocab_size)
            _metadata(mlmodel, metadata)
            path = Path(tmp) / f"{fn.name}.mlpackage"
            with _quiet():
                mlmodel.save(str(path))
            functions.append((fn.name, path))
            del mlmodel
        merge_functions(functions + list(extra), out / f"{STEP_GRAPH}.mlpackage", iface.function_name(0))
    notes.append(f"{c.num_scales} functions scale_0..scale_{c.num_scales - 1}; identical weights are stored once")
    if options.kv_mode == "state":
        notes.append("KV cache as state: make one state per image batch and pass it to every scale's function "
                     "in order; verify on device that a state made by one function is accepted by the others")
    return iface, wrappers


def merge_functions(functions: list[tuple[str, Path]], target: Path, default: str) -> None:
    """Single-function packages (function name, path) → one multifunction package (identical weights stored once)."""
    ct = _ct()
    desc = ct.utils.MultiFunctionDescriptor()
    for name, path in functions:
        desc.add_function(str(path), src_function_name="main", target_function_name=name)
    desc.default_function_name = default
    with _quiet():
        ct.utils.save_multifunction(desc, str(target))


def export_decoder(model: Model, out: Path, options: CoremlOptions, metadata: dict[str, str]) -> DecoderInterface:
    iface = DecoderInterface(model.config, "coreml", batch=options.batch)
    fn = iface.function()
    mlmodel = _convert(VQVAEDecoder(model).eval(), fn, iface.example_inputs(options.batch, seed=0), options, None)
    _metadata(mlmodel, metadata)
    with _quiet():
        mlmodel.save(str(out / f"{DECODER_GRAPH}.mlpackage"))
    return iface


# ---------------------------------------------------------------- reading a saved package
_DTYPE_OF_ARRAY = {65568: "float32", 65552: "float16", 131104: "int32", 65600: "float64"}


def _feature(feature) -> dict[str, Any]:
    kind = feature.type.WhichOneof("Type")
    arr = feature.type.multiArrayType if kind == "multiArrayType" else None
    if kind == "stateType":
        arr = feature.type.stateType.arrayType
    if arr is None:
        return {"name": feature.name, "shape": None, "dtype": kind}
    return {"name": feature.name, "shape": [int(d) for d in arr.shape], "dtype": _DTYPE_OF_ARRAY.get(arr.dataType, str(arr.dataType))}


def package_functions(path: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{function: {inputs, outputs, states}} as the saved package declares them (no model load: Linux-safe)."""
    ct = _ct()
    with _quiet():
        try:
            spec = ct.utils.load_spec(str(path))
        except Exception as err:  # protobuf / file errors
            raise CoremlExportError(f"cannot read Core ML package {path}: {str(err).splitlines()[0]}") from err
    desc = spec.description
    fns = list(desc.functions) or [desc]
    out = {}
    for f in fns:
        name = getattr(f, "name", "") or "main"
        out[name] = {"inputs": [_feature(x) for x in f.input], "outputs": [_feature(x) for x in f.output],
                     "states": [_feature(x) for x in f.state]}
    return out


def function_packages(root: Path, graph: dict[str, Any]) -> dict[str, tuple[Path, str]]:
    """{manifest function name: (package path, function name inside it)}. A function entry with its own
    `file` (iOS17: one package per scale) is that package's only function, `main`."""
    return {f["name"]: ((root / f["file"], "main") if f.get("file") else (root / graph["file"], f["name"]))
            for f in graph["functions"]}


def package_ops(path: Path) -> dict[str, list[dict[str, Any]]]:
    """{function: [{type, outputs: [(dtype, shape)]}]} from the mlprogram (histograms and the ANE report)."""
    ct = _ct()
    with _quiet():
        spec = ct.utils.load_spec(str(path))
    result: dict[str, list[dict[str, Any]]] = {}
    for name, fn in spec.mlProgram.functions.items():
        block = fn.block_specializations[fn.opset]
        ops = []
        for op in block.operations:
            outs = []
            for o in op.outputs:
                t = o.type.tensorType
                dims = [int(d.constant.size) if d.WhichOneof("dimension") == "constant" else -1 for d in t.dimensions]
                outs.append((t.dataType, dims))
            ops.append({"type": op.type, "outputs": outs})
        result[name] = ops
    return result


def weight_bytes(path: Path) -> int:
    weights = Path(path) / "Data" / "com.apple.CoreML" / "weights"
    return sum(f.stat().st_size for f in weights.rglob("*") if f.is_file()) if weights.exists() else 0


# ---------------------------------------------------------------- macOS prediction
def can_predict() -> tuple[bool, str]:
    if platform.system() != "Darwin":
        return False, f"Core ML prediction needs macOS (this is {platform.system()}); structure and wrapper parity were checked instead"
    return True, ""


def predict_runner(path: Path, function: str | None, compute_units: str = "cpu_only"):
    """A loaded function of a package (macOS only); None: a single-function package's own."""
    ok, why = can_predict()
    if not ok:
        raise CoremlExportError(why)
    ct = _ct()
    kw = {"function_name": function} if function else {}
    return ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units]), **kw)

