"""Late-scale token pruning in an exported artifact: `evar-export onnx --token-keep 4:0.6,5:0.4`.

The ordinary step graph runs the scales before the cache scale (the scale before the first pruned one); from the
cache scale on a second graph, `decoder_step_pruned` (`PrunedStep`), runs every scale: it takes the static keep
count K of its scale (`keep_count`, pn² where nothing is pruned) and the previous scale's update map
(`cached_hidden`: final hidden − input embedding per token; zeros at the cache scale itself), runs the transformer
on the K selected tokens only and returns this scale's update map (`hidden`: the next scale's `cached_hidden`). A pruned scale appends K, not pn², entries
to the KV cache, so every later scale's past is shorter: the manifest's per-scale function entries state each
static shape. What is selected and restored: `evar.models.token_keep`. Parity: tokens identical to
`generate(..., token_keep=counts)` at fp32.

With CFG trimming (`--cfg-until-scale N`) in the same artifact, the pruned scales from N on run a third graph,
`decoder_step_pruned_unguided` (`PrunedStep(guided=False)`: B rows everywhere, no cfg input), and the scales
between N and the cache scale (when N is before it) the ordinary unguided graph; at N the runtime keeps rows [0, B)
of the KV cache and of the carried update map. `evar.contract.recipe.Recipe.role` says which graph runs which
scale; the parity is `generate(..., cfg_until_scale=N, token_keep=counts)`, whatever the order of N and the cache
scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from evar.checkpoints import Model
from evar.contract import PRUNED_STEP_GRAPH, PRUNED_UNGUIDED_STEP_GRAPH, STEP_GRAPH, UNGUIDED_STEP_GRAPH
from evar.contract.recipe import Recipe
from evar.errors import EvarError
from evar.export import onnx as ox
from evar.export import parity as pt
from evar.export.graphs import DynamicStep, GatheredOps
from evar.export.interface import BATCH, CFG_BATCH, SEQ, FunctionSpec, StepInterface, TensorSpec
from evar.models.decoding import cfg_labels, generate
from evar.models.sampling import apply_cfg, cfg_ratio
from evar.models.token_keep import KeepOps, cache_scale, decode_pruned_scale, keep_counts, parse_token_keep

PREVIOUS = "previous_length"


@dataclass(frozen=True)
class KeepPlan:
    ratios: dict[int, float]
    counts: dict[int, int]
    cache_si: int

    def keep(self, si: int, n: int) -> int:
        return self.counts.get(si, n)


def plan(text: str | None, model: Model) -> KeepPlan | None:
    ratios = parse_token_keep(text, model.config.var.patch_nums)
    if not ratios:
        return None
    counts = keep_counts(ratios, model.config.var.patch_nums)
    return KeepPlan(ratios, counts, cache_scale(counts))


def check_combination(keep: KeepPlan | None, cfg_until_scale: int | None, split_scale: int | None) -> None:
    if keep is not None and split_scale is not None:
        raise EvarError("--token-keep does not combine with --split-scale in one export yet: export them separately")


def recipe(model: Model, keep: KeepPlan, cfg_until_scale: int | None) -> Recipe:
    return Recipe(model.config.var.num_scales, cfg_until_scale=cfg_until_scale, cache_scale=keep.cache_si)


class PrunedStep(nn.Module):
    """(labels, f_hat, uniforms, cfg, scale_index, keep_count, cached_hidden, *past)
    → (logits, idx, next_f_hat, hidden, *present). `guided=False` (the pruned scales of CFG trimming): the
    conditional rows only (B rows in the cache and the update maps too) and no cfg input."""

    def __init__(self, model: Model, cache_si: int, *, top_k: int, top_p: float, guided: bool = True):
        super().__init__()
        c = model.config.var
        self.var, self.ops, self.keep_ops = model.var, GatheredOps(model), KeepOps(model.var, cache_si)
        self.depth, self.num_classes = c.depth, c.num_classes
        self.top_k, self.top_p, self.guided = top_k, top_p, guided

    def forward(self, labels: Tensor, f_hat: Tensor, uniforms: Tensor, *rest: Tensor):
        if self.guided:
            cfg, (scale_index, keep_count, cached_hidden), past_flat = rest[0], rest[1:4], rest[4:]
            cond_BD = self.var.class_emb(cfg_labels(labels, self.num_classes))
        else:
            cfg, (scale_index, keep_count, cached_hidden), past_flat = 0.0, rest[:3], rest[3:]
            cond_BD = self.var.class_emb(labels)
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.depth)]
        out, full = decode_pruned_scale(self.var, self.ops, self.keep_ops, scale_index, scale_index, cond_BD, f_hat,
                                        uniforms, cfg, past, self.top_k, self.top_p, keep_count[0], cached_hidden,
                                        self.guided)
        return (out.logits, out.idx, out.f_hat, full, *[t for kv in out.presents for t in kv])


@dataclass(frozen=True)
class PrunedInterface:
    """The pruned graph's tensors: the step's, plus keep_count, cached_hidden in and hidden out; pasts as pruned.
    An unguided `step` gives the unguided pruned graph: B rows, no cfg input."""

    step: StepInterface
    keep: KeepPlan

    @property
    def var(self):
        return self.step.var

    def rows(self, batch: int) -> int:
        """The rows of the cache and of the update maps for `batch` images."""
        return 2 * batch if self.step.guided else batch

    def past_length(self, si: int) -> int:
        pns = self.step.var.patch_nums
        return sum(self.keep.keep(s, pns[s] ** 2) for s in range(si))

    def _extra(self, n: Any, n_prev: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
        C, R = self.step.var.embed_dim, self.step.cfg_b
        ins = [TensorSpec("keep_count", (1,), "int64", "keep_count",
                          doc="K: the tokens of this scale the transformer runs on (pn² where nothing is pruned)"),
               TensorSpec("cached_hidden", (R, n_prev, C), "float32", "cached_hidden",
                          doc="the previous scale's `hidden` output (its update map); zeros at the cache scale itself")]
        outs = [TensorSpec("hidden", (R, n, C), "float32", "hidden",
                           doc="this scale's update map: final hidden − input embedding (kept tokens computed, the "
                               "rest restored)")]
        return ins, outs

    def signature(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        ins, outs = self.step.signature()
        e_in, e_out = self._extra(SEQ, PREVIOUS)
        k = len(self.step._fixed_inputs(SEQ))
        return ins[:k] + e_in + ins[k:], outs[:3] + e_out + outs[3:]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        ins, outs = self.signature()
        return {t.name: {a: d for a, d in enumerate(t.shape) if isinstance(d, str)} for t in ins + outs
                if any(isinstance(d, str) for d in t.shape)}

    def function(self, si: int) -> FunctionSpec:
        v = self.step.var
        n, n_prev = v.patch_nums[si] ** 2, v.patch_nums[si - 1] ** 2
        past, K = self.past_length(si), self.keep.keep(si, n)
        e_in, e_out = self._extra(n, n_prev)
        fixed_in, fixed_out = self.step._fixed_inputs(n), self.step._fixed_outputs(n)
        ins = fixed_in + e_in + self.step.kv_inputs(past)
        outs = fixed_out + e_out + self.step.kv_outputs(past + K)
        return FunctionSpec("main", tuple(ins), tuple(outs), (), si, v.patch_nums[si], (past, past + K))

    def example_inputs(self, si: int, batch: int) -> dict[str, np.ndarray]:
        rs = np.random.default_rng(0)
        dims = {BATCH: batch, CFG_BATCH: 2 * batch}
        out = {}
        for t in self.function(si).inputs:
            shape = tuple(int(d) for d in t.concrete(dims).shape)
            if t.role == "labels":
                out[t.name] = rs.integers(0, self.step.var.num_classes, shape)
            elif t.role in ("scale_index",):
                out[t.name] = np.full(shape, si, np.int64)
            elif t.role == "keep_count":
                out[t.name] = np.array([self.keep.keep(si, self.step.var.patch_nums[si] ** 2)], np.int64)
            elif t.role == "uniforms":
                out[t.name] = rs.random(shape).astype(np.float32)
            elif t.role == "cfg":
                out[t.name] = np.array([1.5], np.float32)
            else:
                out[t.name] = (rs.standard_normal(shape) * 0.3).astype(np.float32)
        return out


PRUNED_ROLES = (PRUNED_STEP_GRAPH, PRUNED_UNGUIDED_STEP_GRAPH)


def export_pruned(model: Model, keep: KeepPlan, out: Path, options: ox.OnnxOptions, notes: list[str],
                  role: str = PRUNED_STEP_GRAPH) -> tuple[ox.OnnxGraph, PrunedInterface]:
    """The pruned step graph of `role` (decoder_step_pruned, or its unguided twin) → `out/<role>.onnx`."""
    guided = role == PRUNED_STEP_GRAPH
    iface = PrunedInterface(StepInterface(model.config, "onnx", guided=guided), keep)
    ins, outs = iface.signature()
    si = max(keep.counts)  # trace at a pruned scale: every path (gather, topk, scatter, restore) runs
    example = iface.example_inputs(si, 2)
    args = tuple(torch.from_numpy(example[t.name]) for t in ins)
    raw = out / f".{role}.raw.onnx"
    ox._torch_export(PrunedStep(model, keep.cache_si, top_k=options.top_k, top_p=options.top_p, guided=guided).eval(),
                     args, raw, [t.name for t in ins], [t.name for t in outs], iface.dynamic_axes(), options.opset)
    return ox._postprocess(raw, out / f"{role}.onnx", options, notes), iface


def export_pruned_roles(model: Model, keep: KeepPlan, cfg_until_scale: int | None, out: Path,
                        options: ox.OnnxOptions, notes: dict[str, list[str]]
                        ) -> dict[str, tuple[ox.OnnxGraph, PrunedInterface]]:
    """The pruned graphs the recipe runs (with CFG trimming: the guided one only if a pruned scale comes before
    the trimming scale), by role; `notes[role]` collects each graph's notes."""
    roles = [r for r in recipe(model, keep, cfg_until_scale).roles() if r in PRUNED_ROLES]
    return {r: export_pruned(model, keep, out, options, notes.setdefault(r, []), r) for r in roles}


# ---------------------------------------------------------------- driving it through the interfaces
@dataclass(frozen=True)
class KeepPipeline:
    """Drives each scale through the graph `recipe` names for it, through the manifest interfaces."""

    ifaces: dict[str, StepInterface | PrunedInterface]  # by role
    recipe: Recipe

    def drive(self, steps: dict[str, pt.StepFn], labels: np.ndarray, seed: int, cfg: float,
              teacher: pt.Run | None = None) -> pt.Run:
        c = self.ifaces[STEP_GRAPH].var
        B = len(labels)
        f_hat = np.zeros((B, c.cvae, c.patch_nums[-1], c.patch_nums[-1]), np.float32)
        kv: dict[str, np.ndarray] = {}
        cached: np.ndarray | None = None
        run = pt.Run([], [])
        for si in range(c.num_scales):
            role = self.recipe.role(si)
            iface = self.ifaces[role]
            pruned = isinstance(iface, PrunedInterface)
            if self.recipe.trims_at(si):  # the conditional rows of the cache and of the update map
                kv = {name: value[:B] for name, value in kv.items()}
                cached = cached[:B] if cached is not None else None
            if pruned and si == self.recipe.cache_scale:  # run in full: zeros, every token overwrites them
                cached = np.zeros((iface.rows(B), c.patch_nums[si - 1] ** 2, c.embed_dim), np.float32)
            if teacher is not None:
                feeds = teacher.inputs[si]
            elif pruned:
                feeds = pruned_feeds(iface, si, labels, f_hat, seed, cfg, kv, cached)
            else:
                feeds = pt.scale_feeds(iface, si, labels, f_hat, seed, cfg, kv)
            out = steps[role](si, feeds)
            run.inputs.append(feeds)
            run.outputs.append(out)
            if pruned:
                cached = out["hidden"]
            f_hat, kv = out["next_f_hat"], pt.next_kv(iface.step if pruned else iface, si, out)
        return run


def pruned_feeds(iface: PrunedInterface, si: int, labels: np.ndarray, f_hat: np.ndarray, seed: int, cfg: float,
                 kv: dict[str, np.ndarray], cached: np.ndarray) -> dict[str, np.ndarray]:
    from evar import rng
    from evar.contract import step_feeds

    B, n = len(labels), iface.step.var.patch_nums[si] ** 2
    values = {"labels": labels, "f_hat": f_hat, "uniforms": rng.scale_uniforms(seed, si, B, n),
              "cfg": np.array([cfg]), "scale_index": np.array([si]), "keep_count": np.array([iface.keep.keep(si, n)]),
              "cached_hidden": cached}
    return step_feeds([t.to_json() for t in iface.function(si).inputs], values, kv, lambda t: None)


def pipeline(model: Model, keep: KeepPlan, cfg_until_scale: int | None = None) -> KeepPipeline:
    guided, unguided = StepInterface(model.config, "onnx"), StepInterface(model.config, "onnx", guided=False)
    ifaces = {STEP_GRAPH: guided, UNGUIDED_STEP_GRAPH: unguided, PRUNED_STEP_GRAPH: PrunedInterface(guided, keep),
              PRUNED_UNGUIDED_STEP_GRAPH: PrunedInterface(unguided, keep)}
    return KeepPipeline(ifaces, recipe(model, keep, cfg_until_scale))


@torch.no_grad()
def reference(model: Model, labels: np.ndarray, seed: int, cfg: float, top_k: int, top_p: float,
              keep: KeepPlan, cfg_until_scale: int | None = None) -> pt.Reference:
    S, B = model.config.var.num_scales, len(labels)
    gen = generate(model.var, model.vqvae, torch.from_numpy(labels.astype(np.int64)), guidance=cfg, top_k=top_k,
                   top_p=top_p, seed=seed, keep_logits=True, token_keep=keep.counts, cfg_until_scale=cfg_until_scale)
    logits = [apply_cfg(lg[:B], lg[B:], cfg_ratio(cfg, si, S)).numpy() if len(lg) == 2 * B else lg.numpy()
              for si, lg in enumerate(gen.scale_logits)]
    f_hat = model.vqvae.idx_to_fhat(gen.tokens)
    return pt.Reference(labels, [t.numpy() for t in gen.tokens], logits, f_hat.numpy(), gen.images.numpy())


def _torch_fn(module: nn.Module, fn_of) -> pt.StepFn:
    @torch.no_grad()
    def call(si: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fn = fn_of(si)
        outs = module(*[torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in fn.inputs])
        return {t.name: o.numpy() for t, o in zip(fn.outputs, outs)}

    return call


def wrappers(model: Model, pipe: KeepPipeline, top_k: int, top_p: float) -> dict[str, pt.StepFn]:
    """The PyTorch modules the graphs were exported from, as step functions of the roles the recipe runs."""
    out: dict[str, pt.StepFn] = {}
    for role in pipe.recipe.roles():
        iface = pipe.ifaces[role]
        if isinstance(iface, PrunedInterface):
            module = PrunedStep(model, pipe.recipe.cache_scale, top_k=top_k, top_p=top_p, guided=iface.step.guided)
            out[role] = _torch_fn(module.eval(), iface.function)
        else:
            out[role] = pt.torch_step(DynamicStep(model, top_k=top_k, top_p=top_p, guided=iface.guided).eval(), iface)
    return out


def keep_parity(report: pt.ParityReport, model: Model, root: Path, files: dict[str, str], top_k: int, top_p: float,
                keep: KeepPlan, cfg_until_scale: int | None = None, batch: int = 3) -> None:
    """Wrappers and ONNX graphs (`files`: role → file, and "decoder"), free-running with token pruning (and CFG
    trimming from `cfg_until_scale`), against `generate(token_keep=counts, cfg_until_scale=...)`."""
    pipe = pipeline(model, keep, cfg_until_scale)
    labels = pt.parity_labels(batch, model.config.var.num_classes)
    ref = reference(model, labels, pt.PARITY_SEED, pt.PARITY_CFG, top_k, top_p, keep, cfg_until_scale)
    label = "token keep " + ",".join(f"{si}:{k}" for si, k in keep.counts.items())
    if cfg_until_scale is not None:
        label += f", cfg trimmed at {cfg_until_scale}"
    expected = pipe.drive(wrappers(model, pipe, top_k, top_p), labels, pt.PARITY_SEED, pt.PARITY_CFG)
    pt.check_against_reference(report, f"{label}: wrappers vs generate", ref, expected, pt.LOGITS_TOL, None,
                               pt.IMAGE_TOL, sampling=(top_k, top_p))
    steps = {role: pt.session_step(ox.session(root / files[role])) for role in pipe.recipe.roles()}
    dec = ox.session(root / files["decoder"])
    got = pipe.drive(steps, labels, pt.PARITY_SEED, pt.PARITY_CFG)
    pt.check_against_reference(report, f"{label}: onnx vs generate (end to end)", ref, got, pt.LOGITS_TOL,
                               lambda f: dec.run(None, {"f_hat": f.astype(np.float32)})[0], pt.IMAGE_TOL,
                               sampling=(top_k, top_p))


def gate_driver(model: Model, keep: KeepPlan, roles: list[str], cfg_until_scale: int | None = None):
    """drive(step_fns, labels, seed, teacher) for the int8 gate over the graphs of `roles`, in that order."""
    pipe = pipeline(model, keep, cfg_until_scale)
    return lambda fns, labels, seed, teacher: pipe.drive(dict(zip(roles, fns)), labels, seed, pt.PARITY_CFG,
                                                         teacher=teacher)


def manifest_parts(model: Model, keep: KeepPlan, pruned: dict[str, tuple[ox.OnnxGraph, PrunedInterface]],
                   cfg_until_scale: int | None, opset: int, notes: dict[str, list[str]]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """→ (the pruned graphs' manifest entries by role, the manifest's `generation` fields of token pruning)."""
    S, n = model.config.var.num_scales, cfg_until_scale
    plan_ = recipe(model, keep, n)
    counts = ", ".join(f"scale {si}: {k}" for si, k in keep.counts.items())
    entries = {}
    for role, (graph, iface) in pruned.items():
        scales = [si for si in range(S) if plan_.role(si) == role]
        rows = "the conditional and unconditional rows" if iface.step.guided else \
            f"the conditional rows only (B rows, no cfg input; at scale {n} keep rows [0, B) of the KV cache and of " \
            "`cached_hidden`)"
        notes[role].append(f"token pruning: scales {scales[0]} … {scales[-1]} run this graph on {rows} with keep_count "
                           f"K per scale ({counts}; pn² elsewhere); the transformer runs on K tokens, the others keep "
                           f"their input embedding plus the previous scale's update map upsampled; feed each scale's "
                           f"`hidden` output as the next scale's `cached_hidden` (zeros at scale {keep.cache_si})")
        ins, outs = iface.signature()
        entries[role] = {**ox.graph_entry(graph, [iface.function(si).to_json() for si in scales],
                                          {"inputs": [t.to_json() for t in ins], "outputs": [t.to_json() for t in outs]},
                                          opset, notes[role]), "scale_selection": "scale_index_input"}
    generation = {"token_keep": {str(si): r for si, r in keep.ratios.items()},
                  "token_keep_counts": {str(si): k for si, k in keep.counts.items()},
                  "cache_scale": keep.cache_si}
    for role, key in ((PRUNED_STEP_GRAPH, "pruned_graph"), (PRUNED_UNGUIDED_STEP_GRAPH, "pruned_unguided_graph")):
        if role in pruned:
            generation[key] = role
    return entries, generation
