"""Scale split in an exported artifact (the CoDe idea): `evar-export onnx --model SMALL --early-model BIG --split-scale N`.

The early (dense) model generates scales < N with its own step graph (`decoder_step_early`); at scale N the
compressed model's `prefill` graph builds its KV cache from the tokens drawn so far in one block-causal pass
(`evar.models.decoding.prefill`: labels and the (B, T) tokens of scales < N in, every layer's present key/value
out, 2B rows), and the compressed model's ordinary step graph (`decoder_step`) runs scales >= N on that cache.
The running f_hat crosses over unchanged: both models share one tokenizer (refused otherwise). Everything runs in
fp32 and is checked against `generate(..., early=, split_scale=N)`: tokens identical, logits and image within the
fp32 tolerances. CFG trimming composes when it starts at or after the split (the unguided graph is the
compressed model's); `--quantize int8` quantizes the compressed model's step graphs only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from evar.checkpoints import Model
from evar.contract import EARLY_STEP_GRAPH, PREFILL_GRAPH, STEP_GRAPH, UNGUIDED_STEP_GRAPH
from evar.contract.recipe import Recipe
from evar.errors import EvarError
from evar.export import onnx as ox
from evar.export import parity as pt
from evar.export.graphs import DynamicStep
from evar.export.interface import BATCH, CFG_BATCH, FunctionSpec, StepInterface, TensorSpec
from evar.models.decoding import cfg_labels, check_split_scale, generate, prefill
from evar.models.sampling import apply_cfg, cfg_ratio


def check_shared_tokenizer(early: Model, late: Model) -> None:
    """The early model's tokens must mean what the compressed model's mean: same scales, classes and token side
    of the tokenizer (codebook and the Phi convs that build f_hat; a retrained tokenizer of the same shape has
    other codebook vectors). The decoder may differ: the compressed model's decoder draws the image, so a
    pruned decoder (`evar prune-decoder`) composes with a split."""
    a, b = early.config, late.config
    token_side = dataclasses.replace(a.vqvae, decoder_widths=None) == dataclasses.replace(b.vqvae, decoder_widths=None)
    ea, la = early.vqvae.state_dict(), late.vqvae.state_dict()
    keys = [k for k in ea if k.startswith(("quantize.embedding.", "quantize.quant_resi."))]
    same = token_side and all(k in la and torch.equal(ea[k], la[k]) for k in keys)
    if not same or a.var.patch_nums != b.var.patch_nums or a.var.num_classes != b.var.num_classes:
        raise EvarError("--early-model does not share the model's tokenizer, scales and classes: a scale split "
                        "needs two models of one tokenizer (e.g. a model and its pruned copy)")


def check_plan(late: Model, early: Model | None, split_scale: int | None, cfg_until_scale: int | None) -> None:
    if (early is None) != (split_scale is None):
        raise EvarError("a scale split needs both --early-model and --split-scale")
    if split_scale is None:
        return
    check_split_scale(split_scale, late.config.var.num_scales)
    check_shared_tokenizer(early, late)
    if cfg_until_scale is not None and cfg_until_scale < split_scale:
        raise EvarError(f"--cfg-until-scale {cfg_until_scale} is before --split-scale {split_scale}: trimming "
                        "applies to the compressed model, so it must start at or after the split")


# ---------------------------------------------------------------- the prefill graph
def prefill_length(late: Model, n: int) -> int:
    return late.config.var.scale_ranges()[n][0]


class PrefillGraph(nn.Module):
    """(labels (B,), tokens (B, T) of scales < n) → every layer's (key, value) (2B, heads, T, head_dim)."""

    def __init__(self, model: Model, n: int):
        super().__init__()
        c = model.config.var
        self.var, self.vqvae, self.num_classes = model.var, model.vqvae, c.num_classes
        self.sizes = [pn * pn for pn in c.patch_nums[:n]]

    def forward(self, labels: Tensor, tokens: Tensor):
        cond_BD = self.var.class_emb(cfg_labels(labels, self.num_classes))
        presents = prefill(self.var, self.vqvae, cond_BD, list(tokens.split(self.sizes, 1)))
        return tuple(t for kv in presents for t in kv)


def prefill_function(late_iface: StepInterface, n: int) -> FunctionSpec:
    T = late_iface.var.scale_ranges()[n][0]
    ins = (TensorSpec("labels", (BATCH,), "int64", "labels", doc="class ids"),
           TensorSpec("tokens", (BATCH, T), "int64", "idx",
                      doc=f"the tokens of scales 0 … {n - 1} (the early graph's idx outputs), concatenated"))
    outs = tuple(late_iface.kv_tensor(i, k, T) for i in range(late_iface.var.depth)
                 for k in ("present_key", "present_value"))
    return FunctionSpec("main", ins, outs, token_range=(0, T))


def export_prefill(late: Model, n: int, out: Path, options: ox.OnnxOptions, notes: list[str]) -> ox.OnnxGraph:
    fn = prefill_function(StepInterface(late.config, "onnx"), n)
    rs = np.random.default_rng(0)
    args = (torch.tensor([1, 2]), torch.from_numpy(rs.integers(0, late.config.var.vocab_size, (2, fn.inputs[1].shape[1]))))
    axes = {"labels": {0: BATCH}, "tokens": {0: BATCH}, **{t.name: {0: CFG_BATCH} for t in fn.outputs}}
    raw = out / f".{PREFILL_GRAPH}.raw.onnx"
    ox._torch_export(PrefillGraph(late, n).eval(), args, raw, [t.name for t in fn.inputs],
                     [t.name for t in fn.outputs], axes, options.opset)
    return ox._postprocess(raw, out / f"{PREFILL_GRAPH}.onnx", options, notes)


# ---------------------------------------------------------------- driving the split through the interfaces
@dataclass(frozen=True)
class SplitPipeline:
    """Early graph for scales < n, the prefill at n, the compressed model's graph from n (unguided from `trim`)."""

    early: StepInterface
    late: StepInterface
    unguided: StepInterface | None
    n: int
    trim: int | None

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.late.var.num_scales, self.n, self.trim)

    def iface(self, role: str) -> StepInterface:
        return {EARLY_STEP_GRAPH: self.early, STEP_GRAPH: self.late, UNGUIDED_STEP_GRAPH: self.unguided}[role]

    def drive(self, steps: dict[str, pt.StepFn], labels: np.ndarray, seed: int, cfg: float,
              teacher: pt.Run | None = None) -> pt.Run:
        c = self.late.var
        B = len(labels)
        f_hat = np.zeros((B, c.cvae, c.patch_nums[-1], c.patch_nums[-1]), np.float32)
        kv: dict[str, np.ndarray] = {}
        run = pt.Run([], [])
        recipe = self.recipe
        for si in range(c.num_scales):
            role = recipe.role(si)
            iface = self.iface(role)
            if recipe.prefills_at(si):  # teacher forced too: a cache kept as Core ML state is built only by the prefill
                tokens = np.concatenate([o["idx"] for o in (teacher or run).outputs[:si]], 1).astype(np.int64)
                kv = self.prefill_kv(steps[PREFILL_GRAPH](si, {"labels": labels.astype(np.int64), "tokens": tokens}))
            if teacher is None and recipe.trims_at(si):
                kv = {name: value[:B] for name, value in kv.items()}  # the conditional rows' cache
            feeds = teacher.inputs[si] if teacher else pt.scale_feeds(iface, si, labels, f_hat, seed, cfg, kv)
            out = steps[role](si, feeds)
            run.inputs.append(feeds)
            run.outputs.append(out)
            f_hat, kv = out["next_f_hat"], pt.next_kv(iface, si, out)
        return run

    def prefill_kv(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.late.kv_mode != "io":  # the prefill wrote the state itself
            return {}
        kv = {}
        for i in range(self.late.var.depth):
            for kind in ("key", "value"):
                kv[self.late.kv_tensor(i, f"past_{kind}", 0).name] = outputs[self.late.kv_tensor(i, f"present_{kind}", 0).name]
        return kv


def pipeline(early: Model, late: Model, n: int, trim: int | None) -> SplitPipeline:
    return SplitPipeline(StepInterface(early.config, "onnx"), StepInterface(late.config, "onnx"),
                         StepInterface(late.config, "onnx", guided=False) if trim is not None else None, n, trim)


@torch.no_grad()
def reference(early: Model, late: Model, labels: np.ndarray, seed: int, cfg: float, top_k: int, top_p: float,
              n: int, trim: int | None) -> pt.Reference:
    """`generate` with the scale split; logits as the graphs output them (guided where guidance ran)."""
    S, B = late.config.var.num_scales, len(labels)
    gen = generate(late.var, late.vqvae, torch.from_numpy(labels.astype(np.int64)), guidance=cfg, top_k=top_k,
                   top_p=top_p, seed=seed, keep_logits=True, cfg_until_scale=trim, early=early.var, split_scale=n)
    logits = [apply_cfg(lg[:B], lg[B:], cfg_ratio(cfg, si, S)).numpy() if len(lg) == 2 * B else lg.numpy()
              for si, lg in enumerate(gen.scale_logits)]
    f_hat = late.vqvae.idx_to_fhat(gen.tokens)
    return pt.Reference(labels, [t.numpy() for t in gen.tokens], logits, f_hat.numpy(), gen.images.numpy())


def _torch_prefill(module: PrefillGraph, fn: FunctionSpec) -> pt.StepFn:
    @torch.no_grad()
    def call(si: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = module(torch.from_numpy(feeds["labels"]), torch.from_numpy(feeds["tokens"]))
        return {t.name: o.numpy() for t, o in zip(fn.outputs, outs)}

    return call


def split_parity(report: pt.ParityReport, early: Model, late: Model, root: Path, files: dict[str, str], top_k: int,
                 top_p: float, n: int, trim: int | None, batch: int = 3) -> None:
    """Wrappers and ONNX graphs, free-running through the split, against `generate(early=, split_scale=n)`."""
    pipe = pipeline(early, late, n, trim)
    labels = pt.parity_labels(batch, late.config.var.num_classes)
    ref = reference(early, late, labels, pt.PARITY_SEED, pt.PARITY_CFG, top_k, top_p, n, trim)
    fn = prefill_function(pipe.late, n)
    wrappers = {EARLY_STEP_GRAPH: pt.torch_step(DynamicStep(early, top_k=top_k, top_p=top_p).eval(), pipe.early),
                STEP_GRAPH: pt.torch_step(DynamicStep(late, top_k=top_k, top_p=top_p).eval(), pipe.late),
                PREFILL_GRAPH: _torch_prefill(PrefillGraph(late, n).eval(), fn)}
    if trim is not None:
        wrappers[UNGUIDED_STEP_GRAPH] = pt.torch_step(DynamicStep(late, top_k=top_k, top_p=top_p, guided=False).eval(),
                                                      pipe.unguided)
    label = f"split at {n}" + (f", cfg trimmed at {trim}" if trim is not None else "")
    expected = pipe.drive(wrappers, labels, pt.PARITY_SEED, pt.PARITY_CFG)
    pt.check_against_reference(report, f"{label}: wrappers vs generate", ref, expected, pt.LOGITS_TOL, None,
                               pt.IMAGE_TOL, sampling=(top_k, top_p))
    steps = {role: pt.session_step(ox.session(root / f)) for role, f in files.items() if role in wrappers}
    dec = ox.session(root / files["decoder"])
    got = pipe.drive(steps, labels, pt.PARITY_SEED, pt.PARITY_CFG)
    pt.check_against_reference(report, f"{label}: onnx vs generate (end to end)", ref, got, pt.LOGITS_TOL,
                               lambda f: dec.run(None, {"f_hat": f.astype(np.float32)})[0], pt.IMAGE_TOL,
                               sampling=(top_k, top_p))



def gate_driver(early: Model, late: Model, root: Path, n: int, trim: int | None):
    """drive(step_fns, labels, seed, teacher) for the int8 gate: the quantized graphs are the compressed model's
    (decoder_step, then decoder_step_unguided); the early graph and the prefill stay fp32."""
    pipe = pipeline(early, late, n, trim)
    fixed = {EARLY_STEP_GRAPH: pt.session_step(ox.session(root / f"{EARLY_STEP_GRAPH}.onnx")),
             PREFILL_GRAPH: pt.session_step(ox.session(root / f"{PREFILL_GRAPH}.onnx"))}

    def drive(fns, labels, seed, teacher):
        roles = dict(zip((STEP_GRAPH, UNGUIDED_STEP_GRAPH), fns))
        return pipe.drive({**fixed, **roles}, labels, seed, pt.PARITY_CFG, teacher=teacher)

    return drive


# ---------------------------------------------------------------- the manifest
def manifest_parts(early: Model, early_ref: str, late: Model, n: int, early_graph: ox.OnnxGraph,
                   prefill_graph: ox.OnnxGraph, opset: int, early_notes: list[str],
                   prefill_notes: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(graph entries by role, the `generation` fields) of a split artifact."""
    eiface = StepInterface(early.config, "onnx")
    ins, outs = eiface.signature()
    early_notes.append(f"scale split: the early model ({early_ref}) runs scales 0 … {n - 1} with this graph "
                       "(its own KV cache); then the prefill graph builds the compressed model's cache")
    prefill_notes.append(f"scale split: the compressed model's KV cache for scales 0 … {n - 1} from their tokens, "
                         f"one block-causal pass (2*batch rows, conditional then unconditional); its presents feed "
                         f"decoder_step's pasts at scale {n}")
    graphs = {
        EARLY_STEP_GRAPH: {**ox.graph_entry(early_graph, [eiface.function(si).to_json() for si in range(n)],
                                            {"inputs": [t.to_json() for t in ins], "outputs": [t.to_json() for t in outs]},
                                            opset, early_notes), "scale_selection": "scale_index_input"},
        PREFILL_GRAPH: {**ox.graph_entry(prefill_graph, [prefill_function(StepInterface(late.config, "onnx"), n).to_json()],
                                         None, opset, prefill_notes), "scale_selection": None},
    }
    return graphs, generation_fields(early, early_ref, n)


def generation_fields(early: Model, early_ref: str, n: int) -> dict[str, Any]:
    """The manifest's `generation` fields of a split (ONNX and Core ML alike)."""
    return {"split_scale": n, "early_graph": EARLY_STEP_GRAPH, "prefill_graph": PREFILL_GRAPH,
            "early_model": {"ref": early_ref, "var": early.config.to_dict()["var"]}}
