"""`evar-export coreml --model DD_DIR`: the student passes of `export/dd_graphs.py` as one multifunction mlprogram
(one function per pass, `pass_t0`, `pass_t5`, …; identical weights stored once) + the VQVAE decoder package.

Static batch (`--batch`), labels and tokens int32 (Core ML has no int64 features), fp16 or fp32 compute (fp16:
the argmax may flip near-tied tokens: that is measured on a Mac, not here). Linux cannot run Core ML models, so
parity here is what can be checked: every function of the saved package declares the manifest's inputs and
outputs, and the export-ready wrappers (int32 interface) give `dd_generate`'s tokens for every prefix of the
t-list. The Python runtime runs ONNX DD artifacts only; EVARKit runs these Core ML ones (`FewStepPipeline`).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from evar.export import coreml as cm
from evar.export import parity as pt
from evar.export.dd_export import PARITY_FIRST_SAMPLE, _torch_call, manifest_body
from evar.export.dd_graphs import PassInterface, StudentPass, decoder_model, export_ready, pass_role

from evar import contract, rng
from evar.contract import DECODER_GRAPH, few_step
from evar.dd.model import DDModel
from evar.dd.sampler import FewStep, dd_generate
from evar.errors import EvarError
from evar.files import atomic_dir

PACKAGE = "dd_passes.mlpackage"


def function_name(t: int) -> str:
    return f"pass_t{t}"


def check_coreml_options(options: cm.CoremlOptions) -> None:
    if options.target != "iOS18" or options.compress != "none":
        raise EvarError("a Distilled Decoding Core ML export is --target iOS18 (one multifunction package) without "
                        "--compress; those options belong to VAR's scale-by-scale export")


def _example(model: DDModel, iface: PassInterface) -> dict[str, np.ndarray]:
    c, b = model.config.var, iface.batch
    labels = (np.arange(b) + 1) % c.num_classes
    noise = few_step.sequence_noise(0, 0, b, c.patch_nums, c.cvae)
    out = {"labels": labels.astype(np.int32), "noise": noise}
    if iface.t:
        tokens, vectors, _ = StudentPass(model, 0)(torch.from_numpy(labels), torch.from_numpy(noise))
        out |= {"given_tokens": tokens.numpy().astype(np.int32), "given_vectors": vectors.detach().numpy()}
    return out


def _convert_passes(model: DDModel, tmp: Path, t_values: tuple[int, ...], options: cm.CoremlOptions,
                    meta: dict[str, str]) -> tuple[dict[int, PassInterface], dict[int, StudentPass]]:
    ct = cm._ct()
    ifaces = {t: PassInterface(model, t, options.batch, "int32") for t in t_values}
    wrappers = {t: StudentPass(model, t, torch.int32).eval() for t in t_values}
    with tempfile.TemporaryDirectory(prefix="evar-coreml-", dir=tmp) as work:
        desc = ct.utils.MultiFunctionDescriptor()
        for t in t_values:
            fn = ifaces[t].function()
            mlmodel = cm._convert(wrappers[t], fn, _example(model, ifaces[t]), options, None)
            cm._metadata(mlmodel, meta)
            path = Path(work) / f"{function_name(t)}.mlpackage"
            with cm._quiet():
                mlmodel.save(str(path))
            desc.add_function(str(path), src_function_name="main", target_function_name=function_name(t))
            del mlmodel
        desc.default_function_name = function_name(t_values[0])
        with cm._quiet():
            ct.utils.save_multifunction(desc, str(tmp / PACKAGE))
    return ifaces, wrappers


def coreml_parity(model: DDModel, tmp: Path, ifaces: dict[int, PassInterface], wrappers: dict[int, StudentPass],
                  decoder_fn: dict) -> pt.ParityReport:
    report = pt.ParityReport()
    declared = cm.package_functions(tmp / PACKAGE)
    for t, iface in ifaces.items():
        _same_io(report, f"{PACKAGE}/{function_name(t)}", declared.get(function_name(t)), iface.function().to_json())
    _same_io(report, f"{DECODER_GRAPH}.mlpackage", cm.package_functions(tmp / f"{DECODER_GRAPH}.mlpackage").get("main"),
             decoder_fn)
    t_values = tuple(ifaces)
    c, batch = model.config.var, ifaces[t_values[0]].batch
    labels = pt.parity_labels(batch, c.num_classes)
    noise = few_step.sequence_noise(pt.PARITY_SEED, PARITY_FIRST_SAMPLE, batch, c.patch_nums, c.cvae)
    calls = {t: (ifaces[t].function().to_json(), _torch_call(wrappers[t], ifaces[t])) for t in t_values}
    for k in range(1, len(t_values) + 1):
        chain = t_values[:k]
        _, tokens = dd_generate(model, torch.from_numpy(labels), FewStep(chain), pt.PARITY_SEED, PARITY_FIRST_SAMPLE,
                                decode=False)
        got = few_step.run_passes([calls[t] for t in chain], labels, noise)[-1]["tokens"]
        report.tokens(f"coreml wrapper (int32) vs dd_generate, t-list {','.join(map(str, chain))}: tokens", got,
                      tokens.numpy())
    ok, why = cm.can_predict()
    report.skipped.append(why if not ok else "Core ML prediction of DD passes is not compared yet (macOS)")
    return report


def _same_io(report: pt.ParityReport, what: str, declared: dict | None, want: dict) -> None:
    if declared is None:
        report.fail(f"{what}: present", "the package has no such function")
        return
    for kind in ("inputs", "outputs"):
        expected = [(t["name"], list(t["shape"]), t["dtype"]) if kind == "inputs" else t["name"] for t in want[kind]]
        actual = [(t["name"], t["shape"], t["dtype"]) if kind == "inputs" else t["name"] for t in declared[kind]]
        if expected != actual:
            report.fail(f"{what}: {kind}", f"package {actual} != manifest {expected}")
            return
    report.checks.append(pt.Check(f"{what}: package structure matches manifest", True))


def build_dd_coreml(model: DDModel, model_ref: str, out: Path, options: cm.CoremlOptions, t_values: tuple[int, ...],
                    command: str | None = None) -> dict:
    options.validate()
    check_coreml_options(options)
    model = export_ready(model)
    t0 = time.perf_counter()
    meta = {"evar.format": contract.FORMAT, "evar.model_ref": model_ref, "evar.rng": rng.RNG_NAME, "evar.family": "dd"}
    with atomic_dir(out) as tmp:
        ifaces, wrappers = _convert_passes(model, tmp, t_values, options, meta)
        diface = cm.export_decoder(decoder_model(model), tmp, options, meta)
        export_s = time.perf_counter() - t0
        common = {"format": "coreml", "external_data": None, "opset": None, "target": options.target,
                  "compute_units": options.compute_units, "simplified": None, "signature": None,
                  "scale_selection": None}
        graphs = {pass_role(t): {**common, "file": PACKAGE, "functions": [{**ifaces[t].function().to_json(),
                                                                              "name": function_name(t)}],
                                 "default_function": function_name(t),
                                 "notes": [(f"student pass given {t} scales; function {function_name(t)} of the "
                                            "multifunction package (weights stored once for every pass)")]}
                  for t in t_values}
        graphs[DECODER_GRAPH] = {**common, "file": f"{DECODER_GRAPH}.mlpackage",
                                 "functions": [diface.function().to_json()], "default_function": "main", "notes": []}
        report = coreml_parity(model, tmp, ifaces, wrappers, graphs[DECODER_GRAPH]["functions"][0])
        report.raise_if_failed(f"Core ML export of {model_ref}")
        manifest = manifest_body(model, model_ref, command, graphs, t_values, report, "coreml")
        manifest["batch"] = {"mode": "static", "size": options.batch, "cfg_doubled": False}
        manifest["precision"] = {"weights": options.precision, "compute": options.precision, "fp32_ops": []}
        contract.write(tmp, manifest)
    return {"export_seconds": export_s, "total_seconds": time.perf_counter() - t0, "parity": report}
