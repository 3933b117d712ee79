"""`evar-export coreml --target ane`: Core ML whose transformer and decoder functions the Neural Engine can run.

Three packages (the wrappers are export/ane.py):
    decoder_step.mlpackage   one fp16 function per scale in the ANE layout: (class_onehot, f_hat) → raw
                             logits (2B, pn², V); the KV cache is state padded to a multiple of 32
    fhat_update.mlpackage    one fp32 CPU function per scale: (f_hat, idx) → next f_hat
    vqvae_decoder.mlpackage  fp16, GroupNorm without fp16 overflow
and the host samples in between (CFG, top-k/top-p, inverse CDF: `evar.contract.host_sampling`), as the
manifest's `sampling.where == "host"` tells every runtime.

Parity without a Mac: the fp32 wrappers driven by the host loop against `generate` (same tokens, logits,
image), then the same wrappers in fp16 on the CPU scale by scale on the fp32 run's inputs, plus the packages'
declared structure. fp16 is judged by its logits and, per scale, by the best coupling's token agreement (mean
1 − TV of the guided logits' distributions, export/quantize.py's measure), not by counting equal draws: on
builtin:digits' flat finest scale fp16 moves inverse-CDF boundaries enough to flip 5 of 64 draws at the parity
seed (92%) while 1 − TV stays above 99%. With `--compress` the same protocol runs the stored weights
(export/coreml_gate.py). `--target iOS17` of this layout is not offered: its cache is state.
"""
from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evar import contract, rng
from evar.checkpoints import Model
from evar.config import ModelConfig
from evar.contract import DECODER_GRAPH, FHAT_GRAPH, FORMAT, STEP_GRAPH, host_sampling
from evar.files import atomic_dir
from evar.export import coreml as cm
from evar.export import coreml_gate
from evar.export.coreml_gate import GATED, CompressGate
from evar.export import parity as pt
from evar.export.ane import ALIGN, AneDecoder, AneStep, FhatUpdate, aligned, ane_steps
from evar.export.interface import CFG_BATCH, FunctionSpec, TensorSpec
from evar.export.quantize import token_agreement

ANE_UNITS, CPU_UNITS = "cpu_and_ne", "cpu_only"


@dataclass(frozen=True)
class AneInterface:
    """The declared functions of an ANE artifact (static batch)."""

    config: ModelConfig
    batch: int
    pad_to: int = ALIGN
    # the dtype of the step functions' inputs and logits: what the fp16 artifact declares, or float32 for the
    # fp32 parity run (feeding it f_hat rounded to fp16 would make "the layout at fp32" a mixed-precision run)
    io_dtype: str = "float16"

    @property
    def var(self):
        return self.config.var

    def at_fp32(self) -> "AneInterface":
        """The same functions fed and read in float32: how parity runs the fp32 wrappers."""
        return replace(self, io_dtype="float32")

    @property
    def padded_length(self) -> int:
        return aligned(self.var.seq_len, self.pad_to)

    def _f_hat(self, dtype: str, name: str = "f_hat", doc: str = "") -> TensorSpec:
        c, H = self.var, self.var.patch_nums[-1]
        return TensorSpec(name, (self.batch, c.cvae, H, H), dtype, "f_hat", doc=doc or None)

    def states(self) -> list[TensorSpec]:
        c, B2, L = self.var, 2 * self.batch, self.padded_length
        out = []
        for i, heads in enumerate(c.num_heads):
            inner = aligned(heads * c.head_dim, self.pad_to)
            out.append(TensorSpec(f"key_cache_{i}", (B2, L, 1, inner), "float16", "key_cache", layer=i))
            out.append(TensorSpec(f"value_cache_{i}", (B2, inner, 1, L), "float16", "value_cache", layer=i))
        return out

    def step(self, si: int) -> FunctionSpec:
        c = self.var
        pn, (begin, end) = c.patch_nums[si], c.scale_ranges()[si]
        ins = (TensorSpec("class_onehot", (2 * self.batch, c.num_classes + 1), self.io_dtype, "class_onehot",
                          doc=f"rows [0, batch): one-hot of the labels; rows [batch, 2*batch): of class {c.num_classes} (unconditional)"),
               self._f_hat(self.io_dtype, doc="the running f_hat (fhat_update's output); zeros at scale 0"))
        outs = (TensorSpec("logits", (2 * self.batch, pn * pn, c.vocab_size), self.io_dtype, "raw_logits",
                           doc="before guidance: conditional rows first; the host applies CFG, top-k/top-p and draws"),)
        return FunctionSpec(f"scale_{si}", ins, outs, tuple(self.states()), si, pn, (begin, end))

    def update(self, si: int) -> FunctionSpec:
        c = self.var
        pn, rng_ = c.patch_nums[si], c.scale_ranges()[si]
        ins = (self._f_hat("float32"), TensorSpec("idx", (self.batch, pn * pn), "int32", "idx", doc="host-sampled tokens, row-major"))
        outs = (self._f_hat("float32", "next_f_hat", "f_hat + Phi_si(upsample(embed(idx)))"),)
        return FunctionSpec(f"scale_{si}", ins, outs, (), si, pn, rng_)

    def decoder(self) -> FunctionSpec:
        v = self.config.vqvae
        H, S = v.v_patch_nums[-1], v.image_size
        ins = (TensorSpec("f_hat", (self.batch, v.z_channels, H, H), "float16", "f_hat", doc="next_f_hat of the last scale"),)
        outs = (TensorSpec("image", (self.batch, 3, S, S), "float16", "image", range=(-1.0, 1.0),
                           doc="RGB, channels first; uint8 = round((x + 1) * 127.5)"),)
        return FunctionSpec("main", ins, outs)

    def kv_json(self) -> dict[str, Any]:
        c = self.var
        return {"mode": "state", "layout": "per_layer", "dims": [CFG_BATCH, "sequence", "1", "channels"],
                "value_dims": [CFG_BATCH, "channels", "1", "sequence"], "dtype": "float16",
                "batch": "2*batch (rows [0, B) conditional, [B, 2B) unconditional)", "max_length": c.seq_len,
                "padded_length": self.padded_length, "head_dim": c.head_dim,
                "initial": "make a fresh state per image batch; scale si writes [begin, end) and masks every position >= end; "
                           "channels = heads*head_dim of the layer rounded up to a multiple of 32 (the pad stays zero)",
                "layers": [{"index": i, "heads": h, "state_key": f"key_cache_{i}", "state_value": f"value_cache_{i}"}
                           for i, h in enumerate(c.num_heads)]}


# ---------------------------------------------------------------- conversion
def _convert(module: torch.nn.Module, fn: FunctionSpec, precision: str, units: str, compress: str):
    ct = cm._ct()
    args = tuple(torch.zeros(tuple(int(d) for d in t.shape), dtype=torch.int32 if t.dtype == "int32" else torch.float32)
                 for t in fn.inputs)
    try:
        with torch.no_grad(), cm._quiet():
            program = torch.export.export(module, args).run_decompositions({})
    except Exception as err:  # torch.export raises many types; all mean "this module did not trace"
        raise cm.CoremlExportError(f"torch.export failed for {fn.name}: {str(err).splitlines()[0]}") from err
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(int(d) for d in t.shape), dtype=np.float16), name=t.name)
              for t in fn.states] or None
    with cm._quiet():
        pipeline = keep_tables_uncompressed(cm.pass_pipeline(ct, compress), module)
    try:
        with cm._quiet():
            return ct.convert(program, inputs=cm._tensor_types(ct, fn.inputs),
                              outputs=[ct.TensorType(name=t.name, dtype=cm.NP_OF[t.dtype]) for t in fn.outputs],
                              states=states, minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram",
                              compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                              compute_units=getattr(ct.ComputeUnit, cm.COMPUTE_UNITS[units]), pass_pipeline=pipeline,
                              skip_model_load=True)
    except Exception as err:  # the converter raises ValueError/NotImplementedError/KeyError/RuntimeError
        raise cm.CoremlExportError(f"ct.convert failed for {fn.name}: {type(err).__name__}: {str(err).splitlines()[0]}") from err


COMPRESSION_PASSES = ("compression::palettize_weights", "compression::linear_quantize_weights", "compression::prune_weights")


def is_class_table(name: str) -> bool:
    """A buffer of `class_tables` (export/ane.py names them `*_table`)."""
    return name.endswith("_table")


def keep_tables_uncompressed(pipeline, module: torch.nn.Module):
    """Leave the class tables (`class_tables`) in fp16. A table entry is an AdaLN gate, 1 + scale or shift
    itself: one 64-entry palette over all of them would move each by up to half a palette step, where
    compressing the linear they replace only perturbed its inputs' weighted sum. The converter names a
    buffer's constant after its path (dots as underscores, `b_` first)."""
    names = [f"b_{n.replace('.', '_')}" for n, _ in module.named_buffers() if is_class_table(n)]
    for name in COMPRESSION_PASSES:
        for option in pipeline.get_options(name) or []:
            if option.option_name == "config":
                for const in names:
                    option.option_val.set_op_name(const, None)
    return pipeline


def _save_functions(modules: list[torch.nn.Module], specs: list[FunctionSpec], path: Path, precision: str, units: str,
                    compress: str, metadata: dict[str, str]) -> None:
    """One function per scale merged into one package (identical weight blobs stored once)."""
    ct = cm._ct()
    with tempfile.TemporaryDirectory(prefix="evar-ane-", dir=path.parent) as tmp:
        desc = ct.utils.MultiFunctionDescriptor()
        for module, fn in zip(modules, specs):
            mlmodel = _convert(module, fn, precision, units, compress)
            cm._metadata(mlmodel, metadata)
            one = Path(tmp) / f"{fn.name}.mlpackage"
            with cm._quiet():
                mlmodel.save(str(one))
            desc.add_function(str(one), src_function_name="main", target_function_name=fn.name)
            del mlmodel
        desc.default_function_name = specs[0].name
        with cm._quiet():
            ct.utils.save_multifunction(desc, str(path))


def _save_one(module: torch.nn.Module, fn: FunctionSpec, path: Path, precision: str, units: str, compress: str,
              metadata: dict[str, str]) -> None:
    mlmodel = _convert(module, fn, precision, units, compress)
    cm._metadata(mlmodel, metadata)
    with cm._quiet():
        mlmodel.save(str(path))


# ---------------------------------------------------------------- parity (Linux: the wrappers)
def _reset(steps: list[AneStep]) -> None:
    pt.reset_state(steps)


def _torch_call(modules: list[torch.nn.Module], specs: list[FunctionSpec], dtype: torch.dtype):
    @torch.no_grad()
    def call(si: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fn = specs[si]
        args = [torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in fn.inputs]
        args = [a.to(dtype) if a.is_floating_point() else a for a in args]
        out = modules[si](*args)
        return {fn.outputs[0].name: out.float().numpy()}
    return call


def half_steps(steps: list[AneStep]) -> list[AneStep]:
    """The same steps in fp16 on one fp16 copy of the weights and caches (what the ANE computes, run on the CPU)."""
    core = copy.deepcopy(steps[0].core).half()
    core.caches = [(k.half(), v.half()) for k, v in core.caches]
    return [AneStep(core, s.si).half().eval() for s in steps]


@dataclass
class HostRun:
    onehot: np.ndarray
    f_hats: list[np.ndarray]  # the f_hat each scale was fed
    tokens: list[np.ndarray]
    logits: list[np.ndarray]  # after guidance
    f_hat: np.ndarray  # after the last scale


def loop_manifest(iface: AneInterface) -> dict[str, Any]:
    """The manifest fields `HostSampledLoop` reads (a complete manifest has them too)."""
    c = iface.config
    return {"model": c.to_dict(), "patch_nums": list(c.var.patch_nums),
            "graphs": {STEP_GRAPH: {"functions": [iface.step(si).to_json() for si in range(c.var.num_scales)]},
                       FHAT_GRAPH: {"functions": [iface.update(si).to_json() for si in range(c.var.num_scales)]}}}


def host_run(manifest: dict[str, Any], steps, updates, labels: np.ndarray, seed: int, cfg: float, top_k: int,
             top_p: float, step_specs, update_specs, teacher: HostRun | None = None, dtype=torch.float32,
             reset: bool = True) -> HostRun:
    """The runtime's loop (`HostSampledLoop`) over PyTorch wrappers; with `teacher`, every scale is fed the
    teacher's f_hat (scale by scale on the same inputs). `reset=False` keeps whatever the caches hold."""
    if reset:
        _reset(steps)
    loop = host_sampling.HostSampledLoop(manifest, _torch_call(steps, step_specs, dtype),
                                         _torch_call(updates, update_specs, torch.float32))
    loop.begin(labels, cfg, top_k, top_p)
    run = HostRun(loop.onehot, [], [], [], loop.f_hat)
    for si, pn in enumerate(manifest["patch_nums"]):
        if teacher is not None:
            loop.f_hat = teacher.f_hats[si]
        run.f_hats.append(loop.f_hat)
        out = loop.scale(si, rng.scale_uniforms(seed, si, len(labels), pn * pn))
        run.tokens.append(out.idx)
        run.logits.append(out.logits)
    run.f_hat = loop.f_hat
    return run


def ane_parity(model: Model, manifest: dict[str, Any], iface: AneInterface, steps: list[AneStep], top_k: int,
               top_p: float, report: pt.ParityReport, compress: str = "none", gate: CompressGate | None = None) -> None:
    c = iface.var
    labels = pt.parity_labels(iface.batch, c.num_classes)
    ref = pt.reference(model, labels, pt.PARITY_SEED, pt.PARITY_CFG, top_k, top_p)
    updates = [FhatUpdate(model, si).eval() for si in range(c.num_scales)]
    step_specs = [iface.step(si) for si in range(c.num_scales)]
    update_specs = [iface.update(si) for si in range(c.num_scales)]
    iface32 = iface.at_fp32()
    run = host_run(loop_manifest(iface32), steps, updates, labels, pt.PARITY_SEED, pt.PARITY_CFG, top_k, top_p,
                   [iface32.step(si) for si in range(c.num_scales)], update_specs)
    label = "ane wrapper fp32 + host sampling vs generate"
    for si in range(c.num_scales):
        report.tokens(f"{label}: tokens scale {si}", run.tokens[si], ref.tokens[si])
        report.max_abs(f"{label}: logits scale {si}", run.logits[si], ref.logits[si], pt.LOGITS_TOL, relative=True)
    report.max_abs(f"{label}: f_hat", run.f_hat, ref.f_hat, pt.LOGITS_TOL)
    decoder = AneDecoder(model).eval()
    with torch.no_grad():
        image = decoder(torch.from_numpy(ref.f_hat)).numpy()
        image16 = decoder.half()(torch.from_numpy(ref.f_hat).half()).float().numpy()
    report.max_abs("ane decoder fp32: image from the reference f_hat", image, ref.image, pt.IMAGE_TOL)
    report.max_abs("ane decoder fp16 (CPU): image from the reference f_hat", image16, ref.image, pt.FP16_IMAGE_TOL)
    run16 = host_run(manifest, half_steps(steps), updates, labels, pt.PARITY_SEED, pt.PARITY_CFG, top_k, top_p,
                     step_specs, update_specs, teacher=run, dtype=torch.float16)
    for si in range(c.num_scales):
        report.max_abs(f"ane wrapper fp16 (CPU) vs fp32, same inputs: logits scale {si}", run16.logits[si],
                       run.logits[si], pt.FP16_LOGITS_TOL, relative=True)
        # the best coupling's agreement, not a count of equal draws (see fp16 in the module doc)
        agree = token_agreement(run.logits[si], run16.logits[si])
        report.checks.append(pt.Check(f"ane wrapper fp16 (CPU) vs fp32, same inputs: token agreement (1 - TV) scale {si}",
                                      bool(agree >= pt.FP16_TOKEN_AGREEMENT), "token_agreement", agree,
                                      pt.FP16_TOKEN_AGREEMENT))
    if compress in GATED:
        compressed_parity(model, manifest, steps, updates, run, labels, ref.f_hat, image, top_k, top_p, step_specs,
                          update_specs, compress, gate or CompressGate(), report)
    elif note := coreml_gate.ungated_note(compress):
        report.skipped.append(note)


def compressed_parity(model: Model, manifest: dict[str, Any], steps: list[AneStep], updates, run: HostRun,
                      labels: np.ndarray, f_hat: np.ndarray, image: np.ndarray, top_k: int, top_p: float, step_specs,
                      update_specs, method: str, gate: CompressGate, report: pt.ParityReport) -> None:
    """The `--compress` gate (export/coreml_gate.py): the fp16 wrappers carrying the stored weights, scale by
    scale on the fp32 run's f_hat like the fp16 check, and the compressed decoder on the reference f_hat."""
    from evar.export import coreml_emulate as ce  # it imports this module

    runc = host_run(manifest, ce.compressed_half_steps(steps, method), updates, labels, pt.PARITY_SEED,
                    pt.PARITY_CFG, top_k, top_p, step_specs, update_specs, teacher=run, dtype=torch.float16)
    report.checks.extend(coreml_gate.step_checks(method, run.logits, runc.logits, gate))
    decoder = ce.compressed_half_decoder(AneDecoder(model).eval(), method)
    with torch.no_grad():
        imagec = decoder(torch.from_numpy(f_hat).half()).float().numpy()
    report.checks.append(coreml_gate.decoder_check(method, image, imagec, gate))


# ---------------------------------------------------------------- the artifact
def sampling_json(iface: AneInterface, top_k: int, top_p: float, cfg_default: float) -> dict[str, Any]:
    c = iface.var
    return {"rng": rng.RNG_NAME, "method": "inverse_cdf", "in_graph": False, "where": "host", "top_k": top_k,
            "top_p": top_p, "filters": "host",
            "cfg": {"input": "", "ramp": "on the host: t = cfg * si / (num_scales - 1); logits = (1 + t) * raw[:B] - t * raw[B:]",
                    "default": cfg_default, "unconditional_label": c.num_classes},
            "uniforms": {"input": "", "shape": ["batch", "pn*pn"], "dtype": "float32",
                         "stream": "on the host: evar.rng.scale_uniforms(seed, si, batch, pn*pn, first_sample): token j of "
                                   "sample b takes u[(first_sample + b) * pn*pn + j] of stream si"}}


def ane_manifest(iface: AneInterface, options: cm.CoremlOptions, base: dict[str, Any], cfg_default: float) -> dict[str, Any]:
    """The manifest of an ANE artifact (without parity and files): three graphs, host sampling."""
    n = iface.var.num_scales
    step_specs, update_specs = [iface.step(si) for si in range(n)], [iface.update(si) for si in range(n)]
    common = {"format": "coreml", "external_data": None, "opset": None, "target": "iOS18", "simplified": None,
              "signature": None, "scale_selection": "function"}
    graphs = {
        STEP_GRAPH: {**common, "file": f"{STEP_GRAPH}.mlpackage", "compute_units": ANE_UNITS,
                     "functions": [f.to_json() for f in step_specs], "default_function": step_specs[0].name,
                     "notes": [f"ANE layout (N, C, 1, S), fp16 throughout; KV state padded to {iface.padded_length} "
                               f"(a multiple of {iface.pad_to}) and masked past each scale's end",
                               "outputs raw logits: sampling runs on the host (sampling.where)"]},
        FHAT_GRAPH: {**common, "file": f"{FHAT_GRAPH}.mlpackage", "compute_units": CPU_UNITS,
                     "functions": [f.to_json() for f in update_specs], "default_function": update_specs[0].name,
                     "notes": ["fp32 on the CPU: an embedding gather, the bicubic upsample and Phi"]},
        DECODER_GRAPH: {**common, "file": f"{DECODER_GRAPH}.mlpackage", "compute_units": ANE_UNITS,
                        "functions": [iface.decoder().to_json()], "default_function": "main", "scale_selection": None,
                        "notes": ["fp16; GroupNorm divides by each group's largest magnitude before squaring"]},
    }
    compression = {"method": options.compress,
                   "tool": None if options.compress == "none" else "coremltools.optimize.coreml",
                   "details": {"weight_threshold": cm.WEIGHT_THRESHOLD, "graphs": [STEP_GRAPH, DECODER_GRAPH]}
                   if options.compress != "none" else {}}
    if options.compress in GATED:
        compression["details"]["gate"] = options.gate.to_json(options.compress)
    weights = {"none": "fp16", "palettize6": "palettized", "palettize4": "palettized", "int8": "int8", "2:4": "sparse",
               "2:4+palettize6": "sparse-palettized", "2:4+palettize4": "sparse-palettized"}[options.compress]
    return {**base, "kv_cache": iface.kv_json(), "graphs": graphs,
            "sampling": sampling_json(iface, options.top_k, options.top_p, cfg_default),
            "precision": {"weights": weights, "compute": "fp16",
                          "fp32_ops": ["fhat_update (CPU); sampling on the host in float32"]},
            "compression": compression}


def build_ane(model: Model, model_ref: str, out: Path, options: cm.CoremlOptions, base: dict[str, Any],
              cfg_default: float, command_meta: dict[str, str]) -> dict:
    """Export, check and write an ANE artifact into OUT (atomically). `base` = the artifact's common manifest fields."""
    t0 = time.perf_counter()
    c = model.config.var
    iface = AneInterface(model.config, options.batch)
    with atomic_dir(out) as tmp:
        steps = ane_steps(model, options.batch)
        step_specs = [iface.step(si) for si in range(c.num_scales)]
        update_specs = [iface.update(si) for si in range(c.num_scales)]
        _save_functions(steps, step_specs, tmp / f"{STEP_GRAPH}.mlpackage", "fp16", ANE_UNITS, options.compress, command_meta)
        _save_functions([FhatUpdate(model, si).eval() for si in range(c.num_scales)], update_specs,
                        tmp / f"{FHAT_GRAPH}.mlpackage", "fp32", CPU_UNITS, "none", command_meta)
        _save_one(AneDecoder(model).eval(), iface.decoder(), tmp / f"{DECODER_GRAPH}.mlpackage", "fp16", ANE_UNITS,
                  options.compress, command_meta)
        export_s = time.perf_counter() - t0
        manifest = ane_manifest(iface, options, base, cfg_default)
        graphs = manifest["graphs"]
        report = pt.ParityReport()
        for role, graph in graphs.items():
            check_structure(report, tmp / graph["file"], graph["functions"], role)
        ane_parity(model, {**manifest, "format": FORMAT}, iface, steps, options.top_k, options.top_p, report,
                   options.compress, options.gate)
        ok, why = cm.can_predict()
        if not ok:
            report.skipped.append(why)
        coreml_gate.raise_if_failed(report, f"Core ML ANE export of {model_ref}", options.compress)
        contract.write(tmp, {**manifest, "parity": report.to_json()})
    return {"export_seconds": export_s, "total_seconds": time.perf_counter() - t0, "parity": report}


def check_structure(report: pt.ParityReport, package: Path, functions: list[dict[str, Any]], role: str) -> None:
    from evar.export.artifact import check_package_structure

    check_package_structure(report, package, functions, role)
