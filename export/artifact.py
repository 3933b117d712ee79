"""Build a complete artifact: graphs + parity + manifest, written atomically.

Everything happens in a temp dir beside OUT (`evar.files.atomic_dir`); OUT appears only after every
parity check passed and the manifest validated, so a breach leaves no complete-looking artifact.
"""
from __future__ import annotations

import datetime as _dt
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evar import rng
from evar.checkpoints import Model, build_model
from evar.errors import EvarError
from evar.files import atomic_dir
from evar import contract
from evar.contract import (DECODER_GRAPH, EARLY_STEP_GRAPH, FORMAT, PREFILL_GRAPH, STEP_GRAPH,
                           UNGUIDED_STEP_GRAPH)
from evar.contract.recipe import Recipe
from evar.export import coreml as cm
from evar.export import coreml_ladder as cl
from evar.export.coreml_gate import GATED, default_target_gate, raise_if_failed, ungated_note
from evar.export import onnx as ox
from evar.export import cfg_trim
from evar.export import split as sp
from evar.export import token_keep as tk
from evar.export import parity as pt
from evar.export import quantize as qz
from evar.export.graphs import DynamicStep
from evar.export.interface import StepInterface
from evar.models.decoding import check_cfg_until_scale

CFG_DEFAULT = 1.5


def export_ready(model: Model) -> Model:
    """The same weights with the plain matmul/softmax attention (what both converters handle best)."""
    if all(b.attn.impl == "math" for b in model.var.blocks):
        return model
    ready = build_model(model.config, attn_impl="math")
    ready.var.load_state_dict(model.var.state_dict())
    ready.vqvae.load_state_dict(model.vqvae.state_dict())
    return ready.eval()


def _sampling(iface: StepInterface, top_k: int, top_p: float) -> dict[str, Any]:
    c = iface.var
    return {"rng": rng.RNG_NAME, "method": "inverse_cdf", "in_graph": True, "top_k": top_k, "top_p": top_p,
            "filters": "baked",
            "cfg": {"input": "cfg", "ramp": "t = cfg * si / (num_scales - 1); logits = (1 + t) * cond - t * uncond",
                    "default": CFG_DEFAULT, "unconditional_label": c.num_classes},
            "uniforms": {"input": "uniforms", "shape": ["batch", "pn*pn"], "dtype": "float32",
                         "stream": "evar.rng.scale_uniforms(seed, si, batch, pn*pn, first_sample): token j of sample b "
                                   "takes u[(first_sample + b) * pn*pn + j] of stream si"}}


def _base(model: Model, backend: str, model_ref: str, command: str | None, iface: StepInterface) -> dict[str, Any]:
    c = model.config
    return {"backend": backend, "model": c.to_dict(),
            "patch_nums": list(c.var.patch_nums), "image_size": c.vqvae.image_size,
            "batch": {"mode": "dynamic" if iface.batch is None else "static", "size": iface.batch, "cfg_doubled": True},
            "kv_cache": iface.kv_json(),
            "provenance": provenance(model_ref, c.provenance, command)}


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("evar", "torch", "onnx", "onnxruntime", "onnxsim", "coremltools", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def provenance(model_ref: str, model_provenance: dict[str, Any], command: str | None) -> dict[str, Any]:
    return {"model_ref": model_ref, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "tool_versions": tool_versions(), "model_provenance": model_provenance}


def _check_options(top_k: int, top_p: float) -> None:
    if top_k < 0:
        raise EvarError(f"--top-k must be >= 0, got {top_k}")
    if not 0.0 <= top_p < 1.0:
        raise EvarError(f"--top-p must be in [0, 1), got {top_p}")


# ---------------------------------------------------------------- ONNX
def onnx_parity(model: Model, out: Path, step_file: str, decoder_file: str, options: ox.OnnxOptions,
                batch: int = 3) -> pt.ParityReport:
    c = model.config.var
    iface = StepInterface(model.config, "onnx")
    labels = pt.parity_labels(batch, c.num_classes)
    ref = pt.reference(model, labels, pt.PARITY_SEED, pt.PARITY_CFG, options.top_k, options.top_p)
    report = pt.ParityReport()
    wrapper = pt.torch_step(DynamicStep(model, top_k=options.top_k, top_p=options.top_p).eval(), iface)
    expected = pt.drive(wrapper, iface, labels, pt.PARITY_SEED, pt.PARITY_CFG)
    pt.check_against_reference(report, "wrapper vs generate", ref, expected, pt.LOGITS_TOL, None, pt.IMAGE_TOL,
                               sampling=(options.top_k, options.top_p))

    ort_step, dec = pt.session_step(ox.session(out / step_file)), ox.session(out / decoder_file)

    def decode(f_hat: np.ndarray) -> np.ndarray:
        return dec.run(None, {"f_hat": f_hat.astype(np.float32)})[0]

    fp16 = options.precision == "fp16"
    tol, img_tol = (pt.FP16_LOGITS_TOL, pt.FP16_IMAGE_TOL) if fp16 else (pt.LOGITS_TOL, pt.IMAGE_TOL)
    agreement = pt.FP16_TOKEN_AGREEMENT if fp16 else 1.0
    forced = pt.drive(ort_step, iface, labels, pt.PARITY_SEED, pt.PARITY_CFG, teacher=expected)
    pt.check_scale_by_scale(report, "onnx vs wrapper (same inputs)", expected, forced, tol, agreement)
    pt.check_decoder(report, "onnx decoder", ref, decode, img_tol)
    if not fp16:
        free = pt.drive(ort_step, iface, labels, pt.PARITY_SEED, pt.PARITY_CFG)
        pt.check_against_reference(report, "onnx vs generate (end to end)", ref, free, tol, decode, img_tol,
                                   sampling=(options.top_k, options.top_p))
    else:
        report.skipped.append("end to end vs generate: fp16 is checked scale by scale on the same inputs "
                              f"(logits <= {tol}, token agreement >= {agreement})")
    return report


def build_onnx(model: Model, model_ref: str, out: Path, options: ox.OnnxOptions, command: str | None = None,
               early: Model | None = None) -> dict:
    """`early` (with options.split_scale): the early model of a scale split (evar.export.split)."""
    options.validate()
    _check_options(options.top_k, options.top_p)
    model = export_ready(model)
    t0 = time.perf_counter()
    n = options.cfg_until_scale
    check_cfg_until_scale(n, model.config.var.num_scales)
    split = options.split_scale
    sp.check_plan(model, early, split, n)
    keep = tk.plan(options.token_keep, model)
    tk.check_combination(keep, n, split)
    # which graph runs which scale: the graphs exported are the roles this recipe runs
    recipe = Recipe(model.config.var.num_scales, split, n, keep.cache_si if keep is not None else None)
    early = export_ready(early) if early is not None else None
    with atomic_dir(out) as tmp:
        step_notes: list[str] = []
        dec_notes: list[str] = []
        unguided_notes: list[str] = []
        step, iface = ox.export_step(model, tmp, options, step_notes)
        unguided = ox.export_step(model, tmp, options, unguided_notes, guided=False, role=UNGUIDED_STEP_GRAPH) \
            if UNGUIDED_STEP_GRAPH in recipe.roles() else None
        dec, diface = ox.export_decoder(model, tmp, options, dec_notes)
        split_notes: tuple[list[str], list[str]] = ([], [])
        if split is not None:
            split_graphs = (ox.export_step(early, tmp, options, split_notes[0], role=EARLY_STEP_GRAPH)[0],
                            sp.export_prefill(model, split, tmp, options, split_notes[1]))
        keep_notes: dict[str, list[str]] = {}
        pruned = tk.export_pruned_roles(model, keep, n, tmp, options, keep_notes) if keep is not None else {}
        export_s = time.perf_counter() - t0
        report = onnx_parity(model, tmp, step.file, dec.file, options)
        if pruned:  # token pruning, with CFG trimming when n is given: one pipeline over every role
            files = {STEP_GRAPH: step.file, **({UNGUIDED_STEP_GRAPH: unguided[0].file} if unguided else {}),
                     **{role: g.file for role, (g, _) in pruned.items()}, "decoder": dec.file}
            tk.keep_parity(report, model, tmp, files, options.top_k, options.top_p, keep, n)
        elif unguided is not None:
            cfg_trim.trimmed_parity(report, model, tmp, step.file, unguided[0].file, dec.file, options.top_k,
                                    options.top_p, n)
        if split is not None:
            files = {STEP_GRAPH: step.file, EARLY_STEP_GRAPH: split_graphs[0].file, PREFILL_GRAPH: split_graphs[1].file,
                     "decoder": dec.file, **({UNGUIDED_STEP_GRAPH: unguided[0].file} if unguided else {})}
            sp.split_parity(report, early, model, tmp, files, options.top_k, options.top_p, split, n)
        report.raise_if_failed(f"ONNX export of {model_ref}")
        compression = {"method": "none", "tool": None, "details": {}}
        if options.quantize == "int8":
            fp32 = {STEP_GRAPH: step, **({UNGUIDED_STEP_GRAPH: unguided[0]} if unguided else {}),
                    **{role: g for role, (g, _) in pruned.items()}}
            if pruned:
                gate = tk.gate_driver(model, keep, list(fp32), n)
            else:
                gate = _gate_driver(model, iface, n) if split is None else sp.gate_driver(early, model, tmp, split, n)
            steps, compression = quantize_onnx_steps(model, tmp, list(fp32.values()), options, report, step_notes,
                                                     gate)
            int8 = dict(zip(fp32, steps))
            step = int8[STEP_GRAPH]
            unguided = (int8[UNGUIDED_STEP_GRAPH], unguided[1]) if unguided else None
            pruned = {role: (int8[role], pi) for role, (_, pi) in pruned.items()}
            report.raise_if_failed(f"int8 ONNX export of {model_ref}")
        if options.quantize_decoder == "int8":
            dec, compression = quantize_onnx_decoder(model, tmp, dec, options.decoder_int8, report, dec_notes,
                                                     compression)
            report.raise_if_failed(f"int8 decoder of {model_ref}")
        ins, outs = iface.signature()
        step_notes.append("one graph for every scale: scale-dependent constants (resize operators, Phi, positions, "
                          "CFG ramp) are gathered by scale_index; lengths are symbolic")
        graphs = {
            STEP_GRAPH: ox.graph_entry(step, [f.to_json() for f in iface.functions()],
                                       {"inputs": [t.to_json() for t in ins], "outputs": [t.to_json() for t in outs]},
                                       options.opset, step_notes),
            DECODER_GRAPH: ox.graph_entry(dec, [diface.function().to_json()], None, options.opset, dec_notes),
        }
        extra: dict[str, Any] = {}
        if n is not None:
            extra["generation"] = {"cfg_until_scale": n}
        if unguided is not None:
            u, uiface = unguided
            uins, uouts = uiface.signature()
            scales = [si for si in range(model.config.var.num_scales) if recipe.role(si) == UNGUIDED_STEP_GRAPH]
            unguided_notes.append(f"CFG trimming: scales {scales[0]} … {scales[-1]} run this graph on the conditional "
                                  "rows only (B rows, B-row KV cache: keep rows [0, B) of the guided graph's presents "
                                  f"at scale {n}); no cfg input")
            graphs[UNGUIDED_STEP_GRAPH] = ox.graph_entry(
                u, [uiface.function(si).to_json() for si in scales],
                {"inputs": [t.to_json() for t in uins], "outputs": [t.to_json() for t in uouts]}, options.opset,
                unguided_notes)
            extra["generation"]["unguided_graph"] = UNGUIDED_STEP_GRAPH
        if pruned:
            keep_entries, generation = tk.manifest_parts(model, keep, pruned, n, options.opset, keep_notes)
            extra["generation"] = {**extra.get("generation", {}), **generation}
        if split is not None:
            split_entries, generation = sp.manifest_parts(early, options.early_model, model, split, *split_graphs,
                                                          options.opset, *split_notes)
            extra["generation"] = {**extra.get("generation", {}), **generation}
        for g in graphs.values():
            g["scale_selection"] = None
        graphs[STEP_GRAPH]["scale_selection"] = "scale_index_input"
        if unguided is not None:
            graphs[UNGUIDED_STEP_GRAPH]["scale_selection"] = "scale_index_input"
        if split is not None:
            graphs.update(split_entries)
        if pruned:
            graphs.update(keep_entries)
        manifest = {**_base(model, "onnx", model_ref, command, iface), **extra, "graphs": graphs,
                    "sampling": _sampling(iface, options.top_k, options.top_p),
                    "precision": precision_entry(options),
                    "compression": compression,
                    "parity": report.to_json()}
        contract.write(tmp, manifest)
    return {"export_seconds": export_s, "total_seconds": time.perf_counter() - t0, "parity": report}


def _gate_driver(model: Model, iface: StepInterface, n: int | None):
    """drive(step_fns, labels, seed, teacher) for the int8 gate: one step graph, or the trimmed pair."""
    if n is None:
        return lambda fns, labels, seed, teacher: pt.drive(fns[0], iface, labels, seed, pt.PARITY_CFG, teacher=teacher)
    pipe = cfg_trim.pipeline(model, n)
    return lambda fns, labels, seed, teacher: pipe.drive(tuple(fns), labels, seed, pt.PARITY_CFG, teacher=teacher)


def quantize_onnx_decoder(model: Model, tmp: Path, dec: ox.OnnxGraph, options: qz.DecoderInt8Options,
                          report: pt.ParityReport, notes: list[str],
                          compression: dict[str, Any]) -> tuple[ox.OnnxGraph, dict[str, Any]]:
    """The parity-checked fp32 decoder graph → static int8 in its place, gated on images from f_hat of generations
    it was not calibrated on (another seed). → (its graph, the manifest's compression with a `decoder` entry in
    its details)."""
    import onnx

    from evar.prune.decoder import GENERATED, decoder_data

    if dec.external_data:
        raise EvarError("--quantize-decoder int8: the decoder graph keeps its weights in an external file, which "
                        "the quantizer does not read; export with --external-data never")
    calib = decoder_data(model, GENERATED, options.calib_samples, seed=0).f_hat.numpy()
    check = decoder_data(model, GENERATED, options.check_samples, seed=1).f_hat.numpy()
    int8_file = tmp / dec.file
    fp32_file = int8_file.with_name(int8_file.stem + ".fp32.onnx")
    int8_file.rename(fp32_file)
    details = qz.quantize_decoder(fp32_file, int8_file, calib, options)

    def decode_with(path: Path):
        sess = ox.session(path)
        return lambda f: sess.run(None, {"f_hat": f.astype(np.float32)})[0]

    details["psnr_db"] = qz.decoder_int8_gate(report, decode_with(fp32_file), decode_with(int8_file), check, options)
    fp32_file.unlink()
    notes.append(f"static int8 (QDQ) convolutions, calibrated on {options.calib_samples} generations; image PSNR "
                 f"{details['psnr_db']:.1f} dB against the fp32 graph (gate >= {options.min_psnr_db} dB)")
    tool = "onnxruntime.quantization.quantize_static" if compression.get("tool") is None else \
        f"{compression['tool']} (step graphs) + quantize_static (decoder)"
    nodes = len(onnx.load(str(int8_file), load_external_data=False).graph.node)
    return (ox.OnnxGraph(dec.file, None, dec.simplified, nodes),
            {"method": "int8", "tool": tool, "details": {**compression.get("details", {}), "decoder": details}})


def precision_entry(options: ox.OnnxOptions) -> dict[str, Any]:
    if options.quantize_decoder == "int8" and options.quantize != "int8":
        return {"weights": "int8", "compute": "int8",
                "fp32_ops": ["every op but the quantized decoder convolutions"]}
    if options.quantize == "int8":
        return {"weights": "int8", "compute": "int8", "fp32_ops": ["every op but the quantized transformer matmuls"]}
    return {"weights": options.precision, "compute": "fp32", "fp32_ops": []}


def quantize_onnx_steps(model: Model, tmp: Path, steps: list[ox.OnnxGraph], options: ox.OnnxOptions,
                        report: pt.ParityReport, notes: list[str], drive) -> tuple[list[ox.OnnxGraph], dict[str, Any]]:
    """The parity-checked fp32 step graphs → int8 (`evar.export.quantize`), gated against the fp32 graphs; the int8
    graphs then take their places and file names. `drive(step_fns, labels, seed, teacher)` runs a generation
    through the graphs. → (their graph entries, the manifest's compression)."""
    import onnx

    staging = tmp / ".int8"
    staging.mkdir()
    details = {}
    for step in steps:
        details = qz.quantize_step(model, tmp / step.file, staging / step.file, options.int8,
                                   external=step.external_data is not None)
    fp32 = [pt.session_step(ox.session(tmp / s.file)) for s in steps]
    int8 = [pt.session_step(ox.session(staging / s.file)) for s in steps]
    qz.int8_gate(report, model.config.var.num_scales, lambda labels, seed: drive(fp32, labels, seed, None),
                 lambda labels, seed, teacher: drive(int8, labels, seed, teacher), options.int8,
                 model.config.var.num_classes)
    del fp32, int8
    graphs = []
    for step in steps:
        for leftover in tmp.glob(step.file + "*"):
            leftover.unlink()
        for path in staging.glob(step.file + "*"):
            path.rename(tmp / path.name)
        nodes = onnx.load(str(tmp / step.file), load_external_data=False).graph.node
        external = step.file + ".data" if (tmp / (step.file + ".data")).exists() else None
        graphs.append(ox.OnnxGraph(step.file, external, step.simplified, len(nodes)))
    staging.rmdir()
    notes.append(f"int8: {details['quantized_layers']} linear layers quantized per step graph; gated against the fp32 "
                 f"graphs (per scale: mean token KL <= {options.int8.max_kl}, token agreement 1 - TV >= "
                 f"{options.int8.min_token_agreement})")
    return graphs, {"method": "int8", "tool": "onnxruntime.quantization.quantize_dynamic", "details": details}


# ---------------------------------------------------------------- Core ML
def coreml_parity(model: Model, out: Path, iface: StepInterface, wrappers: list[torch.nn.Module],
                  manifest_graphs: dict[str, Any], options: cm.CoremlOptions) -> pt.ParityReport:
    report = pt.ParityReport()
    # 1. the packages declare exactly the manifest's functions, inputs, outputs and states (a package may hold
    # the functions of several roles: a recipe's unguided and prefill functions share decoder_step's state)
    packages: dict[Path, list[dict[str, Any]]] = {}
    for graph in manifest_graphs.values():
        for f in graph["functions"]:
            path, name = cm.function_packages(out, graph)[f["name"]]
            packages.setdefault(path, []).append({**f, "name": name})
    for path, functions in packages.items():
        check_package_structure(report, path, functions, path.relative_to(out).as_posix())
    # 2. the export-ready wrappers (what was converted) against the original model
    labels = pt.parity_labels(iface.batch, iface.var.num_classes)
    ref = pt.reference(model, labels, pt.PARITY_SEED, pt.PARITY_CFG, options.top_k, options.top_p)
    if iface.kv_mode == "state":
        pt.share_state(wrappers)
        pt.reset_state(wrappers)
    run = pt.drive(pt.torch_step(wrappers, iface), iface, labels, pt.PARITY_SEED, pt.PARITY_CFG)
    pt.check_against_reference(report, "coreml wrapper vs generate", ref, run, pt.LOGITS_TOL, None, pt.IMAGE_TOL,
                               sampling=(options.top_k, options.top_p))
    if options.compress in GATED:  # the stored weights, emulated (export/coreml_gate.py)
        default_target_gate(report, model, iface, wrappers, run, ref, options)
    # 3. prediction (macOS only)
    ok, why = cm.can_predict()
    if not ok:
        report.skipped.append(why)
    else:
        coreml_predict_parity(report, out / manifest_graphs[STEP_GRAPH]["file"], iface, run, options)
    return report


def coreml_predict_parity(report: pt.ParityReport, package: Path, iface: StepInterface, expected: pt.Run,
                          options: cm.CoremlOptions) -> None:
    """macOS: every function on the wrapper's inputs, scale by scale, at the fp16 tolerance."""
    if package.is_dir() and not (package / "Manifest.json").exists():  # iOS17: a package per scale
        models = [cm.predict_runner(package / f"{iface.function_name(si)}.mlpackage", None)
                  for si in range(iface.var.num_scales)]
    else:
        models = [cm.predict_runner(package, iface.function_name(si)) for si in range(iface.var.num_scales)]
    state = models[0].make_state() if iface.kv_mode == "state" else None

    def step(si: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kw = {"state": state} if state is not None else {}
        return models[si].predict(feeds, **kw)

    got = pt.drive(step, iface, expected.inputs[0]["labels"], pt.PARITY_SEED, pt.PARITY_CFG, teacher=expected)
    fp16 = options.precision == "fp16"
    pt.check_scale_by_scale(report, "coreml vs wrapper (same inputs)", expected, got,
                            pt.FP16_LOGITS_TOL if fp16 else 1e-3, pt.FP16_TOKEN_AGREEMENT if fp16 else 1.0)


def check_package_structure(report: pt.ParityReport, package: Path, functions: list[dict[str, Any]], role: str) -> None:
    try:
        declared = cm.package_functions(package)
    except EvarError as err:
        report.fail(f"{role}: package loads", str(err))
        return
    want = {f["name"] for f in functions}
    if set(declared) != want:
        report.fail(f"{role}: functions", f"package has {sorted(declared)}, manifest {sorted(want)}")
        return
    for f in functions:
        got = declared[f["name"]]
        for kind in ("inputs", "outputs", "states"):
            expected = [(t["name"], list(t["shape"]), t["dtype"]) for t in f.get(kind, [])]
            actual = [(t["name"], t["shape"], t["dtype"]) for t in got[kind]]
            if kind == "outputs":  # the converter leaves output shapes/dtypes to the runtime in some cases
                expected, actual = [e[0] for e in expected], [a[0] for a in actual]
            if expected != actual:
                first = next((i for i, (e, a) in enumerate(zip(expected, actual)) if e != a), min(len(expected), len(actual)))
                report.fail(f"{role}/{f['name']}: {kind}",
                            f"#{first}: package {actual[first] if first < len(actual) else 'nothing'} != "
                            f"manifest {expected[first] if first < len(expected) else 'nothing'}")
    report.checks.append(pt.Check(f"{role}: package structure matches manifest", True))


def _sparse_details(model: Model, compress: str) -> dict:
    """`--compress 2:4…` stores a 2:4 model's zeros: the model must be one (evar sparsify --pattern 2:4)."""
    if compress not in cm.SPARSE_COMPRESSIONS:
        return {}
    sp = getattr(model, "sparsity", None)
    if sp is None or sp.pattern.name != "2:4":
        what = "dense" if sp is None else f"{sp.pattern.name} sparse"
        raise EvarError(f"--compress {compress} stores the zeros of a 2:4-sparse model, and this model is {what}: "
                        "make one with `evar sparsify --pattern 2:4` first")
    return {"pattern": "2:4", "masked_layers": len(sp.masks), "sparsity_method": sp.method,
            "storage": "bitmask + kept values (constexpr_sparse_to_dense" + (", values palettized: "
                                                                             "constexpr_lut_to_sparse)" if "+" in compress else ")")}


def build_coreml(model: Model, model_ref: str, out: Path, options: cm.CoremlOptions, command: str | None = None,
                 early: Model | None = None) -> dict:
    """`early` (with options.split_scale): the early model of a scale split (evar.export.coreml_ladder)."""
    options.validate()
    _check_options(options.top_k, options.top_p)
    sparse = _sparse_details(model, options.compress)
    check_cfg_until_scale(options.cfg_until_scale, model.config.var.num_scales)
    sp.check_plan(model, early, options.split_scale, options.cfg_until_scale)
    model = export_ready(model)
    early = export_ready(early) if early is not None else None
    t0 = time.perf_counter()
    meta = {"evar.format": FORMAT, "evar.model_ref": model_ref, "evar.rng": rng.RNG_NAME,
            "evar.top_k": str(options.top_k), "evar.top_p": str(options.top_p)}
    if options.target == "ane":
        from evar.export.ane_export import build_ane

        base = _base(model, "coreml", model_ref, command, StepInterface(model.config, "coreml", "state", options.batch))
        return build_ane(model, model_ref, out, options, base, CFG_DEFAULT, meta)
    with atomic_dir(out) as tmp:
        notes: list[str] = []
        roles = cl.plan_roles(model, early, options)
        with tempfile.TemporaryDirectory(prefix="evar-coreml-", dir=tmp) as staging:
            packages = cl.convert_roles(tmp, Path(staging), roles, model, options, meta)
            iface, wrappers = cm.export_step(model, tmp, options, meta, notes,
                                             extra=packages.pop(f"{STEP_GRAPH}.mlpackage", []))
            for file, functions in packages.items():  # the early model's package
                cm.merge_functions(functions, tmp / file, functions[0][0])
        diface = cm.export_decoder(model, tmp, options, meta)
        export_s = time.perf_counter() - t0
        common = {"format": "coreml", "external_data": None, "opset": None, "target": options.target,
                  "compute_units": options.compute_units, "simplified": None, "signature": None}
        step_functions = [f.to_json() for f in iface.functions()]
        step_file = f"{STEP_GRAPH}.mlpackage"
        if options.target == "iOS17":  # a package per scale (export_step): each function names its own
            step_file = STEP_GRAPH
            for f in step_functions:
                f["file"] = f"{STEP_GRAPH}/{f['name']}.mlpackage"
        graphs = {
            STEP_GRAPH: {**common, "file": step_file, "functions": step_functions,
                         "default_function": iface.function_name(0), "scale_selection": "function", "notes": notes},
            DECODER_GRAPH: {**common, "file": f"{DECODER_GRAPH}.mlpackage", "functions": [diface.function().to_json()],
                            "default_function": "main", "scale_selection": None, "notes": []},
        }
        graphs.update(cl.graph_entries(roles, common, options, options.early_model))
        report = coreml_parity(model, tmp, iface, wrappers, graphs, options)
        if note := ungated_note(options.compress):
            report.skipped.append(note)
        extra: dict[str, Any] = {}
        if roles:
            run = cl.recipe_parity(report, model, early, wrappers, iface, roles, options)
            if cm.can_predict()[0]:
                cl.predict_parity(report, tmp, graphs, model, early, run, options)
            extra["generation"] = cl.generation_fields(model, early, options)
        raise_if_failed(report, f"Core ML export of {model_ref}", options.compress)
        fp32_ops = ["sampling tail: CFG, top-k/top-p, softmax, cumsum, inverse-CDF compare"] \
            if options.precision == "fp16" else []
        weights = {"none": options.precision, "palettize6": "palettized", "palettize4": "palettized",
                   "int8": "int8", "2:4": "sparse", "2:4+palettize6": "sparse-palettized",
                   "2:4+palettize4": "sparse-palettized"}[options.compress]
        compression = {"method": options.compress, "tool": None if options.compress == "none" else "coremltools.optimize.coreml",
                       "details": {"weight_threshold": 2048, **sparse} if options.compress != "none" else {}}
        if options.compress in GATED:
            compression["details"]["gate"] = options.gate.to_json(options.compress)
        manifest = {**_base(model, "coreml", model_ref, command, iface), **extra, "graphs": graphs,
                    "sampling": _sampling(iface, options.top_k, options.top_p),
                    "precision": {"weights": weights, "compute": options.precision, "fp32_ops": fp32_ops},
                    "compression": compression, "parity": report.to_json()}
        contract.write(tmp, manifest)
    return {"export_seconds": export_s, "total_seconds": time.perf_counter() - t0, "parity": report}
