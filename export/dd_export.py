"""`evar-export onnx --model DD_DIR`: a Distilled Decoding student as one static graph per pass + the VQVAE decoder.

The passes exported are the t values of `--t-list` (default 0 and S // 2: one step, and the two-step run
`evar sample --steps 2` makes); any increasing t-list from 0 drawn from them runs. Parity, on labels, seed and
sample numbers other than the trace inputs, for every prefix of the t-list (0; 0,t1; …):
  1. the export-ready wrappers against `dd_generate` (what `evar sample --model DD_DIR` runs): tokens identical;
  2. each ONNX pass on the wrappers' inputs: tokens identical, vectors and f_hat within tolerance;
  3. the ONNX passes free-running, noise from `evar.contract.few_step` as the runtime draws it: the tokens of
     `dd_generate`, and the decoder graph's image within the image tolerance.
Everything is written inside `atomic_dir`: a breach raises one ParityError and leaves nothing behind.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from evar.export import onnx as ox
from evar.export import parity as pt
from evar.export.artifact import provenance
from evar.export.dd_graphs import PassInterface, StudentPass, decoder_model, export_ready, pass_role

from evar import contract, rng
from evar.contract import DECODER_GRAPH, few_step
from evar.dd.model import DDModel
from evar.dd.sampler import FewStep, dd_generate, plan
from evar.errors import EvarError
from evar.files import atomic_dir

PARITY_FIRST_SAMPLE = 5  # the parity batch is samples 5, 6, 7 of PARITY_SEED (the trace: samples 0, 1 of seed 0)


def export_t_list(model: DDModel, text: str | None) -> tuple[int, ...]:
    """--t-list at export (default: 0 and S // 2, the passes of one and two steps), checked against the scales."""
    S = model.config.var.num_scales
    return plan(S, None if text else 2, text, None).t_list


def check_onnx_options(options: ox.OnnxOptions) -> None:
    """The few-step graphs are exported at fp32 without VAR's decoding options (refused in one line)."""
    if options.precision != "fp32" or options.quantize != "none" or options.cfg_until_scale is not None:
        raise EvarError("a Distilled Decoding export is fp32 without --quantize or --cfg-until-scale (those options "
                        "change VAR's scale-by-scale decoder, which a DD student does not have)")


def routes_to_dd(model_ref: str, t_list: str | None, var_flags: list[str]) -> bool:
    """Whether `evar-export onnx|coreml` exports a DD student; the flags of the other kind are refused in one line,
    before anything is loaded or written. `var_flags`: VAR-only flags given on the command line."""
    from evar import zoo

    if zoo.kind_of(model_ref) != "dd":
        if t_list is not None:
            raise EvarError(f"--t-list goes with a Distilled Decoding model (evar dd train); '{model_ref}' is a VAR "
                            "generator")
        return False
    if var_flags:
        raise EvarError(f"{', '.join(var_flags)}: VAR export options; '{model_ref}' is a Distilled Decoding model "
                        "(its passes are exported with argmax tokens; choose them with --t-list)")
    return True


def export_command(model_ref: str, out: Path, t_list: str | None, var_ckpt, vae_ckpt, overwrite: bool,
                   bytes_per_param: float, build: Callable[[DDModel, tuple[int, ...]], dict]) -> dict:
    """The body of `evar-export onnx|coreml --model DD_DIR`: claim OUT, load, `build(model, t_values)` (export,
    check, write the manifest)."""
    from evar import zoo
    from evar.outputs import check_space, claim_output

    if var_ckpt is not None or vae_ckpt is not None:
        raise EvarError(f"--var-ckpt/--vae-ckpt go with --model official:dNN; '{model_ref}' carries its own weights")
    with claim_output(out, "dir", overwrite=overwrite, inputs=[model_ref]):
        model = zoo.load_family(model_ref, ("dd",))
        t_values = export_t_list(model, t_list)
        params = sum(p.numel() for p in model.student.parameters()) + sum(p.numel() for p in model.vqvae.parameters())
        check_space(out, int(2.5 * bytes_per_param * params * len(t_values)))
        return build(model, t_values)


def _export_pass(model: DDModel, iface: PassInterface, wrapper: StudentPass, tmp: Path, options: ox.OnnxOptions,
                 notes: list[str]) -> ox.OnnxGraph:
    fn = iface.function()
    c = model.config.var
    labels = torch.tensor([1 % c.num_classes, 2 % c.num_classes])
    noise = torch.from_numpy(few_step.sequence_noise(0, 0, 2, c.patch_nums, c.cvae))
    args: tuple = (labels, noise)
    if iface.t:  # real previous outputs: the trace then runs what a generation runs
        tokens, vectors, _ = StudentPass(model, 0)(labels, noise)
        args += (tokens, vectors)
    raw = tmp / f".{pass_role(iface.t)}.raw.onnx"
    ox._torch_export(wrapper, args, raw, [t.name for t in fn.inputs], [t.name for t in fn.outputs],
                     iface.dynamic_axes(), options.opset)
    return ox._postprocess(raw, tmp / f"{pass_role(iface.t)}.onnx", options, notes)


def _torch_call(wrapper: StudentPass, iface: PassInterface):
    fn = iface.function()

    @torch.no_grad()
    def call(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = wrapper(*(torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in fn.inputs))
        return {t.name: o.numpy() for t, o in zip(fn.outputs, outs)}

    return call


def _ort_call(session):
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(None, feeds)))


def dd_parity(model: DDModel, tmp: Path, t_values: tuple[int, ...], files: dict[int, str], decoder_file: str,
              wrappers: dict[int, StudentPass], batch: int = 3) -> pt.ParityReport:
    c = model.config.var
    report = pt.ParityReport()
    labels = pt.parity_labels(batch, c.num_classes)
    noise = few_step.sequence_noise(pt.PARITY_SEED, PARITY_FIRST_SAMPLE, batch, c.patch_nums, c.cvae)
    ifaces = {t: PassInterface(model, t) for t in t_values}
    fns = {t: ifaces[t].function().to_json() for t in t_values}
    torch_calls = {t: _torch_call(wrappers[t], ifaces[t]) for t in t_values}
    sessions = {t: ox.session(tmp / files[t]) for t in t_values}
    ort_calls = {t: _ort_call(sessions[t]) for t in t_values}
    dec = ox.session(tmp / decoder_file)
    for k in range(1, len(t_values) + 1):
        chain = t_values[:k]
        name = f"t-list {','.join(map(str, chain))}"
        images, tokens = dd_generate(model, torch.from_numpy(labels), FewStep(chain), pt.PARITY_SEED,
                                     PARITY_FIRST_SAMPLE)
        wrapped = few_step.run_passes([(fns[t], torch_calls[t]) for t in chain], labels, noise)
        report.tokens(f"wrapper vs dd_generate, {name}: tokens", wrapped[-1]["tokens"], tokens.numpy())
        # each ONNX pass on the wrapper's inputs (the last pass of this chain: the earlier ones were checked before)
        previous = wrapped[-2] if k > 1 else None
        values = {"labels": labels, "noise": noise}
        if previous is not None:
            values |= {"given_tokens": previous["tokens"], "given_vectors": previous["vectors"]}
        same = ort_calls[chain[-1]](contract.step_feeds(fns[chain[-1]]["inputs"], values, {}, lambda t: None))
        report.tokens(f"onnx pass t={chain[-1]} vs wrapper (same inputs): tokens", same["tokens"],
                      wrapped[-1]["tokens"])
        report.max_abs(f"onnx pass t={chain[-1]} vs wrapper (same inputs): vectors", same["vectors"],
                       wrapped[-1]["vectors"], pt.LOGITS_TOL * 10)
        report.max_abs(f"onnx pass t={chain[-1]} vs wrapper (same inputs): f_hat", same["f_hat"],
                       wrapped[-1]["f_hat"], pt.LOGITS_TOL * 10)
        free = few_step.run_passes([(fns[t], ort_calls[t]) for t in chain], labels, noise)
        report.tokens(f"onnx vs dd_generate (end to end), {name}: tokens", free[-1]["tokens"], tokens.numpy())
        image = dec.run(None, {"f_hat": free[-1]["f_hat"]})[0]
        report.max_abs(f"onnx vs dd_generate (end to end), {name}: image", image, images.numpy(), pt.IMAGE_TOL)
    return report


def manifest_body(model: DDModel, model_ref: str, command: str | None, graphs: dict[str, Any],
                  t_values: tuple[int, ...], report: pt.ParityReport, backend: str = "onnx") -> dict[str, Any]:
    c = model.config
    passes = [{"t": t, "given_tokens": PassInterface(model, t).given, "graph": pass_role(t)} for t in t_values]
    noise = {"rng": rng.RNG_NAME, "method": "box_muller", "input": "noise",
             "shape": ["batch", c.var.seq_len, c.var.cvae], "dtype": "float32", "stream": few_step.DESCRIPTION}
    return {"family": "dd", "backend": backend, "model": c.model.to_dict(), "patch_nums": list(c.var.patch_nums),
            "image_size": c.vqvae.image_size, "batch": {"mode": "dynamic", "size": None, "cfg_doubled": False},
            "graphs": graphs,
            "few_step": {"passes": passes, "default_t_list": [0], "continuous_from": c.continuous_from, "noise": noise,
                         "output": "tokens: argmax of the student's logits (no CFG, no top-k/top-p: the student "
                                   "learnt the teacher's guided, filtered tokens)"},
            "precision": {"weights": "fp32", "compute": "fp32", "fp32_ops": []},
            "compression": {"method": "none", "tool": None, "details": {}},
            "parity": report.to_json(), "provenance": provenance(model_ref, model.provenance, command)}


def build_dd_onnx(model: DDModel, model_ref: str, out: Path, options: ox.OnnxOptions, t_values: tuple[int, ...],
                  command: str | None = None) -> dict:
    options.validate()
    check_onnx_options(options)
    model = export_ready(model)
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        wrappers = {t: StudentPass(model, t).eval() for t in t_values}
        graphs, files = {}, {}
        for t in t_values:
            notes: list[str] = []
            iface = PassInterface(model, t)
            g = _export_pass(model, iface, wrappers[t], tmp, options, notes)
            notes.append(f"student pass given {t} scales ({iface.given} tokens as data); static shapes but the batch")
            graphs[pass_role(t)] = {**ox.graph_entry(g, [iface.function().to_json()], None, options.opset, notes),
                                    "scale_selection": None}
            files[t] = g.file
        dec_notes: list[str] = []
        dec, diface = ox.export_decoder(decoder_model(model), tmp, options, dec_notes)
        graphs[DECODER_GRAPH] = {**ox.graph_entry(dec, [diface.function().to_json()], None, options.opset, dec_notes),
                                 "scale_selection": None}
        export_s = time.perf_counter() - t0
        report = dd_parity(model, tmp, t_values, files, dec.file, wrappers)
        report.raise_if_failed(f"ONNX export of {model_ref}")
        contract.write(tmp, manifest_body(model, model_ref, command, graphs, t_values, report))
    return {"export_seconds": export_s, "total_seconds": time.perf_counter() - t0, "parity": report}
