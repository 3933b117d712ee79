"""The speed-ladder recipes in a Core ML artifact: `evar-export coreml --cfg-until-scale N` and
`--early-model REF --split-scale N`, with the manifest fields and graph roles of the ONNX artifacts
(`generation.cfg_until_scale` / `unguided_graph`, `split_scale` / `early_graph` / `prefill_graph`), so one
manifest contract serves both formats.

Functions (static shapes, one per scale like the plain step package):
    decoder_step            scale_i: the compressed model, guided (2B rows), every scale
    decoder_step_unguided   unguided_scale_i for i >= cfg_until_scale: the conditional rows only, no cfg input
    prefill                 the compressed model's cache of scales < split_scale from their tokens, one pass
    decoder_step_early      scale_i for i < split_scale: the early model (its own weights, its own cache)
iOS18 (KV as state): every function that touches the compressed model's cache lives in decoder_step.mlpackage
(the roles name functions of that one file), so one state made for it serves them all: the unguided functions
read and write rows [0, B) of the 2B-row state (nothing to copy at the trimming scale) and the prefill writes
slots [0, T). The early model's functions are decoder_step_early.mlpackage with a state of their own. The
rule a runtime follows: one state per package file per generation. iOS17 (KV as inputs/outputs): one package
per function (the function entry's `file`) and the recipe runs exactly as on ONNX (keep rows [0, B) of the
cache at the trimming scale; the prefill's presents are the next scale's pasts).

Parity on Linux: every package declares the manifest's functions; the converted wrappers, driven through the
recipe's pipeline (`evar.export.cfg_trim` / `evar.export.split`), give `generate(...)`'s tokens for the same
recipe. macOS adds prediction scale by scale on the wrappers' inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from evar.checkpoints import Model
from evar.contract import DECODER_GRAPH, EARLY_STEP_GRAPH, PREFILL_GRAPH, STEP_GRAPH, UNGUIDED_STEP_GRAPH
from evar.export import cfg_trim
from evar.export import coreml as cm
from evar.export import parity as pt
from evar.export import split as sp
from evar.export.graphs import ScaleStep
from evar.export.interface import FunctionSpec, StepInterface, TensorSpec

UNGUIDED_PREFIX = "unguided_"


# ---------------------------------------------------------------- the prefill as a Core ML function
class StatePrefill(nn.Module):
    """(labels, tokens of scales < n) → the compressed model's cache written into its state at slots [0, T).
    A Core ML function needs an output: it returns the last layer's keys (what it also wrote)."""

    def __init__(self, model: Model, n: int, batch: int):
        super().__init__()
        self.inner = sp.PrefillGraph(model, n)
        c = model.config.var
        for i, heads in enumerate(c.num_heads):
            shape = (2 * batch, heads, c.seq_len, c.head_dim)
            self.register_buffer(f"key_cache_{i}", torch.zeros(shape))
            self.register_buffer(f"value_cache_{i}", torch.zeros(shape))

    def forward(self, labels: Tensor, tokens: Tensor):
        presents = self.inner(labels, tokens)
        T = tokens.shape[1]
        for i in range(len(presents) // 2):
            getattr(self, f"key_cache_{i}")[:, :, :T] = presents[2 * i]
            getattr(self, f"value_cache_{i}")[:, :, :T] = presents[2 * i + 1]
        return presents[-2] * 1.0  # (a returned input alias does not convert)


def prefill_spec(iface: StepInterface, n: int) -> FunctionSpec:
    """The prefill function of a Core ML artifact: int32 in; io: every layer's presents out (length T);
    state: writes the state, returns the last layer's keys."""
    T = iface.var.scale_ranges()[n][0]
    ins = (TensorSpec("labels", (iface.batch,), "int32", "labels", doc="class ids"),
           TensorSpec("tokens", (iface.batch, T), "int32", "idx",
                      doc=f"the tokens of scales 0 … {n - 1} (the early functions' idx outputs), concatenated"))
    if iface.kv_mode == "io":
        outs = tuple(iface.kv_tensor(i, k, T) for i in range(iface.var.depth) for k in ("present_key", "present_value"))
        return FunctionSpec("prefill", ins, outs, token_range=(0, T))
    last = iface.kv_tensor(iface.var.depth - 1, "present_key", T)
    last = replace(last, doc="the last layer's keys (the cache itself is written into the state)")
    return FunctionSpec("prefill", ins, (last,), tuple(iface.kv_states()), token_range=(0, T))


def prefill_module(late: Model, n: int, iface: StepInterface) -> nn.Module:
    return (StatePrefill(late, n, iface.batch) if iface.kv_mode == "state" else sp.PrefillGraph(late, n)).eval()


# ---------------------------------------------------------------- the plan: roles → functions and wrappers
@dataclass
class Role:
    """One graph role of a recipe artifact: its functions, the wrappers converted into them, and the package."""

    name: str
    iface: StepInterface | None  # the step interface whose inputs the functions take (None: the prefill)
    specs: list[FunctionSpec]
    modules: list[nn.Module]
    file: str  # iOS18: the package holding these functions; iOS17: the folder of one package per function


def step_role(model: Model, options: cm.CoremlOptions, scales: range, role: str, file: str,
              guided: bool = True) -> Role:
    iface = StepInterface(model.config, "coreml", kv_mode=options.kv_mode, batch=options.batch, guided=guided)
    shared = StepInterface(model.config, "coreml", kv_mode=options.kv_mode, batch=options.batch)
    specs, modules = [], []
    for si in scales:
        fn = iface.function(si)
        if not guided:  # its own name in the shared package; a state keeps the guided (2B-row) shape
            fn = replace(fn, name=UNGUIDED_PREFIX + fn.name, states=shared.function(si).states)
        specs.append(fn)
        modules.append(ScaleStep(model, si, top_k=options.top_k, top_p=options.top_p, kv_mode=options.kv_mode,
                                 batch=options.batch, index_dtype=torch.int32, guided=guided).eval())
    return Role(role, iface, specs, modules, file)


def plan_roles(late: Model, early: Model | None, options: cm.CoremlOptions) -> dict[str, Role]:
    """The roles beyond decoder_step (converted by `coreml.export_step`) of a trimmed and/or split export."""
    S, state = late.config.var.num_scales, options.kv_mode == "state"
    roles: dict[str, Role] = {}
    step_file = f"{STEP_GRAPH}.mlpackage" if state else None
    if options.cfg_until_scale is not None:
        roles[UNGUIDED_STEP_GRAPH] = step_role(late, options, range(options.cfg_until_scale, S), UNGUIDED_STEP_GRAPH,
                                               step_file or UNGUIDED_STEP_GRAPH, guided=False)
    if options.split_scale is not None:
        n = options.split_scale
        iface = StepInterface(late.config, "coreml", kv_mode=options.kv_mode, batch=options.batch)
        roles[PREFILL_GRAPH] = Role(PREFILL_GRAPH, None, [prefill_spec(iface, n)], [prefill_module(late, n, iface)],
                                    step_file or PREFILL_GRAPH)
        roles[EARLY_STEP_GRAPH] = step_role(early, options, range(n), EARLY_STEP_GRAPH,
                                            f"{EARLY_STEP_GRAPH}.mlpackage" if state else EARLY_STEP_GRAPH)
    return roles


def _example(role: Role, k: int, batch: int, vocab: int) -> dict[str, np.ndarray]:
    spec = role.specs[k]
    if role.iface is not None:
        return role.iface.example_inputs(spec.scale_index, batch, seed=0)
    tokens = spec.inputs[1]
    return {"labels": np.arange(batch, dtype=np.int32) % 2,
            "tokens": np.random.default_rng(0).integers(0, vocab, tokens.shape).astype(np.int32)}


def convert_roles(out: Path, staging: Path, roles: dict[str, Role], late: Model, options: cm.CoremlOptions,
                  meta: dict[str, str]) -> dict[str, list[tuple[str, Path]]]:
    """Convert every role's functions. iOS17: a package per function in the role's folder under `out`; iOS18:
    single-function packages in `staging`, returned by the package file they join ({file: [(function, path)]}):
    the compressed model's join decoder_step.mlpackage (`coreml.export_step(extra=)`), the early ones their own."""
    vocab = late.config.var.vocab_size
    by_file: dict[str, list[tuple[str, Path]]] = {}
    for role in roles.values():
        for k, (spec, module) in enumerate(zip(role.specs, role.modules)):
            mlmodel = cm._convert(module, spec, _example(role, k, options.batch, vocab), options,
                                  vocab if role.iface is not None else None)
            cm._metadata(mlmodel, meta)
            if options.kv_mode == "io":
                (out / role.file).mkdir(exist_ok=True)
                target = out / role.file / f"{spec.name}.mlpackage"
            else:
                target = staging / f"{role.name}.{spec.name}.mlpackage"
                by_file.setdefault(role.file, []).append((spec.name, target))
            with cm._quiet():
                mlmodel.save(str(target))
            del mlmodel
    return by_file


# ---------------------------------------------------------------- manifest entries
def graph_entries(roles: dict[str, Role], common: dict[str, Any], options: cm.CoremlOptions,
                  early_ref: str | None) -> dict[str, dict[str, Any]]:
    graphs = {}
    for role in roles.values():
        functions = [f.to_json() for f in role.specs]
        file = role.file
        if options.kv_mode == "io":
            for f in functions:
                f["file"] = f"{role.file}/{f['name']}.mlpackage"
        graphs[role.name] = {**common, "file": file, "functions": functions, "default_function": functions[0]["name"],
                             "scale_selection": None if role.name == PREFILL_GRAPH else "function",
                             "notes": _notes(role, options, early_ref)}
    return graphs


def _notes(role: Role, options: cm.CoremlOptions, early_ref: str | None) -> list[str]:
    state = options.kv_mode == "state"
    if role.name == UNGUIDED_STEP_GRAPH:
        return [f"CFG trimming: scales >= {options.cfg_until_scale} run these functions on the conditional rows only "
                "(batch rows, no cfg input)" + (": functions of decoder_step.mlpackage, they read and write rows "
                                               "[0, batch) of its 2*batch-row state" if state else
                                               "; keep rows [0, batch) of every present at the trimming scale")]
    if role.name == PREFILL_GRAPH:
        return [f"scale split: the compressed model's cache of scales 0 … {options.split_scale - 1} from their tokens "
                "in one block-causal pass (2*batch rows)" + (": a function of decoder_step.mlpackage that writes its "
                                                             "state" if state else "; its presents feed decoder_step's "
                                                             f"pasts at scale {options.split_scale}")]
    return [f"scale split: the early model ({early_ref}) runs scales 0 … {options.split_scale - 1} "
            + ("with its own package and state" if state else "(its own KV cache)")]


def generation_fields(late: Model, early: Model | None, options: cm.CoremlOptions) -> dict[str, Any]:
    """The manifest's `generation`: the same fields as an ONNX artifact of the same recipe."""
    out: dict[str, Any] = {}
    if options.cfg_until_scale is not None:
        out.update(cfg_until_scale=options.cfg_until_scale, unguided_graph=UNGUIDED_STEP_GRAPH)
    if options.split_scale is not None:
        out.update(sp.generation_fields(early, options.early_model, options.split_scale))
    return out


# ---------------------------------------------------------------- parity
def _torch_fns(role: Role) -> dict[int, pt.StepFn]:
    """scale index → a StepFn over that scale's wrapper (the prefill: its one module, int32 in as on device)."""
    if role.iface is None:
        module, spec = role.modules[0], role.specs[0]

        @torch.no_grad()
        def call(si: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            outs = module(*(torch.from_numpy(np.ascontiguousarray(feeds[t.name], np.int32)) for t in spec.inputs))
            outs = outs if isinstance(outs, tuple) else (outs,)
            return {t.name: o.numpy() for t, o in zip(spec.outputs, outs)}

        return {-1: call}
    # the inputs/outputs of role.iface.function(si) are the spec's (only an unguided function's name differs)
    return {spec.scale_index: pt.torch_step(module, role.iface) for spec, module in zip(role.specs, role.modules)}


def by_scale(fns: dict[int, pt.StepFn]) -> pt.StepFn:
    return lambda si, feeds: (fns[si] if si in fns else fns[-1])(si, feeds)


def pipeline_for(late: Model, early: Model | None, options: cm.CoremlOptions):
    """The recipe's pipeline over Core ML interfaces (the same drivers as the ONNX export)."""
    kw: dict[str, Any] = {"kv_mode": options.kv_mode, "batch": options.batch}
    late_iface = StepInterface(late.config, "coreml", **kw)
    trim = options.cfg_until_scale
    unguided = StepInterface(late.config, "coreml", guided=False, **kw) if trim is not None else None
    if options.split_scale is None:
        return cfg_trim.TrimmedPipeline(late_iface, unguided, trim)
    return sp.SplitPipeline(StepInterface(early.config, "coreml", **kw), late_iface, unguided, options.split_scale,
                            trim)


def drive(pipe, steps: dict[str, pt.StepFn], labels: np.ndarray, seed: int, cfg: float,
          teacher: pt.Run | None = None) -> pt.Run:
    if isinstance(pipe, cfg_trim.TrimmedPipeline):
        return pipe.drive((steps[STEP_GRAPH], steps[UNGUIDED_STEP_GRAPH]), labels, seed, cfg, teacher=teacher)
    return pipe.drive(steps, labels, seed, cfg, teacher=teacher)


def share_states(step_wrappers: list[nn.Module], roles: dict[str, Role]) -> None:
    """As on device: the compressed model's functions share one state (decoder_step's), the early ones another."""
    late = list(step_wrappers) + [m for r in roles.values() if r.name != EARLY_STEP_GRAPH for m in r.modules]
    groups = [late] + ([roles[EARLY_STEP_GRAPH].modules] if EARLY_STEP_GRAPH in roles else [])
    for group in groups:
        pt.share_state(group)
        pt.reset_state(group)


def recipe_parity(report: pt.ParityReport, late: Model, early: Model | None, step_wrappers: list[nn.Module],
                  step_iface: StepInterface, roles: dict[str, Role], options: cm.CoremlOptions) -> pt.Run:
    """The converted wrappers through the recipe against `generate` of the same recipe: identical tokens."""
    labels = pt.parity_labels(options.batch, late.config.var.num_classes)
    n, trim = options.split_scale, options.cfg_until_scale
    if n is None:
        ref = cfg_trim.reference(late, labels, pt.PARITY_SEED, pt.PARITY_CFG, options.top_k, options.top_p, trim)
    else:
        ref = sp.reference(early, late, labels, pt.PARITY_SEED, pt.PARITY_CFG, options.top_k, options.top_p, n, trim)
    if options.kv_mode == "state":
        share_states(step_wrappers, roles)
    steps = {STEP_GRAPH: pt.torch_step(step_wrappers, step_iface),
             **{name: by_scale(_torch_fns(role)) for name, role in roles.items()}}
    run = drive(pipeline_for(late, early, options), steps, labels, pt.PARITY_SEED, pt.PARITY_CFG)
    pt.check_against_reference(report, f"coreml {recipe_label(options)}: wrappers vs generate", ref, run,
                               pt.LOGITS_TOL, None, pt.IMAGE_TOL)
    return run


def recipe_label(options: cm.CoremlOptions) -> str:
    parts = ([f"split at {options.split_scale}"] if options.split_scale is not None else []) + \
            ([f"cfg trimmed at {options.cfg_until_scale}"] if options.cfg_until_scale is not None else [])
    return ", ".join(parts)


def predict_parity(report: pt.ParityReport, root: Path, graphs: dict[str, Any], late: Model, early: Model | None,
                   expected: pt.Run, options: cm.CoremlOptions) -> None:
    """macOS: the packages' functions through the recipe on the wrappers' inputs (teacher forced), scale by scale."""
    states: dict[Path, Any] = {}
    steps: dict[str, pt.StepFn] = {}
    for role, graph in graphs.items():
        if role == DECODER_GRAPH:
            continue
        fns = {}
        for f in graph["functions"]:
            path, name = cm.function_packages(root, graph)[f["name"]]
            model = cm.predict_runner(path, None if name == "main" else name)
            if f.get("states") and path not in states:  # one state per package file, as the runtime makes them
                states[path] = model.make_state()
            fns[f["scale_index"] if f["scale_index"] is not None else -1] = _predict_fn(model, states.get(path), f)
        steps[role] = by_scale(fns)
    got = drive(pipeline_for(late, early, options), steps, expected.inputs[0]["labels"], pt.PARITY_SEED,
                pt.PARITY_CFG, teacher=expected)
    fp16 = options.precision == "fp16"
    pt.check_scale_by_scale(report, f"coreml {recipe_label(options)}: prediction vs wrappers (same inputs)", expected,
                            got, pt.FP16_LOGITS_TOL if fp16 else 1e-3, pt.FP16_TOKEN_AGREEMENT if fp16 else 1.0)


def _predict_fn(model, state, function: dict[str, Any]) -> pt.StepFn:
    dtypes = {t["name"]: t["dtype"] for t in function["inputs"]}

    def call(si: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cast = {k: np.ascontiguousarray(v, cm.NP_OF[dtypes[k]]) for k, v in feeds.items() if k in dtypes}
        kw = {"state": state} if state is not None else {}
        return {k: np.asarray(v) for k, v in model.predict(cast, **kw).items()}

    return call
