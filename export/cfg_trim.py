"""CFG trimming in an exported artifact: `evar-export onnx --cfg-until-scale N`.

Scales < N run the ordinary step graph (2B rows: conditional, then unconditional); from scale N on the
guidance is held off and only the conditional rows run, in a second graph `decoder_step_unguided`
(`DynamicStep(guided=False)`: B rows, a B-row KV cache, no cfg input). At scale N the runtime keeps rows
[0, B) of every cached key/value, exactly as `Decoder.step` does in PyTorch (`DecodeState.drop_unconditional`),
so the tokens equal `generate(..., cfg_until_scale=N)`. The late scales hold most of the tokens, so the
transformer's work there halves. The manifest states it in `generation`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evar.checkpoints import Model
from evar.contract import UNGUIDED_STEP_GRAPH
from evar.contract.recipe import Recipe
from evar.export import parity as pt
from evar.export.graphs import DynamicStep
from evar.export.interface import StepInterface
from evar.models.decoding import generate
from evar.models.sampling import apply_cfg, cfg_ratio


@dataclass(frozen=True)
class TrimmedPipeline:
    """Drives the guided graph for scales < n and the unguided one from n, through the manifest interfaces."""

    guided: StepInterface
    unguided: StepInterface
    n: int

    def drive(self, steps: tuple[pt.StepFn, pt.StepFn], labels: np.ndarray, seed: int, cfg: float,
              teacher: pt.Run | None = None) -> pt.Run:
        c = self.guided.var
        B = len(labels)
        f_hat = np.zeros((B, c.cvae, c.patch_nums[-1], c.patch_nums[-1]), np.float32)
        kv: dict[str, np.ndarray] = {}
        run = pt.Run([], [])
        recipe = Recipe(c.num_scales, cfg_until_scale=self.n)
        for si in range(c.num_scales):
            trimmed = recipe.role(si) == UNGUIDED_STEP_GRAPH
            iface = self.unguided if trimmed else self.guided
            if recipe.trims_at(si):
                kv = {name: value[:B] for name, value in kv.items()}  # the conditional rows' cache
            feeds = teacher.inputs[si] if teacher else pt.scale_feeds(iface, si, labels, f_hat, seed, cfg, kv)
            out = steps[trimmed](si, feeds)
            run.inputs.append(feeds)
            run.outputs.append(out)
            f_hat, kv = out["next_f_hat"], pt.next_kv(iface, si, out)
        return run


def pipeline(model: Model, n: int) -> TrimmedPipeline:
    return TrimmedPipeline(StepInterface(model.config, "onnx"), StepInterface(model.config, "onnx", guided=False), n)


@torch.no_grad()
def reference(model: Model, labels: np.ndarray, seed: int, cfg: float, top_k: int, top_p: float, n: int) -> pt.Reference:
    """`generate` with CFG trimming; logits as the graphs output them (guided where guidance ran)."""
    S, B = model.config.var.num_scales, len(labels)
    gen = generate(model.var, model.vqvae, torch.from_numpy(labels.astype(np.int64)), guidance=cfg, top_k=top_k,
                   top_p=top_p, seed=seed, keep_logits=True, cfg_until_scale=n)
    logits = [apply_cfg(lg[:B], lg[B:], cfg_ratio(cfg, si, S)).numpy() if len(lg) == 2 * B else lg.numpy()
              for si, lg in enumerate(gen.scale_logits)]
    f_hat = model.vqvae.idx_to_fhat(gen.tokens)
    return pt.Reference(labels, [t.numpy() for t in gen.tokens], logits, f_hat.numpy(), gen.images.numpy())


def trimmed_parity(report: pt.ParityReport, model: Model, root: Path, guided_file: str, unguided_file: str,
                   decoder_file: str, top_k: int, top_p: float, n: int, batch: int = 3) -> None:
    """Wrappers and ONNX graphs, free-running through the trimmed pipeline, against `generate(cfg_until_scale=n)`:
    identical tokens, logits and image within the fp32 tolerances."""
    from evar.export import onnx as ox

    pipe = pipeline(model, n)
    labels = pt.parity_labels(batch, model.config.var.num_classes)
    ref = reference(model, labels, pt.PARITY_SEED, pt.PARITY_CFG, top_k, top_p, n)
    wrappers = (pt.torch_step(DynamicStep(model, top_k=top_k, top_p=top_p).eval(), pipe.guided),
                pt.torch_step(DynamicStep(model, top_k=top_k, top_p=top_p, guided=False).eval(), pipe.unguided))
    expected = pipe.drive(wrappers, labels, pt.PARITY_SEED, pt.PARITY_CFG)
    pt.check_against_reference(report, f"cfg trimmed at {n}: wrappers vs generate", ref, expected, pt.LOGITS_TOL,
                               None, pt.IMAGE_TOL, sampling=(top_k, top_p))
    sessions = [ox.session(root / f) for f in (guided_file, unguided_file)]
    dec = ox.session(root / decoder_file)
    steps = tuple(pt.session_step(s) for s in sessions)
    got = pipe.drive(steps, labels, pt.PARITY_SEED, pt.PARITY_CFG)
    pt.check_against_reference(report, f"cfg trimmed at {n}: onnx vs generate (end to end)", ref, got, pt.LOGITS_TOL,
                               lambda f: dec.run(None, {"f_hat": f.astype(np.float32)})[0], pt.IMAGE_TOL,
                               sampling=(top_k, top_p))

